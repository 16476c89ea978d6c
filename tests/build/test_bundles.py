"""Offline model bundles: pack, install beside the current model, switch atomically, roll back; refuse damage."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edged.build import build_model
from edged.llm.session import DecoderSession
from edged.store import BundleError, Recipe, install, pack, verify


def edged(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edged", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def bundles(tiny_models: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    """Two different builds of one model name: the int4 and the int8 build, each packed as "tiny"."""
    out = []
    for quant in ("int4", "int8"):
        models = tmp_path / f"src-{quant}"
        shutil.copytree(tiny_models[quant], models / "tiny")
        out.append(pack(models, "tiny", tmp_path / f"tiny-{quant}.edged.tar"))
    return out[0], out[1]


def quant_of(models: Path) -> str:
    return str(json.loads((models / "tiny" / "manifest.json").read_text())["quant"])


def test_round_trip_install_verify_switch_rollback(bundles: tuple[Path, Path], tmp_path: Path) -> None:
    models = tmp_path / "clean"
    first, second = bundles
    r = edged("model", "install", str(first), "--models-dir", str(models))
    assert r.returncode == 0, r.stderr
    assert quant_of(models) == "int4" and verify(models / "tiny") == []
    assert edged("model", "verify", "tiny", "--models-dir", str(models)).returncode == 0

    install(models, second)
    assert quant_of(models) == "int8"
    assert (models / "tiny").is_symlink(), "the switch is a symlink replaced in one rename"

    r = edged("model", "rollback", "tiny", "--models-dir", str(models))
    assert r.returncode == 0, r.stderr
    assert quant_of(models) == "int4" and verify(models / "tiny") == []
    edged("model", "rollback", "tiny", "--models-dir", str(models))
    assert quant_of(models) == "int8", "rolling back twice returns to the newer version"


def test_install_adopts_a_model_built_in_place(
    bundles: tuple[Path, Path], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    models = tmp_path / "built"
    shutil.copytree(tiny_models["int4"], models / "tiny")
    install(models, bundles[1])
    assert quant_of(models) == "int8"
    edged("model", "rollback", "tiny", "--models-dir", str(models))
    assert quant_of(models) == "int4"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_bundle_is_refused_and_the_installed_model_untouched(
    bundles: tuple[Path, Path], tmp_path: Path, damage: str
) -> None:
    models = tmp_path / "live"
    install(models, bundles[0])
    before = (models / "tiny").resolve()
    data = bytearray(bundles[1].read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01  # inside model.onnx's data: the archive still reads, the checksum does not
    else:
        data = data[: len(data) // 3]
    broken = tmp_path / f"broken-{damage}.edged.tar"
    broken.write_bytes(bytes(data))

    r = edged("model", "install", str(broken), "--models-dir", str(models))
    assert r.returncode != 0
    assert "refused" in r.stderr and "untouched" in r.stderr
    assert ("sha256 mismatch" in r.stderr) if damage == "flip" else ("truncated" in r.stderr)
    assert (models / "tiny").resolve() == before and verify(models / "tiny") == []
    assert not list((models / ".versions").glob(".incoming-*")), "no half-unpacked leftovers"


def test_a_corrupted_model_is_not_packed(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    models = tmp_path / "m"
    shutil.copytree(tiny_models["int4"], models / "tiny")
    (models / "tiny" / "config.json").write_text("{}")
    with pytest.raises(BundleError, match="fails verification"):
        pack(models, "tiny", tmp_path / "x.tar")


def test_a_gqa_build_travels_with_its_embedding_table(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A gqa build's embedding.npy is one of its files: in its manifest, packed, checked on install, and
    missing when it is gone."""
    models_dir = tiny_models["fp32"].parent
    built = build_model(
        Recipe.load(models_dir / "tiny.toml"), "int4", models_dir, models_dir.parent / "cache", print, graph="gqa"
    )
    source = tmp_path / "src"
    shutil.copytree(built, source / "tiny")
    bundle = pack(source, "tiny", tmp_path / "tiny-gqa.edged.tar")
    with tarfile.open(bundle) as tar:
        assert "tiny/embedding.npy" in tar.getnames()
    models = tmp_path / "live"
    install(models, bundle)
    assert (
        verify(models / "tiny") == []
        and "embedding.npy" in json.loads((models / "tiny" / "manifest.json").read_text())["files"]
    )
    assert DecoderSession(models / "tiny" / "model.onnx").batches

    (source / "tiny" / "embedding.npy").unlink()
    assert verify(source / "tiny") == ["embedding.npy: missing"]
