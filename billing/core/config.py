"""Configuration from environment variables, read with pydantic-settings (see README, Configuration)."""

from __future__ import annotations

import base64
import binascii
from datetime import timedelta
from functools import cached_property

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from billing.core.errors import ConfigError

_ENV_NAMES = {
    "database_url": "DATABASE_URL",
    "temporal_address": "TEMPORAL_ADDRESS",
    "temporal_namespace": "TEMPORAL_NAMESPACE",
    "task_queue": "BILLING_TASK_QUEUE",
    "api_token": "BILLING_API_TOKEN",
    "http_addr": "BILLING_HTTP_ADDR",
    "stripe_api_key": "STRIPE_API_KEY",
    "stripe_api_base": "STRIPE_API_BASE",
    "stripe_webhook_secret": "STRIPE_WEBHOOK_SECRET",
    "metrics_source_url": "BILLING_METRICS_SOURCE_URL",
    "push_answer_seconds": "BILLING_PUSH_ANSWER_SECONDS",
    "retention": "BILLING_RETENTION",
    "report_horizon": "BILLING_REPORT_HORIZON",
    "finalization_grace": "BILLING_STRIPE_FINALIZATION_GRACE",
    "worker_metrics_addr": "BILLING_WORKER_METRICS_ADDR",
    "notify_url": "BILLING_NOTIFY_URL",
    "notify_secret": "BILLING_NOTIFY_SECRET",
    "notify_retry_seconds": "BILLING_NOTIFY_RETRY_SECONDS",
}

# BILLING_RETENTION may not go below a week: Stripe redelivers an event for up to 3 days, and a
# client re-pushes a batch within minutes; a shorter retention would purge what still deduplicates.
MIN_RETENTION = timedelta(days=7)

# An API process answers quota checks from memory only while that memory provably holds every flag
# committed this long ago (api/quota_cache.py); an operator block waits this long after its commit
# before it is acknowledged, so that every API process enforces it by then.
QUOTA_CACHE_MAX_AGE_SECONDS = 0.5

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> timedelta:
    """``30s``, ``90m``, ``20h``, ``35d`` (or a timedelta) as a timedelta; anything else is a ValueError."""
    if isinstance(value, timedelta):
        return value
    text = str(value).strip()
    unit = _DURATION_UNITS.get(text[-1:])
    if unit is None or not text[:-1].isdigit():
        raise ValueError(f"expected a duration such as 30s, 90m, 20h or 35d, got {text!r}")
    return timedelta(seconds=int(text[:-1]) * unit)


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


def _postgres_url(value: str | None) -> str | None:
    if value is not None and not value.startswith(("postgresql://", "postgres://")):
        raise ValueError("expected a postgresql:// URL")
    return value


