"""One clear line instead of a traceback or wrong advice (issue 15, items 11 and 13): the root error
class, a damaged registry or outbox, another program's SQLite file, closed stdin, a closed pipe, a
registry that cannot be opened, and ``-v`` after the sub-command.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cryid.daemon.cli import main
from cryid.enrollment.registry import NewSample, Registry, SampleEmbeddings
from tests.fixtures.cli import cryid_env
from tests.fixtures.data import dac_rows

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`


def _env(state: Path, **extra: str) -> dict[str, str]:
    env = cryid_env()
    env.update(CRYID_STATE_DIR=str(state), **extra)
    return env


def _cryid(
    *args: str, state: Path, stdin: int | None = None, **kw: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cryid.daemon.cli", *args],
        env=_env(state, **kw.pop("env", {})),  # type: ignore[arg-type]
        capture_output=True,
        text=True,
        timeout=120,
        stdin=stdin,
        **kw,  # type: ignore[arg-type]
    )


def _one_line(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cryid: error: "), done.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _registry_with_babies(state: Path, n: int = 20) -> Path:
    rng = np.random.default_rng(0)
    with Registry.open(state) as reg, reg.write() as tx:
        for b in range(n):
            tx.insert_infant(f"b{b:02d}", "", "nursery")
            emb = SampleEmbeddings(
                "0" * 64, rng.random((10, 80), np.float32), tuple(range(10)), tuple(range(1, 11))
            )
            tx.insert_sample(f"b{b:02d}", NewSample("file", "f.wav", "birth", 10.0, 5.0, 10, emb))
    return state / "registry.sqlite3"


def _damage_pages(path: Path, page: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    assert len(data) > 4 * page, "the file must span several pages"
    data[2 * page : len(data) - page] = b"\xa5" * (len(data) - 3 * page)
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------- the root class
def test_every_user_error_class_derives_from_cryid_error() -> None:
    from cryid.daemon.outbox import OutboxError
    from cryid.daemon.service import ServiceError
    from cryid.daemon.sources import SourceError
    from cryid.enrollment.enroll import EnrollmentError
    from cryid.enrollment.registry import RegistryError
    from cryid.models.audio import AudioError
    from cryid.models.calibration import CalibrationError
    from cryid.models.errors import CryidError, SettingsError, UsageError
    from cryid.models.evaluation.cryceleb import CryCelebError
    from cryid.models.evaluation.metrics import MetricError
    from cryid.models.manifest import ModelError

    for cls in (
        OutboxError,
        ServiceError,
        SourceError,
        EnrollmentError,
        RegistryError,
        AudioError,
        CalibrationError,
        CryCelebError,
        ModelError,
        MetricError,
        SettingsError,
        UsageError,
    ):
        assert issubclass(cls, CryidError), cls


def test_a_plain_value_error_is_a_bug_with_its_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from cryid.daemon import commands

    def broken(args: object, settings: object) -> int:
        np.stack([])  # numpy: "need at least one array to stack", a ValueError that is no user error
        return 0

    monkeypatch.setenv("CRYID_STATE_DIR", str(tmp_path))
    monkeypatch.setattr(commands, "cmd_schema", broken)
    with pytest.raises(ValueError, match="need at least one array"):
        main(["schema"])  # not swallowed into "cryid: error: ...": Python prints it and exits 1


def test_a_cryid_error_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryid.daemon import commands
    from cryid.models.errors import CryidError

    def refused(args: object, settings: object) -> int:
        raise CryidError("the problem; the fix")

    monkeypatch.setenv("CRYID_STATE_DIR", str(tmp_path))
    monkeypatch.setattr(commands, "cmd_schema", refused)
    assert main(["schema"]) == 2
    assert capsys.readouterr().err == "cryid: error: the problem; the fix\n"


# ---------------------------------------------------------------------------------- registry files
def test_damaged_registry_page_is_one_line(tmp_path: Path) -> None:
    path = _registry_with_babies(tmp_path / "state")
    _damage_pages(path)
    _one_line(_cryid("enroll", "list", state=tmp_path / "state"), "damaged", ".recover")


def test_foreign_sqlite_file_is_refused_and_not_switched_to_wal(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    foreign = state / "pharmacy.db"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE prescriptions (id INTEGER PRIMARY KEY, drug TEXT)")
    db.execute("INSERT INTO prescriptions (drug) VALUES ('paracetamol')")
    db.commit()
    db.close()
    before = hashlib.sha256(foreign.read_bytes()).hexdigest()
    done = _cryid("enroll", "list", state=state, env={"CRYID_REGISTRY__FILENAME": "pharmacy.db"})
    _one_line(done, "not a cryid registry", "prescriptions")
    assert hashlib.sha256(foreign.read_bytes()).hexdigest() == before  # untouched: still rollback journal
    assert foreign.read_bytes()[18:20] == b"\x01\x01" and not Path(f"{foreign}-wal").exists()


def test_unopenable_registry_is_not_answered_with_restore_from_export(tmp_path: Path) -> None:
    # /proc/self: a directory nobody, root included, can create a file in (the tests may run as root).
    line = _one_line(_cryid("enroll", "list", state=Path("/proc/self")), "may read and write")
    assert "restore" not in line


def test_read_only_registry_names_permissions(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = _registry_with_babies(state, 2)
    if os.geteuid() != 0:  # an unprivileged user: file modes make it read-only
        path.chmod(0o400)
        state.chmod(0o500)
        undo = [lambda: state.chmod(0o700)]
    else:  # root ignores file modes, not a read-only mount: bind the state directory read-only
        undo = []
        for cmd in (["mount", "--bind", str(state), str(state)],
                    ["mount", "-o", "remount,bind,ro", str(state)]):  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                for step in reversed(undo):
                    step()
                pytest.skip(f"root cannot make a read-only mount here ({done.stderr.strip()})")
            if not undo:
                undo.append(lambda: subprocess.run(["umount", str(state)], check=True))
    try:
        line = _one_line(_cryid("enroll", "remove", "b00", state=state), "may read and write")
        assert "restore" not in line
    finally:
        for step in reversed(undo):
            step()


def test_real_readonly_sqlite_error_is_classified_as_permissions(tmp_path: Path) -> None:
    from cryid.enrollment.sqlite_files import sqlite_failure

    path = _registry_with_babies(tmp_path / "state", 2)
    ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError) as err:
        ro.execute("DELETE FROM infants")
    ro.close()
    line = sqlite_failure(path, err.value, "registry")
    assert "may read and write" in line and "restore" not in line and "\n" not in line


# ---------------------------------------------------------------------------------- the daemon's edges
def test_source_stdin_closed_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", "-c", f'exec "{sys.executable}" -m cryid.daemon.cli run --source - <&-'],
        env=_env(tmp_path / "state"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    _one_line(done, "standard input is closed")


def test_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.close(r)  # the reader (``| head``) is gone before anything is written
    try:
        done = subprocess.run(
            [sys.executable, "-m", "cryid.daemon.cli", "schema"],
            env=_env(tmp_path / "state"),
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(w)
    assert done.stderr == "" and done.returncode == 141, (done.returncode, done.stderr)


@pytest.mark.parametrize("damage", ["pages", "garbage"])
def test_damaged_outbox_is_moved_aside_and_the_daemon_starts(
    tmp_path: Path, damage: str, mosquitto: object, dac_dir: Path
) -> None:
    from cryid.daemon.outbox import Outbox

    state = tmp_path / "state"
    if damage == "pages":
        with Outbox.open(state) as ob:
            for i in range(400):
                ob.add(f"e{i}", "episode", "cryid/x/unknown", "{" + '"pad": "' + "x" * 200 + '"}')
        _damage_pages(state / "outbox.sqlite3")
    else:
        state.mkdir()
        (state / "outbox.sqlite3").write_bytes(os.urandom(20000))
    cry = dac_dir / next(r["file_name"] for r in dac_rows(split="dev", period="B"))
    done = _cryid(
        "-v",
        "run",
        "--source",
        str(cry),
        state=state,
        env={"CRYID_MQTT__PORT": str(mosquitto.port), "CRYID_MQTT__HOST": mosquitto.host},  # type: ignore[attr-defined]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "is damaged" in done.stderr and "moved it aside" in done.stderr
    aside = sorted(p.name for p in state.iterdir() if ".corrupt-" in p.name)
    assert aside and aside[0].startswith("outbox.sqlite3.corrupt-"), sorted(p.name for p in state.iterdir())
    with Outbox.open(state) as ob:  # the new outbox works (and was emptied by the broker)
        assert ob.size() == 0


# ---------------------------------------------------------------------------------- -v anywhere
@pytest.mark.parametrize("args", [("config", "check", "-v"), ("enroll", "list", "-v"), ("schema", "-vv")])
def test_verbose_after_the_sub_command(tmp_path: Path, args: tuple[str, ...]) -> None:
    done = _cryid(*args, state=tmp_path / "state")
    assert done.returncode == 0, done.stderr
