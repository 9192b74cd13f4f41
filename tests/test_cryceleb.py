"""cryid.models.evaluation.cryceleb: reads the CryCeleb layout (generated set, donateacry-cc), rejects
malformed sets."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from cryid.models.evaluation.cryceleb import CryCelebError, load_cryceleb
from tests.fixtures.cryceleb import make_cryceleb_set


@pytest.fixture()
def small_set(tmp_path: Path) -> Path:
    return make_cryceleb_set(tmp_path / "set", n_babies=3, files_per_period=2)


def _rewrite(path: Path, transform) -> None:  # type: ignore[no-untyped-def]
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    rows = transform(rows)
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def test_reads_generated_set(small_set: Path) -> None:
    data = load_cryceleb(small_set)
    assert len(data.recordings) == 3 * 2 * 2
    groups = data.groups("dev")
    assert sorted(groups) == [(b, p) for b in ("0000", "0001", "0002") for p in ("B", "D")]
    assert [r.chronological_index for r in groups[("0001", "B")]] == ["000", "001"]
    pairs = data.read_pairs("dev")
    assert len(pairs) == 9 and sum(p.label or 0 for p in pairs) == 3
    assert pairs[0].baby_id_b == "0000"  # leading zeros kept: ids are strings
    data.check_audio("dev")
    assert data.channel_of(groups[("0000", "B")]) == "even"


def test_groups_follow_chronological_index_not_row_order(small_set: Path) -> None:
    _rewrite(small_set / "metadata.csv", lambda rows: [rows[0], *reversed(rows[1:])])
    groups = load_cryceleb(small_set).groups("dev")
    assert [r.file_id for r in groups[("0002", "D")]] == ["0002_D_000", "0002_D_001"]


def test_missing_column_is_one_line_error(small_set: Path) -> None:
    _rewrite(small_set / "metadata.csv", lambda rows: [r[:-1] for r in rows])
    with pytest.raises(CryCelebError, match=r"missing column\(s\) file_id") as err:
        load_cryceleb(small_set)
    assert "\n" not in str(err.value)


def test_pair_naming_unknown_baby_is_rejected(small_set: Path) -> None:
    _rewrite(small_set / "dev_pairs.csv", lambda rows: [*rows, ["0000", "0777", "0000B_0777D", "0"]])
    with pytest.raises(CryCelebError, match="names baby '0777' with no D recordings") as err:
        load_cryceleb(small_set).read_pairs("dev")
    assert "\n" not in str(err.value)


def test_missing_audio_file_is_rejected(small_set: Path) -> None:
    (small_set / "audio/dev/0001/D/0001_D_001.wav").unlink()
    data = load_cryceleb(small_set)
    with pytest.raises(CryCelebError, match=r"0001_D_001\.wav: audio file of 0001_D_001 is missing") as err:
        data.check_audio("dev")
    assert "\n" not in str(err.value)


def test_zipped_audio_gets_an_unzip_hint(small_set: Path) -> None:
    shutil.rmtree(small_set / "audio")
    (small_set / "audio.zip").write_bytes(b"")
    with pytest.raises(CryCelebError, match=r"unzip audio\.zip"):
        load_cryceleb(small_set).check_audio("dev")


def test_pairs_without_labels_are_read_as_unlabelled(small_set: Path) -> None:
    _rewrite(small_set / "dev_pairs.csv", lambda rows: [r[:3] for r in rows])
    pairs = load_cryceleb(small_set).read_pairs("dev")
    assert all(p.label is None for p in pairs)


@pytest.mark.parametrize(
    ("column", "value", "needle"),
    [
        (1, "X", "period 'X' is not B or D"),
        (2, "long", "is not a number"),
        (6, "0000_B_001", "appears twice"),
    ],
)
def test_bad_metadata_values(small_set: Path, column: int, value: str, needle: str) -> None:
    def corrupt(rows: list[list[str]]) -> list[list[str]]:
        rows[1][column] = value
        return rows

    _rewrite(small_set / "metadata.csv", corrupt)
    with pytest.raises(CryCelebError, match=needle):
        load_cryceleb(small_set)


def test_missing_directory_and_pairs_file(tmp_path: Path, small_set: Path) -> None:
    with pytest.raises(CryCelebError, match="no such directory"):
        load_cryceleb(tmp_path / "nope")
    with pytest.raises(CryCelebError, match=r"test_pairs\.csv: no such file"):
        load_cryceleb(small_set).read_pairs("test")


def test_reads_donateacry_cc(dac_dir: Path) -> None:
    data = load_cryceleb(dac_dir)
    dev = data.groups("dev")
    assert len({b for b, _ in dev}) == 30 and len(dev) == 60
    pairs = data.read_pairs("dev")
    assert len(pairs) == 900 and sum(p.label or 0 for p in pairs) == 30
    data.check_audio("dev")
    assert data.channels is not None
    assert data.channel_of(dev[("dac0348", "B")]) == "ios-ima4-16k"
