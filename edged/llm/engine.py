"""The generation loop: a request in, an iterator of text deltas out, a result at the end."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edged.errors import InvalidRequest, ModelUnavailable, TooLong
from edged.llm.sampling import Sampler, SamplingParams
from edged.llm.session import DecoderSession
from edged.llm.tokenizer import ROLES, ChatTokenizer, IncrementalDecoder, Message

MAX_STOP_STRINGS = 8
DEFAULT_CONTEXT_TOKENS = 2048
# Prompt tokens per prefill run: memory for attention and logits grows with the chunk, speed barely does.
# A 1,991-token prompt on SmolLM2-135M int4, 2 threads: chunk 64 peaks at 422 MB RSS, 128 at 490 MB,
# 256 at 590 MB, for about the same time to first token (4.4-5 s); the whole prompt at once took 2 GB, 9.9 s.
PREFILL_CHUNK_TOKENS = 64


class LogitsHook(Protocol):
    """One sequence's constraint on its next token (constrained JSON decoding), consulted at every step.

    ``allowed`` is a boolean mask over the tokenizer's vocabulary (None: any token); tokens it does not
    cover (a model's padded vocabulary) are never allowed. ``accept`` records the token chosen. Once
    ``complete`` is true the answer ends with finish reason ``stop``. An end-of-turn token the mask
    allows ends the answer too, and is not passed to ``accept``.
    """

    def allowed(self) -> npt.NDArray[np.bool_] | None: ...

    def accept(self, token: int) -> None: ...

    @property
    def complete(self) -> bool: ...


@dataclass(frozen=True)
class GenerationRequest:
    messages: tuple[Message, ...]
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    arrived_s: float | None = None  # time.monotonic() when the request arrived, for queue_ms
    deadline_s: float | None = None  # time.monotonic() by which generation must end
    logits_hook: Callable[[], LogitsHook] | None = None  # a fresh hook for each sequence run


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Timings:
    queue_ms: float
    ttft_ms: float
    total_ms: float
    tokens_per_s: float


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: str  # stop, length, deadline, cancelled (or a reason given to cancel())
    usage: Usage
    timings: Timings
    token_ids: tuple[int, ...]  # the answer's tokens, end of turn excluded


class StopMatcher:
    """Cuts generated text before the first stop string, holding back text that may begin one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._text = ""
        self._emitted = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Adds ``delta``; returns the text now safe to emit (never any part of a stop string)."""
        self._text += delta
        if not self._stops:
            return self._take(len(self._text))
        search_from = max(0, self._emitted - max(len(s) for s in self._stops) + 1)
        hits = [i for i in (self._text.find(s, search_from) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._take(min(hits))
        return self._take(len(self._text) - self._held_back())

    def flush(self) -> str:
        """The held-back text once generation ended without completing a stop string."""
        return "" if self.stopped else self._take(len(self._text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _take(self, end: int) -> str:
        piece = self._text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return piece


class Generation(Iterator[str]):
    """One running generation. Iterate for text deltas; ``result`` is set once iteration ends.

    ``cancel()`` may be called from any thread; the loop stops before the next token.
    """

    def __init__(self, engine: Engine, request: GenerationRequest, prompt_ids: list[int]) -> None:
        self._cancel_reason: str | None = None
        self._cancelled = threading.Event()
        self.result: GenerationResult | None = None
        self.token_ids: list[int] = []  # grows as tokens are chosen
        self.pause_s = 0.0  # duty cycling: a pause before each decode step, may change while running
        self._steps = engine._run(self, request, prompt_ids)

    def __next__(self) -> str:
        return next(self._steps)

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._cancelled.is_set():
            self._cancel_reason = reason
            self._cancelled.set()

    @property
    def cancel_reason(self) -> str | None:
        return self._cancel_reason if self._cancelled.is_set() else None


class Engine:
    """A loaded model: tokenizer, chat template and ONNX decoder. Not thread-safe: one worker owns it."""

    def __init__(
        self,
        model_dir: Path,
        *,
        threads: int | None = None,
        context_tokens: int | None = None,
        prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS,
    ) -> None:
        model_file = model_dir / "model.onnx"
        if not model_file.is_file():
            raise ModelUnavailable(f"no model in {model_dir}; run `edged model build {model_dir.name}` first")
        self.model_dir = model_dir
        self.name = model_dir.name
        self.tokenizer = ChatTokenizer(model_dir)
        self._model_file = model_file
        self.session = DecoderSession(model_file, threads)
        config = json.loads((model_dir / "config.json").read_text())
        model_ctx = int(config.get("max_position_embeddings", DEFAULT_CONTEXT_TOKENS))
        self.context_tokens = min(model_ctx, context_tokens or DEFAULT_CONTEXT_TOKENS)
        self.end_ids = self._end_of_turn_ids(model_dir, config)
        self.prefill_chunk_tokens = prefill_chunk_tokens

    def set_threads(self, threads: int) -> None:
        """Reloads the session with another thread count (onnxruntime fixes it per session); between requests."""
        if threads != self.session.threads:
            del self.session  # free the old session's memory before the new one allocates
            self.session = DecoderSession(self._model_file, threads)

    def _end_of_turn_ids(self, model_dir: Path, config: dict[str, object]) -> frozenset[int]:
        ids: set[int] = set()
        gen_path = model_dir / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        for source in (gen.get("eos_token_id"), config.get("eos_token_id")):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list):
                ids.update(int(i) for i in source)
        eos = self.tokenizer.token_id(self.tokenizer.eos_token) if self.tokenizer.eos_token else None
        if eos is not None:
            ids.add(eos)
        return frozenset(ids)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """Validates the request and renders its prompt; raises InvalidRequest or TooLong."""
        if not request.messages:
            raise InvalidRequest("the request has no messages; send a non-empty prompt")
        for m in request.messages:
            if m.role not in ROLES:
                raise InvalidRequest(f"unknown chat role {m.role!r}; use one of {', '.join(ROLES)}")
            _check_text(m.content, f"{m.role} message")
        if not any(m.role == "user" and m.content.strip() for m in request.messages):
            raise InvalidRequest("the prompt is empty; send a question or instruction")
        if request.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {request.max_tokens}")
        if len(request.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(request.stop)}")
        for s in request.stop:
            _check_text(s, "stop string")
        ids = self.tokenizer.encode(self.tokenizer.render(request.messages))
        if len(ids) >= self.context_tokens:
            raise TooLong(
                f"the prompt is {len(ids)} tokens; this model's context budget is {self.context_tokens} "
                "(prompt plus answer): shorten the prompt or the conversation"
            )
        return ids

    def generate(self, request: GenerationRequest, prompt_ids: list[int] | None = None) -> Generation:
        """Starts a generation; validation errors are raised here, before any compute.

        ``prompt_ids`` from an earlier ``prompt_ids(request)`` saves rendering the prompt twice.
        """
        return Generation(self, request, prompt_ids if prompt_ids is not None else self.prompt_ids(request))

    def complete(self, request: GenerationRequest) -> GenerationResult:
        """Runs a generation to its end."""
        generation = self.generate(request)
        for _ in generation:
            pass
        assert generation.result is not None
        return generation.result

    def _run(self, gen: Generation, request: GenerationRequest, prompt_ids: list[int]) -> Iterator[str]:
        start = time.monotonic()
        queue_ms = (start - request.arrived_s) * 1000 if request.arrived_s is not None else 0.0
        # The answer may use what the context has left after the prompt.
        max_tokens = min(request.max_tokens, self.context_tokens - len(prompt_ids))
        sampler = Sampler(request.sampling)
        decoder = IncrementalDecoder(self.tokenizer)
        stops = StopMatcher(request.stop)
        hook = request.logits_hook() if request.logits_hook is not None else None
        history = list(prompt_ids)
        answer = gen.token_ids
        first_token_s: float | None = None
        text_parts: list[str] = []
        finish = "length"

        cache = self.session.new_cache(len(prompt_ids) + max_tokens)
        logits = self.session.prefill(prompt_ids, cache, self.prefill_chunk_tokens)
        while True:
            if gen.cancel_reason is not None:
                finish = gen.cancel_reason
                break
            if request.deadline_s is not None and time.monotonic() >= request.deadline_s:
                finish = "deadline"
                break
            token = sampler(logits, history, hook.allowed() if hook is not None else None)
            if first_token_s is None:
                first_token_s = time.monotonic()
            if token in self.end_ids:
                finish = "stop"
                break
            if hook is not None:
                hook.accept(token)
            answer.append(token)
            history.append(token)
            piece = stops.feed(decoder.push(token))
            if piece:
                text_parts.append(piece)
                yield piece
            if stops.stopped or (hook is not None and hook.complete):
                finish = "stop"
                break
            if len(answer) >= max_tokens:
                break
            if gen.pause_s > 0:
                time.sleep(gen.pause_s)
            logits = self.session.step(token, cache)

        tail = stops.flush()
        if tail:
            text_parts.append(tail)
            yield tail
        end = time.monotonic()
        ttft_s = (first_token_s or end) - start
        decode_s = end - (first_token_s or end)
        generated = len(answer)
        gen.result = GenerationResult(
            text="".join(text_parts),
            finish_reason=finish,
            usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=generated),
            timings=Timings(
                queue_ms=round(queue_ms, 1),
                ttft_ms=round(ttft_s * 1000, 1),
                total_ms=round((end - start) * 1000, 1),
                tokens_per_s=round((generated - 1) / decode_s, 1) if generated > 1 and decode_s > 0 else 0.0,
            ),
            token_ids=tuple(answer),
        )


def _check_text(text: str, what: str) -> None:
    if not isinstance(text, str):
        raise InvalidRequest(f"the {what} must be a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"the {what} is not valid UTF-8 (at character {exc.start})") from exc
