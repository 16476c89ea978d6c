"""The peers ``edged bench`` measures edged against, each run alone in a fresh process.

``python -m edged.peers SPEC.json OUT.json`` loads one peer (edged's engine, llama.cpp through
llama-cpp-python on the recipe's GGUF, or optimum's ``ORTModelForCausalLM``), runs a fixed workload of
token ids and writes what it measured. The parent (``spawn``) times the process and counts the CPU time
other processes took from the cores meanwhile, so a ratio from a busy machine can be seen for what it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

EDGED, LLAMA_CPP, OPTIMUM = "edged", "llama.cpp", "optimum"
PEERS = (EDGED, LLAMA_CPP, OPTIMUM)
# How to get a peer that is missing; the bench prints it instead of a number.
INSTALL = {
    LLAMA_CPP: "run `make peers` (llama-cpp-python==0.3.36 built for this CPU, 5-10 minutes)",
    OPTIMUM: "pip install -e '.[build]' (optimum-onnx, as `edged model build` uses)",
}


@dataclass(frozen=True)
class Prompt:
    """One bench prompt three ways: the conversation, its chat-templated text and edged's token ids for it."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    text: str
    ids: list[int]


# A schema whose document is mostly free text, so a constrained answer is as long as a free one.
GUIDE_SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "guide": {"type": "string"}},
    "required": ["title", "guide"],
}


@dataclass(frozen=True)
class Stream:
    """One generation: the answer's token ids and when each arrived (seconds after the call)."""

    token_ids: list[int]
    stamps_s: list[float]
    ttft_ms: float
    decode_tok_s: float


class Runner(Protocol):
    # Whether a second prompt sharing a prefix with the first reuses its KV cache.
    prefix_cache: bool
    # Whether concurrent requests run as one batch (else one after another).
    batches: bool

    def stream(self, prompt: Prompt, max_tokens: int, *, keep_prefix: bool = False) -> Stream: ...

    def batch(self, prompt: Prompt, copies: int, max_tokens: int) -> int:
        """Generates ``max_tokens`` for ``copies`` requests of ``prompt`` at once; returns the tokens made."""
        ...


def _decode_rate(stamps_s: Sequence[float]) -> float:
    """Tokens per second after the first token: (n - 1) over the time from the first to the last."""
    if len(stamps_s) < 2 or stamps_s[-1] <= stamps_s[0]:
        return 0.0
    return (len(stamps_s) - 1) / (stamps_s[-1] - stamps_s[0])


