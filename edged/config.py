"""One typed, validated configuration: TOML file, then environment, then command-line flags."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edged import profiles
from edged.governor import Thresholds
from edged.profiles import Profile
from edged.store import checkout_dir, default_models_dir

DEFAULT_CONFIG = Path("/etc/edged/edged.toml")
DEFAULT_STATE_DIR = Path("/var/lib/edged")
DEFAULT_PROFILES_DIR = Path("/etc/edged/profiles")
LOCAL_BROKER_PORT = 1883


class ConfigError(ValueError):
    """A configuration a person must fix; the message says where and how."""


def default_node_id() -> str:
    return re.sub(r"[^a-zA-Z0-9_-]", "", socket.gethostname()) or "edged"


@dataclass(frozen=True)
class BrokerConfig:
    url: str = ""  # mqtt://[user@]host[:port] or mqtts://...; empty: a private Mosquitto on 127.0.0.1
    protocol: str = "v5"  # or "v3.1.1"
    client_id: str = ""  # default: edged-<node_id>
    password: str = ""  # prefer password_file or the systemd credential "broker-password"
    password_file: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    keepalive_s: int = 30
    session_expiry_s: int = 86400  # how long the broker keeps our subscriptions and queued requests
    local_port: int = LOCAL_BROKER_PORT  # port of the private broker when url is empty
    # MQTT over WebSockets for the kiosk page on the private broker (9001 is usual); 0: none. Mosquitto 2.0.11
    # (Debian 12) binds a WebSockets listener to every address whatever it is told, and the private broker
    # lets anyone in: only on a board whose LAN is trusted or firewalled (see README, "The kiosk page").
    local_ws_port: int = 0
    allow_plaintext_password: bool = False  # let a password travel unencrypted (mqtt://) to another host

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def username(self) -> str | None:
        return urlsplit(self.url).username

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"


MAX_SLOTS = 16  # answers decoded together: past a handful a step is no longer memory-bound on these boards


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP front door: the Ollama and OpenAI APIs and the kiosk page (off by default)."""

    enabled: bool = False
    listen: str = "127.0.0.1:11434"  # host:port ([v6]:port); anything but loopback needs api_key
    api_key: str = ""  # bearer token every request must carry; prefer api_key_file or the credential
    api_key_file: str = ""  # or the systemd credential "http-api-key"
    kiosk_broker: str = ""  # the MQTT WebSockets URL the kiosk page uses; empty: ws://<the page's host>:9001

    @property
    def host(self) -> str:
        return _split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return _split_listen(self.listen)[1]


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ConfigError(f"http.listen {listen!r} must look like 127.0.0.1:11434 or [::1]:11434")
    return host.removeprefix("[").removesuffix("]"), int(port)


