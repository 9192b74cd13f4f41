"""A poisoned registry (issue 15, item 1): ``cryid enroll import`` checks every field and refuses the
whole file with one line; the daemon skips a bad reference already in the registry and keeps going.

Real parts: the shipped ONNX model, real cries of donateacry-cc, real SQLite, a real mosquitto.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from cryid.daemon.cli import main
from cryid.enrollment.registry import Registry
from cryid.models.config import DEFAULT_MODEL_DIR
from tests.fixtures.data import dac_rows
from tests.fixtures.registry import tamper

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`

BABIES = ("dac0018", "dac0059")


def _files(dac_dir: Path, baby_id: str) -> list[str]:
    return [
        str(dac_dir / r["file_name"]) for r in dac_rows(split="dev", period="B") if r["baby_id"] == baby_id
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, dac_dir: Path) -> tuple[Path, dict[str, Any]]:
    """A registry with two babies (the first with kept audio) and its export, made once."""
    work = tmp_path_factory.mktemp("poison")
    mp = pytest.MonkeyPatch()
    mp.setenv("CRYID_STATE_DIR", str(work / "state"))
    mp.setenv("CRYID_MODEL", str(DEFAULT_MODEL_DIR))
    mp.delenv("CRYID_CONFIG", raising=False)
    try:
        assert main(["enroll", "add", BABIES[0], *_files(dac_dir, BABIES[0])[:2], "--keep-audio"]) == 0
        assert main(["enroll", "add", BABIES[1], *_files(dac_dir, BABIES[1])]) == 0
        assert main(["enroll", "export", str(work / "export.json")]) == 0
    finally:
        mp.undo()
    return work / "state", json.loads((work / "export.json").read_text())




def _f32(vectors: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vectors, dtype="<f4").tobytes()).decode()


def _emb(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["infants"][1]["samples"][0]["embeddings"]


def _set_vectors(
    doc: dict[str, Any], fill: float | None = None, dim: int | None = None, row: int = 0
) -> None:
    e = _emb(doc)
    n = len(e["start_samples"])
    if dim is not None:
        e["dim"] = dim
        e["vectors_f32le"] = _f32(np.ones((n, dim)))
        return
    v = np.frombuffer(base64.b64decode(e["vectors_f32le"]), dtype="<f4").reshape(n, -1).copy()
    v[row] = fill
    e["vectors_f32le"] = _f32(v)


def _flac(rate: int) -> str:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(rate, np.float32), rate, format="FLAC")
    return base64.b64encode(buf.getvalue()).decode()


POISONS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "10-dimension vectors": (lambda d: _set_vectors(d, dim=10), "embeddings.dim"),
    "nan vector": (lambda d: _set_vectors(d, np.nan), "vectors_f32le[0]"),
    "zero vector": (lambda d: _set_vectors(d, 0.0), "vectors_f32le[0]"),
    "1e38 vector": (lambda d: _set_vectors(d, 1e38), "vectors_f32le[0]"),
    "negative duration": (lambda d: d["infants"][1]["samples"][0].update(duration_s=-5.0), "duration_s"),
    "negative cry": (lambda d: d["infants"][1]["samples"][0].update(cry_s=-1.0), "cry_s"),
    "infinite duration": (lambda d: d["infants"][1]["samples"][0].update(duration_s=1e300), "duration_s"),
    "huge name": (lambda d: d["infants"][1].update(display_name="A" * 2_000_000), "display_name"),
    "escape sequence name": (
        lambda d: d["infants"][1].update(display_name="\x1b[2J\x1b]0;pwn\x07"),
        "display_name",
    ),
    "newline in source": (lambda d: d["infants"][1]["samples"][0].update(source="a\nb"), "source"),
    "schema version true": (lambda d: d.update(schema_version=True), "schema version"),
    "garbage audio": (
        lambda d: d["infants"][0]["samples"][0].update(audio_flac=base64.b64encode(b"\0" * 5000).decode()),
        "audio_flac",
    ),
    "audio at 8 kHz": (lambda d: d["infants"][0]["samples"][0].update(audio_flac=_flac(8000)), "audio_flac"),
    "bad baby id": (lambda d: d["infants"][1].update(baby_id="a/#"), "baby_id"),
    "duplicate baby": (lambda d: d["infants"].append(copy.deepcopy(d["infants"][1])), "appears twice"),
    "string count": (lambda d: d["infants"][1]["samples"][0].update(n_expirations="7"), "n_expirations"),
    "span ends before it starts": (
        lambda d: _emb(d).update(end_samples=[0] * len(_emb(d)["end_samples"])),
        "end_samples",
    ),
    "bad room": (lambda d: d["infants"][1].update(room="icu\x1b"), "room"),
}


@pytest.mark.parametrize("name", sorted(POISONS))
def test_poisoned_import_is_refused_whole_with_one_line(
    name: str, cryid, exported: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    poison, field = POISONS[name]
    doc = copy.deepcopy(exported[1])
    poison(doc)
    path = tmp_path / "poisoned.json"
    path.write_text(json.dumps(doc))
    rc, out, err = cryid("enroll", "import", path)
    assert rc != 0, f"{name}: accepted ({out})"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cryid: error: "), err[:2000]
    assert field in lines[0] and len(lines[0]) < 600, lines[0]
    assert "\x1b" not in err
    with Registry.open(cryid.state_dir) as reg:
        assert reg.infants() == []  # one transaction: nothing of the file was imported


def test_clean_export_still_imports(cryid, exported: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    path = tmp_path / "clean.json"
    path.write_text(json.dumps(exported[1]))
    rc, out, err = cryid("enroll", "import", path)
    assert rc == 0, err
    rc, out, err = cryid("enroll", "list", "--json")
    assert sorted(r["baby_id"] for r in json.loads(out)["infants"]) == sorted(BABIES)


def _poison_registry(state: Path, baby_id: str, vector: np.ndarray) -> None:
    with Registry.open(state) as reg:
        tamper(
            reg.path,
            "UPDATE embeddings SET vector = ? "
            "WHERE sample_id IN (SELECT sample_id FROM samples WHERE baby_id = ?)",
            (np.asarray(vector, dtype="<f4").tobytes(), baby_id),
        )


def test_list_and_show_print_names_without_raw_control_characters(
    cryid, exported: tuple[Path, dict[str, Any]]
) -> None:
    shutil.copytree(exported[0], cryid.state_dir)
    with Registry.open(cryid.state_dir) as reg:  # an older cryid let this in
        tamper(
            reg.path,
            "UPDATE infants SET display_name = ? WHERE baby_id = ?",
            ("\x1b[31mRed\x1b[0m", BABIES[0]),
        )
    for args in (("enroll", "list"), ("enroll", "show", BABIES[0])):
        rc, out, err = cryid(*args)
        assert rc == 0, err
        assert "\x1b" not in out and "Red" in out
    rc, out, err = cryid("enroll", "add", "dac9999", *_files_any(exported), "--name", "\x1b[2J")
    assert rc != 0 and "control characters" in err


def _files_any(exported: tuple[Path, dict[str, Any]]) -> list[str]:
    return [str(Path(__file__))]  # never read: the name is refused before any audio is


@pytest.mark.parametrize("poison", ["10 dimensions", "nan", "zero", "1e38"])
def test_daemon_skips_a_poisoned_reference_and_keeps_identifying_the_others(
    poison: str,
    exported: tuple[Path, dict[str, Any]],
    tmp_path: Path,
    dac_dir: Path,
    mosquitto: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from cryid.daemon.config import MqttSettings, Settings
    from cryid.daemon.service import build_service

    state = tmp_path / "state"
    shutil.copytree(exported[0], state)
    dim = len(np.frombuffer(base64.b64decode(_emb(exported[1])["vectors_f32le"]), "<f4")) // len(
        _emb(exported[1])["start_samples"]
    )
    vector = {
        "10 dimensions": np.ones(10),
        "nan": np.full(dim, np.nan),
        "zero": np.zeros(dim),
        "1e38": np.full(dim, 1e38),
    }[poison]
    _poison_registry(state, BABIES[0], vector)
    settings = Settings(
        # the babies were enrolled in the default room, and the daemon compares only its own room's
        state_dir=state, mqtt=MqttSettings(host=mosquitto.host, port=mosquitto.port)
    )
    caplog.set_level(logging.WARNING)
    service = build_service(settings, _files(dac_dir, BABIES[1])[0])
    try:
        code = service.run()
    finally:
        service.close()
    assert code == 0 and service.fatal is None, service.fatal
    assert service._enrolled == [BABIES[1]]  # the poisoned baby is left out, the other one stays
    assert service.counters.expirations > 0 and service.counters.events > 0
    assert any(BABIES[0] in r.getMessage() and "cannot be used" in r.getMessage() for r in caplog.records)


def test_reembed_survives_a_garbage_audio_blob_already_in_the_registry(
    cryid, exported: tuple[Path, dict[str, Any]]
) -> None:
    shutil.copytree(exported[0], cryid.state_dir)
    with Registry.open(cryid.state_dir) as reg:  # an older cryid let this in
        sample_id = tamper(
            reg.path,
            "SELECT sample_id FROM samples WHERE baby_id = ? AND audio_flac IS NOT NULL",
            (BABIES[0],),
        )[0][0]
        tamper(
            reg.path, "UPDATE samples SET audio_flac = ? WHERE sample_id = ?", (b"\0garbage" * 100, sample_id)
        )
    rc, _out, err = cryid("enroll", "reembed")
    assert rc == 0, err
    assert f"sample id(s) {sample_id}" in err


@pytest.mark.parametrize("poison", ["10 dimensions", "nan", "1e38"])
def test_show_and_add_survive_a_poisoned_reference(
    poison: str, cryid, exported: tuple[Path, dict[str, Any]], dac_dir: Path
) -> None:
    shutil.copytree(exported[0], cryid.state_dir)
    vector = {"10 dimensions": np.ones(10), "nan": np.full(80, np.nan), "1e38": np.full(80, 1e38)}[poison]
    _poison_registry(cryid.state_dir, BABIES[0], vector)
    for baby in BABIES:
        rc, out, err = cryid("enroll", "show", baby)
        assert rc == 0, err
        assert "nan" not in out, out
    rc, out, err = cryid("enroll", "add", "dac0084", *_files(dac_dir, "dac0084"))
    assert rc == 0, err