class EdgedRunner:
    """edged's engine through its public API, as the daemon configures it (prefix cache on, a batch of
    slots, the model loaded through its prepared copy in ``prepared_dir``); the prompt is rendered by the
    engine from the same messages."""

    def __init__(self, model_dir: Path, threads: int, context_tokens: int, prepared_dir: Path | None) -> None:
        from edged.llm import Engine

        self.engine = Engine(
            model_dir, threads=threads, context_tokens=context_tokens, prefix_cache_mb=32, prepared_dir=prepared_dir
        )
        self.prefix_cache = self.engine.prefix_cache is not None
        self.batches = self.engine.session.batches

    def _request(self, prompt: Prompt, max_tokens: int) -> Any:
        from edged.llm import GenerationRequest, Message

        messages = tuple(Message(role, content) for role, content in prompt.messages)
        request = GenerationRequest(messages=messages, max_tokens=max_tokens)
        if self.engine.prompt_ids(request) != prompt.ids:
            raise RuntimeError("edged rendered the bench prompt to other token ids than the bench did")
        return request

    def stream(self, prompt: Prompt, max_tokens: int, *, keep_prefix: bool = False, schema: Any = None) -> Stream:
        """``schema``: the answer is constrained to that JSON schema (edged's structured answers)."""
        request = self._request(prompt, max_tokens)
        if schema is not None:
            from dataclasses import replace

            from edged.structured import compile_format

            request = replace(request, logits_hook=compile_format(schema, self.engine.tokenizer, max_tokens))
        if not keep_prefix and self.engine.prefix_cache is not None:
            self.engine.prefix_cache.clear()  # as llama.cpp is reset: only the cached-prompt row reuses one
        start = time.perf_counter()
        generation = self.engine.generate(request)
        stamps: list[float] = []
        for _ in generation:
            now = time.perf_counter() - start
            stamps.extend([now] * (len(generation.token_ids) - len(stamps)))
        result = generation.result
        assert result is not None
        stamps.extend([time.perf_counter() - start] * (len(result.token_ids) - len(stamps)))
        return Stream(list(result.token_ids), stamps, result.timings.ttft_ms, result.timings.tokens_per_s)

    def batch(self, prompt: Prompt, copies: int, max_tokens: int) -> int:
        from edged.llm.engine import Batch

        if not self.batches:  # an optimum export holds one sequence: served one at a time
            return sum(len(self.stream(prompt, max_tokens).token_ids) for _ in range(copies))
        if self.engine.prefix_cache is not None:
            self.engine.prefix_cache.clear()
        request = self._request(prompt, max_tokens)
        batch = Batch(self.engine, copies)  # as the daemon's scheduler: each joins, then one step for all
        seqs = [self.engine.sequence(request, prompt.ids) for _ in range(copies)]
        for seq in seqs:
            batch.add(seq)
        while batch.running:
            batch.step()
        return sum(len(seq.token_ids) for seq in seqs)


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python, greedy, fed the same token ids; it never stops at end of turn."""

    prefix_cache = True
    batches = False

    def __init__(self, gguf: Path, threads: int, context_tokens: int) -> None:
        llama_cpp: Any = importlib.import_module("llama_cpp")
        # n_threads_batch defaults to every core (prefill); set both so each peer computes on the same threads.
        self.llm = llama_cpp.Llama(
            str(gguf), n_ctx=context_tokens, n_threads=threads, n_threads_batch=threads, verbose=False
        )

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode(), add_bos=False, special=True))

    def stream(self, prompt: Prompt, max_tokens: int, *, keep_prefix: bool = False) -> Stream:
        if not keep_prefix:
            self.llm.reset()  # generate() reuses the longest common prefix otherwise
        start = time.perf_counter()
        tokens: list[int] = []
        stamps: list[float] = []
        steps = self.llm.generate(prompt.ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)
        for token in steps:
            stamps.append(time.perf_counter() - start)
            tokens.append(int(token))
            if len(tokens) >= max_tokens:
                break
        steps.close()
        return Stream(tokens, stamps, stamps[0] * 1000, _decode_rate(stamps))

    def batch(self, prompt: Prompt, copies: int, max_tokens: int) -> int:
        # llama-cpp-python's Llama holds one sequence: concurrent requests are served one at a time.
        return sum(len(self.stream(prompt, max_tokens).token_ids) for _ in range(copies))


class OptimumRunner:
    """optimum's ORTModelForCausalLM.generate on edged's build (an optimum export), greedy, no early end."""

    prefix_cache = False
    batches = True

    def __init__(self, model_dir: Path, threads: int) -> None:
        import onnxruntime as ort

        torch: Any = importlib.import_module("torch")
        modeling: Any = importlib.import_module("optimum.onnxruntime")
        torch.set_num_threads(1)  # torch only picks the argmax; onnxruntime gets the bench's threads
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._torch = torch
        self.model = modeling.ORTModelForCausalLM.from_pretrained(
            model_dir, session_options=options, use_cache=True, use_io_binding=False, provider="CPUExecutionProvider"
        )

    def _generate(self, ids: list[int], copies: int, max_tokens: int, streamer: object | None = None) -> Any:
        x = self._torch.tensor([ids] * copies)
        return self.model.generate(
            x,
            attention_mask=self._torch.ones_like(x),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            repetition_penalty=1.0,
            pad_token_id=self.model.config.eos_token_id,
            streamer=streamer,
        )

    def stream(self, prompt: Prompt, max_tokens: int, *, keep_prefix: bool = False) -> Stream:
        stamps: list[float] = []
        start = time.perf_counter()

        class Stamps:
            prompt_seen = False

            def put(self, value: object) -> None:
                if self.prompt_seen:  # the first call carries the prompt
                    stamps.append(time.perf_counter() - start)
                self.prompt_seen = True

            def end(self) -> None:
                pass

        out = self._generate(prompt.ids, 1, max_tokens, Stamps())
        tokens = [int(t) for t in out[0, len(prompt.ids) :].tolist()]
        return Stream(tokens, stamps, stamps[0] * 1000, _decode_rate(stamps))

    def batch(self, prompt: Prompt, copies: int, max_tokens: int) -> int:
        out = self._generate(prompt.ids, copies, max_tokens)
        return int(out.shape[0] * (out.shape[1] - len(prompt.ids)))


def peak_rss_mb(pid: int | str = "self") -> float:
    """VmHWM: the process's peak resident set so far, what a board must have free for it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if pid == "self" else 0.0


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Loads the peer named in ``spec`` and runs its workload; called in the fresh child process."""
    peer, threads, ctx = spec["peer"], int(spec["threads"]), int(spec["context_tokens"])
    prompts = {
        key: Prompt(tuple((r, c) for r, c in p["messages"]), p["text"], list(p["ids"]))
        for key, p in spec["prompts"].items()
    }
    report: dict[str, Any] = {"peer": peer, "threads": threads}
    started = time.perf_counter()
    runner: Runner
    if peer == EDGED:
        importlib.import_module("edged.llm")
        loaded = time.perf_counter()
        prepared = spec.get("prepared_dir")
        runner = EdgedRunner(Path(spec["model_dir"]), threads, ctx, Path(prepared) if prepared else None)
    elif peer == LLAMA_CPP:
        importlib.import_module("llama_cpp")
        loaded = time.perf_counter()
        llama = LlamaCppRunner(Path(spec["gguf"]), threads, ctx)
        # The same ids for every peer: llama.cpp's own tokenizer must agree on the rendered text.
        report["tokenizer_matches"] = all(llama.tokenize(p.text) == p.ids for p in prompts.values())
        runner = llama
    elif peer == OPTIMUM:
        importlib.import_module("optimum.onnxruntime")
        loaded = time.perf_counter()
        runner = OptimumRunner(Path(spec["model_dir"]), threads)
    else:
        raise ValueError(f"unknown peer {peer!r}; use one of {', '.join(PEERS)}")
    ready = time.perf_counter()
    report["import_s"], report["load_s"] = loaded - started, ready - loaded
    runner.stream(prompts["short"], 2)  # warm-up, as the daemon does before it reports ready
    report["warmup_s"] = time.perf_counter() - ready

    repeats = int(spec["ttft_repeats"])
    if spec.get("answer_only"):
        report["decode"] = [_decode(runner.stream(prompts["write"], n)) for n in spec["decode_tokens"]]
        report["peak_rss_mb"] = peak_rss_mb()
        return report
    for key in ("short", "long"):
        report[f"ttft_{key}_ms"] = statistics.median(runner.stream(prompts[key], 1).ttft_ms for _ in range(repeats))
    cached = []
    for _ in range(repeats):
        runner.stream(prompts["system_warm"], 1)  # fills the shared system prompt, where the peer can keep it
        cached.append(runner.stream(prompts["system_ask"], 1, keep_prefix=True).ttft_ms)
    report["ttft_system_ms"], report["prefix_cache"] = statistics.median(cached), runner.prefix_cache
    report["decode"] = [_decode(runner.stream(prompts["write"], n)) for n in spec["decode_tokens"]]
    if isinstance(runner, EdgedRunner):  # the same answer written into a JSON document, every token masked
        n = int(spec["decode_tokens"][0])
        report["decode_schema"] = _decode(runner.stream(prompts["write"], n, schema=GUIDE_SCHEMA))
    report["batches"] = runner.batches
    report["concurrency"] = []
    for copies in spec["concurrency"]:
        start = time.perf_counter()
        made = runner.batch(prompts["short"], copies, int(spec["concurrent_tokens"]))
        wall_s = time.perf_counter() - start
        report["concurrency"].append({"requests": copies, "tokens": made, "wall_s": wall_s, "tok_s": made / wall_s})
    report["peak_rss_mb"] = peak_rss_mb()
    return report


def _decode(stream: Stream) -> dict[str, Any]:
    return {
        "tokens": len(stream.token_ids),
        "tok_s": stream.decode_tok_s,
        "ttft_ms": stream.ttft_ms,
        "token_ids": stream.token_ids,
        "stamps_s": [round(s, 5) for s in stream.stamps_s],
    }


@dataclass(frozen=True)
class ChildRun:
    """One peer's fresh process as the parent saw it: its report (None if it failed) and the machine's load."""

    peer: str
    report: dict[str, Any] | None
    error: str | None
    wall_s: float
    loadavg_before: float
    loadavg_after: float
    other_cpu_s: float  # CPU time the machine spent on anything but this child and the bench itself

    @property
    def other_cores(self) -> float:
        """Cores' worth of other work during the run (0 on a quiet machine)."""
        return self.other_cpu_s / self.wall_s if self.wall_s > 0 else 0.0


