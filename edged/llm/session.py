"""onnxruntime adapter: one decoder session and its KV cache, names discovered from the graph."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import mmap
import os
import platform
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edged.errors import ModelUnavailable
from edged.store import EMBEDDING_FILE

_PAST_PREFIX = "past_key_values."
_PRESENT_PREFIX = "present."
# edged's own graph (edged.build.graph): GroupQueryAttention reads lengths, not a mask, and writes its
# presents into the buffer it reads its pasts from; the lm_head runs on the rows named in LOGIT_ROWS.
_SEQLENS_K = "seqlens_k"
_TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
_LOGIT_ROWS = "logit_rows"
INPUTS_EMBEDS = "inputs_embeds"  # edged's graph starts from the embeddings of its tokens, [batch, seq, hidden]
_LAYER = re.compile(r"past_key_values\.(\d+)\.\w+")
Logits = npt.NDArray[np.float32]
log = logging.getLogger(__name__)
_DTYPES: dict[str, type[np.floating]] = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def default_threads() -> int:
    """All cores on a board with one or two; otherwise leave one core for the rest of the system."""
    cores = len(os.sched_getaffinity(0))
    return cores - 1 if cores > 2 else cores


def release_freed_heap() -> None:
    """Hands memory that glibc holds freed back to the system (``malloc_trim``; absent elsewhere, skipped).

    glibc keeps freed blocks below its mmap threshold in the process: after a load that is the parsed model
    (about 60 MB for SmolLM2-135M), after a long prefill the arena regions onnxruntime has just released.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


_MADV_DONTNEED = 4
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s+(.*)$")


def file_mappings(path: Path) -> list[tuple[int, int, int, int]]:
    """This process's mappings of ``path``: (start, end, resident bytes, bytes written) each, from
    /proc/self/smaps (none where there is no such file)."""
    found: list[list[int]] = []
    target = str(path.resolve())
    try:
        with open("/proc/self/smaps") as smaps:
            current: list[int] | None = None
            for line in smaps:
                header = _MAPPING.match(line)
                if header:
                    current = [int(header[1], 16), int(header[2], 16), 0, 0] if header[3] == target else None
                    if current is not None:
                        found.append(current)
                elif current is not None and line.startswith(("Rss:", "Anonymous:")):
                    current[2 if line.startswith("Rss:") else 3] = int(line.split()[1]) * 1024
    except OSError:
        return []
    return [(start, end, rss, written) for start, end, rss, written in found]


def _give_back_load_pages(data_file: Path) -> int:
    """Unmaps the pages of a prepared copy's data file that onnxruntime read while it loaded; the bytes.

    onnxruntime maps the file privately, initializer by initializer, and reads parts of it while it loads
    that no step reads again (SmolLM2 int4: 20 MB of the 147 MB it maps). Mapped, they count in the
    process's RSS for its life. MADV_DONTNEED on a private mapping none of whose pages was written drops
    only page-cache pages: those a step needs fault in again from the page cache, and every other one stays
    out. A mapping with a written page is left alone. Linux only; elsewhere nothing is found.
    """
    given = 0
    with contextlib.suppress(OSError, AttributeError):
        madvise = ctypes.CDLL(None).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        for start, end, rss, written in file_mappings(data_file):
            if (
                rss
                and not written
                and madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0
            ):
                given += rss
    return given


