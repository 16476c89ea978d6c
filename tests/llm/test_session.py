"""The onnxruntime adapter: where the KV cache may be overwritten, and what a long prompt costs in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edged.build.graph import _Writer
from edged.build.quantize import BlockWeights
from edged.errors import ModelUnavailable
from edged.llm.session import DecoderSession, Embedding, _kv_lag, file_mappings, prepared_copy
from tests.build.test_quantize import q4_1_blocks, q8_0_blocks

PEAK_LIMIT_MB = 500
# What a 2,048-token context may keep after the request: the arena's decode-sized regions, not the prompt's.
AFTER_SLACK_MB = 64


def _names(*pairs: tuple[int, str]) -> list[str]:
    return [f"past_key_values.{layer}.{kind}" for layer, kind in pairs]


@pytest.mark.parametrize(
    ("names", "lag"),
    [
        (_names((0, "key"), (0, "value"), (1, "key"), (1, "value"), (2, "key"), (2, "value")), 2),
        (_names((0, "key"), (1, "key"), (2, "key")), 1),
        (_names((1, "key"), (1, "value"), (0, "key"), (0, "value")), 4),  # not in layer order
        (_names((0, "key"), (0, "value"), (1, "key")), 2),  # a short last layer: still a layer back
        (_names((0, "key"), (1, "key"), (1, "value")), 3),  # a longer later layer: not
        (["past_key_values.0.key", "past.1.value"], 2),  # names that do not say the layer
    ],
)
def test_a_present_overwrites_a_past_only_one_layer_back_when_the_names_prove_the_order(
    names: list[str], lag: int
) -> None:
    """One layer back is safe only in layer order; anything else must fall back to a full second copy."""
    assert _kv_lag(names) == lag


_PROBE = """
import json, resource, sys
from pathlib import Path
from edged.llm import Engine, GenerationRequest, Message

def rss_mb():
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20

def peak_mb():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork and exec, so it would report the test
    # process's own RSS at spawn (1.5 GB once earlier tests had loaded SmolLM2 twice) instead of this one's.
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024

engine = Engine(Path(sys.argv[1]), threads=2, context_tokens=2048)
engine.complete(GenerationRequest(messages=(Message("user", "Hi"),), max_tokens=2))
baseline = rss_mb()
text = "The tomato plants on the south balcony need water every morning in July. " * 140
request = GenerationRequest(messages=(Message("user", text),), max_tokens=4)
result = engine.complete(request)
print(json.dumps({
    "prompt_tokens": result.usage.prompt_tokens,
    "completion_tokens": result.usage.completion_tokens,
    "baseline_mb": baseline,
    "peak_mb": peak_mb(),
    "after_mb": rss_mb(),
}))
"""


@pytest.mark.model
def test_a_prompt_that_fills_the_context_stays_under_500_mb(smollm2_dirs: dict[str, Path]) -> None:
    """A 2,000-token prompt once took the process from ~370 MB to ~2 GB and kept it; a Pi has 512 MB-1 GB."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(smollm2_dirs["int4"])],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert 1900 <= probe["prompt_tokens"] < 2048 - 4, probe
    assert probe["completion_tokens"] >= 1, probe
    assert probe["peak_mb"] < PEAK_LIMIT_MB, probe
    assert probe["after_mb"] < probe["baseline_mb"] + AFTER_SLACK_MB, probe


# -- prepared copies --------------------------------------------------------------------------------


def _logits(session: DecoderSession) -> np.ndarray:
    cache = session.new_cache(32)
    return session.forward(list(range(3, 19)), cache)


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_a_prepared_copy_is_written_once_then_loaded_with_the_same_logits(
    tiny_models: dict[str, Path], tmp_path: Path, quant: str
) -> None:
    """The first load writes onnxruntime's optimized graph and prepacked weights and loads that copy, as every
    later load does; it computes exactly what the model file computes."""
    model = tiny_models[quant] / "model.onnx"
    plain = DecoderSession(model)
    first = DecoderSession(model, prepared_dir=tmp_path)
    copy = prepared_copy(model, tmp_path)
    assert first.loaded_from == copy / "model.onnx" and (copy / "model.data").stat().st_size > 0
    written = (copy / "model.data").stat().st_mtime_ns
    second = DecoderSession(model, prepared_dir=tmp_path)
    assert second.loaded_from == copy / "model.onnx" and (copy / "model.data").stat().st_mtime_ns == written
    # What onnxruntime read of the copy while it loaded is unmapped; a step maps back what it reads.
    assert file_mappings(copy / "model.data") and sum(rss for *_, rss, _ in file_mappings(copy / "model.data")) == 0
    assert np.array_equal(_logits(plain), _logits(first)) and np.array_equal(_logits(plain), _logits(second))
    assert sum(rss for *_, rss, _ in file_mappings(copy / "model.data")) > 0


