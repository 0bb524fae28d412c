"""What is measured, not asserted: CALM against its plain-torch bound and against calm-pytorch.

    python -m benchmarks [--quick] [--out DIR] [--threads N] [--device cuda] [--dtype bfloat16]
                         [--configs mid,large]        # the benchmark, run.py (docs/benchmarks.md)
    python -m benchmarks.investigations.NAME [...]    # one-off measurements quoted in the docs

Run from the checkout's root (the package is not installed with `calm`). run.py is the benchmark
and its report; measure.py says how things are timed and weighed; reference.py is the bound (the
least work the method needs, in plain torch); peers.py runs calm-pytorch on the same models.
investigations/ holds the studies behind single paragraphs of the docs (the generation gap,
A/B runs of core changes, the cost of two tokenizers); they import the parts above.
"""