def _lazy_empty(shape: tuple[int, ...], dtype: type[np.floating]) -> npt.NDArray[np.floating]:
    """An array on anonymous memory that becomes resident page by page, as it is written, in 4 KB pages.

    numpy asks for transparent huge pages on large arrays. For a KV buffer that is ruinous: each sequence
    writes the first positions of every head's row, so every 2 MB huge page becomes resident at once (4
    slots of 2,048 tokens of SmolLM2: 370 MB after four short prompts, 24 MB with small pages).
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.empty(shape, dtype)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, dtype=dtype).reshape(shape)


def _kv_lag(past_names: list[str]) -> int:
    """How many KV tensors back a present may overwrite a past: one layer's worth when the inputs are
    ``past_key_values.<layer>.*`` in layer order, since layer l's presents depend on layer l - 1's attention,
    which has read all of layer l - 1's past; otherwise all of them (a second copy, safe in any order).
    """
    layers = [m.group(1) for m in map(_LAYER.fullmatch, past_names) if m]
    if len(layers) != len(past_names) or not layers:
        return len(past_names)
    per_layer = layers.count(layers[0])
    expected = [str(i // per_layer) for i in range(len(layers))]
    return per_layer if layers == expected else len(past_names)


class KVCache:
    """The past keys and values of one sequence, owned here rather than by onnxruntime.

    One row per KV tensor (a contiguous prefix holds [1, heads, length, head_dim]) plus ``lag`` spare rows.
    The graph reads tensor i's past from its row and writes its present straight into the row of tensor
    i - lag's past, which is dead by then: so the cache costs one copy of the keys and values, not two
    (past in, present out). One allocation, touched only as far as the sequence reaches, handed back whole.
    """

    def __init__(
        self, tensors: int, lag: int, heads: int, head_dim: int, dtype: type[np.floating], capacity: int
    ) -> None:
        self.length = 0
        self.heads = heads
        self.head_dim = head_dim
        self._lag = lag
        self._rows = _lazy_empty((tensors + lag, capacity * heads * head_dim), dtype)
        self._first = 0  # the row of tensor 0's past

    @property
    def capacity(self) -> int:
        return int(self._rows.shape[1]) // (self.heads * self.head_dim)

    @property
    def dtype(self) -> np.dtype[np.floating]:
        return self._rows.dtype

    def reserve(self, tokens: int) -> None:
        """Makes room for ``tokens`` in all (a copy, when the sequence outgrows the buffer)."""
        if tokens > self.capacity:
            rows = self._rows.shape[0]
            grown = _lazy_empty((rows, tokens * self.heads * self.head_dim), self.dtype.type)
            used = self.length * self.heads * self.head_dim
            order = (self._first + np.arange(rows - self._lag)) % rows
            grown[: rows - self._lag, :used] = self._rows[order, :used]
            self._rows, self._first = grown, 0

    def addresses(self, tensor: int) -> tuple[int, int]:
        """Where ``tensor``'s past is read from and its present written to (valid until ``reserve``)."""
        rows, row_bytes = self._rows.shape[0], self._rows[0].nbytes
        base: int = self._rows.ctypes.data
        return (
            base + (self._first + tensor) % rows * row_bytes,
            base + (self._first + tensor - self._lag) % rows * row_bytes,
        )

    def advance(self, length: int) -> None:
        """The presents just written become the past."""
        self._first = (self._first - self._lag) % self._rows.shape[0]
        self.length = length


class KVBuffer:
    """The keys and values of up to ``slots`` sequences in place: what GroupQueryAttention reads and appends to.

    One allocation [tensors, slots, heads, capacity, head_dim]. A run over one sequence binds its slot,
    [1, heads, capacity, head_dim], as both past and present at the same address; a batched decode step
    binds slots 0..n-1 together, [n, heads, capacity, head_dim]. The kernel writes the new positions after
    each sequence's old ones and, since the two pointers are equal, copies nothing: a step costs the new
    rows only. Pages are touched only as far as each sequence reaches.
    """

    def __init__(
        self, tensors: int, heads: int, head_dim: int, dtype: type[np.floating], capacity: int, slots: int = 1
    ) -> None:
        self.heads = heads
        self.head_dim = head_dim
        self.lengths = [0] * slots  # tokens held per slot
        self._buffer = _lazy_empty((tensors, slots, heads, capacity, head_dim), dtype)

    @property
    def length(self) -> int:
        """Tokens held by slot 0 (the sequence of a one-slot buffer)."""
        return self.lengths[0]

    @property
    def slots(self) -> int:
        return int(self._buffer.shape[1])

    @property
    def capacity(self) -> int:
        return int(self._buffer.shape[3])

    @property
    def dtype(self) -> np.dtype[np.floating]:
        return self._buffer.dtype

    @property
    def tensors(self) -> npt.NDArray[np.floating]:
        """The buffer itself, [tensors, slots, heads, capacity, head_dim]; a slot's positions from its length
        on are unused."""
        return self._buffer

    def reserve(self, tokens: int, slot: int = 0) -> None:
        """Makes room for ``tokens`` in ``slot``: a copy of the whole buffer when a one-slot buffer is outgrown
        (a batch's slots are sized once, from the context)."""
        if tokens <= self.capacity:
            return
        if self.slots > 1:
            raise ValueError(f"slot {slot} would need {tokens} positions; the batch holds {self.capacity}")
        tensors, slots, heads, _, head_dim = self._buffer.shape
        grown = _lazy_empty((tensors, slots, heads, tokens, head_dim), self.dtype.type)
        grown[:, :, :, : self.length] = self._buffer[:, :, :, : self.length]
        self._buffer = grown

    def address(self, tensor: int, slot: int = 0) -> int:
        """Where ``tensor``'s past of ``slot`` is read from and its present written to (valid until ``reserve``)."""
        base: int = self._buffer.ctypes.data
        return base + int(self._buffer[0].nbytes) * tensor + int(self._buffer[0, 0].nbytes) * slot

    def copy_out(self, slot: int, tokens: int) -> npt.NDArray[np.floating]:
        """The first ``tokens`` positions of ``slot``, [tensors, heads, tokens, head_dim] (a prefix to keep)."""
        return self._buffer[:, slot, :, :tokens].copy()

    def copy_in(self, slot: int, kv: npt.NDArray[np.floating]) -> None:
        """Puts a kept prefix at the start of ``slot``, which then holds just that prefix."""
        tokens = kv.shape[2]
        self.reserve(tokens, slot)
        self._buffer[:, slot, :, :tokens] = kv
        self.lengths[slot] = tokens

    def advance(self, length: int, slot: int = 0) -> None:
        self.lengths[slot] = length