def test_a_broken_prepared_copy_is_written_again(
    tiny_models: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A copy cut short (a full disk, a power cut before the kernel wrote it out) is not trusted: it is
    written anew and loaded."""
    model = tiny_models["int4"] / "model.onnx"
    DecoderSession(model, prepared_dir=tmp_path)
    data = prepared_copy(model, tmp_path) / "model.data"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 3)
    again = DecoderSession(model, prepared_dir=tmp_path)
    assert again.loaded_from == prepared_copy(model, tmp_path) / "model.onnx" and "cannot be loaded" in caplog.text
    assert data.stat().st_size == size
    assert np.array_equal(_logits(again), _logits(DecoderSession(model)))


def test_a_prepared_dir_that_cannot_be_written_loads_the_model_as_it_is(
    tiny_models: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_models["int4"] / "model.onnx"
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    session = DecoderSession(model, prepared_dir=blocked)
    assert session.loaded_from == model and "cannot write a prepared copy" in caplog.text
    assert np.array_equal(_logits(session), _logits(DecoderSession(model)))


def test_a_rebuilt_model_replaces_its_copy_and_leaves_other_models_copies(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """A copy belongs to one build of one model: a new build gets a new copy, the old one is deleted, and a
    model whose name starts with this one's keeps its own."""
    source = tiny_models["int4"]
    model = tmp_path / "tiny" / "model.onnx"
    model.parent.mkdir()
    model.write_bytes((source / "model.onnx").read_bytes())
    other = tmp_path / "tiny-fp32" / "model.onnx"
    other.parent.mkdir()
    other.write_bytes((tiny_models["fp32"] / "model.onnx").read_bytes())
    prepared = tmp_path / "prepared"
    DecoderSession(other, prepared_dir=prepared)
    DecoderSession(model, prepared_dir=prepared)
    old = prepared_copy(model, prepared)
    model.write_bytes(model.read_bytes())  # a rebuild: same name, a new modification time
    os.utime(model, ns=(model.stat().st_atime_ns, model.stat().st_mtime_ns + 10**9))
    assert prepared_copy(model, prepared) != old
    DecoderSession(model, prepared_dir=prepared)
    assert not old.exists() and prepared_copy(model, prepared).is_dir()
    assert prepared_copy(other, prepared).is_dir()


@pytest.mark.parametrize("kind", ["q4_1", "q8_0", "int8", "float"])
def test_the_embedding_file_gives_the_blocks_rows(tmp_path: Path, kind: str) -> None:
    """edged's graph starts from embeddings the engine reads from embedding.npy: each token's row is its
    blocks' value (a GGUF's Q4_1 with its remainder or Q8_0, or a float table requantized to 8 bits with
    zero points anywhere in 0..255), or the float row of an fp32 build, exactly."""
    vocab, hidden = 2048, 576  # over the size below which a table stays float
    rng = np.random.default_rng(1)
    floats = (rng.normal(size=(vocab, hidden)) + rng.normal(size=(vocab, hidden // 32)).repeat(32, axis=1)).astype(
        np.float32
    )
    source = {"q4_1": q4_1_blocks, "q8_0": q8_0_blocks}.get(kind)
    blocks = source(vocab, hidden) if source is not None else None
    if kind == "int8":
        rows = BlockWeights.quantize(floats, 8).dequantize()
    else:
        rows = blocks.dequantize() if blocks is not None else floats
    quant = {"int8": "int8", "float": "fp32"}.get(kind, "int4")
    writer = _Writer(quant, 0, lambda *_: blocks, ())
    np.save(tmp_path / "embedding.npy", writer.embedding(floats if blocks is None else rows))
    ids = np.array([[0, 7, 2047], [5, 5, 1000]])
    got = Embedding(tmp_path / "embedding.npy")(ids)
    assert got.shape == (2, 3, hidden) and got.dtype == np.float32
    np.testing.assert_array_equal(got, rows[ids])
    assert Embedding(tmp_path / "embedding.npy")(np.zeros((1, 0), np.int64)).shape == (1, 0, hidden)
    with pytest.raises(ValueError, match="in 0 to 2047"):
        Embedding(tmp_path / "embedding.npy")(np.array([[2048]]))


def test_a_missing_or_foreign_embedding_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="cannot read the embedding table"):
        Embedding(tmp_path / "embedding.npy")
    np.save(tmp_path / "embedding.npy", np.zeros((4, 8), np.float32))
    with pytest.raises(ModelUnavailable, match="not an embedding table"):
        Embedding(tmp_path / "embedding.npy")
