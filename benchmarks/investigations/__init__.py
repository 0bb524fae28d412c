"""One-off measurements behind paragraphs of docs/benchmarks.md and docs/tokenizers.md.

Each runs as `python -m benchmarks.investigations.NAME` from the checkout's root; its docstring
gives the options and what it prints.
"""
