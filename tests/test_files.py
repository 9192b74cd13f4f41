"""``cryid.models.files.atomic_write``: the one way cryid replaces a file (registry exports, the room's
state, Home Assistant's roster, manifests, evaluation outputs, trained models)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from cryid.models.files import atomic_write, save_npz, sha256_file


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_text_bytes_and_writer_replace_the_file_whole(tmp_path: Path, umask_022: None) -> None:
    target = tmp_path / "a.json"
    target.write_text("old", encoding="utf-8")
    assert atomic_write(target, "néw") == target
    assert target.read_text(encoding="utf-8") == "néw"
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    arrays = tmp_path / "b.npz"  # the writer gets a name that ends in .npz, so numpy adds nothing
    atomic_write(arrays, lambda tmp: np.savez(tmp, x=np.arange(3)))
    assert np.load(arrays)["x"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.npz"]  # no temporary file left


def test_private_is_0600_whatever_the_umask_else_the_usual_mode(tmp_path: Path, umask_022: None) -> None:
    atomic_write(tmp_path / "export.json", "{}", private=True)
    atomic_write(tmp_path / "state.json", "{}")
    atomic_write(tmp_path / "cache.npy", lambda tmp: np.save(tmp, np.ones(2)), private=True, fsync=False)
    assert _mode(tmp_path / "export.json") == 0o600
    assert _mode(tmp_path / "cache.npy") == 0o600
    assert _mode(tmp_path / "state.json") == 0o644
    (tmp_path / "export.json").chmod(0o644)
    atomic_write(tmp_path / "export.json", "{}", private=True)  # private tightens a replaced file
    assert _mode(tmp_path / "export.json") == 0o600


@pytest.mark.parametrize(
    ("mode", "umask"),
    [(0o644, 0o077), (0o640, 0o022), (0o600, 0o000)],
    ids=["644-umask077", "640-umask022", "600-umask000"],
)
def test_a_replaced_file_keeps_its_mode_whatever_the_umask(tmp_path: Path, mode: int, umask: int) -> None:
    """A model's manifest.json rewritten by an admin whose umask is 077 stays readable by the service
    user; one that was 0600 is not opened up, not even while its replacement is being written."""
    target = tmp_path / "manifest.json"
    target.write_text("old", encoding="utf-8")
    target.chmod(mode)
    while_written: list[int] = []

    def writer(tmp: Path) -> None:
        while_written.append(_mode(tmp))
        tmp.write_text("newer", encoding="utf-8")

    old = os.umask(umask)  # a new file would get 0o666 & ~umask, another mode
    try:
        atomic_write(target, "new")
        assert _mode(target) == mode and target.read_text(encoding="utf-8") == "new"
        atomic_write(target, writer)
    finally:
        os.umask(old)
    assert _mode(target) == mode and target.read_text(encoding="utf-8") == "newer"
    assert while_written == [0o600]
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    target.write_text("old", encoding="utf-8")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half", encoding="utf-8")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, half_then_fail)
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_an_unwritable_folder_is_an_os_error_and_changes_nothing(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        atomic_write(tmp_path / "missing" / "x.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_save_npz_loads_back_and_keeps_a_replaced_files_mode(tmp_path: Path) -> None:
    """Trained backends and GMM branches are written this way: the arrays come back as written, the
    name gets no second ".npz", and a replaced file keeps its mode, as with atomic_write."""
    target = tmp_path / "backend.npz"
    target.write_bytes(b"old")
    target.chmod(0o640)
    arrays = {"mean": np.arange(3, dtype=np.float32), "kind": np.array("lda")}
    old = os.umask(0o077)
    try:
        assert save_npz(target, arrays) == target
    finally:
        os.umask(old)
    assert _mode(target) == 0o640
    with np.load(target) as z:
        assert sorted(z.files) == ["kind", "mean"]
        assert z["mean"].dtype == np.float32 and z["mean"].tolist() == [0.0, 1.0, 2.0]
        assert str(z["kind"]) == "lda"
    assert [p.name for p in tmp_path.iterdir()] == ["backend.npz"]


def test_sha256_file_is_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    import hashlib

    data = os.urandom(3 << 20)  # more than one 1 MiB block
    (tmp_path / "m.onnx").write_bytes(data)
    assert sha256_file(tmp_path / "m.onnx") == hashlib.sha256(data).hexdigest()
