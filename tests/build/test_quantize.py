"""Block quantization: MatMulNBits graphs compute what the block arithmetic says, exact where promised."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edged.build.quantize import BLOCK, BlockWeights, _Graph, _matmul_nbits, _Tables, quantize_model
from edged.llm import Engine

RNG = np.random.default_rng(0)


def q4_1_blocks(n: int, k: int) -> BlockWeights:
    """Random weights in GGUF Q4_1 form (W = d q + m, float m), as the SmolLM2 GGUF stores them."""
    q = RNG.integers(0, 16, size=(n, k), dtype=np.uint8)
    d = RNG.uniform(0.001, 0.02, size=(n, k // 32)).astype(np.float16).astype(np.float32)
    m = RNG.uniform(-0.2, 0.0, size=(n, k // 32)).astype(np.float16).astype(np.float32)
    return BlockWeights.from_affine(4, q, d, m)


def q8_0_blocks(n: int, k: int) -> BlockWeights:
    q = RNG.integers(0, 256, size=(n, k), dtype=np.uint8)
    d = RNG.uniform(0.001, 0.02, size=(n, k // 32)).astype(np.float16).astype(np.float32)
    return BlockWeights.from_affine(8, q, d, -128 * d)


def graph(rows: np.ndarray, vocab_gather: bool) -> onnx.ModelProto:
    """y = x @ W.T (an exported Linear), and optionally e = Gather(W, ids) (an embedding table)."""
    n, k = rows.shape
    w = numpy_helper.from_array(np.ascontiguousarray(rows.T), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="/lm_head/MatMul")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", k])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", n])]
    inits = [w]
    if vocab_gather:
        table = numpy_helper.from_array(rows, "E")
        nodes.append(helper.make_node("Gather", ["E", "ids"], ["e"], name="/embed/Gather"))
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "s"]))
        outputs.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, "s", k]))
        inits.append(table)
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return list(session.run(None, feed))


@pytest.mark.parametrize("make", [q4_1_blocks, q8_0_blocks], ids=["q4_1", "q8_0"])
@pytest.mark.parametrize("level", [0, 4])
def test_carried_blocks_compute_the_source_weights(make: object, level: int) -> None:
    """Q4_1 (float minimum, residual path) and Q8_0 (nibble split at level 0) reproduce W = d q + m."""
    bw = make(96, 128)  # type: ignore[operator]
    rows = bw.dequantize()
    model = graph(rows, vocab_gather=True)
    stats = quantize_model(model, 4, level, lambda *_: bw)
    assert stats["exact_blocks"] == 1 and stats["requantized"] == 0, "one table shared by MatMul and Gather"
    assert not any(t.data_type == TensorProto.FLOAT and list(t.dims) == [128, 96] for t in model.graph.initializer)
    x = RNG.standard_normal((1, 3, 128)).astype(np.float32)
    ids = np.array([[0, 95, 7]], dtype=np.int64)
    y, e = run(model, {"x": x, "ids": ids})
    expected = x @ rows.T
    tolerance = 1e-4 if level == 0 else 3e-2  # level 4 quantizes the activations to int8
    assert np.abs(y - expected).max() <= tolerance * np.abs(expected).max()
    np.testing.assert_allclose(e[0], rows[ids[0]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("block_size", [32, 16])
def test_folded_remainders_are_within_a_900th(block_size: int) -> None:
    """At level 4 a Q4_1 remainder rides in its MatMulNBits on the input's block sums (no float MatMul):
    the folded table on [x, blocksums, 0.., blocksums] is the exact weights to 1/900 of the largest remainder,
    and the node computes what the exact weights do, to int8 activations' precision."""
    bw = q4_1_blocks(96, 128)
    assert bw.residual is not None
    folded = bw.with_remainder_blocks()
    x = RNG.standard_normal((5, 128)).astype(np.float32)
    sums = x.reshape(5, -1, BLOCK).sum(axis=2)
    widened = np.concatenate([x, sums, np.zeros((5, BLOCK - sums.shape[1]), np.float32), sums], axis=1)
    exact = x @ bw.dequantize().T
    error = np.abs(widened @ folded.dequantize()[:, : widened.shape[1]].T - exact)
    bound = np.abs(bw.residual).max() / 900 * np.abs(sums).sum(axis=1, keepdims=True)
    assert (error <= bound + 1e-4 * np.abs(exact).max()).all()
    assert (error > 0).any(), "not exact: the remainders are rounded"

    model = graph(bw.dequantize(), vocab_gather=False)
    nodes = _matmul_nbits(_Graph(model), model.graph.node[0], _Tables("w", (bw,)), 4, {}, block_size)
    assert "MatMul" not in [n.op_type for n in nodes], "no float remainder path at level 4"
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    (y,) = run(model, {"x": x[None]})
    assert np.abs(y[0] - exact).max() <= 3e-2 * np.abs(exact).max()


def test_q4_1_residual_is_needed() -> None:
    """Without the residual, rounding the float minimum to an integer zero point is visibly wrong."""
    bw = q4_1_blocks(16, 64)
    assert bw.residual is not None
    truncated = BlockWeights(4, bw.q, bw.scale, bw.zero, None)
    assert np.abs(truncated.dequantize() - bw.dequantize()).max() > 1e-3


@pytest.mark.parametrize("bits", [4, 8])
def test_requantized_float_weights_are_close(bits: int) -> None:
    rows = RNG.standard_normal((64, 96)).astype(np.float32)
    bw = BlockWeights.quantize(rows, bits)
    step = (rows.max() - rows.min()) / ((1 << bits) - 1)
    assert np.abs(bw.dequantize() - rows).max() <= step
    model = graph(rows, vocab_gather=False)
    quantize_model(model, bits, 0, lambda *_: None)
    x = RNG.standard_normal((1, 2, 96)).astype(np.float32)
    (y,) = run(model, {"x": x})
    np.testing.assert_allclose(y, x @ bw.dequantize().T, rtol=1e-4, atol=1e-4)


def test_quantized_tiny_builds_track_fp32(tiny_models: dict[str, Path]) -> None:
    """The whole exported graph still runs after the rewrite, with logits close to fp32's."""
    engines = {q: Engine(path, threads=1) for q, path in tiny_models.items()}
    ids = engines["fp32"].tokenizer.encode("Tomatoes wilt in hot weather")
    logits = {q: e.session.forward(ids, e.session.new_cache()) for q, e in engines.items()}
    spread = np.abs(logits["fp32"]).max()
    assert np.abs(logits["int8"] - logits["fp32"]).max() < 0.05 * spread
    assert np.abs(logits["int4"] - logits["fp32"]).max() < 0.5 * spread
    sizes = {q: (p / "model.onnx").stat().st_size for q, p in tiny_models.items()}
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"]
