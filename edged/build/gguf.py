"""Reading a GGUF file: its tokenizer and chat template, and its quantized blocks for exact carry-over."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from edged.build.quantize import BLOCK, F32, BlockWeights

_CONTROL_TOKEN = 3  # gguf TokenType.CONTROL

# transformers' Llama/Qwen2 module names -> GGUF tensor names (llama.cpp's convention).
_MODULES = {
    "self_attn/q_proj": "attn_q",
    "self_attn/k_proj": "attn_k",
    "self_attn/v_proj": "attn_v",
    "self_attn/o_proj": "attn_output",
    "mlp/gate_proj": "ffn_gate",
    "mlp/up_proj": "ffn_up",
    "mlp/down_proj": "ffn_down",
}
_LAYER_MATMUL = re.compile(r"^/model/layers\.(\d+)/(\w+/\w+)/MatMul$")


class GGUFSource:
    """A GGUF file opened for the build: metadata, tokenizer, and the blocks behind each weight."""

    def __init__(self, path: Path) -> None:
        import gguf  # build-time dependency

        self.path = path
        self._reader = gguf.GGUFReader(str(path))
        self._types = gguf.GGMLQuantizationType
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.arch = str(self.field("general.architecture"))

    def field(self, key: str) -> Any:
        f = self._reader.fields.get(key)
        return None if f is None else f.contents()

    @property
    def chat_template(self) -> str:
        template = self.field("tokenizer.chat_template")
        if not isinstance(template, str):
            raise ValueError(f"{self.path.name} carries no chat template")
        return template

    def tokenizer(self, bos: str, eos: str, split_digits: bool) -> Tokenizer:
        """GPT-2-style byte-level BPE from the GGUF vocabulary and merges.

        transformers' GGUF loader gets SmolLM2's tokenizer wrong (eos, a BOS on plain text, a mixed
        byte decoder), so the tokenizer is rebuilt from the raw vocabulary instead.
        """
        if self.field("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"{self.path.name}: only byte-level BPE (gguf model 'gpt2') tokenizers are supported")
        tokens: list[str] = list(self.field("tokenizer.ggml.tokens"))
        types: list[int] = list(self.field("tokenizer.ggml.token_type"))
        merges = [tuple(m.split(" ", 1)) for m in self.field("tokenizer.ggml.merges")]
        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
        tok = Tokenizer(bpe)
        steps: list[pre_tokenizers.PreTokenizer] = []
        if split_digits:
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, types, strict=True)
                if ty == _CONTROL_TOKEN
            ]
        )
        expected = self.field("tokenizer.ggml.bos_token_id")
        if tok.token_to_id(bos) != expected:
            raise ValueError(f"{bos} is id {tok.token_to_id(bos)}, the GGUF says {expected}")
        if tok.token_to_id(eos) is None:
            raise ValueError(f"{eos} is not in the vocabulary")
        return tok

    def blocks_for(self, onnx_weight: str, node_name: str, rows: F32) -> BlockWeights | None:
        """The GGUF blocks of the weight a graph node uses, checked to equal the exported ``rows`` [N, K]."""
        name = self._gguf_name(onnx_weight, node_name)
        tensor = self._tensors.get(name) if name else None
        if name is None or tensor is None:
            return None
        bw = self._decode(tensor)
        if bw is None:
            return None
        # transformers un-permutes Llama's q/k rows (llama.cpp interleaves rotary halves); match either order.
        for perm in self._row_orders(name, bw.shape[0]):
            candidate = BlockWeights(
                bw.bits,
                bw.q[perm],
                bw.scale[perm],
                bw.zero[perm],
                None if bw.residual is None else bw.residual[perm],
            )
            if np.allclose(candidate.dequantize(), rows, rtol=0, atol=1e-6 * float(np.abs(rows).max() or 1)):
                return candidate
        raise ValueError(f"GGUF tensor {name} does not match the exported weight of {node_name or onnx_weight}")

    def _gguf_name(self, onnx_weight: str, node_name: str) -> str | None:
        if onnx_weight == "model.embed_tokens.weight":
            return "token_embd.weight"
        if node_name == "/lm_head/MatMul":  # tied to the embedding unless the file has its own output
            return "output.weight" if "output.weight" in self._tensors else "token_embd.weight"
        m = _LAYER_MATMUL.match(node_name)
        if m and m.group(2) in _MODULES:
            return f"blk.{m.group(1)}.{_MODULES[m.group(2)]}.weight"
        return None

    def _row_orders(self, name: str, rows: int) -> list[np.ndarray]:
        orders = [np.arange(rows)]
        heads = {
            "attn_q": self.field(f"{self.arch}.attention.head_count"),
            "attn_k": self.field(f"{self.arch}.attention.head_count_kv"),
        }
        for part, n_head in heads.items():
            if f".{part}." in name and n_head:
                half = rows // int(n_head) // 2
                orders.append(np.arange(rows).reshape(int(n_head), half, 2).swapaxes(1, 2).reshape(rows))
        return orders

    def _decode(self, tensor: Any) -> BlockWeights | None:
        raw = np.asarray(tensor.data, dtype=np.uint8)
        rows = raw.shape[0]
        if tensor.tensor_type == self._types.Q4_1:  # per block: d f16, m f16, 16 bytes of nibbles
            b = raw.reshape(rows, -1, 20)
            d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
            m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            qs = b[..., 4:]
            q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # byte j holds elements j and j + 16
            return BlockWeights.from_affine(4, q.reshape(rows, -1), d, m)
        if tensor.tensor_type == self._types.Q8_0:  # per block: d f16, 32 x int8
            b = raw.reshape(rows, -1, 2 + BLOCK)
            d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
            q = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
            return BlockWeights.from_affine(8, q.reshape(rows, -1), d, -128 * d)
        return None
