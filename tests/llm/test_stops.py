"""Stop strings: the answer ends before the stop text, and no part of it is ever streamed."""

from __future__ import annotations

import pytest

from edged.llm.engine import StopMatcher


@pytest.mark.parametrize(
    ("stops", "deltas", "emitted", "stopped"),
    [
        ((), ["Hel", "lo"], "Hello", False),
        (("\n\n",), ["One.", "\n", "\nTwo."], "One.", True),
        (("END",), ["abc E", "N", "D tail"], "abc ", True),
        (("END",), ["abc E", "N", "o"], "abc ENo", False),  # a partial match is released, not lost
        (("stop", "halt"), ["we ha", "lt now"], "we ", True),
        (("ab",), ["xa", "b"], "x", True),
        (("word",), ["a w", "or"], "a wor", False),  # flushed when generation ends
    ],
)
def test_stop_matcher(stops: tuple[str, ...], deltas: list[str], emitted: str, stopped: bool) -> None:
    m = StopMatcher(stops)
    out = "".join(m.feed(d) for d in deltas if not m.stopped) + m.flush()
    assert out == emitted
    assert m.stopped is stopped


def test_held_back_text_is_never_emitted_early() -> None:
    m = StopMatcher(("</answer>",))
    assert m.feed("42 </ans") == "42 "
    assert m.feed("wer>") == ""
    assert m.stopped
