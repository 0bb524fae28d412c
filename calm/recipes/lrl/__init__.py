"""The low-resource-language experiment of the CALM paper (section 4.1, Tables 2 and 5) on real
pretrained models.

    models.py      mB and the base of mA (converted GGUF checkpoints), mA once built
    data.py        mA's corpus (train-side low-resource text) and D_C (`paper`, `parallel`)
    evaluation.py  the tasks every row is scored on per language, the floors, per-example values
    reproduce.py   mA's build and the rows (`calm reproduce lrl`), through `calm.recipes.runner`
    report.py      results.md beside the paper's Tables 2 and 5, and results.png

docs/lrl.md describes the experiment, its budget and what limits it.
"""
