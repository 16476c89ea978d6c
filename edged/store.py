"""Model recipes and built model directories: where they live, their manifests and checksums."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tarfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edged.errors import ModelUnavailable

QUANTS = ("fp32", "int8", "int4")
# The decoder graph: optimum's export (rewritten to MatMulNBits), or edged's own (edged.build.graph:
# GroupQueryAttention on a shared KV buffer, packed projections, logits for the last position only).
GRAPHS = ("optimum", "gqa")
MANIFEST = "manifest.json"
MODEL_FILES = (
    "model.onnx",
    "tokenizer.json",
    "tokenizer_config.json",
    "config.json",
    "generation_config.json",
)
# The token embedding table of a gqa build, read by the engine row by row (edged.llm.session.Embedding).
EMBEDDING_FILE = "embedding.npy"
DEPLOYED_MODELS_DIR = Path("/var/lib/edged/models")


def checkout_dir() -> Path | None:
    """The source checkout edged runs from (``make run``), or None when installed."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "models").is_dir() else None


def default_models_dir() -> Path:
    """``models/`` of the checkout edged runs from, else the deployed state directory."""
    checkout = checkout_dir()
    return checkout / "models" if checkout else DEPLOYED_MODELS_DIR


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edged"


def model_dir_name(
    recipe: str, quant: str, default_quant: str, graph: str = "optimum", default_graph: str = "optimum"
) -> str:
    """The recipe's default quantization and graph get the plain name; others are suffixed (``-fp32``, ``-gqa``)."""
    name = recipe if quant == default_quant else f"{recipe}-{quant}"
    return name if graph == default_graph else f"{name}-{graph}"


PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")  # of edged's gqa graph


@dataclass(frozen=True)
class Recipe:
    """How to build one model: ``models/<name>.toml``."""

    name: str
    path: Path
    description: str
    default_quant: str
    accuracy_level: int
    source: dict[str, Any]
    tokenizer: dict[str, Any] = field(default_factory=dict)
    graph: str = "optimum"  # the default decoder graph, one of GRAPHS
    # Projections of the gqa graph whose MatMulNBits quantize their input to int8 (accuracy level 4)
    # whatever ``accuracy_level`` says: qkv_proj, o_proj, gate_up_proj, down_proj, lm_head.
    int8_activations: tuple[str, ...] = ()
    # Of those, the ones stored in blocks of 16 (each GGUF block of 32 as two with the same scale and zero
    # point: the same weights), so that their input is quantized to int8 per 16 values, not 32.
    fine_blocks: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: Path) -> Recipe:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read recipe {path}: {exc}") from exc
        known = {
            "description",
            "default_quant",
            "accuracy_level",
            "source",
            "tokenizer",
            "graph",
            "int8_activations",
            "fine_blocks",
        }
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"recipe {path}: unknown keys {sorted(unknown)}")
        source = data.get("source")
        if not isinstance(source, dict) or not ({"package", "hf_dir"} & source.keys()):
            raise ValueError(f"recipe {path}: [source] needs `package` (a GGUF in a pip package) or `hf_dir`")
        quant = data.get("default_quant", "int4")
        if quant not in QUANTS:
            raise ValueError(f"recipe {path}: default_quant must be one of {QUANTS}")
        graph = data.get("graph", "optimum")
        if graph not in GRAPHS:
            raise ValueError(f"recipe {path}: graph must be one of {GRAPHS}")
        int8 = data.get("int8_activations", [])
        if not isinstance(int8, list) or not set(int8) <= set(PROJECTIONS):
            raise ValueError(f"recipe {path}: int8_activations must list some of {', '.join(PROJECTIONS)}")
        fine = data.get("fine_blocks", [])
        if not isinstance(fine, list) or not set(fine) <= set(int8):
            raise ValueError(f"recipe {path}: fine_blocks must list some of int8_activations ({', '.join(int8)})")
        return cls(
            name=path.stem,
            path=path,
            description=str(data.get("description", "")),
            default_quant=quant,
            accuracy_level=int(data.get("accuracy_level", 4)),
            source=source,
            tokenizer=dict(data.get("tokenizer", {})),
            graph=graph,
            int8_activations=tuple(int8),
            fine_blocks=tuple(fine),
        )

    def dir_name(self, quant: str, graph: str | None = None) -> str:
        return model_dir_name(self.name, quant, self.default_quant, graph or self.graph, self.graph)


