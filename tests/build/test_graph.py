"""edged's own decoder graph: the same weights as the optimum export give the same logits and answers."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edged.build import build_key, build_model, graph
from edged.build.graph import build_decoder
from edged.build.quantize import BLOCK, F32, BlockSource, BlockWeights, quantize_model
from edged.errors import ModelUnavailable
from edged.evaluate import agreement
from edged.llm import Engine, GenerationRequest, Message
from edged.llm.session import DecoderSession, Embedding, KVBuffer, KVCache
from edged.store import Recipe, default_cache_dir

TEXT = "Tomatoes wilt in hot weather; water them early in the morning. Grüße aus München!"


@pytest.fixture(scope="module")
def tiny_gqa(tiny_models: dict[str, Path]) -> dict[str, Path]:
    """The tiny model's gqa builds beside its optimum builds, from the same recipe and weights."""
    models_dir = tiny_models["fp32"].parent
    recipe = Recipe.load(models_dir / "tiny.toml")
    cache = models_dir.parent / "cache"
    return {q: build_model(recipe, q, models_dir, cache, lambda _: None, graph="gqa") for q in ("fp32", "int4")}


def _logits(model_dir: Path, ids: list[int]) -> F32:
    session = DecoderSession(model_dir / "model.onnx", threads=1)
    return session.forward(ids, session.new_cache())


def _close(a: F32, b: F32, rel: float) -> None:
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= rel * np.abs(b).max(), np.abs(a - b).max()


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_gqa_graph_gives_the_optimum_graphs_logits(
    tiny_models: dict[str, Path], tiny_gqa: dict[str, Path], quant: str
) -> None:
    """Same weights, another graph (fused QKV, rotary inside attention, a shared KV buffer): same logits."""
    ids = Engine(tiny_models["fp32"]).tokenizer.encode(TEXT)
    _close(_logits(tiny_gqa[quant], ids), _logits(tiny_models[quant], ids), 1e-5)


