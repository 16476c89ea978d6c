"""Generation: one request's state as a ``Sequence``, several decoded together in a ``Batch``, recent
prompt prefixes kept in a ``PrefixCache``; ``Engine.generate`` runs one request alone as an iterator."""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edged.errors import InvalidRequest, ModelUnavailable, TooLong
from edged.llm.sampling import Sampler, SamplingParams
from edged.llm.session import DecoderSession, KVBuffer, Logits, release_freed_heap
from edged.llm.tokenizer import ROLES, ChatTokenizer, IncrementalDecoder, Message

MAX_STOP_STRINGS = 8
DEFAULT_CONTEXT_TOKENS = 2048
# Prompt tokens per prefill run: memory for attention and logits grows with the chunk, speed barely does.
# A 1,991-token prompt on SmolLM2-135M int4, 2 threads: chunk 64 peaks at 422 MB RSS, 128 at 490 MB,
# 256 at 590 MB, for about the same time to first token (4.4-5 s); the whole prompt at once took 2 GB, 9.9 s.
PREFILL_CHUNK_TOKENS = 64
# A shared prompt prefix shorter than this is not worth keeping (SmolLM2-135M: 46 KB of keys and values
# a token, about 2 ms of prefill each on 2 cores).
MIN_PREFIX_TOKENS = 16


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


class Sequence:
    """One request's generation state: prompt, sampler, detokenizer, stop matcher, logits hook, budgets,
    cancel and finish reason. A ``Batch`` advances it one token at a time; ``result`` is set when it ends.

    ``cancel()`` may be called from any thread: the sequence ends before its next token.
    """

    def __init__(self, engine: Engine, request: GenerationRequest, prompt_ids: list[int]) -> None:
        self.request = request
        self.prompt_ids = prompt_ids
        self.token_ids: list[int] = []  # the answer so far, end of turn excluded
        self.result: GenerationResult | None = None
        self.slot: int | None = None  # where its keys and values live while it runs
        self.prefix_tokens = 0  # prompt tokens taken from the prefix cache
        # The answer may use what the context has left after the prompt.
        self.max_tokens = min(request.max_tokens, engine.context_tokens - len(prompt_ids))
        self._end_ids = engine.end_ids
        self._sampler = Sampler(request.sampling)
        self._decoder = IncrementalDecoder(engine.tokenizer)
        self._stops = StopMatcher(request.stop)
        self._hook = request.logits_hook() if request.logits_hook is not None else None
        self._history = list(prompt_ids)
        self._text: list[str] = []
        self._cancel_reason: str | None = None
        self._cancelled = threading.Event()
        self._started = time.monotonic()
        self._first_token_s: float | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._cancelled.is_set():
            self._cancel_reason = reason
            self._cancelled.set()

    @property
    def cancel_reason(self) -> str | None:
        return self._cancel_reason if self._cancelled.is_set() else None

    @property
    def finished(self) -> bool:
        return self.result is not None

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    def advance(self, logits: Logits) -> str:
        """Chooses the next token from ``logits`` (or ends: cancelled, past the deadline, end of turn, a stop
        string, the hook complete, the budget spent). Returns the text now safe to emit, the tail included
        once the sequence ends."""
        finish = self._check()
        if finish is None:
            token = self._sampler(logits, self._history, self._hook.allowed() if self._hook is not None else None)
            if self._first_token_s is None:
                self._first_token_s = time.monotonic()
            if token in self._end_ids:
                return self._end("stop")
            if self._hook is not None:
                self._hook.accept(token)
            self.token_ids.append(token)
            self._history.append(token)
            piece = self._stops.feed(self._decoder.push(token))
            self._text.append(piece)
            if self._stops.stopped or (self._hook is not None and self._hook.complete):
                return piece + self._end("stop")
            if len(self.token_ids) >= self.max_tokens:
                return piece + self._end("length")
            return piece
        return self._end(finish)

    def end(self, reason: str) -> str:
        """Ends the sequence now (a batch dropped, the worker stopping); returns the held-back tail."""
        return "" if self.finished else self._end(reason)

    def _check(self) -> str | None:
        if self.cancel_reason is not None:
            return self.cancel_reason
        deadline = self.request.deadline_s
        if deadline is not None and time.monotonic() >= deadline:
            return "deadline"
        return None

    def _end(self, finish: str) -> str:
        tail = self._stops.flush()
        self._text.append(tail)
        end = time.monotonic()
        first = self._first_token_s or end
        arrived = self.request.arrived_s
        generated = len(self.token_ids)
        decode_s = end - first
        self.result = GenerationResult(
            text="".join(self._text),
            finish_reason=finish,
            usage=Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=generated),
            timings=Timings(
                queue_ms=round((self._started - arrived) * 1000, 1) if arrived is not None else 0.0,
                ttft_ms=round((first - self._started) * 1000, 1),
                total_ms=round((end - self._started) * 1000, 1),
                tokens_per_s=round((generated - 1) / decode_s, 1) if generated > 1 and decode_s > 0 else 0.0,
            ),
            token_ids=tuple(self.token_ids),
        )
        return tail


