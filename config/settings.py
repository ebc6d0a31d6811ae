"""Every setting of Sluice, read once from the environment and validated.

`load_settings()` is the only place that reads `os.environ` for the app; a bad
value stops the process with one line naming the variable and what it accepts.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from typing import Annotated, Literal

from limits import parse_many
from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "SettingsError", "load_settings"]


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


CommaList = Annotated[tuple[str, ...], NoDecode]


# The environment being read (load_settings' mapping): UPSTREAMS_FILE's keys come from it.
_ENVIRON: ContextVar[dict[str, str] | None] = ContextVar("sluice_settings_environ", default=None)


class SettingsError(Exception):
    """A setting is missing or malformed; the message names the variable."""


class Settings(BaseSettings):
    """The environment variables of docs/API.md, typed."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    app_env: Literal["development", "production", "test"] = "development"
    redis_url: str | None = None
    openai_base_url: str | None = None
    openai_api_key: str | None = None
    secret_key: str | None = None

    llm_model: str = Field("gpt-4o-mini", min_length=1)
    allowed_models: CommaList = ()
    api_keys: CommaList = ()
    trusted_proxies: int = Field(0, ge=0, le=10)
    rate_limit_default: str = "100/minute"
    rate_limit_stream: str = "10/minute"
    max_concurrent_streams: int = Field(5, ge=1, le=100_000)
    heartbeat_seconds: float = Field(15.0, gt=0, le=3600)
    disconnect_grace_seconds: float = Field(5.0, ge=0, le=3600)
    stream_retention_seconds: int = Field(300, ge=1, le=7 * 86400)
    upstream_timeout_seconds: float = Field(60.0, gt=0, le=3600)
    send_timeout_seconds: float = Field(30.0, gt=0, le=3600)
    relay_interval_ms: int = Field(100, ge=0, le=1000)
    max_body_bytes: int = Field(262_144, ge=1024, le=64 * 1024 * 1024)
    max_prompt_chars: int = Field(32_000, ge=1, le=10_000_000)
    session_ttl_seconds: int = Field(604_800, ge=60)
    session_max_messages: int = Field(50, ge=2, le=10_000)
    # tokens (prompt + completion) per owner per UTC day; None: no budget
    token_budget_daily: int | None = Field(None, ge=1, le=10**15)

    # identity (API.md section 2)
    jwt_secret: str | None = None
    jwt_jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    auth_session_ttl_seconds: int = Field(86_400, ge=60, le=90 * 86400)
    cors_origins: CommaList = ()
    rate_limit_auth_failures: str = "20/minute"

    # several upstreams (API.md section 11)
    upstreams_file: str | None = None
    upstream_head_timeout_seconds: float = Field(10.0, gt=0, le=3600)
    upstream_failure_threshold: int = Field(3, ge=1, le=1000)
    upstream_cooldown_seconds: float = Field(30.0, gt=0, le=86400)
    # the parsed UPSTREAMS_FILE (streaming.upstream.upstreams); () without the file
    _upstreams: tuple = PrivateAttr(())

    _split = field_validator("allowed_models", "api_keys", "cors_origins", mode="before")(
        _comma_list
    )

    @field_validator("rate_limit_default", "rate_limit_stream", "rate_limit_auth_failures")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        try:
            parse_many(value)
        except ValueError as exc:
            raise ValueError("a rate such as '100/minute' or '10 per second'") from exc
        return value

    @field_validator(
        "token_budget_daily",
        "jwt_secret",
        "jwt_jwks_url",
        "jwt_issuer",
        "jwt_audience",
        "upstreams_file",
        mode="before",
    )
    @classmethod
    def _unset_if_empty(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("jwt_secret")
    @classmethod
    def _jwt_secret(cls, value: str | None) -> str | None:
        if value is not None and len(value.encode()) < 32:
            raise ValueError("at least 32 bytes (an HS256 key, RFC 7518 section 3.2)")
        return value

    @field_validator("jwt_jwks_url")
    @classmethod
    def _jwks_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("an https:// (or http://) URL")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s?#]+", origin):
                raise ValueError(
                    f"origins such as https://chat.example.com (scheme and host, no path) "
                    f"or *; got {origin[:80]!r}"
                )
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(
            ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")
        ):
            raise ValueError(
                "a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL"
            )
        return value or None

    @model_validator(mode="after")
    def _production_requires(self) -> Settings:
        if self.app_env == "production":
            required = ("redis_url", "secret_key")
            if not self.upstreams_file:  # with the file, each upstream names its key
                required += ("openai_api_key",)
            for name in required:
                if not getattr(self, name):
                    raise ValueError(f"{name.upper()} is required when APP_ENV=production")
        if self.upstreams_file:
            from streaming.upstream.upstreams import load_upstreams

            environ = _ENVIRON.get()
            environ = os.environ if environ is None else environ
            self._upstreams = load_upstreams(
                self.upstreams_file, environ, self.app_env == "production"
            )
            if self.llm_model not in self.models:
                raise ValueError("LLM_MODEL must be one of the upstreams' allowed models")
        elif self.allowed_models and self.llm_model not in self.allowed_models:
            raise ValueError("ALLOWED_MODELS must include LLM_MODEL")
        if (
            "upstream_head_timeout_seconds" in self.model_fields_set
            and self.upstream_head_timeout_seconds > self.upstream_timeout_seconds
        ):
            raise ValueError(
                "UPSTREAM_HEAD_TIMEOUT_SECONDS must not exceed UPSTREAM_TIMEOUT_SECONDS"
            )
        return self

    @property
    def models(self) -> tuple[str, ...]:
        """The models a request may name (the default model when none are listed).

        With UPSTREAMS_FILE: the union of the upstreams' models, in file order,
        narrowed by ALLOWED_MODELS when it is set (API.md section 11).
        """
        if self._upstreams:
            union = dict.fromkeys(m for spec in self._upstreams for m in spec.models)
            return tuple(m for m in union if not self.allowed_models or m in self.allowed_models)
        return self.allowed_models or (self.llm_model,)

    @property
    def upstreams(self) -> tuple:
        """The upstreams (`streaming.upstream.upstreams.UpstreamSpec`); () without the file."""
        return self._upstreams

    @property
    def upstream_head_timeout(self) -> float:
        """UPSTREAM_HEAD_TIMEOUT_SECONDS, never above UPSTREAM_TIMEOUT_SECONDS (its default
        of 10 s yields to a shorter upstream timeout; a value set above it is an error)."""
        return min(self.upstream_head_timeout_seconds, self.upstream_timeout_seconds)

    @property
    def jwt_enabled(self) -> bool:
        return bool(self.jwt_secret or self.jwt_jwks_url)

    @property
    def authenticated(self) -> bool:
        """API keys or JWT on (API.md section 2); with neither, open mode."""
        return bool(self.api_keys) or self.jwt_enabled


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part]
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if loc:
        return f"invalid setting {loc[0].upper()}: {message}"
    return f"invalid settings: {message}"


def load_settings(environ: dict[str, str] | None = None, **overrides: object) -> Settings:
    """Read Settings from `environ` (default: the process environment) plus overrides."""
    source = os.environ if environ is None else environ
    values = {
        key.lower(): val for key, val in source.items() if key.lower() in Settings.model_fields
    }
    values.update(overrides)
    token = _ENVIRON.set(source)
    try:
        return Settings.model_validate(values) if environ is not None else Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None
    finally:
        _ENVIRON.reset(token)
