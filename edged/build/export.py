"""The torch side of the build: GGUF -> transformers -> ONNX with a KV cache (optimum)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_gguf(gguf_path: Path) -> Any:
    """A float32 transformers model from a GGUF file (transformers dequantizes every tensor)."""
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, torch_dtype=torch.float32
    )
    return model.eval()


def save_hf(model: Any, out_dir: Path, bos_id: int, eos_id: int) -> None:
    model.config.bos_token_id = bos_id
    model.config.eos_token_id = eos_id
    model.generation_config.bos_token_id = bos_id
    model.generation_config.eos_token_id = eos_id
    model.save_pretrained(str(out_dir))


def export_onnx(hf_dir: Path, out_dir: Path) -> None:
    """optimum's export for ``text-generation-with-past``: input_ids, attention_mask, position_ids and
    past_key_values.* in; logits and present.* out (opset 18)."""
    from optimum.exporters.onnx import main_export

    main_export(
        str(hf_dir),
        output=str(out_dir),
        task="text-generation-with-past",
        device="cpu",
        do_validation=False,
        local_files_only=True,
    )
