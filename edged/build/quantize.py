"""Weight-only block quantization of an exported decoder graph, into onnxruntime's MatMulNBits.

Every MatMul whose weight is a constant (including the tied lm_head, exported as a Transpose
of the embedding table) becomes a MatMulNBits node; large embedding Gathers read the same
quantized table and dequantize only the rows they fetch. Weights come either as float arrays
(requantized here) or as the GGUF's own blocks, carried over exactly (see ``BlockWeights``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

BLOCK = 32
# Smaller Gathers (position tables, norms) are not worth a dequantizing subgraph; smaller embedding tables of
# edged's graph stay float rows in embedding.npy.
_MIN_GATHER_ELEMENTS = 1 << 20

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class BlockWeights:
    """Weights of a [N, K] matrix (one row per output) in blocks of 32 along K:

        W[n, k] = scale[n, b] * (q[n, k] - zero[n, b]) + residual[n, b],   b = k // 32

    ``zero`` is an integer, as MatMulNBits needs for its fast kernels. GGUF's Q4_1 stores
    W = d * q + m with a float minimum m; rounding -m/d to the integer ``zero`` leaves a small
    per-block ``residual`` (m + d * zero), added back through the activations' block sums, so a
    Q4_1 tensor is carried over exactly instead of being quantized a second time.
    """

    bits: int
    q: U8  # [N, K], values 0 .. 2**bits - 1
    scale: F32  # [N, K/32]
    zero: U8  # [N, K/32]
    residual: F32 | None  # [N, K/32], or None when every block is exact without it

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.q.shape
        return int(n), int(k)

    @classmethod
    def from_affine(cls, bits: int, q: U8, d: F32, m: F32) -> BlockWeights:
        """From W = d * q + m per block (GGUF Q4_1; Q8_0 with q + 128 and m = -128 d)."""
        qmax = (1 << bits) - 1
        safe_d = np.where(d == 0, np.float32(1), d)
        zero = np.clip(np.rint(-m / safe_d), 0, qmax).astype(np.uint8)
        residual = (m + d * zero.astype(np.float32)).astype(np.float32)
        return cls(bits, q, d.astype(np.float32), zero, residual if np.any(residual) else None)

    @classmethod
    def quantize(cls, w: F32, bits: int) -> BlockWeights:
        """Asymmetric round-to-nearest quantization of float weights [N, K]."""
        n, k = w.shape
        qmax = (1 << bits) - 1
        blocks = w.reshape(n, k // BLOCK, BLOCK).astype(np.float32)
        lo = np.minimum(blocks.min(axis=2), 0)
        hi = np.maximum(blocks.max(axis=2), 0)
        scale = ((hi - lo) / qmax).astype(np.float32)
        safe = np.where(scale == 0, np.float32(1), scale)
        zero = np.clip(np.rint(-lo / safe), 0, qmax)
        q = np.clip(np.rint(blocks / safe[..., None]) + zero[..., None], 0, qmax)
        return cls(bits, q.reshape(n, k).astype(np.uint8), scale, zero.astype(np.uint8), None)

    @property
    def nbytes(self) -> int:
        """What a MatMulNBits holds of these weights: packed values, scales and zero points."""
        n, k = self.shape
        return n * (k * self.bits // 8 + k // BLOCK * 5)

    def rows(self, start: int, stop: int) -> BlockWeights:
        """Rows ``start`` to ``stop`` (outputs of a slice of N)."""
        residual = self.residual[start:stop] if self.residual is not None else None
        return BlockWeights(self.bits, self.q[start:stop], self.scale[start:stop], self.zero[start:stop], residual)

    def dequantize(self) -> F32:
        n, k = self.shape
        q = self.q.reshape(n, k // BLOCK, BLOCK).astype(np.float32)
        w = self.scale[..., None] * (q - self.zero[..., None].astype(np.float32))
        if self.residual is not None:
            w = w + self.residual[..., None]
        return w.reshape(n, k).astype(np.float32)

    def with_remainder_blocks(self) -> BlockWeights:
        """These weights [N, K], then their remainders [N, K/32] as 4-bit blocks of their own, then what
        rounding the remainders to 4 bits left, the same way (each zero padded to whole blocks): x @ W.T is
        then [x, blocksums(x), 0.., blocksums(x)] @ this.T, one MatMulNBits.

        Close to exact: a remainder (at most half a weight step) is off by at most 1/900 of its block's largest.
        """
        if self.bits != 4 or self.residual is None:
            raise ValueError("only 4-bit weights with remainders fold them into blocks")
        n, blocks = self.residual.shape
        padded = np.zeros((n, remainder_width(blocks)), dtype=np.float32)
        padded[:, :blocks] = self.residual
        coarse = BlockWeights.quantize(padded, 4)
        fine = BlockWeights.quantize(padded - coarse.dequantize(), 4)
        parts = (self, coarse, fine)
        q, scale, zero = (np.concatenate([getattr(p, f) for p in parts], axis=1) for f in ("q", "scale", "zero"))
        return BlockWeights(4, q, scale, zero, None)

    def nibbles(self) -> tuple[BlockWeights, BlockWeights]:
        """Two 4-bit matrices whose sum is exactly this 8-bit one: q = 16 h + l, z = 16 zh + zl.

        onnxruntime runs 4-bit weights with float activations fast, but not 8-bit ones.
        """
        assert self.bits == 8
        u8 = np.uint8
        high = BlockWeights(4, (self.q >> 4).astype(u8), self.scale * 16, (self.zero >> 4).astype(u8), self.residual)
        low = BlockWeights(4, (self.q & 0x0F).astype(u8), self.scale, (self.zero & 0x0F).astype(u8), None)
        return high, low

    def packed(self) -> U8:
        """B of MatMulNBits: [N, K/32, 32*bits/8], two 4-bit values per byte, the first in the low nibble."""
        n, k = self.shape
        q = self.q.reshape(n, k // BLOCK, BLOCK)
        if self.bits == 8:
            same: U8 = np.ascontiguousarray(q)
            return same
        packed: U8 = np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
        return packed

    def packed_zero(self, per_block: int = 1, blocks: int | None = None) -> U8:
        """Zero points as MatMulNBits reads them, each repeated ``per_block`` times (blocks of 32 / per_block),
        the first ``blocks`` of each row (all by default)."""
        zero = np.repeat(self.zero, per_block, axis=1)[:, :blocks]
        n, nb = zero.shape
        if self.bits == 8:
            return zero.reshape(-1).copy()
        padded = np.zeros((n, nb + nb % 2), dtype=np.uint8)
        padded[:, :nb] = zero
        zeros: U8 = (padded[:, 0::2] | (padded[:, 1::2] << 4)).reshape(-1).astype(np.uint8)
        return zeros


def remainder_width(blocks: int) -> int:
    """The columns ``blocks`` remainders take in a folded table: whole blocks of 32."""
    return -(-blocks // BLOCK) * BLOCK


# Looks up the source blocks of a weight: (graph weight name, node name, float rows) -> blocks, or None.
BlockSource = Callable[[str, str, F32], "BlockWeights | None"]


class _Graph:
    """The parts of an ONNX graph the rewrite touches, with name lookups."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self._counter = 0

    def array(self, name: str) -> F32:
        return numpy_helper.to_array(self.inits[name]).astype(np.float32)

    def is_float_init(self, name: str) -> bool:
        t = self.inits.get(name)
        return t is not None and t.data_type == TensorProto.FLOAT and len(t.dims) == 2

    def add_init(self, name: str, array: npt.NDArray[np.generic]) -> str:
        if name not in self.inits:
            tensor = numpy_helper.from_array(array, name)
            self.graph.initializer.append(tensor)
            self.inits[name] = tensor
        return name

    def fresh(self, base: str) -> str:
        self._counter += 1
        return f"{base}/q{self._counter}"

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> onnx.NodeProto:
        domain = "com.microsoft" if op == "MatMulNBits" else ""
        return helper.make_node(op, inputs, outputs, name=self.fresh(op), domain=domain, **attrs)


