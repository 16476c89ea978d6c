"""Incremental detokenization never splits a UTF-8 character and loses nothing."""

from __future__ import annotations

from pathlib import Path

from edged.llm.tokenizer import ChatTokenizer, IncrementalDecoder, Message


def test_streamed_text_equals_the_whole_decode_and_has_no_broken_characters(tiny: Path) -> None:
    tok = ChatTokenizer(tiny)
    text = "Grüße aus München! 東京は日本の首都です。 🍅🌞 and a tail"
    ids = tok.encode(text)
    assert len(ids) > len(text.split()), "multi-byte characters must span several byte-level tokens here"
    decoder = IncrementalDecoder(tok)
    deltas = [decoder.push(i) for i in ids]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_chat_template_renders_specials_as_single_tokens(tiny: Path) -> None:
    tok = ChatTokenizer(tiny)
    prompt = tok.render([Message("system", "Be brief."), Message("user", "Hi")])
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok.encode(prompt)
    assert ids.count(tok.token_id("<|im_start|>")) == 3
    assert ids.count(tok.token_id("<|im_end|>")) == 2