def test_gqa_build_has_its_own_directory_key_and_manifest(
    tiny_models: dict[str, Path], tiny_gqa: dict[str, Path]
) -> None:
    """A gqa build must never be mistaken for (or overwrite) the optimum build of the same recipe."""
    recipe = Recipe.load(tiny_models["int4"].parent / "tiny.toml")
    assert tiny_gqa["int4"].name == "tiny-gqa" and tiny_gqa["fp32"].name == "tiny-fp32-gqa"
    assert build_key(recipe, "int4", "gqa") != build_key(recipe, "int4") == build_key(recipe, "int4", "optimum")
    manifest = json.loads((tiny_gqa["int4"] / "manifest.json").read_text())
    assert manifest["graph"] == "gqa" and manifest["build_key"] == build_key(recipe, "int4", "gqa")
    ops = Counter(n.op_type for n in onnx.load(str(tiny_gqa["int4"] / "model.onnx")).graph.node)
    assert ops["GroupQueryAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] == 4
    assert ops["MatMulNBits"] == 2 * 4 + 1, "per layer QKV, O, gate/up and down, then the lm_head"


def test_gqa_greedy_answers_match_with_chunked_prefill(tiny_models: dict[str, Path], tiny_gqa: dict[str, Path]) -> None:
    """Prefill in chunks of 3 (GroupQueryAttention's 'subsequent prompt' path), then decode: the same tokens."""
    request = GenerationRequest(messages=(Message("user", TEXT),), max_tokens=40)
    optimum = Engine(tiny_models["int4"], threads=1).complete(request)
    gqa = Engine(tiny_gqa["int4"], threads=1, prefill_chunk_tokens=3).complete(request)
    assert len(gqa.token_ids) == 40
    assert gqa.token_ids == optimum.token_ids


def _q4_1(node_names: list[str]) -> BlockSource:
    """A block source that hands out Q4_1 blocks (w = d q + m, float m) of each weight, as a GGUF does,
    and records which weights it was asked for."""

    def source(init_name: str, node_name: str, rows: F32) -> BlockWeights | None:
        if not node_name.endswith("/MatMul"):
            return None
        node_names.append(node_name)
        n, k = rows.shape
        blocks = rows.reshape(n, k // BLOCK, BLOCK)
        lo, hi = blocks.min(axis=2), blocks.max(axis=2)
        d = ((hi - lo) / 15).astype(np.float16).astype(np.float32)
        m = lo.astype(np.float16).astype(np.float32)
        safe_d = np.where(d == 0, np.float32(1), d)  # the tiny lm_head's rows of specials are all zero
        q = np.clip(np.rint((blocks - m[..., None]) / safe_d[..., None]), 0, 15).astype(np.uint8)
        return BlockWeights.from_affine(4, q.reshape(n, k), d, m)

    return source


def test_q4_1_remainders_are_exact_and_shared_per_input(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Q4_1 blocks carried into both graphs give the same logits; in the gqa graph the remainder costs one
    block sum and one small MatMul per input (QKV share one, gate/up share one), not one per projection."""
    asked_optimum: list[str] = []
    asked_gqa: list[str] = []
    optimum = onnx.load(str(tiny_models["fp32"] / "model.onnx"))
    quantize_model(optimum, 4, 0, _q4_1(asked_optimum))
    onnx.save(optimum, str(tmp_path / "optimum.onnx"))
    hf_dir = (tiny_models["fp32"].parent / "../hf").resolve()
    gqa = build_decoder(hf_dir, "int4", 0, _q4_1(asked_gqa))
    assert sorted(asked_gqa) == sorted(asked_optimum), "the same weights, looked up by the same names"

    ops = Counter(n.op_type for n in gqa.model.graph.node)
    layers = 2
    assert ops["ReduceSum"] == ops["MatMul"] == 4 * layers + 1, "one remainder per input, plus the lm_head's"
    assert gqa.stats["residual_paths"] == 4 * layers + 1

    ids = Engine(tiny_models["fp32"]).tokenizer.encode(TEXT)
    paths = [tmp_path / "optimum.onnx", gqa.save(tmp_path / "gqa")]
    sessions = [DecoderSession(path, threads=1) for path in paths]
    reference, ours = (s.forward(ids, s.new_cache()) for s in sessions)
    _close(ours, reference, 1e-5)


def test_8bit_weights_stay_whole_where_activations_are_int8(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """onnxruntime has a fast 8-bit kernel for int8 activations only: an 8-bit lm_head at level 4 is one
    MatMulNBits, while 8-bit projections at level 0 run as two
    exact 4-bit halves. Both hold the same weights: the logits differ by the head's int8 activations only."""
    hf_dir = (tiny_models["fp32"].parent / "../hf").resolve()
    decoders = {
        name: build_decoder(hf_dir, "int8", 0, lambda *_: None, int8)
        for name, int8 in (("float", ()), ("int8_head", ("lm_head",)))
    }
    nodes = decoders["int8_head"].model.graph.node
    head = [n for n in nodes if n.op_type == "MatMulNBits" and n.output[0].startswith("logits")]
    attrs = {a.name: a.i for a in head[0].attribute} if head else {}
    assert len(head) == 1 and attrs["bits"] == 8 and attrs["accuracy_level"] == 4, head
    for kind in ("/qkv/", "/o/", "/gate_up/", "/down/"):
        parts = [n for n in nodes if n.op_type == "MatMulNBits" and kind in n.output[0] and "layers.0/" in n.output[0]]
        assert [{a.name: a.i for a in n.attribute}["bits"] for n in parts] == [4, 4], kind
    float_head = [
        n for n in decoders["float"].model.graph.node if n.op_type == "MatMulNBits" and "logits" in n.output[0]
    ]
    assert len(float_head) == 2

    ids = Engine(tiny_models["fp32"]).tokenizer.encode(TEXT)
    logits = {}
    for name, decoder in decoders.items():
        session = DecoderSession(decoder.save(tmp_path / name), threads=1)
        logits[name] = session.forward(ids, session.new_cache())
    _close(logits["int8_head"], logits["float"], 2e-2)
    _close(logits["float"], _logits(tiny_models["int8"], ids), 1e-5)


@pytest.mark.parametrize(("quant", "source"), [("int4", "q4_1"), ("int8", "float"), ("fp32", "float")])
def test_large_projections_run_as_slices_with_the_same_logits(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quant: str, source: str
) -> None:
    """A projection over the node size runs as slices of its outputs and a Concat: the same logits, with
    each slice's Q4_1 remainder and 8-bit halves in place. The limit is lowered so the tiny model is cut."""
    hf_dir = (tiny_models["fp32"].parent / "../hf").resolve()
    blocks = _q4_1([]) if source == "q4_1" else (lambda *_: None)
    whole = build_decoder(hf_dir, quant, 0, blocks)
    monkeypatch.setattr(graph, "_MAX_NODE_WEIGHT_BYTES", 512)
    sliced = build_decoder(hf_dir, quant, 0, blocks)
    ops = Counter(n.op_type for n in sliced.model.graph.node)
    assert ops["Concat"] == 2 * 4 + 1, "every projection of both layers, and the head, is cut"
    ids = Engine(tiny_models["fp32"]).tokenizer.encode(TEXT)
    logits = []
    for name, decoder in (("whole", whole), ("sliced", sliced)):
        session = DecoderSession(decoder.save(tmp_path / name), threads=1)
        logits.append(session.forward(ids, session.new_cache()))
    _close(logits[1], logits[0], 1e-5)


def test_fine_blocks_hold_the_same_weights_in_blocks_of_16(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A projection in fine_blocks stores each block of 32 as two of 16 with its scale and zero point: at
    float activations the logits are those of blocks of 32 (Q4_1 remainders included); at int8 activations
    the input is quantized per 16 values, closer to the float logits than per 32."""
    hf_dir = (tiny_models["fp32"].parent / "../hf").resolve()
    every = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")
    ids = Engine(tiny_models["fp32"]).tokenizer.encode(TEXT)
    logits = {}
    for name, int8, fine in (
        ("float", (), ()),
        ("float16", (), every),
        ("int8", every, ()),
        ("int8_16", every, every),
    ):
        decoder = build_decoder(hf_dir, "int4", 0, _q4_1([]), int8, fine)
        sizes = {a.i for n in decoder.model.graph.node for a in n.attribute if a.name == "block_size"}
        assert sizes == ({16} if fine else {32}), name
        session = DecoderSession(decoder.save(tmp_path / name), threads=1)
        logits[name] = session.forward(ids, session.new_cache())
    _close(logits["float16"], logits["float"], 1e-5)
    error = {name: np.abs(logits[name] - logits["float"]).mean() for name in ("int8", "int8_16")}
    assert 0 < error["int8_16"] < error["int8"], error


def test_slices_cover_every_row_in_order() -> None:
    for rows, nbytes in ((49152, 31_850_496), (960, 100), (7, 10 * graph._MAX_NODE_WEIGHT_BYTES), (1, 1 << 30)):
        cuts = graph._slices(rows, nbytes)
        assert cuts[0][0] == 0 and cuts[-1][1] == rows
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in itertools.pairwise(cuts))
    assert len(graph._slices(49152, 31_850_496)) == 4


def test_a_graph_from_an_older_build_is_named_as_such(tiny_gqa: dict[str, Path], tmp_path: Path) -> None:
    """A gqa graph of GRAPH_FORMAT 2 gathered its own embeddings from input_ids: the session says to rebuild."""
    model = onnx.load(str(tiny_gqa["fp32"] / "model.onnx"))
    rows = Embedding(tiny_gqa["fp32"] / "embedding.npy")
    table = rows(np.arange(rows.vocab)[None])[0]
    model.graph.initializer.append(numpy_helper.from_array(table, "embed"))
    model.graph.node.insert(0, onnx.helper.make_node("Gather", ["embed", "input_ids"], ["inputs_embeds"]))
    kept = [i for i in model.graph.input if i.name != "inputs_embeds"]
    del model.graph.input[:]
    model.graph.input.extend(
        [onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "sequence"]), *kept]
    )
    old = tmp_path / "old"
    old.mkdir()
    onnx.save(model, str(old / "model.onnx"))
    with pytest.raises(ModelUnavailable, match=r"built by an older edged.*rebuild it with `edged model build`"):
        DecoderSession(old / "model.onnx")


def test_a_kv_buffer_is_chosen_from_the_graphs_inputs(tiny_models: dict[str, Path], tiny_gqa: dict[str, Path]) -> None:
    """The session reads the graph's signature: optimum exports keep their cache, gqa graphs get a buffer."""
    assert isinstance(DecoderSession(tiny_models["int4"] / "model.onnx").new_cache(8), KVCache)
    gqa = DecoderSession(tiny_gqa["int4"] / "model.onnx")
    buffer = gqa.new_cache(8)
    assert isinstance(buffer, KVBuffer) and buffer.tensors.shape == (4, 1, 2, 8, 16)


# -- the real SmolLM2 --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_float(smollm2_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recipe built with float activations everywhere (its int8_activations and fine_blocks left out):
    the GGUF's blocks and their float remainders, exactly. Built once, then found in the build cache."""
    recipe = Recipe.load(smollm2_dirs["int4"].parent / f"{smollm2_dirs['int4'].name}.toml")
    assert recipe.int8_activations, "the default build has int8 activations somewhere (the recipe's int8_activations)"
    models = tmp_path_factory.mktemp("float")
    kept = [line for line in recipe.path.read_text().splitlines() if not line.startswith(("int8_activations", "fine_"))]
    (models / recipe.path.name).write_text("\n".join(kept) + "\n")
    return build_model(Recipe.load(models / recipe.path.name), "int4", models, default_cache_dir(), print)


PROMPTS = ["What is the capital of Japan?", "Write a short poem about the sea.", "Why do cats purr?"]


@pytest.mark.model
def test_smollm2_default_build_carries_the_gguf_blocks_exactly(
    smollm2_dirs: dict[str, Path], smollm2_float: Path
) -> None:
    """The gqa graph holds the GGUF's blocks exactly: built with float activations its logits are the fp32
    build's to float rounding and its greedy answers are token for token the same. The default build holds
    the same blocks, their remainders folded into them (int8 activations: no float remainder path left)."""
    manifest = json.loads((smollm2_dirs["int4"] / "manifest.json").read_text())
    assert manifest["graph"] == "gqa"
    quantization = manifest["quantization"]
    assert quantization["requantized"] == 0
    assert (quantization["folded_remainders"], quantization["residual_paths"]) == (30 * 4, 0)
    exact_paths = json.loads((smollm2_float / "manifest.json").read_text())["quantization"]
    assert (exact_paths["folded_remainders"], exact_paths["residual_paths"]) == (0, 30 * 4)
    assert quantization["exact_blocks"] == 30 * 7 + 1, "each layer's 7 weights, then one table for embedding and head"
    graph = onnx.load(str(smollm2_dirs["int4"] / "model.onnx")).graph
    head = [n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0].startswith("logits")]
    attrs = [{a.name: a.i for a in n.attribute} for n in head]
    assert [(a["bits"], a["N"]) for a in attrs] == [(8, 49152 // 4)] * 4, "the Q8_0 head: 8-bit nodes of <= 8 MB"
    assert "Gather" not in {n.op_type for n in graph.node if n.output[0].startswith("/model/embed")}
    # The tied embedding is the head's blocks, read from embedding.npy: row t of both is the same, exactly.
    inits = {i.name: i for i in graph.initializer}
    q = numpy_helper.to_array(inits[head[1].input[1]]).reshape(49152 // 4, -1)  # tokens 12288 .. 24575
    scale = numpy_helper.to_array(inits[head[1].input[2]]).reshape(len(q), -1)
    tokens = np.arange(0, len(q), 97)
    want = (q[tokens].astype(np.float32) - 128).reshape(len(tokens), -1, BLOCK) * scale[tokens][..., None]
    got = Embedding(smollm2_dirs["int4"] / "embedding.npy")(tokens[None, :] + len(q))[0]
    assert np.array_equal(got, want.reshape(len(tokens), -1))
    fp32 = Engine(smollm2_dirs["fp32"], threads=2)
    exact = Engine(smollm2_float, threads=2)
    for prompt in PROMPTS:
        request = GenerationRequest(messages=(Message("user", prompt),), max_tokens=48)
        ids = fp32.prompt_ids(request)
        ours = exact.session.forward(ids, exact.session.new_cache())
        _close(ours, fp32.session.forward(ids, fp32.session.new_cache()), 1e-4)
        assert exact.complete(request).token_ids == fp32.complete(request).token_ids, prompt


@pytest.mark.model
def test_smollm2_default_build_is_faithful_to_fp32(smollm2_dirs: dict[str, Path], smollm2_float: Path) -> None:
    """`edged model eval`'s measure: at least 0.99 top-1 agreement with fp32 with float activations, and at
    least 0.95 with the recipe's int8 activations (the answer set in test_smollm2 says they lose nothing)."""
    fp32 = Engine(smollm2_dirs["fp32"], threads=2)
    exact = agreement(fp32, Engine(smollm2_float, threads=2))
    assert exact.positions >= 200
    assert exact.top1 >= 0.99 and exact.kl < 1e-3, exact
    default = agreement(fp32, Engine(smollm2_dirs["int4"], threads=2))
    print(f"agreement with fp32: float activations {exact.top1:.3f}, the default build {default.top1:.3f}")
    assert default.top1 >= 0.95, default
    japan = Engine(smollm2_dirs["int4"], threads=2).complete(
        GenerationRequest(messages=(Message("user", PROMPTS[0]),), max_tokens=32)
    )
    assert "Tokyo" in japan.text and japan.finish_reason == "stop"


def test_int8_activations_apply_to_the_named_projections_only(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A recipe's int8_activations set accuracy level 4 on those projections' MatMulNBits, the rest keep the
    recipe's level; a name that is no projection is refused."""
    models_dir = tiny_models["fp32"].parent
    recipe_path = tmp_path / "mixed.toml"
    base = (models_dir / "tiny.toml").read_text().replace('hf_dir = "../hf"', f'hf_dir = "{models_dir.parent / "hf"}"')
    recipe_path.write_text(f'int8_activations = ["gate_up_proj", "lm_head"]\n{base}')
    built = build_model(Recipe.load(recipe_path), "int4", tmp_path / "models", tmp_path / "cache", print, graph="gqa")
    levels: dict[str, set[int]] = {}
    for node in onnx.load(str(built / "model.onnx")).graph.node:
        if node.op_type == "MatMulNBits":
            kind = node.output[0].split("/")[-2] if "/layers." in node.output[0] else "lm_head"
            level = next(a.i for a in node.attribute if a.name == "accuracy_level")
            levels.setdefault(kind, set()).add(level)
    assert levels == {"qkv": {0}, "o": {0}, "gate_up": {4}, "down": {0}, "lm_head": {4}}, levels
    recipe_path.write_text(f'fine_blocks = ["lm_head"]\nint8_activations = ["gate_up_proj"]\n{base}')
    with pytest.raises(ValueError, match="fine_blocks must list some of int8_activations"):
        Recipe.load(recipe_path)
    recipe_path.write_text(f'int8_activations = ["attention"]\n{base}')
    with pytest.raises(ValueError, match="int8_activations must list some of"):
        Recipe.load(recipe_path)
