"""``cryid enroll ...`` end to end on real cries (donateacry-cc), the real ONNX model and real SQLite.

Commands run through ``cryid``'s real entry point (``cryid.daemon.cli.main``) in this process; the
concurrency and kill -9 tests (test_enroll_concurrency.py) run it as subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cryid.daemon.cli import main
from cryid.enrollment.config import RegistrySettings
from cryid.enrollment.registry import Registry
from tests.fixtures.data import dac_rows


def files(dac_dir: Path, baby_id: str, period: str = "B") -> list[Path]:
    return [dac_dir / r["file_name"] for r in dac_rows(split="dev", period=period) if r["baby_id"] == baby_id]


def state_digest(state_dir: Path) -> dict[str, str]:
    """Every file of the state directory (registry, -wal, -shm) and its sha256."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(state_dir.iterdir()) if p.is_file()
    }




@pytest.fixture(scope="module")
def enrolled_state(tmp_path_factory: pytest.TempPathFactory, shipped_model_dir: Path, dac_dir: Path) -> Path:
    """A registry with dac0018 (active, audio kept) and dac0059 (active), made once per module."""
    state = tmp_path_factory.mktemp("enrolled") / "state"
    mp = pytest.MonkeyPatch()
    mp.setenv("CRYID_STATE_DIR", str(state))
    mp.setenv("CRYID_MODEL", str(shipped_model_dir))
    try:
        a_files = [str(p) for p in files(dac_dir, "dac0018")[:2]]
        assert main(["enroll", "add", "dac0018", *a_files, "--keep-audio"]) == 0
        assert main(["enroll", "add", "dac0059", *map(str, files(dac_dir, "dac0059"))]) == 0
    finally:
        mp.undo()
    return state


@pytest.fixture
def ward(cryid, enrolled_state: Path):
    """``cryid`` on a private copy of the enrolled registry."""
    shutil.copytree(enrolled_state, cryid.state_dir)
    return cryid


def test_add_show_list_update_remove(cryid, dac_dir: Path, shipped_model_dir: Path) -> None:
    rc, out, err = cryid("enroll", "add", "dac0018", *files(dac_dir, "dac0018")[:2], "--name", "Baby A")
    assert rc == 0, err
    assert out.startswith("enrolled dac0018: 2 recordings, ") and "s of cry in" in out
    rc, out, err = cryid("enroll", "add", "dac0059", *files(dac_dir, "dac0059"))
    assert rc == 0, err

    rc, out, _ = cryid("enroll", "show", "dac0018")
    assert rc == 0
    assert 'dac0018 "Baby A": active, room nursery' in out
    assert "centroid quality: mean cosine of expirations to centroid" in out
    assert "nearest other baby: dac0059 (cosine" in out
    assert "needs re-enrollment: no" in out

    d_file = files(dac_dir, "dac0018", "D")[0]
    rc, out, _ = cryid("enroll", "update", "dac0018", d_file, "--period", "discharge")
    assert rc == 0 and out.startswith("updated dac0018: 1 recording,")
    rc, out, _ = cryid("enroll", "show", "dac0018", "--json")
    report = json.loads(out)
    assert [s["period"] for s in report["samples"]] == ["birth", "birth", "discharge"]
    assert report["cry_s"] == pytest.approx(sum(s["cry_s"] for s in report["samples"]))
    assert report["n_embedded"] == report["n_expirations"] > 0
    assert -1.0 <= report["min_cosine_to_centroid"] <= report["mean_cosine_to_centroid"] <= 1.0

    rc, out, _ = cryid("enroll", "remove", "dac0059")
    assert rc == 0 and out.strip() == "discharged dac0059"
    rc, out, _ = cryid("enroll", "list", "--json")
    listed = {r["baby_id"]: r for r in json.loads(out)["infants"]}
    assert listed["dac0059"]["status"] == "discharged" and listed["dac0018"]["status"] == "active"
    assert listed["dac0018"]["n_samples"] == 3
    rc, out, _ = cryid("enroll", "list")
    assert out.splitlines()[0].split()[:4] == ["BABY_ID", "NAME", "ROOM", "STATUS"]
    assert any(line.startswith("dac0059") and "discharged" in line for line in out.splitlines())

    with Registry.open(cryid.state_dir, RegistrySettings()) as reg:
        sha = hashlib.sha256((shipped_model_dir / "model.onnx").read_bytes()).hexdigest()
        assert set(reg.centroids(sha)) == {"dac0018"}  # a discharged baby is no longer matched

    rc, out, _ = cryid("enroll", "remove", "dac0059", "--purge")
    assert rc == 0 and out.strip() == "purged dac0059"
    rc, out, _ = cryid("enroll", "list", "--json")
    assert [r["baby_id"] for r in json.loads(out)["infants"]] == ["dac0018"]


