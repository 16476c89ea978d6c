"""edged's own decoder graph for Llama-style models, written with the ``onnx`` package at build time.

The graph starts from the token embeddings (``inputs_embeds``): the engine reads their rows from the model's
``embedding.npy`` as it needs them, so the table is never on the heap (``edged.llm.session.Embedding``). Per
layer: SkipSimplifiedLayerNormalization, one packed QKV projection, GroupQueryAttention with rotary inside
on a KV buffer that is both past and present, the O projection, one packed gate/up projection, SiLU as
Sigmoid * Mul, down. The lm_head runs only on the rows ``logit_rows`` picks (the last position when generating).
Projections are MatMulNBits over the GGUF's own blocks, carried exactly (``quantize.BlockWeights``); a float
source is requantized the way ``quantize_model`` does it, so both graphs hold the same weights.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from edged.build.quantize import (
    _MIN_GATHER_ELEMENTS,
    BLOCK,
    F32,
    BlockSource,
    BlockWeights,
    _Graph,
    _matmul_nbits,
    _Tables,
    remainder_stats,
)
from edged.llm.session import INPUTS_EMBEDS, embedding_table
from edged.store import EMBEDDING_FILE

OPSET = 18
MS = "com.microsoft"
# The graph's interface, read by edged.llm.session (a graph with SEQLENS_K gets the shared KV buffer), with
# session.INPUTS_EMBEDS, float32 [batch, seq, hidden]: the tokens' rows of embedding.npy.
SEQLENS_K = "seqlens_k"  # int32 [batch]: total length - 1 per sequence
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # int32 scalar
LOGIT_ROWS = "logit_rows"  # int64 [rows]: rows of the flattened [batch * seq] positions to compute logits for
# A projection whose weights exceed this (8 MiB) runs as several nodes, each on a slice of the outputs:
# onnxruntime holds a node's unpacked weights beside their packed layout while it loads (SmolLM2's session
# from its prepared copy peaked 66 MB above what it keeps with its 32 MB lm_head as one node, 17 MB with four).
_MAX_NODE_WEIGHT_BYTES = 8 << 20


@dataclass(frozen=True)
class DecoderShape:
    """The few numbers of a Llama-style decoder the graph is written from (transformers' config.json)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    rope_theta: float
    max_positions: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DecoderShape:
        if config.get("model_type") != "llama":
            raise ValueError(f"the gqa graph is written for Llama-style models, not {config.get('model_type')!r}")
        for flag in ("attention_bias", "mlp_bias"):
            if config.get(flag):
                raise ValueError(f"the gqa graph has no projection biases ({flag} is set); build with --graph optimum")
        if config.get("rope_scaling"):
            raise ValueError("the gqa graph has no rope scaling; build with --graph optimum")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"the gqa graph computes SiLU, not {config['hidden_act']!r}")
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        shape = cls(
            layers=int(config["num_hidden_layers"]),
            hidden=hidden,
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate=int(config["intermediate_size"]),
            vocab=int(config["vocab_size"]),
            eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            max_positions=int(config["max_position_embeddings"]),
            tied=bool(config.get("tie_word_embeddings", False)),
        )
        if shape.head_dim % 16:  # GroupQueryAttention's rotary needs it (onnxruntime's CheckInputs)
            raise ValueError(
                f"head size {shape.head_dim} is not a multiple of 16, as GroupQueryAttention's rotary needs"
            )
        return shape

    @property
    def qkv_width(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim


def rotary_caches(shape: DecoderShape) -> tuple[F32, F32]:
    """cos and sin [max_positions, head_dim / 2], computed in float32 as transformers' Llama does."""
    exponents = np.arange(0, shape.head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(shape.head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(shape.rope_theta) ** exponents)).astype(np.float32)
    angles = np.arange(shape.max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def load_hf_weights(hf_dir: Path) -> dict[str, F32]:
    """Every tensor of a transformers checkpoint saved as safetensors, as float32."""
    from safetensors.numpy import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{hf_dir} holds no *.safetensors weights")
    weights: dict[str, F32] = {}
    for file in files:
        weights.update({k: v.astype(np.float32) for k, v in load_file(str(file)).items()})
    return weights


class _Writer:
    """Writes the decoder's nodes into one graph, converting each weight once (tied tables shared by content)."""

    def __init__(
        self,
        quant: str,
        accuracy_level: int,
        source: BlockSource,
        int8_activations: tuple[str, ...],
        fine_blocks: tuple[str, ...] = (),
    ) -> None:
        self.quant = quant
        self.bits = 8 if quant == "int8" else 4
        self.level = accuracy_level
        self.int8_activations = int8_activations
        self.fine_blocks = fine_blocks
        self.source = source
        model = helper.make_model(
            helper.make_graph([], "edged-decoder", [], []),
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
        )
        self.g = _Graph(model)
        self.nodes: list[onnx.NodeProto] = []
        self.block_sums: dict[str, str] = {}
        self._blocks: dict[bytes, BlockWeights] = {}
        counts = ("matmul_nbits", "exact_blocks", "requantized", "residual_paths", "folded_remainders")
        self.stats = dict.fromkeys(counts, 0)

    def op(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs: Any) -> list[str]:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=self.g.fresh(op), domain=domain, **attrs))
        return outputs

    def const(self, name: str, array: np.ndarray[Any, Any]) -> str:
        return self.g.add_init(name, array)

    def level_of(self, key: str) -> int:
        """The accuracy level of the projection ``key`` (``model.layers.3.mlp.down_proj``, ``lm_head``)."""
        return 4 if key.rsplit(".", 1)[-1] in self.int8_activations else self.level

    def block_of(self, key: str) -> int:
        """The block size the projection ``key`` is stored in: 16 where the recipe's fine_blocks name it."""
        return 16 if key.rsplit(".", 1)[-1] in self.fine_blocks else BLOCK

    def blocks(self, weights: list[tuple[str, str, F32]]) -> BlockWeights:
        """The blocks of ``weights`` ([N_i, K] rows each, with their graph names) stacked along N: the GGUF's
        own, or requantized. Converted once per content, so a tied lm_head gets the embedding's blocks."""
        rows = np.concatenate([w for _, _, w in weights], axis=0)
        digest = hashlib.blake2b(np.ascontiguousarray(rows).tobytes(), digest_size=16).digest()
        if digest not in self._blocks:
            blocks = []
            for init_name, node_name, w in weights:
                bw = self.source(init_name, node_name, w)
                self.stats["exact_blocks" if bw is not None else "requantized"] += 1
                blocks.append(bw or BlockWeights.quantize(w, self.bits))
            self._blocks[digest] = _stack(blocks)
        return self._blocks[digest]

    def project(self, x: str, y: str, key: str, weights: list[tuple[str, str, F32]]) -> str:
        """y = x @ W.T for the rows of ``weights`` stacked along N: one MatMulNBits (or one float MatMul), or
        one per slice of N and a Concat when the weights exceed ``_MAX_NODE_WEIGHT_BYTES``.

        A Q4_1 remainder costs one block sum of ``x`` (shared by every projection that reads ``x``) and one
        small MatMul for the whole stack (per slice), not one per projection. 8-bit blocks stay whole at level
        4, where onnxruntime runs them fast (SmolLM2's lm_head: 0.64 ms a token, against 0.84 ms as two 4-bit
        halves, and 1.0 against 2.2 ms for four rows), and become two 4-bit halves at level 0, where it does not.
        """
        emit: Callable[[int, int, str], None]
        if self.quant == "fp32":
            stacked = np.concatenate([w for _, _, w in weights], axis=0)
            rows, nbytes = stacked.shape[0], stacked.nbytes

            def emit(start: int, stop: int, out: str) -> None:
                weight_t = np.ascontiguousarray(stacked[start:stop].T)
                self.op("MatMul", [x, self.const(f"{key}.n{start}.weight_t", weight_t)], [out])
        else:
            bw = self.blocks(weights)
            rows, nbytes = bw.shape[0], bw.nbytes

            def emit(start: int, stop: int, out: str) -> None:
                self._nbits(x, out, key, f"{key}.n{start}", bw.rows(start, stop))

        slices = _slices(rows, nbytes)
        outputs = [y] if len(slices) == 1 else [f"{y}/n{i}" for i in range(len(slices))]
        for (start, stop), out in zip(slices, outputs, strict=True):
            emit(start, stop, out)
        if len(outputs) > 1:
            self.op("Concat", outputs, [y], axis=-1)
        return y

    def _nbits(self, x: str, y: str, key: str, name: str, part: BlockWeights) -> None:
        """One MatMulNBits (two 4-bit halves for 8-bit blocks at level 0) of projection ``key``'s rows ``part``."""
        level = self.level_of(key)
        t = _Tables(name, part.nibbles() if part.bits == 8 and level == 0 else (part,))
        matmul = helper.make_node("MatMul", [x, ""], [y])  # only its input and output names are read
        self.nodes.extend(_matmul_nbits(self.g, matmul, t, level, self.block_sums, self.block_of(key)))
        self.stats["matmul_nbits"] += len(t.parts)
        for stat, count in remainder_stats(t.parts, level).items():
            self.stats[stat] += count

    def embedding(self, table: F32) -> np.ndarray[Any, Any]:
        """The records of ``embedding.npy``: the float rows of an fp32 build or a small table (as
        ``quantize_model`` leaves them), else the blocks a tied lm_head holds too, centred on their zero points
        (``W = (q - zero) * scale + residual``, one rounding)."""
        if self.quant == "fp32" or table.size < _MIN_GATHER_ELEMENTS:
            return embedding_table(table)
        bw = self.blocks([("model.embed_tokens.weight", "/model/embed_tokens/Gather", table)])
        n, k = bw.shape
        centred = (bw.q.reshape(n, k // BLOCK, BLOCK).astype(np.int16) - bw.zero[..., None]).reshape(n, k)
        # int8 holds GGUF's Q8_0 (zero 128) and every 4-bit table; requantized 8-bit zero points need int16.
        fits = centred.min() >= -128 and centred.max() <= 127
        return embedding_table(centred.astype(np.int8 if fits else np.int16), bw.scale, bw.residual)

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        graph = self.g.graph
        graph.node.extend(self.nodes)
        graph.input.extend(inputs)
        graph.output.extend(outputs)
        return self.g.model


def _slices(rows: int, nbytes: int) -> list[tuple[int, int]]:
    """Equal slices of ``rows`` outputs, as few as hold about ``_MAX_NODE_WEIGHT_BYTES`` of the ``nbytes`` each."""
    size = math.ceil(rows / max(1, math.ceil(nbytes / _MAX_NODE_WEIGHT_BYTES)))
    return [(start, min(start + size, rows)) for start in range(0, rows, size)]


def _stack(blocks: list[BlockWeights]) -> BlockWeights:
    """One [sum N_i, K] block matrix from several with the same K and bits (a remainder of 0 where one has none)."""
    if len(blocks) == 1:
        return blocks[0]
    if len({b.bits for b in blocks}) != 1:
        raise ValueError(f"cannot pack projections stored with different bits {[b.bits for b in blocks]}")
    residual = None
    if any(b.residual is not None for b in blocks):
        residual = np.concatenate([b.residual if b.residual is not None else np.zeros_like(b.scale) for b in blocks])
    return BlockWeights(
        blocks[0].bits,
        np.concatenate([b.q for b in blocks]),
        np.concatenate([b.scale for b in blocks]),
        np.concatenate([b.zero for b in blocks]),
        residual,
    )


@dataclass(frozen=True, eq=False)
class Decoder:
    """A written decoder: its graph, its embedding table and what was converted (for the manifest)."""

    model: onnx.ModelProto
    embedding: np.ndarray[Any, Any]
    stats: dict[str, Any]

    def save(self, out: Path) -> Path:
        """Writes ``model.onnx`` and ``embedding.npy`` into ``out``; returns the graph's path."""
        out.mkdir(parents=True, exist_ok=True)
        onnx.save(self.model, str(out / "model.onnx"))
        np.save(out / EMBEDDING_FILE, self.embedding)
        return out / "model.onnx"


def build_decoder(
    hf_dir: Path,
    quant: str,
    accuracy_level: int,
    source: BlockSource,
    int8_activations: tuple[str, ...] = (),
    fine_blocks: tuple[str, ...] = (),
) -> Decoder:
    """The decoder of the transformers model in ``hf_dir``; ``source`` gives a weight's GGUF blocks. The
    projections named in ``int8_activations`` run at accuracy level 4 (int8 activations), the rest at
    ``accuracy_level``; those in ``fine_blocks`` are stored in blocks of 16."""
    shape = DecoderShape.from_config(json.loads((hf_dir / "config.json").read_text()))
    weights = load_hf_weights(hf_dir)
    w = _Writer(quant, accuracy_level, source, int8_activations, fine_blocks)
    kv_shape: list[int | str] = ["batch", shape.kv_heads, "max_length", shape.head_dim]
    inputs = [
        helper.make_tensor_value_info(INPUTS_EMBEDS, TensorProto.FLOAT, ["batch", "sequence", shape.hidden]),
        helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info(TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, []),
        helper.make_tensor_value_info(LOGIT_ROWS, TensorProto.INT64, ["rows"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "rows", shape.vocab])]
    cos, sin = rotary_caches(shape)
    cos_name, sin_name = w.const("rotary.cos", cos), w.const("rotary.sin", sin)

    def parts(layer: int, module: str, *projections: str) -> list[tuple[str, str, F32]]:
        """(weight name, the export's MatMul name, rows) of the projections one packed MatMul carries."""
        p, n = f"model.layers.{layer}", f"/model/layers.{layer}"
        return [
            (f"{p}.{module}.{m}_proj.weight", f"{n}/{module}/{m}_proj/MatMul", rows(f"{p}.{module}.{m}_proj.weight"))
            for m in projections
        ]

    def rows(name: str) -> F32:
        return weights[name]

    embed_table = rows("model.embed_tokens.weight")
    embedding = w.embedding(embed_table)  # first: a tied lm_head then finds its blocks converted
    residual = INPUTS_EMBEDS
    mlp_out: str | None = None
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        n = f"/model/layers.{i}"
        ln_in = w.const(f"{p}.input_layernorm.weight", rows(f"{p}.input_layernorm.weight"))
        if mlp_out is None:
            (x,) = w.op("SimplifiedLayerNormalization", [residual, ln_in], [f"{n}/input_layernorm"], epsilon=shape.eps)
        else:
            x, _, _, residual = w.op(
                "SkipSimplifiedLayerNormalization",
                [mlp_out, residual, ln_in],
                [f"{n}/input_layernorm", "", "", f"{n}/residual_in"],
                domain=MS,
                epsilon=shape.eps,
            )

        qkv = w.project(x, f"{n}/qkv", f"{p}.self_attn.qkv_proj", parts(i, "self_attn", "q", "k", "v"))
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        present_k, present_v = f"present.{i}.key", f"present.{i}.value"
        for past, present in ((past_k, present_k), (past_v, present_v)):
            inputs.append(helper.make_tensor_value_info(past, TensorProto.FLOAT, kv_shape))
            outputs.append(helper.make_tensor_value_info(present, TensorProto.FLOAT, kv_shape))
        (attn, _, _) = w.op(
            "GroupQueryAttention",
            [qkv, "", "", past_k, past_v, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, cos_name, sin_name],
            [f"{n}/attn", present_k, present_v],
            domain=MS,
            num_heads=shape.heads,
            kv_num_heads=shape.kv_heads,
            scale=float(1 / np.sqrt(shape.head_dim)),
            do_rotary=1,
            # transformers' rows (rotate_half), which GGUFSource.blocks_for matches: no interleaving
            rotary_interleaved=0,
        )
        o = w.project(attn, f"{n}/o", f"{p}.self_attn.o_proj", parts(i, "self_attn", "o"))
        ln_post = w.const(f"{p}.post_attention_layernorm.weight", rows(f"{p}.post_attention_layernorm.weight"))
        x, _, _, residual = w.op(
            "SkipSimplifiedLayerNormalization",
            [o, residual, ln_post],
            [f"{n}/post_attention_layernorm", "", "", f"{n}/residual_mid"],
            domain=MS,
            epsilon=shape.eps,
        )
        gate_up = w.project(x, f"{n}/gate_up", f"{p}.mlp.gate_up_proj", parts(i, "mlp", "gate", "up"))
        gate, up = w.op("Split", [gate_up], [f"{n}/gate", f"{n}/up"], axis=-1, num_outputs=2)
        (sig,) = w.op("Sigmoid", [gate], [f"{n}/sigmoid"])
        (silu,) = w.op("Mul", [gate, sig], [f"{n}/silu"])
        (act,) = w.op("Mul", [silu, up], [f"{n}/act"])
        mlp_out = w.project(act, f"{n}/down", f"{p}.mlp.down_proj", parts(i, "mlp", "down"))
    assert mlp_out is not None
    norm = w.const("model.norm.weight", rows("model.norm.weight"))
    final, _, _, _ = w.op(
        "SkipSimplifiedLayerNormalization",
        [mlp_out, residual, norm],
        ["/model/norm", "", "", ""],
        domain=MS,
        epsilon=shape.eps,
    )
    # Only the picked rows reach the lm_head: a prompt's prefill computes one row of logits, not one per token.
    (flat,) = w.op("Reshape", [final, w.const("shape.rows", np.array([-1, shape.hidden], np.int64))], ["/flat"])
    (picked,) = w.op("Gather", [flat, LOGIT_ROWS], ["/picked"], axis=0)
    (picked3,) = w.op("Unsqueeze", [picked, w.const("axes.first", np.array([0], np.int64))], ["/picked3"])
    head_rows = embed_table if shape.tied or "lm_head.weight" not in weights else rows("lm_head.weight")
    w.project(picked3, "logits", "lm_head", [("lm_head.weight", "/lm_head/MatMul", head_rows)])
    return Decoder(w.model(inputs, outputs), embedding, {"graph": "gqa", "embedding": EMBEDDING_FILE, **w.stats})