@dataclass(frozen=True)
class _Tables:
    """A quantized weight stored in the graph: one or two 4/8-bit parts that add up to it."""

    key: str
    parts: tuple[BlockWeights, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return self.parts[0].shape


def quantize_model(model: onnx.ModelProto, bits: int, accuracy_level: int, source: BlockSource) -> dict[str, int]:
    """Rewrites ``model`` in place; returns counts of what was converted (for the manifest)."""
    g = _Graph(model)
    # By content, so a tied lm_head shares the embedding's tables however the exporter spelled it.
    tables: dict[bytes, _Tables] = {}
    new_nodes: list[onnx.NodeProto] = []
    block_sums: dict[str, str] = {}
    stats = dict.fromkeys(
        ("matmul_nbits", "exact_blocks", "requantized", "residual_paths", "folded_remainders", "gathers"), 0
    )

    def tables_for(init_name: str, node_name: str, rows: F32) -> _Tables:
        digest = hashlib.blake2b(np.ascontiguousarray(rows).tobytes(), digest_size=16).digest()
        if digest not in tables:
            bw = source(init_name, node_name, rows)
            stats["exact_blocks" if bw is not None else "requantized"] += 1
            bw = bw or BlockWeights.quantize(rows, bits)
            parts = bw.nibbles() if bw.bits == 8 and accuracy_level == 0 else (bw,)
            tables[digest] = _Tables(init_name, parts)
        return tables[digest]

    for node in g.graph.node:
        if node.op_type == "MatMul":
            weight = _constant_weight(g, node.input[1])
            if weight is not None:
                init_name, transposed = weight
                w = g.array(init_name)
                rows = w if transposed else np.ascontiguousarray(w.T)
                if rows.shape[1] % BLOCK == 0:
                    t = tables_for(init_name, node.name, rows)
                    new_nodes.extend(_matmul_nbits(g, node, t, accuracy_level, block_sums))
                    stats["matmul_nbits"] += len(t.parts)
                    for key, count in remainder_stats(t.parts, accuracy_level).items():
                        stats[key] += count
                    continue
        if node.op_type == "Gather" and g.is_float_init(node.input[0]):
            table = g.array(node.input[0])
            if table.size >= _MIN_GATHER_ELEMENTS and table.shape[1] % BLOCK == 0:
                t = tables_for(node.input[0], node.name, table)
                new_nodes.extend(_dequantizing_gather(g, node, t))
                stats["gathers"] += 1
                continue
        new_nodes.append(node)

    del g.graph.node[:]
    g.graph.node.extend(_live_nodes(new_nodes, [o.name for o in g.graph.output]))
    used = {i for n in g.graph.node for i in n.input}
    keep = [t for t in g.graph.initializer if t.name in used]
    del g.graph.initializer[:]
    g.graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return stats


def _constant_weight(g: _Graph, name: str) -> tuple[str, bool] | None:
    """(initializer, transposed) when a MatMul's B is a float initializer or a Transpose of one."""
    if g.is_float_init(name):
        return name, False
    node = g.producer.get(name)
    if node is not None and node.op_type == "Transpose" and g.is_float_init(node.input[0]):
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        if perm == [1, 0]:
            return node.input[0], True
    return None


def _blocked(name: str, block_size: int) -> str:
    """An initializer's name, marked when its blocks are not the usual 32."""
    return name if block_size == BLOCK else f"{name}.b{block_size}"


def _packed_name(g: _Graph, t: _Tables, i: int, block_size: int = BLOCK, blocks: int | None = None) -> str:
    """B of part ``i`` in blocks of ``block_size`` (32, or 16: each block of 32 as its two halves), the first
    ``blocks`` of each row (all by default)."""
    n, k = t.shape
    packed = t.parts[i].packed().reshape(n, k // block_size, -1)[:, :blocks]
    return g.add_init(_blocked(f"{t.key}.p{i}.q{t.parts[i].bits}", block_size), np.ascontiguousarray(packed))


def _scale_name(g: _Graph, t: _Tables, i: int, block_size: int = BLOCK, blocks: int | None = None) -> str:
    scale = np.repeat(t.parts[i].scale, BLOCK // block_size, axis=1)[:, :blocks]
    return g.add_init(_blocked(f"{t.key}.p{i}.scale", block_size), scale.reshape(-1))


def _sum(g: _Graph, terms: list[str], out: str) -> list[onnx.NodeProto]:
    """Nodes adding ``terms`` into ``out`` (a plain rename is not possible, so one term is an Identity)."""
    if len(terms) == 1:
        return [g.node("Identity", terms, [out])]
    nodes, acc = [], terms[0]
    for i, term in enumerate(terms[1:], start=2):
        target = out if i == len(terms) else g.fresh(out)
        nodes.append(g.node("Add", [acc, term], [target]))
        acc = target
    return nodes


def _matmul_nbits(
    g: _Graph,
    node: onnx.NodeProto,
    t: _Tables,
    accuracy_level: int,
    block_sums: dict[str, str],
    block_size: int = BLOCK,
) -> list[onnx.NodeProto]:
    """MatMulNBits nodes for ``t`` (and its Q4_1 remainder, per block of 32), the weights in blocks of
    ``block_size``: 16 stores each block of 32 as two with its scale and zero point, the same weights, so
    that int8 activations are quantized per 16 values.

    With float activations a remainder is exact: blocksum(x) @ remainder^T, one float MatMul and an Add. With
    int8 activations (level 4), already an approximation, it rides in the same MatMulNBits as 4-bit blocks
    of its own on x's block sums (``BlockWeights.with_remainder_blocks``): SmolLM2 then reads about 8 MB of
    remainders a token instead of 13 MB, and a decode step takes ~9 % less.
    """
    n, k = t.shape
    x, y = node.input[0], node.output[0]
    nodes: list[onnx.NodeProto] = []
    terms: list[str] = []
    for i, part in enumerate(t.parts):
        # onnxruntime has no fast float-activation kernel for 8-bit weights (~90 ms for SmolLM2's
        # lm_head at level 0, ~1 ms at level 4); such weights are split into nibbles at level 0.
        level = _level(part, accuracy_level)
        tables, j, x_in, k_in = t, i, x, k
        if _folds(part, level):
            tables, j = _Tables(f"{t.key}.p{i}.folded", (part.with_remainder_blocks(),)), 0
            x_in, k_in = _with_block_sums(g, x, k, block_sums, nodes)
        stored = tables.parts[j]
        blocks = -(-k_in // block_size)  # blocks of 16 may end a folded table one early
        names = _packed_name(g, tables, j, block_size, blocks), _scale_name(g, tables, j, block_size, blocks)
        inputs = [x_in, *names]
        if np.any(stored.zero != (1 << (stored.bits - 1))):  # MatMulNBits' default zero point is 2**(bits-1)
            zero = stored.packed_zero(BLOCK // block_size, blocks)
            inputs.append(g.add_init(_blocked(f"{tables.key}.p{j}.zero", block_size), zero))
        attrs = {"K": k_in, "N": n, "bits": stored.bits, "block_size": block_size, "accuracy_level": level}
        terms.append(g.fresh(y))
        nodes.append(g.node("MatMulNBits", inputs, [terms[-1]], **attrs))
        if stored.residual is None:
            continue
        # + blocksum(x) @ residual^T: the exact Q4_1 correction, [.., K/32] x [K/32, N].
        r = g.add_init(f"{t.key}.p{i}.residual", np.ascontiguousarray(stored.residual.T))
        terms.append(g.fresh(y))
        nodes.append(g.node("MatMul", [_block_sums(g, x, k, block_sums, nodes), r], [terms[-1]]))
    return nodes + _sum(g, terms, y)


def _level(part: BlockWeights, accuracy_level: int) -> int:
    """The accuracy level ``part``'s MatMulNBits runs at: 8-bit weights always at 4 (see _matmul_nbits)."""
    return 4 if part.bits == 8 else accuracy_level


def _folds(part: BlockWeights, level: int) -> bool:
    """Whether ``part``'s Q4_1 remainder rides in its MatMulNBits (int8 activations), not in a float MatMul."""
    return level == 4 and part.bits == 4 and part.residual is not None


def remainder_stats(parts: tuple[BlockWeights, ...], accuracy_level: int) -> dict[str, int]:
    """How ``parts`` carry their remainders: as exact float paths, or folded into 4-bit blocks."""
    folded = sum(_folds(p, _level(p, accuracy_level)) for p in parts)
    return {"residual_paths": sum(p.residual is not None for p in parts) - folded, "folded_remainders": folded}


def _with_block_sums(g: _Graph, x: str, k: int, cache: dict[str, str], nodes: list[onnx.NodeProto]) -> tuple[str, int]:
    """[x, blocksums(x), 0.., blocksums(x)] and its width: the input of a table with folded remainders (see
    ``BlockWeights.with_remainder_blocks``), made once per input. It ends inside a block: MatMulNBits takes
    a K that does, and the table's padding there is never read."""
    blocks = k // BLOCK
    key = f"{x}|sums"
    if key not in cache:
        sums = _block_sums(g, x, k, cache, nodes)
        padded = sums
        if remainder_width(blocks) > blocks:
            padded = g.fresh(x)
            pads = g.add_init(f"pads.last.{blocks}", np.array([0, remainder_width(blocks) - blocks], dtype=np.int64))
            nodes.append(g.node("Pad", [sums, pads, "", g.add_init("axes.last", np.array([-1], np.int64))], [padded]))
        cache[key] = g.fresh(x)
        nodes.append(g.node("Concat", [x, padded, sums], [cache[key]], axis=-1))
    return cache[key], k + remainder_width(blocks) + blocks


def _block_sums(g: _Graph, x: str, k: int, cache: dict[str, str], nodes: list[onnx.NodeProto]) -> str:
    """blocksums(x), [.., K/32]: made once per input, shared by every projection that reads it."""
    if x not in cache:
        shape = g.add_init(f"shape.blocks.{k}", np.array([0, 0, k // BLOCK, BLOCK], dtype=np.int64))
        axes = g.add_init("axes.last", np.array([-1], dtype=np.int64))
        blocked, cache[x] = g.fresh(x), g.fresh(x)
        nodes.append(g.node("Reshape", [x, shape], [blocked]))
        nodes.append(g.node("ReduceSum", [blocked, axes], [cache[x]], keepdims=0))
    return cache[x]


def _dequantizing_gather(g: _Graph, node: onnx.NodeProto, t: _Tables) -> list[onnx.NodeProto]:
    """Gathers rows of the packed tables, then W = sum of q * scale + offset on those rows only."""
    _, k = t.shape
    ids, out = node.input[1], node.output[0]
    nodes: list[onnx.NodeProto] = []
    terms: list[str] = []
    blocks_shape = g.add_init(f"shape.blocks.{k}", np.array([0, 0, k // BLOCK, BLOCK], dtype=np.int64))
    for i, part in enumerate(t.parts):
        # The scales MatMulNBits reads, viewed per row: a Reshape of an initializer is folded at load.
        gscale = g.fresh(out)
        rows_shape = g.add_init(f"shape.rows.{k // BLOCK}", np.array([-1, k // BLOCK, 1], dtype=np.int64))
        nodes.append(g.node("Reshape", [_scale_name(g, t, i), rows_shape], [gscale]))
        q = g.fresh(out)
        nodes.append(g.node("Gather", [_packed_name(g, t, i), ids], [q], axis=0))
        if part.bits == 4:  # two values per byte, low nibble first
            mask = g.add_init("const.u8.15", np.array(15, dtype=np.uint8))
            four = g.add_init("const.u8.4", np.array(4, dtype=np.uint8))
            axes = g.add_init("axes.last", np.array([-1], dtype=np.int64))
            low, high, low1, high1, pairs, q4 = (g.fresh(out) for _ in range(6))
            nodes += [
                g.node("BitwiseAnd", [q, mask], [low]),
                g.node("BitShift", [q, four], [high], direction="RIGHT"),
                g.node("Unsqueeze", [low, axes], [low1]),
                g.node("Unsqueeze", [high, axes], [high1]),
                g.node("Concat", [low1, high1], [pairs], axis=-1),
                g.node("Reshape", [pairs, blocks_shape], [q4]),
            ]
            q = q4
        qf, sc, term = (g.fresh(out) for _ in range(3))
        nodes += [
            g.node("Cast", [q], [qf], to=TensorProto.FLOAT),
            g.node("Gather", [gscale, ids], [sc], axis=0),
            g.node("Mul", [qf, sc], [term]),
        ]
        offset = -part.scale * part.zero.astype(np.float32)
        if part.residual is not None:
            offset = offset + part.residual
        if np.any(offset):
            goffset = g.add_init(f"{t.key}.p{i}.gather_offset", offset.astype(np.float32)[..., None])
            of, shifted = g.fresh(out), g.fresh(out)
            nodes += [g.node("Gather", [goffset, ids], [of], axis=0), g.node("Add", [term, of], [shifted])]
            term = shifted
        terms.append(term)
    blocked = g.fresh(out)
    out_shape = g.add_init(f"shape.hidden.{k}", np.array([0, 0, k], dtype=np.int64))
    return [*nodes, *_sum(g, terms, blocked), g.node("Reshape", [blocked, out_shape], [out])]


def _live_nodes(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """Drops nodes nothing depends on (the lm_head's Transpose), keeping topological order."""
    needed = set(outputs)
    live: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    return live[::-1]