Cache = KVCache | KVBuffer


def embedding_table(
    values: npt.NDArray[np.generic],
    scale: npt.NDArray[np.float32] | None = None,
    residual: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.void]:
    """The records of a model's ``embedding.npy``, one per token, so that a token's row is one read.

    Either the float rows (``values`` [vocab, hidden] float32), or blocks of 32 along hidden: ``values``
    int8 [vocab, hidden] centred on their zero points and ``scale`` float32 [vocab, hidden / 32], with a
    ``residual`` of the same shape where a block needs one (GGUF's Q4_1); a row is ``values * scale +
    residual``, block by block.
    """
    vocab, hidden = values.shape
    fields: list[tuple[str, str, tuple[int, ...]]] = [("values", values.dtype.str, (hidden,))]
    extra = {"scale": scale, "residual": residual}
    fields += [(name, "<f4", array.shape[1:]) for name, array in extra.items() if array is not None]
    table = np.empty(vocab, dtype=np.dtype(fields))
    table["values"] = values
    for name, array in extra.items():
        if array is not None:
            table[name] = array
    return table


class Embedding:
    """A model's token embeddings, read from its ``embedding.npy`` as tokens need them.

    The table is mapped, not loaded: only the pages of tokens in use become resident, and they are the
    page cache's, which the kernel can take back (SmolLM2-135M's table: 31 MB; onnxruntime held all of it).
    """

    def __init__(self, path: Path) -> None:
        try:
            self._table: npt.NDArray[np.void] = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(f"cannot read the embedding table {path}: {exc}") from exc
        names = self._table.dtype.names or ()
        if "values" not in names or self._table.ndim != 1:
            raise ModelUnavailable(f"{path} is not an embedding table (records with values, per token)")
        self._blocks = int(self._table.dtype["scale"].shape[0]) if "scale" in names else 0  # per row; 0: float rows
        self._residual = "residual" in names
        self.vocab = int(self._table.shape[0])
        self.hidden = int(self._table.dtype["values"].shape[0])

    def __call__(self, token_ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """The embeddings of ``token_ids`` [rows, seq]: [rows, seq, hidden] float32."""
        if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= self.vocab):
            raise ValueError(f"token ids must be in 0 to {self.vocab - 1}")
        records = self._table[token_ids.reshape(-1)]
        values = records["values"].astype(np.float32)
        if self._blocks:
            blocked = values.reshape(len(records), self._blocks, self.hidden // self._blocks)
            blocked = blocked * records["scale"][..., None]
            if self._residual:
                blocked = blocked + records["residual"][..., None]
            values = blocked.reshape(values.shape)
        return values.reshape(*token_ids.shape, self.hidden)


# A prepared copy of a model: onnxruntime's optimized graph with the prepacked weights in its data file.
_PREPARED_GRAPH, _PREPARED_DATA = "model.onnx", "model.data"
# /proc/cpuinfo fields that decide which kernels, and so which prepacked layouts, onnxruntime picks.
_CPU_FIELDS = ("vendor_id", "model name", "flags", "CPU implementer", "CPU architecture", "CPU variant", "CPU part")


def _cpu_signature() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0].splitlines()
    except OSError:
        return platform.processor()
    fields = (line.split(":", 1) for line in lines if ":" in line)
    return "|".join(f"{k.strip()}={v.strip()}" for k, v in fields if k.strip() in _CPU_FIELDS)