def test_replace_and_confusable_warning(ward, monkeypatch: pytest.MonkeyPatch, dac_dir: Path) -> None:
    monkeypatch.setenv("CRYID_REGISTRY__CONFUSABLE_SIMILARITY", "-1.0")  # every other baby is "too close"
    rc, out, err = ward("enroll", "add", "dac0059", files(dac_dir, "dac0059")[0], "--replace")
    assert rc == 0, err
    assert out.startswith("re-enrolled dac0059: 1 recording,")
    assert "cryid: warning: dac0059 is" in err and "similar to dac0018" in err and "may confuse them" in err


def _bad_text_wav(tmp: Path) -> Path:
    p = tmp / "notes.wav"
    p.write_text("this is a text file, not audio\n")
    return p


def _silent_wav(tmp: Path) -> Path:
    p = tmp / "silence.wav"
    sf.write(p, np.zeros(16000 * 5, dtype=np.float32), 16000)
    return p


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("missing file", "no such file"),
        ("text file named .wav", "not a readable audio file"),
        ("silent file", "no cry detected in 5.0 s of audio"),
        ("recording without cry", "no cry detected"),
        ("too little cry", "found 0.3 s of cry in 1 expirations, enrollment needs at least 2.0 s"),
        ("show unknown id", "is not enrolled"),
        ("remove unknown id", "is not enrolled"),
        ("update unknown id", "is not enrolled"),
        ("add enrolled id", "already enrolled"),
        ("id with '/'", "MQTT topic level"),
        ("id with '#'", "MQTT topic level"),
        ("id with '+'", "MQTT topic level"),
        ("import of another model", "exported with model"),
        ("import of another schema version", "registry schema version 99"),
    ],
)
def test_bad_input_one_line_error_registry_unchanged(
    ward, case: str, expect: str, dac_dir: Path, tmp_path: Path
) -> None:
    good = files(dac_dir, "dac0038")[0]
    argv: list[str | Path]
    if case == "missing file":
        argv = ["enroll", "add", "newbaby", good, tmp_path / "missing.wav"]
    elif case == "text file named .wav":
        argv = ["enroll", "add", "newbaby", _bad_text_wav(tmp_path)]
    elif case == "silent file":
        argv = ["enroll", "add", "newbaby", good, _silent_wav(tmp_path)]
    elif case == "recording without cry":  # a real phone recording in which the segmenter finds no cry
        argv = ["enroll", "add", "dac0066", *files(dac_dir, "dac0066", "B")]
    elif case == "too little cry":  # a far cry (about 0 dB SNR): 0.3 s of it is pitched; the minimum is 2 s
        argv = ["enroll", "add", "dac0348", *files(dac_dir, "dac0348", "B")]
    elif case.endswith("unknown id"):
        verb = case.split()[0]
        argv = ["enroll", verb, "nobody"] + ([good] if verb == "update" else [])
    elif case == "add enrolled id":
        argv = ["enroll", "add", "dac0059", good]
    elif case.startswith("id with"):
        argv = ["enroll", "add", "baby" + case[-2] + "1", good]
    else:
        rc, _, err = ward("enroll", "export", tmp_path / "ward.json")
        assert rc == 0, err
        doc = json.loads((tmp_path / "ward.json").read_text())
        if case == "import of another model":
            doc["model_sha256"] = "0" * 64
        else:
            doc["schema_version"] = 99
        (tmp_path / "other.json").write_text(json.dumps(doc))
        argv = ["enroll", "import", tmp_path / "other.json", "--replace"]
    before = state_digest(ward.state_dir)
    rc, out, err = ward(*argv)
    assert rc != 0
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("cryid: error: ") and expect in err, err
    assert state_digest(ward.state_dir) == before


