"""What the tests of the real-model recipes (code, lrl) share: a tiny English Bible, and
counting (or refusing) the recipe's calls of `calm.train` and `calm.evaluate`."""

from __future__ import annotations

import calm

BSB_HEADER = (
    "id\tsource_verse\ttext\tskip_space_after\texclude\tid_range_end\tsource_verse_range_end\n"
)


def tiny_bible(root):
    """The BSB layout with 120 chapters of two 7-word verses (text-bpb, the English side)."""
    (root / "english").mkdir(parents=True)
    rows = [BSB_HEADER]
    for c in range(1, 121):
        for v in (1, 2):
            words = ["These", "are", "the", "words", "of", f"chapter{c}", f"verse{v}."]
            rows += [f"01{c:03d}{v:03d}{w + 1:03d}\tx\t{t}\t\t\t\t\n" for w, t in enumerate(words)]
    (root / "english" / "ot_BSB.tsv").write_text("".join(rows))
    return root


class Counting:
    """Wraps a function, counting its calls (or refusing them)."""

    def __init__(self, fn, refuse=False):
        self.fn, self.refuse, self.calls = fn, refuse, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.refuse:
            raise AssertionError("a finished row was computed again")
        return self.fn(*args, **kwargs)


def run_counting(run, cfg, models, data, monkeypatch, refuse=False):
    """`run(cfg, ...)` (a recipe's run function) on the given models and data: its results and
    how many times it called `calm.train` and `calm.evaluate` (refused when `refuse`)."""
    train = Counting(calm.train, refuse)
    evaluate = Counting(calm.evaluate, refuse)
    monkeypatch.setattr(calm, "train", train)
    monkeypatch.setattr(calm, "evaluate", evaluate)
    results = run(cfg, load=lambda _: models, data=data, log=lambda _: None)
    monkeypatch.undo()
    return results, train.calls, evaluate.calls
