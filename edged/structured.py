"""Structured answers: a ``format`` (``"json"`` or a JSON schema) enforced while decoding, with llguidance.

``compile_format(format, tokenizer, max_tokens)`` compiles the format once and returns a factory of logits
hooks (``edged.llm.LogitsHook``), one per sequence: each hook masks every token that cannot continue a valid
document and is complete once the document is, so the answer ends there. A format llguidance cannot
compile raises ``InvalidRequest`` with its reason, never an unconstrained answer.

    hooks = compile_format({"type": "object", ...}, engine.tokenizer, 256)  # InvalidRequest: cannot compile
    engine.generate(GenerationRequest(messages, max_tokens=256, logits_hook=hooks))  # validates against it

A small model can ramble inside a document (a string, an object that gains keys) until its token budget is
spent, and a cut document is no document. Near the end of ``max_tokens`` the hook therefore steers to the
way out: within a string only tokens that close it, outside one only tokens that close an object or array,
whenever the grammar allows them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import llguidance
import numpy as np
import numpy.typing as npt

from edged.errors import Internal, InvalidRequest
from edged.llm import LogitsHook
from edged.llm.tokenizer import ChatTokenizer

# The separators the model writes itself ('{"a": 1, "b": 2}'); no other whitespace, so a small model cannot
# stall the answer in an endless run of spaces or newlines between tokens of the document.
_JSON_OPTIONS: Any = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
_MAX_SCHEMA_BYTES = 16_384


def compile_format(format: object, tokenizer: ChatTokenizer, max_tokens: int | None = None) -> Callable[[], LogitsHook]:
    """A factory of per-sequence hooks for ``format``: ``"json"`` (a JSON object, as Ollama's ``format: json``,
    OpenAI's ``json_object`` and llama.cpp's JSON grammar mean it) or a JSON schema object.

    ``max_tokens``: the answer's token budget, whose last tokens steer the document to its end (None: never).
    Raises InvalidRequest, with llguidance's reason, for anything else or a schema it cannot compile.
    The compiled grammar is shared by the hooks (and cached per schema); each hook has its own matcher.
    """
    if format == "json":
        schema = '{"type": "object"}'
    elif isinstance(format, dict):
        schema = json.dumps(format, ensure_ascii=False)  # key order kept: the model writes properties in it
    else:
        raise InvalidRequest('format must be "json" or a JSON schema object')
    if len(schema.encode()) > _MAX_SCHEMA_BYTES:
        raise InvalidRequest(f"the format's schema is over {_MAX_SCHEMA_BYTES} bytes")
    prototype = _matcher(tokenizer, schema)
    # The budget's last quarter (8 to 32 tokens, at most half of it) steers to the end: enough to finish a
    # value and write a few required keys.
    closing_at = None if max_tokens is None else max_tokens - min(32, max(8, max_tokens // 4), max_tokens // 2)
    return functools.partial(_Constraint, prototype, _token_table(tokenizer), closing_at)


class _Constraint:
    """One sequence's matcher: the mask of tokens that keep the document valid, advanced token by token."""

    def __init__(self, prototype: llguidance.LLMatcher, table: _TokenTable, closing_at: int | None) -> None:
        self._matcher = prototype.deep_copy()
        self._table = table
        self._closing_at = closing_at
        self._bits = np.zeros((table.vocab_size + 31) // 32, dtype=np.int32)
        self._tokens = 0
        self._in_string = False
        self._escaped = False

    def allowed(self) -> npt.NDArray[np.bool_]:
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little", count=self._table.vocab_size)
        mask = bits.view(np.bool_)
        if self._closing_at is not None and self._tokens >= self._closing_at and not self._escaped:
            way_out = mask & (self._table.closes_string if self._in_string else self._table.closes_container)
            if way_out.any():
                return way_out
        return mask

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise Internal(f"the structured-answer matcher refused token {token}: {self._matcher.get_error()}")
        self._tokens += 1
        for char in self._table.texts[token]:  # where the document stands: inside a string or not
            if self._escaped:
                self._escaped = False
            elif self._in_string and char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = not self._in_string

    @property
    def complete(self) -> bool:
        """True once the document is whole and nothing may follow it (a top-level number may go on: the
        mask then allows end of turn, which ends the answer too)."""
        return bool(self._matcher.is_stopped())


class _TokenTable:
    """llguidance's view of one tokenizer and each token's text (about 0.3 s to build for SmolLM2's 49,152
    tokens): built once per model."""

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        eos = tokenizer.token_id(tokenizer.eos_token) if tokenizer.eos_token else None
        self.vocab_size = tokenizer.vocab_size
        self.ll = llguidance.LLTokenizer(tokenizer.path.read_text(), n_vocab=self.vocab_size, eos_token=eos)
        self.texts = [self.ll.decode_str([i]) for i in range(self.vocab_size)]
        # A way out of a string is a quote followed by nothing but closing brackets ('"', '"}', '"]}'), never
        # '",' which opens another member; a way out of a container starts with its closing bracket.
        self.closes_string = np.array([_only_closing(t[1:]) for t in self.texts], dtype=np.bool_)
        self.closes_string &= np.array([t.startswith('"') for t in self.texts], dtype=np.bool_)
        self.closes_container = np.array([t.lstrip(" ")[:1] in ("}", "]") for t in self.texts], dtype=np.bool_)


def _only_closing(text: str) -> bool:
    return not text.strip(" }]")


@functools.lru_cache(maxsize=64)
def _matcher(tokenizer: ChatTokenizer, schema: str) -> llguidance.LLMatcher:
    """The compiled schema as a matcher in its start state, the prototype every hook copies."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    except ValueError as exc:
        raise InvalidRequest(f"the format's schema cannot be compiled: {exc}") from exc
    matcher = llguidance.LLMatcher(_token_table(tokenizer).ll, grammar, log_level=0)
    if matcher.is_error():
        raise InvalidRequest(f"the format's schema cannot be compiled: {matcher.get_error()}")
    return matcher


@functools.lru_cache(maxsize=4)
def _token_table(tokenizer: ChatTokenizer) -> _TokenTable:
    return _TokenTable(tokenizer)