def find_recipe(models_dir: Path, name: str) -> Recipe:
    path = models_dir / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in models_dir.glob("*.toml"))) or "none"
        raise ModelUnavailable(f"no recipe {name!r} in {models_dir} (recipes there: {known})")
    return Recipe.load(path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def model_files(model_dir: Path) -> tuple[str, ...]:
    """The files a built model consists of: ``MODEL_FILES``, and a gqa build's embedding table."""
    return (*MODEL_FILES, *((EMBEDDING_FILE,) if (model_dir / EMBEDDING_FILE).is_file() else ()))


def write_manifest(model_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Records ``info`` and the sha256 of every model file in ``manifest.json``."""
    files = {
        name: {"sha256": sha256_file(model_dir / name), "bytes": (model_dir / name).stat().st_size}
        for name in model_files(model_dir)
    }
    manifest = {**info, "files": files}
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(model_dir: Path) -> dict[str, Any]:
    path = model_dir / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelUnavailable(f"{model_dir} has no {MANIFEST}; rebuild it with `edged model build`") from exc
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"{path} is unreadable: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ModelUnavailable(f"{path} lists no files")
    return data


def verify(model_dir: Path) -> list[str]:
    """Problems found in ``model_dir`` (empty when every file matches its manifest checksum)."""
    try:
        manifest = read_manifest(model_dir)
    except ModelUnavailable as exc:
        return [exc.message]
    problems = []
    for name, expected in sorted(manifest["files"].items()):
        path = model_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != expected.get("bytes"):
            problems.append(f"{name}: {size} bytes, the manifest says {expected.get('bytes')} (truncated or replaced)")
        elif sha256_file(path) != expected.get("sha256"):
            problems.append(f"{name}: sha256 mismatch (the file is corrupted or was modified)")
    return problems


@dataclass(frozen=True)
class BuiltModel:
    name: str
    path: Path
    recipe: str | None
    quant: str | None
    size_bytes: int


def list_models(models_dir: Path) -> tuple[list[Recipe], list[BuiltModel]]:
    recipes = []
    for path in sorted(models_dir.glob("*.toml")):
        try:
            recipes.append(Recipe.load(path))
        except ValueError:
            continue
    built = []
    for path in (
        sorted(p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if models_dir.is_dir()
        else []
    ):
        try:
            manifest = read_manifest(path)
        except ModelUnavailable:
            continue
        size = sum(int(f.get("bytes", 0)) for f in manifest["files"].values())
        built.append(BuiltModel(path.name, path, manifest.get("recipe"), manifest.get("quant"), size))
    return recipes, built


# -- offline bundles ------------------------------------------------------------------------------
# A bundle is one tar archive holding <name>/ with the model files and manifest.json. Installed
# versions live in <models_dir>/.versions/; <models_dir>/<name> is a symlink switched atomically,
# and <models_dir>/.versions/<name>.previous remembers the version before it for rollback.

BUNDLE_FILES = (*MODEL_FILES, EMBEDDING_FILE, MANIFEST)


class BundleError(ValueError):
    """A bundle that cannot be installed; nothing was changed."""


def pack(models_dir: Path, name: str, out: Path) -> Path:
    """Writes ``name`` as one archive; refuses a model that fails its own checksums."""

    model_dir = models_dir / name
    problems = verify(model_dir)
    if problems:
        raise BundleError(f"{name} fails verification, not packing it: {'; '.join(problems)}")
    partial = out.with_name(out.name + ".partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for file in (*sorted(read_manifest(model_dir)["files"]), MANIFEST):  # what verify has just checked
            tar.add(model_dir / file, arcname=f"{name}/{file}", recursive=False)
    partial.replace(out)
    return out


def install(models_dir: Path, bundle: Path) -> tuple[str, Path]:
    """Verifies and unpacks ``bundle`` beside the current version, then switches to it atomically."""
    import shutil

    versions = models_dir / ".versions"
    versions.mkdir(parents=True, exist_ok=True)
    staging = versions / f".incoming-{secrets.token_hex(4)}"
    try:
        with tarfile.open(bundle, "r:") as tar:
            name = _unpack(tar, staging)
        problems = verify(staging)
        if problems:
            raise BundleError(f"{bundle.name}: {'; '.join(problems)}")
        key = str(read_manifest(staging).get("build_key", ""))[:12] or secrets.token_hex(6)
        target = versions / f"{name}-{key}"
        if target.exists():
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    except (tarfile.TarError, EOFError, OSError, BundleError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        reason = exc if isinstance(exc, BundleError) else f"{bundle.name} is truncated or not a model bundle ({exc})"
        raise BundleError(f"refused: {reason}; the installed model is untouched") from exc
    current = models_dir / name
    _adopt(current, versions)
    previous = os.readlink(current) if current.is_symlink() else None
    _point(current, Path(".versions") / target.name)
    if previous is not None and Path(previous).name != target.name:
        _point(versions / f"{name}.previous", Path(previous).name)
    _prune_versions(versions, name)
    return name, target


def rollback(models_dir: Path, name: str) -> Path:
    """Switches ``name`` back to the version installed before the current one (and remembers the current)."""
    versions = models_dir / ".versions"
    marker = versions / f"{name}.previous"
    if not marker.is_symlink() or not marker.resolve().is_dir():
        raise BundleError(f"{name} has no previous version to roll back to")
    current = models_dir / name
    now = Path(os.readlink(current)).name
    _point(current, Path(".versions") / Path(os.readlink(marker)).name)
    _point(marker, now)
    return current.resolve()


def _prune_versions(versions: Path, name: str) -> None:
    """Keeps the current and the previous version of ``name``; older ones only take space."""

    keep = {(versions.parent / name).resolve()}
    marker = versions / f"{name}.previous"
    if marker.is_symlink():
        keep.add(marker.resolve())
    for path in versions.glob(f"{name}-*"):
        if path.is_dir() and path.resolve() not in keep and re.fullmatch(rf"{re.escape(name)}-[0-9a-z]+", path.name):
            shutil.rmtree(path)


def _unpack(tar: Any, staging: Path) -> str:
    """Extracts the expected files only (no links, no paths outside); returns the model name."""
    staging.mkdir()
    names: set[str] = set()
    for member in tar:
        top, _, file = member.name.partition("/")
        if not member.isfile() or file not in BUNDLE_FILES or not re.fullmatch(r"[A-Za-z0-9._-]+", top):
            raise BundleError(f"unexpected entry {member.name!r}")
        names.add(top)
        source = tar.extractfile(member)
        with (staging / file).open("wb") as dst:
            while chunk := source.read(1 << 20):
                dst.write(chunk)
    if len(names) != 1:
        raise BundleError("a bundle holds exactly one model")
    return names.pop()


def _adopt(current: Path, versions: Path) -> None:
    """A model directory built in place becomes a version, so installs can switch away from it."""
    if current.is_dir() and not current.is_symlink():
        key = str(read_manifest(current).get("build_key", "local"))[:12] if (current / MANIFEST).is_file() else "local"
        target = versions / f"{current.name}-{key}"
        if target.exists():
            shutil.rmtree(target)
        current.rename(target)
        _point(current, Path(".versions") / target.name)


def _point(link: Path, target: Path | str) -> None:
    """Makes ``link`` a symlink to ``target`` atomically (rename over the old link)."""
    tmp = link.with_name(f".{link.name}.link-tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)
