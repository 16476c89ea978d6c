"""Build cache, manifests and verification of the built model directories."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edged.build import build_model
from edged.store import MODEL_FILES, Recipe, verify


def edged(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edged", *args], capture_output=True, text=True, timeout=300)


def test_manifest_lists_every_file_with_its_checksum(tiny_models: dict[str, Path]) -> None:
    manifest = json.loads((tiny_models["int4"] / "manifest.json").read_text())
    assert set(manifest["files"]) == set(MODEL_FILES)
    assert manifest["quant"] == "int4" and manifest["recipe"] == "tiny"
    assert {"torch", "onnxruntime", "optimum"} <= set(manifest["tools"])
    assert verify(tiny_models["int4"]) == []


def test_second_build_is_a_no_op(tiny_models: dict[str, Path]) -> None:
    model_dir = tiny_models["int4"]
    before = (model_dir / "model.onnx").stat().st_mtime_ns
    logs: list[str] = []
    recipe = Recipe.load(model_dir.parent / "tiny.toml")
    build_model(recipe, "int4", model_dir.parent, model_dir.parent.parent / "cache", logs.append)
    assert logs == [
        f"tiny: up to date (build {json.loads((model_dir / 'manifest.json').read_text())['build_key'][:12]})"
    ]
    assert (model_dir / "model.onnx").stat().st_mtime_ns == before


def test_verify_reports_a_flipped_byte_and_a_missing_file(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_models["int4"], copy)
    ok = edged("model", "verify", "tiny", "--models-dir", str(copy.parent))
    assert ok.returncode == 0, ok.stderr

    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    (copy / "tokenizer.json").unlink()
    bad = edged("model", "verify", "tiny", "--models-dir", str(copy.parent))
    assert bad.returncode == 1
    assert "model.onnx: sha256 mismatch" in bad.stderr
    assert "tokenizer.json: missing" in bad.stderr


def test_a_recipe_names_its_default_graph_and_other_graphs_get_a_suffix(tmp_path: Path) -> None:
    """`graph` picks the decoder graph; a build of the other graph lives beside it under its own name."""
    source = '[source]\nhf_dir = "hf"\n'
    (tmp_path / "plain.toml").write_text(source)
    (tmp_path / "fast.toml").write_text(f'graph = "gqa"\n{source}')
    (tmp_path / "bad.toml").write_text(f'graph = "tensorrt"\n{source}')
    plain, fast = Recipe.load(tmp_path / "plain.toml"), Recipe.load(tmp_path / "fast.toml")
    assert plain.graph == "optimum" and fast.graph == "gqa"
    assert [plain.dir_name("int4"), plain.dir_name("int4", "gqa"), plain.dir_name("fp32", "gqa")] == [
        "plain",
        "plain-gqa",
        "plain-fp32-gqa",
    ]
    assert [fast.dir_name("int4"), fast.dir_name("int4", "optimum")] == ["fast", "fast-optimum"]
    with pytest.raises(ValueError, match="graph must be one of"):
        Recipe.load(tmp_path / "bad.toml")