class PrefixCache:
    """The keys and values of recent prompt prefixes (a system prompt, a profile's preamble), least recently
    used dropped first, at most ``budget_bytes`` in all. A prompt whose shared prefix is kept is prefilled
    from the end of it."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[int, ...], npt.NDArray[np.floating]] = OrderedDict()

    @property
    def bytes(self) -> int:
        return sum(kv.nbytes for kv in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, prefix: tuple[int, ...]) -> npt.NDArray[np.floating] | None:
        """The keys and values kept for exactly ``prefix``, [tensors, heads, tokens, head_dim], or None."""
        kv = self._entries.get(prefix)
        if kv is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(prefix)
        return kv

    def clear(self) -> None:
        self._entries.clear()

    def keep(self, tokens: tuple[int, ...], kv: npt.NDArray[np.floating]) -> None:
        if kv.nbytes > self.budget_bytes or tokens in self._entries:
            return
        while self._entries and self.bytes + kv.nbytes > self.budget_bytes:
            self._entries.popitem(last=False)
        self._entries[tokens] = kv


class Batch:
    """Up to ``slots`` sequences decoded together: one KV slot each, one engine step for all of them.

    ``add`` prefills a sequence into a free slot (alone: a prefill cannot share a run with decoding rows)
    and chooses its first token; ``step`` chooses the next token of every running sequence in one run of
    the graph. A sequence that ends frees its slot at once. An optimum export holds one slot.
    """

    def __init__(self, engine: Engine, slots: int, capacity: int | None = None) -> None:
        if slots > 1 and not engine.session.batches:
            raise ValueError(f"{engine.name} is an optimum export: it decodes one sequence at a time")
        self.engine = engine
        self._cache = engine.session.new_cache(capacity or engine.context_tokens, slots)
        self._running: list[Sequence | None] = [None] * slots

    @property
    def slots(self) -> int:
        return len(self._running)

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self._running if s is not None]

    @property
    def free(self) -> int:
        return self._running.count(None)

    def add(self, seq: Sequence) -> str:
        """Prefills ``seq`` into the lowest free slot and chooses its first token; returns its first text."""
        if seq.cancel_reason is not None or (
            seq.request.deadline_s is not None and time.monotonic() >= seq.request.deadline_s
        ):
            return seq.advance(np.zeros(0, np.float32))  # ends before any compute
        slot = self._running.index(None)
        seq.slot = slot
        self._running[slot] = seq
        try:
            logits = self._prefill(seq, slot)
            return self._after(seq, seq.advance(logits))
        except BaseException:
            self._running[slot] = None
            raise

    def step(self) -> list[tuple[Sequence, str]]:
        """One token for every running sequence (each may end); returns each one's new text."""
        width = max((i + 1 for i, s in enumerate(self._running) if s is not None), default=0)
        if width == 0:
            return []
        session = self.engine.session
        if isinstance(self._cache, KVBuffer):
            tokens = [s.last_token if s is not None else None for s in self._running[:width]]
            logits = session.step_batch(tokens, self._cache)
        else:  # one sequence
            seq = self._running[0]
            assert seq is not None
            logits = session.step(seq.last_token, self._cache)[None, :]
        out = []
        for i, seq in enumerate(self._running[:width]):
            if seq is not None:
                out.append((seq, self._after(seq, seq.advance(logits[i]))))
        return out

    def end_all(self, reason: str) -> list[tuple[Sequence, str]]:
        """Ends every running sequence with ``reason`` and frees its slot."""
        out = [(s, self._after(s, s.end(reason))) for s in self.running]
        return out

    def _after(self, seq: Sequence, text: str) -> str:
        if seq.finished and seq.slot is not None:
            self._running[seq.slot] = None
        return text

    def _prefill(self, seq: Sequence, slot: int) -> Logits:
        engine, cache, ids = self.engine, self._cache, seq.prompt_ids
        chunk = engine.prefill_chunk_tokens
        if not isinstance(cache, KVBuffer):
            return engine.session.prefill(ids, cache, chunk, slot=slot)
        cache.advance(0, slot)
        # The part other questions share (system prompt, earlier turns) is always prefilled on its own, cache
        # or not: the rest then runs in the same chunks either way, so greedy answers match token for token.
        shared = engine.shared_prefix(seq.request, ids)
        if shared < MIN_PREFIX_TOKENS:
            return engine.session.prefill(ids, cache, chunk, slot=slot)
        prefix = tuple(ids[:shared])
        prefixes = engine.prefix_cache
        kept = prefixes.take(prefix) if prefixes is not None else None
        if kept is not None:
            cache.copy_in(slot, kept)
            seq.prefix_tokens = shared
        else:
            engine.session.prefill(ids[:shared], cache, chunk, slot=slot, shrink=False)
            if prefixes is not None:
                prefixes.keep(prefix, cache.copy_out(slot, shared))
        return engine.session.prefill(ids[shared:], cache, chunk, slot=slot)