@dataclass(frozen=True)
class Config:
    node_id: str = field(default_factory=default_node_id)
    topic_prefix: str = "edged"
    model: str = "smollm2-135m-instruct"
    models_dir: str = ""  # default: models/ of a checkout, else /var/lib/edged/models
    state_dir: str = ""  # journal and private broker; default /var/lib/edged (or $STATE_DIRECTORY)
    profiles_dir: str = ""  # profiles as <name>.toml; default: profiles/ of a checkout, else /etc/edged/profiles
    profile: str = ""  # the profile of a request that names none; empty: none
    knowledge_dir: str = ""  # knowledge bases (`edged kb build`); default: knowledge/ beside the models directory
    threads: int = 0  # 0: all cores on 1-2 core boards, else cores - 1
    context_tokens: int = 2048  # per answer, prompt included; KV memory is context_tokens x slots
    slots: int = 0  # answers decoded together; 0: 4 on boards with 4+ cores, else 2
    prefix_cache_mb: float = 32.0  # keys and values of recent prompt prefixes (system prompts) kept; 0: off
    system_prompt: str = ""  # empty: the model's own default system turn
    max_tokens: int = 256  # per request, when the request does not say
    max_tokens_cap: int = 512  # no request gets more
    deadline_ms: int = 120_000  # per request, when the request does not say
    queue_capacity: int = 16
    max_payload_bytes: int = 32_768
    dedupe_window_s: int = 3600
    rate_limit_per_min: float = 60.0  # per client; 0 disables
    rate_limit_burst: int = 10
    journal_keep: int = 10_000  # finished entries kept at most
    journal_keep_s: int = 7 * 86400  # and for at most this long
    stop_grace_s: float = 10.0  # on SIGTERM the running answer may finish within this, else it is cancelled
    sysfs_root: str = "/"  # where /sys and /proc are read from
    sensor_interval_s: float = 2.0
    telemetry_interval_s: float = 30.0
    board: str = ""  # pi4, pi5 or generic: the power model when no sensor measures power; empty: detect
    idle_w: float = 0.0  # override the board's idle watts (0: the board's)
    busy_w: float = 0.0  # override the board's all-cores-busy watts (0: the board's)
    homeassistant: bool = True  # publish Home Assistant MQTT discovery
    homeassistant_prefix: str = "homeassistant"
    metrics_port: int = 0  # Prometheus metrics on 127.0.0.1:<port>; 0: off
    # Where replies may go (CONTRACT.md v1.1): MQTT filters, {prefix} {node} {client} filled in per request.
    reply_topics: tuple[str, ...] = ("{prefix}/{node}/answer/{client}/#", "kiosk/{client}/#")  # scoped requests
    v1_reply_topics: tuple[str, ...] = ("#",)  # requests on the v1 topics (loopback and anonymous setups)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    governor: Thresholds = field(default_factory=Thresholds)
    profiles: dict[str, Profile] = field(default_factory=dict)  # profiles_dir's files and [profiles.<name>] tables

    def resolved_models_dir(self) -> Path:
        return Path(self.models_dir) if self.models_dir else default_models_dir()

    def resolved_profiles_dir(self) -> Path:
        if self.profiles_dir:
            return Path(self.profiles_dir)
        checkout = checkout_dir()
        return checkout / "profiles" if checkout else DEFAULT_PROFILES_DIR

    def resolved_knowledge_dir(self) -> Path:
        return Path(self.knowledge_dir) if self.knowledge_dir else self.resolved_models_dir().parent / "knowledge"

    def resolved_state_dir(self) -> Path:
        """The config's, else systemd's $STATE_DIRECTORY, else ``state/`` in a checkout, else /var/lib/edged."""
        if self.state_dir:
            return Path(self.state_dir)
        if os.environ.get("STATE_DIRECTORY"):
            return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
        checkout = checkout_dir()
        return checkout / "state" if checkout else DEFAULT_STATE_DIR

    def topic(self, leaf: str) -> str:
        return f"{self.topic_prefix}/{self.node_id}/{leaf}"


def _check_types(section: str, cls: type, values: dict[str, Any]) -> dict[str, Any]:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in {section}")
    out = {}
    for key, value in values.items():
        expected = known[key].type
        ok = {
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, int | float) and not isinstance(value, bool),
        }.get(str(expected), True)
        if not ok:
            raise ConfigError(f"{section}.{key} must be a {expected}, got {type(value).__name__} {value!r}")
        if str(expected).startswith("tuple[str"):
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"{section}.{key} must be a list of non-empty strings, got {value!r}")
            value = tuple(value)
        out[key] = float(value) if expected == "float" else value
    return out