def prepared_copy(model_path: Path, prepared_dir: Path) -> Path:
    """Where the prepared copy of ``model_path`` for this machine and onnxruntime lives in ``prepared_dir``.

    The key covers what the copy depends on: the model file (its resolved path, size and modification time,
    so a rebuilt or switched model gets a new one), onnxruntime's version and the CPU (prepacked layouts
    differ by instruction set).
    """
    stat = model_path.resolve().stat()
    identity = f"{model_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{ort.__version__}|{platform.machine()}"
    key = hashlib.sha256(f"{identity}|{_cpu_signature()}".encode()).hexdigest()[:16]
    return prepared_dir / f"{model_path.parent.name}-{key}"


def _open(
    model_path: Path, options: Callable[[], ort.SessionOptions], prepared_dir: Path | None
) -> tuple[ort.InferenceSession, Path]:
    """An onnxruntime session for ``model_path``, through its prepared copy in ``prepared_dir`` when there is
    one; and the file it was loaded from.

    Loading a model makes onnxruntime optimize the graph and repack every MatMulNBits weight into its
    kernels' layout, about half of the load, and keeps the packed weights on the heap. A prepared copy has
    both done: the packed weights are mapped from its data file (SmolLM2-135M int4 on 2 x86 cores: load
    0.31 -> 0.17 s, the same logits to the bit). The first load writes it and then loads it too, so a node
    runs the same way from its first start on. A copy that cannot be written or read is logged and the
    model is loaded as it is.
    """

    def load(path: Path, opts: ort.SessionOptions) -> ort.InferenceSession:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    if prepared_dir is None:
        return load(model_path, options()), model_path
    prepared = prepared_copy(model_path, prepared_dir)
    for fresh in (False, True):
        if (prepared / _PREPARED_GRAPH).is_file():
            opts = options()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # optimized already
            try:
                session = load(prepared / _PREPARED_GRAPH, opts)
            except Exception as exc:  # onnxruntime raises its own untyped errors
                log.warning("prepared copy %s cannot be loaded: %s", prepared, exc)
                shutil.rmtree(prepared, ignore_errors=True)
            else:
                given = _give_back_load_pages(prepared / _PREPARED_DATA)
                log.debug("gave back %.1f MB of %s read while loading", given / 2**20, prepared / _PREPARED_DATA)
                return session, prepared / _PREPARED_GRAPH
        if fresh or not _write_copy(model_path, options(), prepared):
            break
    return load(model_path, options()), model_path


def _write_copy(model_path: Path, opts: ort.SessionOptions, prepared: Path) -> bool:
    """Writes the prepared copy of ``model_path`` as ``prepared``; False (logged) when it cannot."""
    staging = prepared.with_name(f".{prepared.name}.{os.getpid()}")
    try:
        for partial in prepared.parent.glob(f".{prepared.name}.*"):
            shutil.rmtree(partial, ignore_errors=True)  # left by a load that was killed while writing
        staging.mkdir(parents=True)
        opts.optimized_model_filepath = str(staging / _PREPARED_GRAPH)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", _PREPARED_DATA)
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        opts.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])  # writes it, then goes
        release_freed_heap()  # its packed weights, before the copy is mapped
        for written in (staging / _PREPARED_GRAPH, *staging.glob(_PREPARED_DATA)):  # no data: nothing was large
            with open(written, "rb") as f:
                os.fsync(f.fileno())  # whole on disk before it is named: a power cut leaves no half copy
        for old in prepared.parent.glob(f"{model_path.parent.name}-*"):
            if re.fullmatch(rf"{re.escape(model_path.parent.name)}-[0-9a-f]{{16}}", old.name):
                shutil.rmtree(old, ignore_errors=True)  # copies of earlier builds of this model
        staging.rename(prepared)
        return True
    except Exception as exc:  # a read-only or full disk, or onnxruntime refusing to write the copy
        log.warning("cannot write a prepared copy of %s as %s (%s); loading it as it is", model_path, prepared, exc)
        shutil.rmtree(staging, ignore_errors=True)
        return False


