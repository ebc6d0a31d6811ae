"""The upstreams of API.md section 11: read from ``UPSTREAMS_FILE`` (TOML), checked once.

Settings (`config.settings`) call `load_upstreams` at startup; a bad file stops
the process with one line naming the entry (gunicorn.conf.py prints
`SettingsError`), like any bad variable. No Flask, no Redis, no network here.

```toml
[[upstream]]
name = "primary"                       # letters, digits, "-", "_", "." (Redis keys, metrics)
base_url = "https://api.openai.com/v1" # http:// or https://
api_key_env = "OPENAI_API_KEY"         # the key is read from this variable
models = ["gpt-4o-mini", "gpt-4o"]
model_map = { "gpt-4o-mini" = "provider/gpt-4o-mini" }   # optional: the name sent upstream
```

Without the file, `default_upstream` is the one upstream of ``OPENAI_BASE_URL``
(its name is ``default``), serving every allowed model.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_NAME",
    "PLACEHOLDER_KEY",
    "UpstreamSpec",
    "UpstreamsFileError",
    "default_upstream",
    "load_upstreams",
]

DEFAULT_NAME = "default"
# The key of an upstream whose api_key_env is unset outside production (the simulator's).
PLACEHOLDER_KEY = "sk-sluice-simulator"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_FIELDS = {"name", "base_url", "api_key_env", "models", "model_map"}
_REQUIRED = ("name", "base_url", "api_key_env", "models")


class UpstreamsFileError(ValueError):
    """The file is unreadable or an entry is wrong; the message names the entry."""


@dataclass(frozen=True)
class UpstreamSpec:
    """One upstream: where, with which key, which models (None: every allowed one)."""

    name: str
    base_url: str | None
    api_key: str
    models: tuple[str, ...] | None
    model_map: Mapping[str, str] = field(default_factory=dict)

    def serves(self, model: str) -> bool:
        return self.models is None or model in self.models

    def upstream_model(self, model: str) -> str:
        """The model name sent to this upstream for the client's `model`."""
        return self.model_map.get(model, model)


def default_upstream(base_url: str | None, api_key: str | None) -> UpstreamSpec:
    """The single upstream of ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` (no file)."""
    return UpstreamSpec(DEFAULT_NAME, base_url, api_key or PLACEHOLDER_KEY, None)


def load_upstreams(
    path: str, environ: Mapping[str, str], production: bool
) -> tuple[UpstreamSpec, ...]:
    """Read and check the file at `path`; `environ` holds the keys its entries name."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise UpstreamsFileError(
            f"UPSTREAMS_FILE {path}: cannot be read ({exc.strerror or exc})"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise UpstreamsFileError(f"UPSTREAMS_FILE {path}: not valid TOML ({exc})") from None
    extra = set(data) - {"upstream"}
    if extra:
        raise UpstreamsFileError(
            f"UPSTREAMS_FILE {path}: unknown table {sorted(extra)[0]!r} (only [[upstream]])"
        )
    entries = data.get("upstream")
    if not isinstance(entries, list) or not entries:
        raise UpstreamsFileError(f"UPSTREAMS_FILE {path}: no [[upstream]] entry")
    specs: list[UpstreamSpec] = []
    for number, entry in enumerate(entries, 1):
        specs.append(_entry(path, number, entry, environ, production))
    names = [spec.name for spec in specs]
    for number, name in enumerate(names, 1):
        if names.index(name) != number - 1:
            raise UpstreamsFileError(
                f"UPSTREAMS_FILE {path}: upstream {name!r} (entry {number}): duplicate name"
            )
    return tuple(specs)


def _entry(
    path: str, number: int, entry: object, environ: Mapping[str, str], production: bool
) -> UpstreamSpec:
    label = f"entry {number}"
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        label = f"upstream {entry['name']!r} ({label})"

    def bad(message: str) -> UpstreamsFileError:
        return UpstreamsFileError(f"UPSTREAMS_FILE {path}: {label}: {message}")

    if not isinstance(entry, dict):
        raise bad("not a table")
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise bad(f"unknown field {unknown[0]!r}")
    for name in _REQUIRED:
        if name not in entry:
            raise bad(f"missing field {name!r}")
    name, base_url, key_env = entry["name"], entry["base_url"], entry["api_key_env"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise bad("name: 1 to 64 letters, digits, '-', '_' or '.'")
    if not isinstance(base_url, str) or not _valid_url(base_url):
        raise bad("base_url: an http:// or https:// URL with a host")
    if not isinstance(key_env, str) or not key_env:
        raise bad("api_key_env: the name of an environment variable")
    models = entry["models"]
    if (
        not isinstance(models, list)
        or not models
        or not all(isinstance(m, str) and m for m in models)
    ):
        raise bad("models: a non-empty list of model names")
    model_map = entry.get("model_map", {})
    if not isinstance(model_map, dict) or not all(
        isinstance(v, str) and v for v in model_map.values()
    ):
        raise bad("model_map: a table of model name = name sent upstream")
    for model in model_map:
        if model not in models:
            raise bad(f"model_map: {model!r} is not in models")
    key = environ.get(key_env, "")
    if not key:
        if production:
            raise bad(f"api_key_env: {key_env} is not set")
        key = PLACEHOLDER_KEY
    return UpstreamSpec(name, base_url.rstrip("/"), key, tuple(dict.fromkeys(models)), model_map)


def _valid_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)
