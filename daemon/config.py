"""The one ``Settings`` of cryid: composes each layer's settings; env ``CRYID_*``, TOML, secrets.

Precedence (highest first): init arguments, environment (``CRYID_MQTT__HOST``), the TOML file given
by ``--config`` or ``CRYID_CONFIG``, secret files (``$CREDENTIALS_DIRECTORY``), defaults.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from cryid.daemon.dashboard import DashboardSettings
from cryid.daemon.homeassistant import HomeAssistantSettings
from cryid.daemon.metrics import MetricsSettings
from cryid.daemon.sourcelist import SourceEntry
from cryid.enrollment.config import RegistrySettings, plain_filename
from cryid.models.config import DEFAULT_MODEL_DIR, EmbedderSettings, SegmenterSettings
from cryid.models.errors import SettingsError
from cryid.models.strict import StrictModel

logger = logging.getLogger(__name__)

# CRYID_* variables that are not settings fields but are read elsewhere (so not typos), with their meaning.
OTHER_ENVIRONMENT = {
    "CRYID_CONFIG": "The TOML configuration file (`--config` wins over it).",
    "CRYID_DEMO_DATA": "`cryid demo`: the donateacry-cc folder of real cries (default "
    "`../shared/data/donateacry-cc`).",
    "CRYID_TEST_DATA": "Tests and `bench/`: the donateacry-cc folder of real cries.",
    "CRYID_TEST_SHIPPED_SOURCE": "Tests: the speechbrain folder the shipped model was exported from.",
    "CRYID_FULL_PARITY": "Tests: `1` checks the embedder's parity on every dev file (slow).",
}

DEFAULT_STATE_DIR = Path(os.environ.get("STATE_DIRECTORY", "~/.local/state/cryid")).expanduser()


class MqttSettings(StrictModel):
    """Broker connection and topic layout."""

    host: str = Field("127.0.0.1", description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (8883 is usual for TLS).")
    username: str | None = Field(None, description="User name; unset for an anonymous connection.")
    password: SecretStr | None = Field(None, description="Password (secret; prefer a credential file).")
    password_file: Path | None = Field(
        None, description="File holding the password; relative names are looked up in $CREDENTIALS_DIRECTORY."
    )
    tls: bool = Field(False, description="Connect with TLS.")
    protocol: Literal["5", "3.1.1"] = Field(
        "5",
        description="MQTT version. 5 makes the broker say when it refuses a publish (ACL); 3.1.1 only for "
        "brokers without MQTT 5, which acknowledge a refused publish and drop it.",
    )
    ca_file: Path | None = Field(None, description="CA certificate for TLS (system store when unset).")
    client_id: str = Field("", description="MQTT client id; empty derives one from the room.")
    topic_prefix: str = Field("", description="Prefix of every topic; empty means cryid/<room>.")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive.")
    reconnect_min_s: float = Field(1.0, gt=0.0, le=60.0, description="First reconnect delay.")
    reconnect_max_s: float = Field(30.0, gt=0.0, le=3600.0, description="Reconnect delay cap.")
    stats_interval_s: float = Field(30.0, gt=0.0, le=3600.0, description="Period of the stats topic.")
    max_inflight: int = Field(
        100, ge=1, le=10000, description="Events published but not yet acknowledged by the broker, at most."
    )

    @field_validator("topic_prefix")
    @classmethod
    def _no_wildcards(cls, v: str) -> str:
        if "#" in v or "+" in v or "\x00" in v:
            raise ValueError("a topic prefix cannot hold the MQTT wildcards '#' or '+'; use e.g. cryid/ward1")
        return v

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
            raise SettingsError(
                f"mqtt.password_file: cannot read {path} ({exc.strerror}); fix the path or its permissions"
            ) from exc


class IdentifierSettings(StrictModel):
    """Decision rules. With a calibrated model (``manifest.calibration``) a baby is named when the
    calibrated probability that the best-matching baby is the one crying is at least ``min_confidence``
    (``min_confidence_unconfirmed`` while none of that baby's cries has been confirmed by a nurse);
    ``min_score`` and ``min_margin`` are expert overrides that must then ALSO be met. A model without a
    calibration falls back to cosine thresholds: ``min_score``/``min_margin`` when set, else
    ``fallback_min_score``/``fallback_min_margin`` (``cryid model calibrate`` fixes that)."""

    # 0.94: the lowest value at which the statistics-only model's cross-validated wrong-baby rate stayed at
    # or below 5% in dev rooms of 8, with and without a confirmed cry per baby. The shipped model with the
    # GMM branch recommends 0.92 (`cryid model calibrate` stores it in the manifest as
    # calibration.metrics.recommended_min_confidence; another model may need another value); the default
    # stays at 0.94, the safer side: with one confirmed cry per baby 14.1% of cries named, 0.6% wrongly
    # (0.92: 17.2%, 0.5%; model card).
    min_confidence: float = Field(
        0.94,
        gt=0.0,
        le=1.0,
        description="Calibrated probability that the best-matching baby is the one crying, needed to "
        "name it (a wrong name sends a nurse to the wrong cot; unnamed cries still list candidates).",
    )
    # 1.0: from birth recordings alone the shipped model names few cries and most of those wrongly. Dev rooms
    # of 8 through `cryid run` (../shared/tools/ward_rooms.py, 6 enrolled + 2 strangers, 5 rooms, ~90
    # episodes): at 0.94 2 cries named, both wrong; at 0.96 1 named, wrong; at 0.98 none. Cross-validated
    # (`cryid model calibrate`, K=0): 0.35% of cries named at 0.9, 30% of those wrong.
    min_confidence_unconfirmed: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Calibrated confidence needed to name a best-matching baby none of whose cries a nurse "
        "has confirmed yet (birth recordings only); 1.0: such a baby is never named, its cries list it "
        "among the candidates until a nurse confirms one. Babies with confirmed cries use min_confidence.",
    )
    min_score: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="Expert override: cosine to the best-matching baby also needed to name it; "
        "unset: not applied (with a calibrated model).",
    )
    min_margin: float | None = Field(
        None,
        ge=0.0,
        le=2.0,
        description="Expert override: best score minus runner-up score also needed to name a baby; "
        "unset: not applied (with a calibrated model).",
    )
    fallback_min_score: float = Field(
        0.5,
        ge=-1.0,
        le=1.0,
        description="Only for a model without calibration and min_score unset: cosine needed to name a baby.",
    )
    fallback_min_margin: float = Field(
        0.05,
        ge=0.0,
        le=2.0,
        description="Only for a model without calibration and min_margin unset: margin to name a baby.",
    )
    episode_gap_s: float = Field(
        3.0, gt=0.0, le=600.0, description="Expirations at most this far apart belong to one crying episode."
    )
    max_episode_s: float = Field(
        120.0, gt=0.0, le=3600.0, description="An episode is closed (final event) after this long at most."
    )
    same_cry_ms: int = Field(
        300, ge=0, le=5000,
        description="Several microphones of one room: their expirations that overlap or lie less than this "
        "apart are one cry (identified once, from the clearest microphone); adds up to this much latency.",
    )


class OutboxSettings(StrictModel):
    """SQLite outbox in the state directory: events wait here until the broker acknowledges them."""

    filename: str = Field(
        "outbox.sqlite3", description="Outbox file name inside the state directory (a plain name, no path)."
    )

    _plain_filename = field_validator("filename")(classmethod(plain_filename))  # type: ignore[arg-type]
    max_events: int = Field(
        100000,
        ge=10,
        le=10_000_000,
        description="Bound: when full, the oldest provisional expiration events are dropped first.",
    )
    fsync: bool = Field(
        True,
        description="fsync every stored event (survives power loss, not only crashes); done by the main "
        "thread right after the commit, while the event is published.",
    )
    memory_events: int = Field(
        10000, ge=10, le=1_000_000,
        description="While the disk is full, this many newest events wait in memory (published as usual).",
    )
    disk_retry_s: float = Field(
        5.0, gt=0.0, le=3600.0, description="While the disk is full, try writing the outbox this often."
    )


class ServiceSettings(StrictModel):
    """The daemon's threads and lifecycle."""

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


class SourceSettings(StrictModel):
    """Where the audio comes from and how it is delivered."""

    device: str | None = Field(
        None,
        description="Microphone: device index or (part of) its name, see `cryid devices`; None: default.",
    )
    chunk_ms: int = Field(
        20,
        ge=10,
        le=2000,
        description="Audio per chunk read from a file, stdin or the mic (a chunk's length adds to latency).",
    )
    quiet_chunk_ms: int = Field(
        200,
        ge=0,
        le=250,
        description="Audio per read from the mic or a real-time file while the room is quiet (the gate shut "
        "for a second): fewer wake-ups. Audio that opens the gate cuts the block short; keep it below "
        "segmenter.min_expiration_ms. 0: always chunk_ms.",
    )
    mic_queue_chunks: int = Field(
        500,
        ge=2,
        le=100000,
        description="Bounded queue after the audio callback; when full, chunks are dropped.",
    )
    reopen_min_s: float = Field(
        0.5, gt=0.0, le=60.0, description="First delay before reopening a failed mic."
    )
    reopen_max_s: float = Field(30.0, gt=0.0, le=3600.0, description="Cap of the doubling reopen delay.")
    stall_timeout_s: float = Field(
        3.0, gt=0.0, le=600.0, description="A mic that delivers nothing this long is treated as failed."
    )
    flat_timeout_s: float = Field(
        60.0, gt=0.0, le=86400.0, description="Audio flat this long (silence, constant, clipped) is an alarm."
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
    state_dir: Path = Field(
        DEFAULT_STATE_DIR,
        description="Registry and outbox live here (CRYID_STATE_DIR).",
        json_schema_extra={"doc_default": "`$STATE_DIRECTORY` (set by systemd) or `~/.local/state/cryid`"},
    )
    model: Path = Field(
        DEFAULT_MODEL_DIR,
        description="Model directory: model.onnx + manifest.json (CRYID_MODEL).",
        json_schema_extra={"doc_default": "the shipped model, `models/default/`"},
    )
    segmenter: SegmenterSettings = SegmenterSettings()
    embedder: EmbedderSettings = EmbedderSettings()
    registry: RegistrySettings = RegistrySettings()
    mqtt: MqttSettings = MqttSettings()
    identifier: IdentifierSettings = IdentifierSettings()
    outbox: OutboxSettings = OutboxSettings()
    service: ServiceSettings = ServiceSettings()
    source: SourceSettings = SourceSettings()
    sources: list[SourceEntry] | None = Field(
        None,
        description="Several microphones / rooms in one daemon ([[sources]]: name, room, device); unset: the "
        "single [source] of `room`.",
    )
    dashboard: DashboardSettings = DashboardSettings()
    metrics: MetricsSettings = MetricsSettings()
    homeassistant: HomeAssistantSettings = HomeAssistantSettings()

    @field_validator("state_dir", "model", mode="before")
    @classmethod
    def _not_empty(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip():
            raise ValueError("empty; give a directory, or unset the variable for the default")
        return v

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
            raise SettingsError(f"config file {config_file} does not exist; check --config")
        os.environ["CRYID_CONFIG"] = str(config_file)
    else:
        named = os.environ.get("CRYID_CONFIG")
        if named and not Path(named).is_file():
            what = "is a directory" if Path(named).is_dir() else "does not exist"
            raise SettingsError(f"CRYID_CONFIG={named}: {what}; name a TOML file or unset CRYID_CONFIG")
    return Settings(**overrides)


def environment_names() -> list[str]:
    """Every ``CRYID_*`` variable cryid reads: settings (``CRYID_MQTT__HOST``) and the others."""
    names = list(OTHER_ENVIRONMENT)
    for name, f in Settings.model_fields.items():
        names.append(f"CRYID_{name.upper()}")
        model = f.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            names += [f"CRYID_{name.upper()}__{sub.upper()}" for sub in model.model_fields]
    return names


def warn_unknown_environment(environ: dict[str, str] | None = None) -> list[str]:
    """Log a warning for each ``CRYID_*`` variable that no setting reads (a typo is otherwise silent)."""
    environ = dict(os.environ) if environ is None else environ
    known = set(environment_names())
    # lists, mappings and unions (e.g. a list of sources) take any nested name
    open_prefixes = tuple(
        f"CRYID_{name.upper()}__"
        for name, f in Settings.model_fields.items()
        if not isinstance(f.annotation, type)
    )
    unknown = sorted(
        k
        for k in environ
        if k.upper().startswith("CRYID_")
        and k.upper() not in known
        and not k.upper().startswith(open_prefixes)
    )
    for k in unknown:
        close = difflib.get_close_matches(k.upper(), sorted(known), n=1, cutoff=0.6)
        logger.warning(
            "environment variable %s is not a cryid setting and is ignored%s",
            k,
            f"; did you mean {close[0]}?" if close else " (see `cryid config check`)",
        )
    return unknown