class DecoderSession:
    """A decoder-only ONNX model with a KV cache: optimum's ``text-generation-with-past`` export (past and
    present tensors, a mask), or edged's own graph (GroupQueryAttention on one buffer per KV tensor).

    The graph's inputs say which: a graph with ``seqlens_k`` gets ``KVBuffer``s, any other ``KVCache``s.
    """

    def __init__(self, model_path: Path, threads: int | None = None, prepared_dir: Path | None = None) -> None:
        """``prepared_dir``: where prepared copies of models are kept (see ``_open``); None loads the file as it is."""
        self.threads = threads or default_threads()

        def options() -> ort.SessionOptions:
            options = ort.SessionOptions()
            # Keep the arena and shrink it after a prefill: without it glibc kept ~300 MB of freed blocks after
            # a 2,000-token prompt, and decode was ~10 % slower (SmolLM2-135M int4, 2 threads).
            options.enable_cpu_mem_arena = True
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            return options

        try:
            self._session, self.loaded_from = _open(model_path, options, prepared_dir)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelUnavailable(f"onnxruntime cannot load {model_path}: {exc}") from exc
        self._model_path = model_path
        release_freed_heap()

        inputs = {i.name: i for i in self._session.get_inputs()}
        self._shared_kv = _SEQLENS_K in inputs
        required = (
            {INPUTS_EMBEDS, _SEQLENS_K, _TOTAL_SEQUENCE_LENGTH, _LOGIT_ROWS}
            if self._shared_kv
            else {"input_ids", "attention_mask"}
        )
        missing = required - inputs.keys()
        if self._shared_kv and missing == {INPUTS_EMBEDS} and "input_ids" in inputs:
            raise ModelUnavailable(
                f"{model_path} was built by an older edged (its graph gathers its own embeddings); rebuild it with "
                "`edged model build`, or install a bundle built by this version"
            )
        if missing:
            raise ModelUnavailable(f"{model_path} is not a decoder with a KV cache (no {sorted(missing)})")
        self._embedding = None
        if self._shared_kv:
            self._embedding = Embedding(model_path.parent / EMBEDDING_FILE)
            width, hidden = inputs[INPUTS_EMBEDS].shape[-1], self._embedding.hidden
            if width != hidden:
                table = model_path.parent / EMBEDDING_FILE
                raise ModelUnavailable(f"{table} has rows of {hidden}; the graph reads {width}")
        self._has_positions = "position_ids" in inputs
        outputs = [o.name for o in self._session.get_outputs()]
        self._past_to_present: dict[str, str] = {}
        layouts: set[tuple[int, int, type[np.floating]]] = set()
        for name, meta in inputs.items():
            if not name.startswith(_PAST_PREFIX):
                continue
            present = _PRESENT_PREFIX + name[len(_PAST_PREFIX) :]
            if present not in outputs:
                raise ModelUnavailable(f"{model_path}: input {name} has no matching output {present}")
            _, heads, _, head_dim = meta.shape
            if not (isinstance(heads, int) and isinstance(head_dim, int)):
                raise ModelUnavailable(f"{model_path}: {name} has no fixed head count or head size")
            self._past_to_present[name] = present
            layouts.add((heads, head_dim, _DTYPES.get(meta.type, np.float32)))
        if not self._past_to_present:
            raise ModelUnavailable(f"{model_path} was exported without a KV cache (no past_key_values.* inputs)")
        if len(layouts) != 1:
            raise ModelUnavailable(f"{model_path}: the KV inputs differ in head count, head size or type")
        self._kv_layout = layouts.pop()
        self._kv_lag = _kv_lag(list(self._past_to_present))
        self._bindings: dict[tuple[int, int, int, int], ort.IOBinding] = {}
        vocab = self._session.get_outputs()[0].shape[-1]
        self._vocab = vocab if isinstance(vocab, int) else 0  # fixed in edged's graph, which alone steps batches
        self._step_logits: dict[int, npt.NDArray[np.float32]] = {}
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    @property
    def batches(self) -> bool:
        """Whether several sequences can be decoded in one run (edged's graph; optimum's holds one)."""
        return self._shared_kv

    def new_cache(self, capacity: int = 0, slots: int = 1) -> Cache:
        """An empty cache with room for ``capacity`` tokens in each of ``slots`` sequences (one slot grows by
        copying beyond that)."""
        if self._shared_kv:
            return KVBuffer(len(self._past_to_present), *self._kv_layout, capacity, slots)
        if slots != 1:
            raise ValueError(f"{self._model_path.name} is an optimum export: it holds one sequence, not {slots}")
        return KVCache(len(self._past_to_present), self._kv_lag, *self._kv_layout, capacity)

    def forward(self, token_ids: list[int], cache: Cache, slot: int = 0) -> npt.NDArray[np.float32]:
        """Runs ``token_ids`` after the cached sequence and extends the cache.

        Returns the logits of every new position, shape [len(token_ids), vocab]: for scoring a whole
        sequence; generation wants ``prefill`` and ``step``, which keep only the last position.
        """
        return np.asarray(self._run(token_ids, cache, slot, None, every_row=True)[0], dtype=np.float32)

    def prefill(
        self, token_ids: list[int], cache: Cache, chunk_tokens: int, *, slot: int = 0, shrink: bool = True
    ) -> Logits:
        """Runs a prompt ``chunk_tokens`` at a time into ``slot``; returns the last position's logits, [vocab].

        Attention and logits then need memory for one chunk, not the whole prompt; ``shrink`` hands the
        arena's grown part back to the system after the last chunk.
        """
        if not token_ids or chunk_tokens < 1:
            raise ValueError(
                f"prefill needs tokens and a chunk size of at least 1, got {len(token_ids)}, {chunk_tokens}"
            )
        starts = range(0, len(token_ids), chunk_tokens)
        for start in starts:
            options = self._shrink if shrink and start == starts[-1] else None
            logits = self._run(token_ids[start : start + chunk_tokens], cache, slot, options)
        if shrink:
            release_freed_heap()
        # A copy of one row, so the chunk's [1, n, vocab] output is freed now, not with the row.
        return np.array(logits[0, -1], dtype=np.float32)

    def step(self, token_id: int, cache: Cache) -> Logits:
        """One decode step: the logits after ``token_id``, shape [vocab]."""
        return np.asarray(self._run([token_id], cache, 0, None)[0, -1], dtype=np.float32)

    def step_batch(self, tokens: list[int | None], cache: KVBuffer) -> npt.NDArray[np.float32]:
        """One decode step of slots 0..len(tokens)-1 together: the logits after each slot's token, shape
        [len(tokens), vocab]. A free slot (None) takes a placeholder token whose row is to be ignored."""
        if not self._shared_kv:
            raise TypeError("only edged's own graph decodes a batch; this is an optimum export")
        rows = len(tokens)
        if not 0 < rows <= cache.slots:
            raise ValueError(f"a step of {rows} slots in a buffer of {cache.slots}")
        totals = [cache.lengths[i] + 1 if t is not None else 1 for i, t in enumerate(tokens)]
        if max(totals) > cache.capacity:
            raise ValueError(f"a slot would need {max(totals)} positions; the batch holds {cache.capacity}")
        binding = self._shared_binding(cache, 0, rows)
        self._bind_embeddings(binding, np.asarray([[t or 0] for t in tokens], dtype=np.int64))
        # Right padding: each row's new token lands at its own length; GroupQueryAttention reads the lengths.
        binding.bind_cpu_input(_SEQLENS_K, np.asarray(totals, dtype=np.int32) - 1)
        binding.bind_cpu_input(_TOTAL_SEQUENCE_LENGTH, np.array(max(totals), dtype=np.int32))
        binding.bind_cpu_input(_LOGIT_ROWS, np.arange(rows, dtype=np.int64))
        # Into a buffer of ours: reading an output back through get_outputs() wraps all 61 of them, ~0.2 ms.
        logits = self._step_logits.get(rows)
        if logits is None:
            logits = self._step_logits[rows] = np.empty((1, rows, self._vocab), dtype=np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self._session.run_with_iobinding(binding)
        for i, t in enumerate(tokens):
            if t is not None:
                cache.advance(totals[i], i)
        out: npt.NDArray[np.float32] = logits[0].copy()  # [rows, vocab]: the next step writes the buffer again
        return out

    def _run(
        self,
        token_ids: list[int],
        cache: Cache,
        slot: int,
        run_options: ort.RunOptions | None,
        *,
        every_row: bool = False,
    ) -> npt.NDArray[np.float32]:
        """Logits [1, n, vocab]: of every new position, or (where the graph allows) of the last one only."""
        if isinstance(cache, KVBuffer):
            if not self._shared_kv:
                raise TypeError("a KVBuffer belongs to a graph with a shared KV buffer; use this session's new_cache")
            return self._run_shared(token_ids, cache, slot, run_options, every_row)
        if self._shared_kv:
            raise TypeError("this graph reads a KVBuffer; use this session's new_cache")
        if slot != 0:
            raise ValueError("an optimum export's cache holds one sequence")
        total = cache.length + len(token_ids)
        cache.reserve(total)
        binding = self._session.io_binding()
        binding.bind_cpu_input("input_ids", np.asarray([token_ids], dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        if self._has_positions:
            binding.bind_cpu_input("position_ids", np.arange(cache.length, total, dtype=np.int64)[None, :])
        binding.bind_output("logits", "cpu")  # first: outputs come back in the order they were bound
        past_shape = [1, cache.heads, cache.length, cache.head_dim]
        present_shape = [1, cache.heads, total, cache.head_dim]
        for tensor, (past, present) in enumerate(self._past_to_present.items()):
            read, write = cache.addresses(tensor)
            binding.bind_input(past, "cpu", 0, cache.dtype, past_shape, read)
            binding.bind_output(present, "cpu", 0, cache.dtype, present_shape, write)
        self._session.run_with_iobinding(binding, run_options)
        cache.advance(total)
        logits: npt.NDArray[np.float32] = binding.get_outputs()[0].numpy()
        return logits  # [1, len(token_ids), vocab]

    def _run_shared(
        self, token_ids: list[int], cache: KVBuffer, slot: int, run_options: ort.RunOptions | None, every_row: bool
    ) -> npt.NDArray[np.float32]:
        total = cache.lengths[slot] + len(token_ids)
        cache.reserve(total, slot)
        binding = self._shared_binding(cache, slot, 1)
        self._bind_embeddings(binding, np.asarray([token_ids], dtype=np.int64))
        # One sequence, right-aligned at 0: GroupQueryAttention derives the positions from these lengths.
        binding.bind_cpu_input(_SEQLENS_K, np.array([total - 1], dtype=np.int32))
        binding.bind_cpu_input(_TOTAL_SEQUENCE_LENGTH, np.array(total, dtype=np.int32))
        first = 0 if every_row else len(token_ids) - 1
        binding.bind_cpu_input(_LOGIT_ROWS, np.arange(first, len(token_ids), dtype=np.int64))
        binding.bind_output("logits", "cpu")  # a new output each run (rebinding a name replaces it in place)
        self._session.run_with_iobinding(binding, run_options)
        cache.advance(total, slot)
        logits: npt.NDArray[np.float32] = binding.get_outputs()[0].numpy()
        return logits  # [1, rows, vocab]

    def _bind_embeddings(self, binding: ort.IOBinding, token_ids: npt.NDArray[np.int64]) -> None:
        assert self._embedding is not None  # every graph with a shared KV buffer has one
        binding.bind_cpu_input(INPUTS_EMBEDS, self._embedding(token_ids))

    def _shared_binding(self, cache: KVBuffer, slot: int, rows: int) -> ort.IOBinding:
        """A binding of every past and present to ``rows`` slots of ``cache`` from ``slot`` on, kept while the
        buffer stays where it is: the same addresses and shapes serve every step, so a step rebinds only its
        four small inputs (binding the 60 KV tensors of SmolLM2-135M anew took ~0.3 ms, ~3 % of a step).
        One binding is kept per (slot, rows) in use: a batch's prefills and its steps of each width."""
        key = (cache.address(0), cache.capacity, slot, rows)
        binding = self._bindings.get(key)
        if binding is None:
            if any(k[:2] != key[:2] for k in self._bindings):
                self._bindings.clear()  # another buffer now: the old one's bindings would keep it alive
            binding = self._session.io_binding()
            binding.bind_output("logits", "cpu")  # first: outputs come back in the order they were bound
            shape = [rows, cache.heads, cache.capacity, cache.head_dim]
            for tensor, (past, present) in enumerate(self._past_to_present.items()):
                address = cache.address(tensor, slot)
                binding.bind_input(past, "cpu", 0, cache.dtype, shape, address)
                binding.bind_output(present, "cpu", 0, cache.dtype, shape, address)
            self._bindings[key] = binding
        return binding