class Generation(Iterator[str]):
    """One generation on its own (``ask --local``, bench, eval). Iterate for text deltas; ``result`` is set
    once iteration ends. ``cancel()`` may be called from any thread; the loop stops before the next token."""

    def __init__(self, engine: Engine, request: GenerationRequest, prompt_ids: list[int]) -> None:
        self.pause_s = 0.0  # duty cycling: a pause before each decode step, may change while running
        self._seq = Sequence(engine, request, prompt_ids)
        self._engine = engine
        self._steps = self._run()

    @property
    def token_ids(self) -> list[int]:
        return self._seq.token_ids

    @property
    def result(self) -> GenerationResult | None:
        return self._seq.result

    def __next__(self) -> str:
        return next(self._steps)

    def cancel(self, reason: str = "cancelled") -> None:
        self._seq.cancel(reason)

    def _run(self) -> Iterator[str]:
        seq = self._seq
        batch = Batch(self._engine, 1, len(seq.prompt_ids) + seq.max_tokens)
        text = batch.add(seq)
        while True:
            if text:
                yield text
            if seq.finished:
                return
            if self.pause_s > 0:
                time.sleep(self.pause_s)
            ((_, text),) = batch.step()


# How long the tokenizer's parse waits for the session load to be inside onnxruntime (see _load_beside).
_SESSION_HEAD_START_S = 0.02


