"""calm.progress: bars written to a file or pipe redraw rarely, postfix updates included."""

import io

from calm.progress import _LogBar, bar


def test_bar_to_a_file_redraws_at_most_at_start_and_end():
    out = io.StringIO()
    b = bar(total=2000, file=out, desc="train")
    assert isinstance(b, _LogBar)
    for i in range(2000):
        b.update(1)
        b.set_postfix(loss=f"{1 / (i + 1):.4f}", lr="1e-3")
    b.close()
    text = out.getvalue()
    # A redraw per update would write 2000+ carriage returns; we allow start, one timed, end.
    assert text.count("\r") <= 4, text.count("\r")
    assert "2000/2000" in text and "loss=" in text


def test_bar_to_a_terminal_is_plain_tqdm():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    b = bar(range(3), file=Terminal())
    assert not isinstance(b, _LogBar)
    assert list(b) == [0, 1, 2]
