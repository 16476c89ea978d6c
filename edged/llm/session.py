"""onnxruntime adapter: one decoder session and its KV cache, names discovered from the graph."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edged.errors import ModelUnavailable

_PAST_PREFIX = "past_key_values."
_PRESENT_PREFIX = "present."
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def default_threads() -> int:
    """All cores on a board with one or two; otherwise leave one core for the rest of the system."""
    cores = len(os.sched_getaffinity(0))
    return cores - 1 if cores > 2 else cores


@dataclass
class KVCache:
    """The past keys and values of one sequence, as the graph's ``present.*`` outputs returned them."""

    arrays: dict[str, npt.NDArray[np.floating]] = field(default_factory=dict)
    length: int = 0


class DecoderSession:
    """A decoder-only ONNX model exported with a KV cache (optimum's ``text-generation-with-past``)."""

    def __init__(self, model_path: Path, threads: int | None = None) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelUnavailable(f"onnxruntime cannot load {model_path}: {exc}") from exc
        self.threads = options.intra_op_num_threads

        inputs = {i.name: i for i in self._session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - inputs.keys()
        if missing:
            raise ModelUnavailable(f"{model_path} is not a decoder with a KV cache (no {sorted(missing)})")
        self._has_positions = "position_ids" in inputs
        outputs = [o.name for o in self._session.get_outputs()]
        self._past_to_present: dict[str, str] = {}
        self._empty: dict[str, npt.NDArray[np.floating]] = {}
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
            self._empty[name] = np.zeros((1, heads, 0, head_dim), dtype=_DTYPES.get(meta.type, np.float32))
        if not self._past_to_present:
            raise ModelUnavailable(f"{model_path} was exported without a KV cache (no past_key_values.* inputs)")
        self._output_names = ["logits", *self._past_to_present.values()]

    def new_cache(self) -> KVCache:
        return KVCache(arrays=dict(self._empty))

    def forward(self, token_ids: list[int], cache: KVCache) -> npt.NDArray[np.float32]:
        """Runs ``token_ids`` after the cached sequence and extends the cache.

        Returns the logits of every new position, shape [len(token_ids), vocab].
        """
        total = cache.length + len(token_ids)
        feed: dict[str, npt.NDArray[np.generic]] = {
            "input_ids": np.asarray([token_ids], dtype=np.int64),
            "attention_mask": np.ones((1, total), dtype=np.int64),
            **cache.arrays,
        }
        if self._has_positions:
            feed["position_ids"] = np.arange(cache.length, total, dtype=np.int64)[None, :]
        logits, *presents = self._session.run(self._output_names, feed)
        cache.arrays = dict(zip(self._past_to_present, presents, strict=True))
        cache.length = total
        return np.asarray(logits[0], dtype=np.float32)
