"""`cryid config check` and `cryid schema`: effective config, secrets masked, exact field on errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cryid.daemon.config import Settings, load_settings
from cryid.daemon.events import SCHEMA_VERSION, CryEvent
from tests.fixtures.cli import cryid_env

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`


def _run(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = cryid_env()
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "cryid.daemon.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_config_check_prints_effective_toml_with_the_password_masked(tmp_path: Path) -> None:
    cfg = tmp_path / "cryid.toml"
    cfg.write_text('room = "ward7"\n[mqtt]\nhost = "broker.local"\nusername = "ward"\npassword = "hunter2"\n')
    done = _run("config", "check", "--config", str(cfg), env_extra={"CRYID_MQTT__PORT": "8883"})
    assert done.returncode == 0, done.stderr
    assert "hunter2" not in done.stdout
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads(done.stdout)  # the output is a valid config file again
    assert data["room"] == "ward7"
    assert data["mqtt"]["host"] == "broker.local" and data["mqtt"]["port"] == 8883  # env beats the file
    assert data["mqtt"]["password"] == "**********"
    assert data["identifier"]["episode_gap_s"] == Settings().identifier.episode_gap_s


def test_config_check_json(tmp_path: Path) -> None:
    done = _run("config", "check", "--json", env_extra={"CRYID_STATE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state_dir"] == str(tmp_path)


@pytest.mark.parametrize(
    ("env", "toml", "field"),
    [
        ({"CRYID_MQTT__PORT": "70000"}, "", "mqtt.port"),
        ({"CRYID_IDENTIFIER__MIN_SCORE": "high"}, "", "identifier.min_score"),
        ({}, "[identifier]\nepisode_gap_s = -1\n", "identifier.episode_gap_s"),
        ({}, "[mqtt]\nhostname = 'x'\n", "mqtt.hostname"),
        ({}, "room = 'ward 7!'\n", "room"),
    ],
)
def test_bad_value_fails_naming_the_exact_field(
    tmp_path: Path, env: dict[str, str], toml: str, field: str
) -> None:
    args = ["config", "check"]
    if toml:
        cfg = tmp_path / "bad.toml"
        cfg.write_text(toml)
        args += ["--config", str(cfg)]
    for command in (args, ["run", "--source", "x.wav", *args[2:]]):
        done = _run(*command, env_extra=env)
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("cryid: error: invalid configuration: ") and f"{field}:" in lines[0]


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    done = _run("config", "check", "--config", str(tmp_path / "nope.toml"))
    assert done.returncode == 2
    assert "does not exist" in done.stderr


def test_unreadable_password_file_fails_config_check(tmp_path: Path) -> None:
    done = _run(
        "config",
        "check",
        env_extra={"CRYID_MQTT__USERNAME": "u", "CRYID_MQTT__PASSWORD_FILE": str(tmp_path / "x")},
    )
    assert done.returncode == 2 and "mqtt.password_file" in done.stderr


def test_settings_from_env_nested(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYID_IDENTIFIER__EPISODE_GAP_S", "5.5")
    monkeypatch.setenv("CRYID_OUTBOX__MAX_EVENTS", "1000")
    s = load_settings()
    assert s.identifier.episode_gap_s == 5.5 and s.outbox.max_events == 1000
    assert s.mqtt.prefix(s.room) == "cryid/nursery"


def test_schema_prints_the_payload_schemas() -> None:
    done = _run("schema")
    assert done.returncode == 0
    schemas = json.loads(done.stdout)
    event = schemas["<prefix>/baby/<baby_id> and <prefix>/unknown"]
    assert event == CryEvent.model_json_schema()
    for key in (
        "event_id",
        "kind",
        "decision",
        "baby_id",
        "score",
        "runner_up",
        "margin",
        "started_at",
        "ended_at",
        "stream_offset_s",
        "n_expirations",
        "model_sha256",
        "confidence",
        "candidates",
        "n_candidates",
        "reason",
    ):
        assert key in event["properties"]
    assert SCHEMA_VERSION == 2 and event["properties"]["schema_version"]["default"] == 2
    candidate = schemas["<prefix>/baby/<baby_id> and <prefix>/unknown"]["$defs"]["CandidateOut"]
    assert set(candidate["properties"]) == {"baby_id", "score", "probability", "confirmed"}
    assert candidate["properties"]["confirmed"]["default"] is False
    assert "confirmed" not in candidate["required"]
    reasons = {r for branch in event["properties"]["reason"]["anyOf"] for r in branch.get("enum", [])}
    assert reasons == {
        "no_candidates", "below_min_confidence", "not_confirmed", "below_min_score", "below_min_margin"
    }  # fmt: skip
    assert "reason" not in event["required"]  # an optional addition to version 2
    assert event["properties"]["candidates"]["maxItems"] == 3
    assert "queue_depth" in schemas["<prefix>/stats"]["properties"]


def test_identifier_thresholds_in_config_check(tmp_path: Path) -> None:
    """min_confidence is a setting; the expert overrides are unset (commented) by default and can be set."""
    done = _run("config", "check")
    assert done.returncode == 0, done.stderr
    assert "# min_score = (unset)" in done.stdout and "# min_margin = (unset)" in done.stdout
    tomllib = pytest.importorskip("tomllib")
    assert tomllib.loads(done.stdout)["identifier"]["min_confidence"] == Settings().identifier.min_confidence
    done = _run(
        "config",
        "check",
        "--json",
        env_extra={"CRYID_IDENTIFIER__MIN_CONFIDENCE": "0.97", "CRYID_IDENTIFIER__MIN_SCORE": "0.4"},
    )
    ident = json.loads(done.stdout)["identifier"]
    assert ident["min_confidence"] == 0.97 and ident["min_score"] == 0.4 and ident["min_margin"] is None
    bad = _run("config", "check", env_extra={"CRYID_IDENTIFIER__MIN_CONFIDENCE": "1.5"})
    assert bad.returncode == 2 and "identifier.min_confidence:" in bad.stderr
