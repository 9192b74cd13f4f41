"""The one ``Settings`` of cryid: composes each layer's settings; env ``CRYID_*``, TOML, secrets.

Precedence (highest first): init arguments, environment (``CRYID_MQTT__HOST``), the TOML file given
by ``--config`` or ``CRYID_CONFIG``, secret files (``$CREDENTIALS_DIRECTORY``), defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from cryid.daemon.homeassistant import HomeAssistantSettings
from cryid.daemon.metrics import MetricsSettings
from cryid.daemon.sources import SourceSettings
from cryid.enrollment.config import RegistrySettings
from cryid.models.config import DEFAULT_MODEL_DIR, EmbedderSettings, SegmenterSettings

DEFAULT_STATE_DIR = Path(os.environ.get("STATE_DIRECTORY", "~/.local/state/cryid")).expanduser()


class MqttSettings(BaseModel):
    """Broker connection and topic layout."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (8883 is usual for TLS).")
    username: str | None = Field(None, description="User name; None for an anonymous connection.")
    password: SecretStr | None = Field(None, description="Password (secret; prefer a credential file).")
    password_file: Path | None = Field(
        None, description="File holding the password; relative names are looked up in $CREDENTIALS_DIRECTORY."
    )
    tls: bool = Field(False, description="Connect with TLS.")
    ca_file: Path | None = Field(None, description="CA certificate for TLS (system store when None).")
    client_id: str = Field("", description="MQTT client id; empty derives one from the room.")
    topic_prefix: str = Field("", description="Prefix of every topic; empty means cryid/<room>.")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive.")
    reconnect_min_s: float = Field(1.0, gt=0.0, le=60.0, description="First reconnect delay.")
    reconnect_max_s: float = Field(30.0, gt=0.0, le=3600.0, description="Reconnect delay cap.")
    stats_interval_s: float = Field(30.0, gt=0.0, le=3600.0, description="Period of the stats topic.")
    max_inflight: int = Field(
        100, ge=1, le=10000, description="Events published but not yet acknowledged by the broker, at most."
    )

    def prefix(self, room: str) -> str:
        """The topic prefix: ``topic_prefix`` or ``cryid/<room>``."""
        return (self.topic_prefix or f"cryid/{room}").rstrip("/")

    def resolved_password(self) -> str | None:
        """The password from ``password`` or ``password_file`` (relative: in ``$CREDENTIALS_DIRECTORY``)."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is None:
            return None
        path = Path(self.password_file).expanduser()
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if not path.is_absolute() and cred_dir:
            path = Path(cred_dir) / path
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ValueError(
                f"mqtt.password_file: cannot read {path} ({exc.strerror}); fix the path or its permissions"
            ) from exc


class IdentifierSettings(BaseModel):
    """Decision rules: an expiration or episode is ``identified`` when both thresholds are met."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_score: float = Field(
        0.5, ge=-1.0, le=1.0, description="Cosine to the best-matching centroid needed to name a baby."
    )
    min_margin: float = Field(
        0.05, ge=0.0, le=2.0, description="Best score minus runner-up score needed to name a baby."
    )
    episode_gap_s: float = Field(
        3.0, gt=0.0, le=600.0, description="Expirations closer than this belong to one crying episode."
    )
    max_episode_s: float = Field(
        120.0, gt=0.0, le=3600.0, description="An episode is closed (final event) after this long at most."
    )


class OutboxSettings(BaseModel):
    """SQLite outbox in the state directory: events wait here until the broker acknowledges them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    filename: str = Field("outbox.sqlite3", description="Outbox file name inside the state directory.")
    max_events: int = Field(
        100000,
        ge=10,
        le=10_000_000,
        description="Bound: when full, the oldest provisional expiration events are dropped first.",
    )
    fsync: bool = Field(True, description="fsync every write (survives power loss, not only crashes).")


class ServiceSettings(BaseModel):
    """The daemon's threads and lifecycle."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    queue_chunks: int = Field(
        200,
        ge=2,
        le=100000,
        description="Audio chunks queued between reader and pipeline; when full, the reader waits.",
    )
    shutdown_timeout_s: float = Field(
        10.0, ge=0.0, le=600.0, description="On stop, wait this long for the broker to acknowledge events."
    )
    registry_poll_s: float = Field(
        1.0, gt=0.0, le=1.0, description="How often the registry is checked for changes (enrollments)."
    )


class Settings(BaseSettings):
    """Everything ``cryid`` can be configured with."""

    model_config = SettingsConfigDict(
        env_prefix="CRYID_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        secrets_dir=os.environ.get("CREDENTIALS_DIRECTORY") or None,
    )

    room: str = Field("nursery", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Ward room name (topics).")
    state_dir: Path = Field(DEFAULT_STATE_DIR, description="Registry and outbox live here (CRYID_STATE_DIR).")
    model: Path = Field(
        DEFAULT_MODEL_DIR, description="Model directory: model.onnx + manifest.json (CRYID_MODEL)."
    )
    segmenter: SegmenterSettings = SegmenterSettings()
    embedder: EmbedderSettings = EmbedderSettings()
    registry: RegistrySettings = RegistrySettings()
    mqtt: MqttSettings = MqttSettings()
    identifier: IdentifierSettings = IdentifierSettings()
    outbox: OutboxSettings = OutboxSettings()
    service: ServiceSettings = ServiceSettings()
    source: SourceSettings = SourceSettings()
    metrics: MetricsSettings = MetricsSettings()
    homeassistant: HomeAssistantSettings = HomeAssistantSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = os.environ.get("CRYID_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        sources.append(file_secret_settings)
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the effective settings; ``config_file`` wins over ``CRYID_CONFIG``."""
    if config_file is not None:
        if not Path(config_file).is_file():
            raise ValueError(f"config file {config_file} does not exist; check --config / CRYID_CONFIG")
        os.environ["CRYID_CONFIG"] = str(config_file)
    return Settings(**overrides)