def test_export_import_roundtrip(ward, cryid_factory_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    export = cryid_factory_dir / "ward.json"
    rc, out, err = ward("enroll", "export", export)
    assert rc == 0 and "exported 2 babies" in out, err
    src_state = ward.state_dir
    monkeypatch.setenv("CRYID_STATE_DIR", str(cryid_factory_dir / "other-pc"))
    rc, out, err = ward("enroll", "import", export)
    assert rc == 0 and "imported 2 babies" in out, err
    sha = json.loads(export.read_text())["model_sha256"]
    with Registry.open(src_state, RegistrySettings()) as a, Registry.open(
        cryid_factory_dir / "other-pc", RegistrySettings()
    ) as b:
        ca, cb = a.centroids(sha), b.centroids(sha)
        assert set(ca) == set(cb) == {"dac0018", "dac0059"}
        for k in ca:
            np.testing.assert_array_equal(ca[k], cb[k])
        assert [s.has_audio for s in b.samples("dac0018")] == [True, True]
        assert [s.has_audio for s in b.samples("dac0059")] == [False, False]
    # importing the same babies again is refused unless --replace
    rc, _, err = ward("enroll", "import", export)
    assert rc != 0 and "already enrolled" in err
    rc, _, err = ward("enroll", "import", export, "--replace")
    assert rc == 0, err


@pytest.fixture
def cryid_factory_dir(tmp_path: Path) -> Path:
    d = tmp_path / "elsewhere"
    d.mkdir()
    return d


def test_record_from_microphone(cryid, monkeypatch: pytest.MonkeyPatch, dac_dir: Path) -> None:
    """``record`` with sounddevice MOCKED: no microphone here (deploy's virtual-mic test covers capture).

    The fake device plays back a real cry recording, so the rest of the path is real.
    """
    wav, sr = sf.read(files(dac_dir, "dac0018")[0], dtype="float32")
    assert sr == 16000
    calls: dict[str, object] = {}

    def rec(frames: int, samplerate: int, channels: int, dtype: str, device: object) -> np.ndarray:
        calls.update(frames=frames, samplerate=samplerate, channels=channels, device=device)
        out = np.zeros((frames, channels), dtype=np.float32)
        n = min(frames, len(wav))
        out[:n, 0] = wav[:n]
        return out

    fake = types.SimpleNamespace(rec=rec, wait=lambda: None)
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    rc, out, err = cryid("enroll", "record", "dac0018", "--seconds", "7", "--device", "3")
    assert rc == 0, err
    assert calls == {"frames": 7 * 16000, "samplerate": 16000, "channels": 1, "device": 3}
    assert out.startswith("enrolled dac0018: 1 recording,")
    rc, out, _ = cryid("enroll", "show", "dac0018", "--json")
    (sample,) = json.loads(out)["samples"]
    assert sample["source_kind"] == "mic" and sample["has_audio"] is False


@pytest.fixture(scope="module")
def other_model_dir(shipped_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model saved again with one unknown protobuf field appended (field 1000 = 1, which ONNX
    readers keep and ignore): same function, another sha256, which is all the registry knows of a
    model ("a model change"). Byte-level, so the base install (no ``onnx`` package) runs it."""
    from cryid.models.files import sha256_file
    from cryid.models.manifest import load_manifest, write_manifest

    out = tmp_path_factory.mktemp("other-model") / "model"
    out.mkdir()
    (out / "model.onnx").write_bytes((shipped_model_dir / "model.onnx").read_bytes() + b"\xc0\x3e\x01")
    manifest = load_manifest(shipped_model_dir)
    write_manifest(manifest.model_copy(update={"onnx_sha256": sha256_file(out / "model.onnx")}), out)
    return out


def test_model_change_reembed_from_kept_audio(
    ward, monkeypatch: pytest.MonkeyPatch, shipped_model_dir: Path, other_model_dir: Path
) -> None:
    old_sha = hashlib.sha256((shipped_model_dir / "model.onnx").read_bytes()).hexdigest()
    new_sha = hashlib.sha256((other_model_dir / "model.onnx").read_bytes()).hexdigest()
    assert old_sha != new_sha
    monkeypatch.setenv("CRYID_MODEL", str(other_model_dir))

    rc, out, _ = ward("enroll", "list", "--json")
    assert {r["baby_id"]: r["needs_reenrollment"] for r in json.loads(out)["infants"]} == {
        "dac0018": True,
        "dac0059": True,
    }
    rc, out, _ = ward("enroll", "show", "dac0059")
    assert "needs re-enrollment: yes" in out and "cryid enroll add dac0059 AUDIO... --replace" in out
    rc, out, _ = ward("enroll", "show", "dac0018")
    assert "needs re-enrollment: yes" in out and "`cryid enroll reembed`" in out

    rc, out, err = ward("enroll", "reembed")
    assert rc == 0, err
    assert out.startswith(f"re-embedded 2 recordings of 1 baby for model {new_sha[:12]}")
    assert "these babies need re-enrollment: dac0059" in err

    with Registry.open(ward.state_dir, RegistrySettings()) as reg:
        new, old = reg.centroids(new_sha), reg.centroids(old_sha)
        assert set(new) == {"dac0018"} and set(old) == {"dac0018", "dac0059"}  # never mixed
        # the same function on the same kept (16-bit) audio gives the same centroid
        np.testing.assert_allclose(new["dac0018"], old["dac0018"], atol=1e-4)
        assert reg.needs_reenrollment(new_sha) == ["dac0059"]
    rc, out, _ = ward("enroll", "show", "dac0018")
    assert "needs re-enrollment: no" in out
