"""Assistant profiles: a named system prompt, style note, sampling parameters, limits, knowledge base and format.

A profile is a TOML file ``<profiles_dir>/<name>.toml`` or a ``[profiles.<name>]`` table of the configuration;
a request picks one with the contract's ``profile`` field, its own fields override the profile's, and the
node's caps bound both (``protocol.parse`` does that).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edged.errors import InvalidRequest

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ProfileError(ValueError):
    """A profile a person must fix; the message names the profile and the key."""


@dataclass(frozen=True)
class Profile:
    name: str
    description: str = ""
    model: str = ""  # the model it is written for; empty: whatever the node serves
    system: str = ""  # the system turn; empty: the node's system_prompt
    style: str = ""  # a style note ("Answer in two short sentences.") put after the question: a small model
    # follows an instruction there far better than in the system turn
    max_tokens: int | None = None  # when the request does not say; the node's max_tokens_cap still bounds it
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    knowledge: str = ""  # a knowledge base (`edged kb build`) whose best passages go into the prompt
    format: str | dict[str, Any] | None = None  # "json" or a JSON schema, as the request field

    def as_dict(self) -> dict[str, Any]:
        """The set keys, for ``edged profile show``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) not in (None, "", ())}


_TYPES: dict[str, tuple[type, ...]] = {
    "description": (str,),
    "model": (str,),
    "system": (str,),
    "style": (str,),
    "max_tokens": (int,),
    "temperature": (int, float),
    "top_k": (int,),
    "top_p": (int, float),
    "repeat_penalty": (int, float),
    "seed": (int,),
    "stop": (list,),
    "knowledge": (str,),
    "format": (str, dict),
}


def parse(name: str, values: dict[str, Any], where: str) -> Profile:
    """A Profile from a TOML table; ProfileError naming ``where`` for an unknown key or a wrong type."""
    if not _NAME.fullmatch(name):
        raise ProfileError(f"{where}: a profile name is 1-64 characters of A-Z a-z 0-9 _ -, got {name!r}")
    unknown = sorted(set(values) - set(_TYPES))
    if unknown:
        raise ProfileError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(value, _TYPES[key]) or isinstance(value, bool):
            raise ProfileError(f"{where}: {key} must be a {' or '.join(t.__name__ for t in _TYPES[key])}")
        out[key] = float(value) if isinstance(value, int | float) and _TYPES[key] == (int, float) else value
    if "stop" in out:
        if not all(isinstance(s, str) and s for s in out["stop"]) or len(out["stop"]) > 8:
            raise ProfileError(f"{where}: stop must be a list of at most 8 non-empty strings")
        out["stop"] = tuple(out["stop"])
    if isinstance(out.get("format"), str) and out["format"] != "json":
        raise ProfileError(f'{where}: format must be "json" or a JSON schema table')
    if out.get("max_tokens", 1) < 1:
        raise ProfileError(f"{where}: max_tokens must be at least 1")
    return Profile(name=name, **out)


def load(directory: Path, tables: dict[str, Any]) -> dict[str, Profile]:
    """Every ``*.toml`` in ``directory`` (when it exists) and every ``[profiles.<name>]`` table, by name."""
    found: dict[str, Profile] = {}
    for path in sorted(directory.glob("*.toml")) if directory.is_dir() else []:
        try:
            values = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ProfileError(f"profile {path}: cannot be read: {exc}") from exc
        found[path.stem] = parse(path.stem, values, f"profile {path}")
    for name, values in tables.items():
        if not isinstance(values, dict):
            raise ProfileError(f"[profiles.{name}] must be a table")
        if name in found:
            raise ProfileError(f"profile {name!r} is defined both in {directory} and as [profiles.{name}]")
        found[name] = parse(name, values, f"[profiles.{name}]")
    return found


@dataclass(frozen=True)
class Catalog:
    """The node's profiles and the one a request without ``profile`` gets (empty: none)."""

    profiles: dict[str, Profile] = field(default_factory=dict)
    default: str = ""

    def pick(self, name: str | None) -> Profile | None:
        """The profile a request names, else the default; InvalidRequest naming the known ones when unknown."""
        chosen = name if name is not None else self.default
        if not chosen:
            return None
        if chosen not in self.profiles:
            known = ", ".join(sorted(self.profiles)) or "none"
            raise InvalidRequest(f"unknown profile {chosen!r}; this node's profiles: {known}")
        return self.profiles[chosen]