def _load_beside(
    session: Callable[[], DecoderSession], tokenizer: Callable[[], ChatTokenizer]
) -> tuple[DecoderSession, ChatTokenizer]:
    """Both, the tokenizer parsed on a thread of its own while the session loads.

    onnxruntime releases the GIL while it initializes a session; the tokenizers library holds it for its
    whole parse (about 90 ms for SmolLM2's 49k-token vocabulary). Started at once, the parse takes the GIL
    before the session load reaches onnxruntime and the two run one after the other; started a moment
    later, it runs inside the session's initialization (SmolLM2 from its prepared copy: 0.26 -> 0.18 s).
    The head start only orders the two: a late one costs the overlap, never the result. The session's
    error is raised first, then the tokenizer's."""
    parsed: list[ChatTokenizer | BaseException] = []

    def parse() -> None:
        time.sleep(_SESSION_HEAD_START_S)
        try:
            parsed.append(tokenizer())
            release_freed_heap()  # what the parse built and freed (SmolLM2: 16 MB), before the session peaks
        except BaseException as exc:  # handed to the loading thread
            parsed.append(exc)

    thread = threading.Thread(target=parse, name="tokenizer-load", daemon=True)
    thread.start()
    try:
        loaded = session()
    finally:
        thread.join()
    if isinstance(parsed[0], BaseException):
        raise parsed[0]
    return loaded, parsed[0]


class Engine:
    """A loaded model: tokenizer, chat template and ONNX decoder. Not thread-safe: one worker owns it."""

    def __init__(
        self,
        model_dir: Path,
        *,
        threads: int | None = None,
        context_tokens: int | None = None,
        prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS,
        prefix_cache_mb: float = 0,
        prepared_dir: Path | None = None,
    ) -> None:
        """``prepared_dir``: where onnxruntime's optimized, prepacked copy of the model is kept between loads
        (the daemon's ``<state_dir>/prepared``); None loads the model file as it is."""
        model_file = model_dir / "model.onnx"
        if not model_file.is_file():
            raise ModelUnavailable(f"no model in {model_dir}; run `edged model build {model_dir.name}` first")
        self.model_dir = model_dir
        self.name = model_dir.name
        self._model_file = model_file
        self._prepared_dir = prepared_dir
        self.session, self.tokenizer = _load_beside(
            lambda: DecoderSession(model_file, threads, prepared_dir), lambda: ChatTokenizer(model_dir)
        )
        config = json.loads((model_dir / "config.json").read_text())
        model_ctx = int(config.get("max_position_embeddings", DEFAULT_CONTEXT_TOKENS))
        self.context_tokens = min(model_ctx, context_tokens or DEFAULT_CONTEXT_TOKENS)
        self.end_ids = self._end_of_turn_ids(model_dir, config)
        self.prefill_chunk_tokens = prefill_chunk_tokens
        # Only edged's own graph reads keys and values from a buffer of ours that a prefix can be copied into.
        self.prefix_cache = (
            PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 and self.session.batches else None
        )

    def set_threads(self, threads: int) -> None:
        """Reloads the session with another thread count (onnxruntime fixes it per session); between requests."""
        if threads != self.session.threads:
            del self.session  # free the old session's memory before the new one allocates
            self.session = DecoderSession(self._model_file, threads, self._prepared_dir)

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

    def shared_prefix(self, request: GenerationRequest, prompt_ids: list[int]) -> int:
        """How many leading tokens of ``prompt_ids`` other questions in the same conversation would share:
        everything before the last message's own text (system prompt, earlier turns, the turn opener),
        found as the common prefix with the same prompt rendered with that text left out."""
        last = request.messages[-1]
        probe = self.tokenizer.encode(self.tokenizer.render((*request.messages[:-1], Message(last.role, ""))))
        n = 0
        for a, b in zip(prompt_ids, probe, strict=False):
            if a != b:
                break
            n += 1
        return min(n, len(prompt_ids) - 1)

    def sequence(self, request: GenerationRequest, prompt_ids: list[int]) -> Sequence:
        """A sequence for a ``Batch`` of this engine, from ``prompt_ids(request)``."""
        return Sequence(self, request, prompt_ids)

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


def _check_text(text: str, what: str) -> None:
    if not isinstance(text, str):
        raise InvalidRequest(f"the {what} must be a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"the {what} is not valid UTF-8 (at character {exc.start})") from exc