class Settings(BaseSettings):
    """Every setting of the service; each field is read from the environment variable in its alias."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    database_url: str | None = Field(None, alias="DATABASE_URL")
    temporal_address: str = Field("127.0.0.1:7233", alias="TEMPORAL_ADDRESS")
    temporal_namespace: str = Field("default", alias="TEMPORAL_NAMESPACE", min_length=1)
    task_queue: str = Field("billing", alias="BILLING_TASK_QUEUE", min_length=1)
    api_token: SecretStr | None = Field(None, alias="BILLING_API_TOKEN")
    http_addr: str = Field("127.0.0.1:8080", alias="BILLING_HTTP_ADDR")
    stripe_api_key: SecretStr | None = Field(None, alias="STRIPE_API_KEY")
    stripe_api_base: str | None = Field(None, alias="STRIPE_API_BASE")
    stripe_webhook_secret: SecretStr | None = Field(None, alias="STRIPE_WEBHOOK_SECRET")
    metrics_source_url: str | None = Field(None, alias="BILLING_METRICS_SOURCE_URL")
    # How long POST /v1/metrics waits for its batch's workflow before answering 503 (the run goes on).
    push_answer_seconds: float = Field(60.0, alias="BILLING_PUSH_ANSWER_SECONDS", gt=0, le=3600)
    retention: timedelta = Field(timedelta(days=35), alias="BILLING_RETENTION")
    # A report row not settled this long after its first attempt is never resent automatically: Stripe
    # deduplicates an identifier for at least 24 hours, so this stays a safety margin below that.
    report_horizon: timedelta = Field(timedelta(hours=20), alias="BILLING_REPORT_HORIZON")
    # How long after a month ends Stripe may still invoice usage stamped inside it (Stripe's default).
    finalization_grace: timedelta = Field(timedelta(hours=1), alias="BILLING_STRIPE_FINALIZATION_GRACE")
    # Where `billing worker` serves Prometheus text (its own metrics and the Temporal SDK's).
    worker_metrics_addr: str = Field("127.0.0.1:9464", alias="BILLING_WORKER_METRICS_ADDR")
    # Usage-threshold and payment notifications: POSTed here, signed by the Standard Webhooks scheme.
    notify_url: str | None = Field(None, alias="BILLING_NOTIFY_URL")
    notify_secret: SecretStr | None = Field(None, alias="BILLING_NOTIFY_SECRET")
    # First retry interval of a refused delivery; it doubles up to 15 minutes, for 72 hours.
    notify_retry_seconds: float = Field(5.0, alias="BILLING_NOTIFY_RETRY_SECONDS", gt=0, le=3600)

    _check_urls = field_validator("database_url", "metrics_source_url")(_postgres_url)
    _check_addrs = field_validator("temporal_address", "http_addr", "worker_metrics_addr")(_host_port)

    @field_validator("notify_url")
    @classmethod
    def _notify_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return value

    @field_validator("notify_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # The Standard Webhooks secret: base64 bytes, optionally prefixed whsec_ (as its libraries expect).
        if value is not None:
            raw = value.get_secret_value().removeprefix("whsec_")
            try:
                if len(base64.b64decode(raw, validate=True)) < 16:
                    raise ValueError
            except (ValueError, binascii.Error):
                raise ValueError("expected whsec_ followed by at least 16 base64-encoded bytes") from None
        return value

    @field_validator("report_horizon", "finalization_grace", mode="before")
    @classmethod
    def _duration(cls, value: object) -> timedelta:
        duration = parse_duration(value)
        if duration <= timedelta(0):
            raise ValueError("must be more than zero")
        return duration

    @field_validator("report_horizon")
    @classmethod
    def _below_stripe_dedupe(cls, value: timedelta) -> timedelta:
        if value > timedelta(hours=24):
            raise ValueError("must be at most 24h (Stripe deduplicates identifiers for 24 hours)")
        return value

    @field_validator("stripe_api_base")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return value.rstrip("/") if value else value

    @field_validator("retention", mode="before")
    @classmethod
    def _retention(cls, value: object) -> object:
        duration = parse_duration(value) if isinstance(value, str) else value
        if isinstance(duration, timedelta) and duration < MIN_RETENTION:
            raise ValueError(f"must be at least {MIN_RETENTION.days}d (Stripe redelivers for 3 days)")
        return duration

    @field_validator("api_token")
    @classmethod
    def _long_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value

    @classmethod
    def load(cls, **overrides: object) -> Settings:
        """Read the environment; a malformed value raises ConfigError naming its variable."""
        try:
            return cls(**overrides)  # type: ignore[arg-type]
        except ValidationError as exc:
            first = exc.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else "configuration"
            setting = _ENV_NAMES.get(field, field)
            raise ConfigError(setting, first["msg"].removeprefix("Value error, ")) from None

    def is_set(self, field: str) -> bool:
        """Whether a setting was given (rather than defaulted)."""
        return field in self.model_fields_set

    def require_database_url(self) -> str:
        """The PostgreSQL URL, or ConfigError when it is not set."""
        if not self.database_url:
            raise ConfigError(
                "DATABASE_URL",
                "not set; `source .data/dev.env` to use the `make dev` stack (start it with `make dev`), "
                "or export DATABASE_URL=postgresql://...",
            )
        return self.database_url

    def require_api_token(self) -> str:
        """The API bearer token, or ConfigError when it is not set."""
        if self.api_token is None:
            raise ConfigError("BILLING_API_TOKEN", "not set (required to serve the API)")
        return self.api_token.get_secret_value()

    @cached_property
    def http_host_port(self) -> tuple[str, int]:
        """BILLING_HTTP_ADDR split into host and port."""
        host, _, port = self.http_addr.rpartition(":")
        return host.strip("[]"), int(port)