def validate(config: Config) -> Config:
    """Cross-field rules, checked once at load."""
    if not re.fullmatch(r"[a-zA-Z0-9_-]+", config.node_id):
        raise ConfigError(f"node_id {config.node_id!r} may only hold letters, digits, '_' and '-'")
    if not re.fullmatch(r"[a-zA-Z0-9_-]+", config.topic_prefix):
        raise ConfigError(f"topic_prefix {config.topic_prefix!r} may only hold letters, digits, '_' and '-'")
    for key in ("max_tokens", "max_tokens_cap", "deadline_ms", "queue_capacity", "max_payload_bytes"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key} must be at least 1")
    if not 0 <= config.slots <= MAX_SLOTS:
        raise ConfigError(f"slots must be 0 (by the cores) to {MAX_SLOTS}, got {config.slots}")
    if config.prefix_cache_mb < 0:
        raise ConfigError(f"prefix_cache_mb must be 0 (off) or more, got {config.prefix_cache_mb}")
    if config.max_tokens > config.max_tokens_cap:
        raise ConfigError(f"max_tokens ({config.max_tokens}) is above max_tokens_cap ({config.max_tokens_cap})")
    for key in ("reply_topics", "v1_reply_topics"):
        for pattern in getattr(config, key):
            try:
                pattern.format(prefix="p", node="n", client="c")
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(f"{key}: {pattern!r} may only use {{prefix}}, {{node}} and {{client}}") from exc
    if config.profile and config.profile not in config.profiles:
        known = ", ".join(sorted(config.profiles)) or "none"
        raise ConfigError(f"profile {config.profile!r} (the default) is not defined; profiles: {known}")
    g = config.governor
    if not g.warm_c < g.hot_c < g.critical_c:
        raise ConfigError("governor thresholds must rise: warm_c < hot_c < critical_c")
    if g.low_power_action not in ("limit", "refuse"):
        raise ConfigError("governor.low_power_action must be 'limit' or 'refuse'")
    if config.board not in ("", "pi4", "pi5", "generic"):
        raise ConfigError(f"board must be pi4, pi5 or generic (or empty to detect), got {config.board!r}")
    if config.sensor_interval_s <= 0 or config.telemetry_interval_s <= 0:
        raise ConfigError("sensor_interval_s and telemetry_interval_s must be positive")
    if config.broker.protocol not in ("v5", "v3.1.1"):
        raise ConfigError(f"broker.protocol must be 'v5' or 'v3.1.1', got {config.broker.protocol!r}")
    if config.broker.url:
        parts = urlsplit(config.broker.url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ConfigError(f"broker.url {config.broker.url!r} must look like mqtt://[user@]host[:port]")
        credentials = bool(parts.username or parts.password or config.broker.password)
        plaintext = parts.scheme == "mqtt" and not _loopback(parts.hostname)
        if credentials and plaintext and not config.broker.allow_plaintext_password:
            who = f"the login of user {parts.username!r}" if parts.username else "the broker password"
            raise ConfigError(
                f"broker.url mqtt://{parts.hostname} would send {who} unencrypted to a host that is not "
                "loopback: use mqtts:// or set broker.allow_plaintext_password = true"
            )
    host = config.http.host  # a malformed listen address is refused even while the front door is off
    if config.http.enabled and not config.http.api_key and not _loopback(host):
        raise ConfigError(
            f"http.listen {config.http.listen} is reachable from other machines: set http.api_key "
            "(or http.api_key_file) so only clients with the token are served, or listen on 127.0.0.1"
        )
    return config


def _loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: traffic that never leaves the machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load(path: Path | None, env: dict[str, str], overrides: dict[str, Any]) -> Config:
    """The file (``path``, else /etc/edged/edged.toml when present), then EDGED_* variables, then flags."""
    data: dict[str, Any] = {}
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    broker_data, governor_data, http_data = data.pop("broker", {}), data.pop("governor", {}), data.pop("http", {})
    profile_tables = data.pop("profiles", {})
    if not all(isinstance(t, dict) for t in (broker_data, governor_data, http_data, profile_tables)):
        raise ConfigError("[broker], [governor], [http] and [profiles] must be tables")
    top = _check_types("the configuration", Config, data)
    broker = _check_types("[broker]", BrokerConfig, broker_data)
    governor = _check_types("[governor]", Thresholds, governor_data)
    http = _check_types("[http]", HttpConfig, http_data)

    env_map = {
        "EDGED_NODE": (top, "node_id"),
        "EDGED_MODEL": (top, "model"),
        "EDGED_MODELS_DIR": (top, "models_dir"),
        "EDGED_STATE_DIR": (top, "state_dir"),
        "EDGED_BROKER": (broker, "url"),
        "EDGED_BROKER_PASSWORD": (broker, "password"),
    }
    for var, (target, key) in env_map.items():
        if env.get(var):
            target[key] = env[var]
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "broker":
            broker["url"] = value
        else:
            top[key] = value

    config = Config(**top, broker=BrokerConfig(**broker), http=HttpConfig(**http), governor=Thresholds(**governor))
    try:
        config = replace(config, profiles=profiles.load(config.resolved_profiles_dir(), profile_tables))
    except profiles.ProfileError as exc:
        raise ConfigError(str(exc)) from exc
    return validate(
        replace(
            config,
            broker=replace(config.broker, password=_password(config.broker, env)),
            http=replace(config.http, api_key=_api_key(config.http, env)),
        )
    )


def _password(broker: BrokerConfig, env: dict[str, str]) -> str:
    """The broker password: inline, a file, or the systemd credential ``broker-password``."""
    return _secret(broker.password, broker.password_file, "broker.password_file", "broker-password", env)


def _api_key(http: HttpConfig, env: dict[str, str]) -> str:
    """The HTTP bearer token: inline, a file, or the systemd credential ``http-api-key``."""
    return _secret(http.api_key, http.api_key_file, "http.api_key_file", "http-api-key", env)


def _secret(inline: str, file: str, file_key: str, credential: str, env: dict[str, str]) -> str:
    if inline:
        return inline
    candidates = [file] if file else []
    if env.get("CREDENTIALS_DIRECTORY"):
        candidates.append(str(Path(env["CREDENTIALS_DIRECTORY"]) / credential))
    for candidate in candidates:
        try:
            return Path(candidate).read_text().strip()
        except OSError as exc:
            if candidate == file:
                raise ConfigError(f"{file_key} {candidate}: {exc.strerror}") from exc
    return ""
