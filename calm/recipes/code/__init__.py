"""The code experiment of the CALM paper (section 4.2, Tables 4 and 5) on real pretrained models.

    models.py      mB, mA and vanilla mA (converted GGUF checkpoints), random mA, the LoRA model
    data.py        D_C: train-side standard-library Python, as plain-text records
    evaluation.py  the five tasks every row is scored on, and their per-example values
    reproduce.py   the rows (`calm reproduce code`), run through `calm.recipes.runner.Runner`
    report.py      results.md beside the paper's Table 4, and results.png

docs/code.md describes the experiment, its budget and what limits it.
"""
