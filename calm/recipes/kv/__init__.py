"""The key-value arithmetic experiment of the CALM paper (section 4.1, Table 1), as a recipe.

    bases.py         the base models' tokenizer and shape; loading the shipped ones (assets/)
    pretrain.py      training a base model from scratch (`calm pretrain kv`)
    data.py          D_C, the composition's training data
    reproduce.py     the experiment (`calm reproduce kv`): every row trains through `calm.train`
                     and is scored through `calm.evaluate` on the registered `kv` task
    report.py        results.md and results.png
    memorization.py  a probe: held-out vs D_C-key KV-SUBS along training

The task itself (the map, the data sets, the scoring) is `calm.tasks.kv`. docs/kv.md describes
the experiment and its results.
"""