def _busy_cpu_s() -> float:
    """Seconds all CPUs spent busy since boot (/proc/stat: everything but idle and iowait; steal counts)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _cpu_s(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def spawn(spec: dict[str, Any], timeout_s: float) -> ChildRun:
    """Runs ``measure(spec)`` in a fresh interpreter and accounts for the load around it."""
    with tempfile.TemporaryDirectory(prefix="edged-peer-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        load_before = os.getloadavg()[0]
        busy, child, own = _busy_cpu_s(), _cpu_s(resource.RUSAGE_CHILDREN), _cpu_s(resource.RUSAGE_SELF)
        start = time.perf_counter()
        error: str | None = None
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "edged.peers", str(spec_path), str(out_path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                timeout=timeout_s,
            )
            if proc.returncode != 0:
                error = _exit_reason(proc.returncode, proc.stderr)
        except subprocess.TimeoutExpired:
            error = f"no result within {timeout_s:.0f} s"
        wall_s = time.perf_counter() - start
        busy_s = _busy_cpu_s() - busy
        mine = (_cpu_s(resource.RUSAGE_CHILDREN) - child) + (_cpu_s(resource.RUSAGE_SELF) - own)
        report = json.loads(out_path.read_text()) if error is None and out_path.is_file() else None
        if report is None and error is None:
            error = "the runner exited without a report"
    return ChildRun(
        peer=spec["peer"],
        report=report,
        error=error,
        wall_s=wall_s,
        loadavg_before=load_before,
        loadavg_after=os.getloadavg()[0],
        other_cpu_s=max(0.0, busy_s - mine),
    )


def _exit_reason(returncode: int, stderr: str) -> str:
    tail = " | ".join(line for line in stderr.strip().splitlines()[-3:] if line.strip())
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (a native llama.cpp build on a CPU that forbids what it advertises: `make peers`)"
        return f"killed by {name}{hint if name == 'SIGILL' else ''}" + (f": {tail}" if tail else "")
    return f"exit status {returncode}" + (f": {tail}" if tail else "")


def missing(peer: str) -> str | None:
    """Why ``peer`` cannot run here (with what to do), or None when it can."""
    module = {LLAMA_CPP: "llama_cpp", OPTIMUM: "optimum.onnxruntime"}.get(peer)
    if module is None:
        return None
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:  # the parent package is absent
        found = False
    return None if found else f"skipped: {module.split('.')[0]} is not installed; {INSTALL[peer]}"


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    report = measure(json.loads(Path(spec_path).read_text()))
    Path(out_path).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
