"""Registry behaviour that mutation testing showed unchecked (bench/mutation.py enrollment/registry.py).

A real SQLite registry in a temporary state directory, written through its transactions and read back
through its public reads; a damaged embedding is written with plain SQL, as a damaged file would hold
it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from cryid.enrollment import registry as registry_module
from cryid.enrollment.config import RegistrySettings
from cryid.enrollment.registry import NewSample, Registry, RegistryError, SampleEmbeddings

SHA = "a" * 64
OTHER = "b" * 64


def _sample(period: str = "birth", n: int = 2, audio: bytes | None = None) -> NewSample:
    vectors = np.random.default_rng(n).normal(size=(n, 8)).astype(np.float32)
    return NewSample(
        source_kind="file", source=f"{period}.wav", period=period, duration_s=7.0, cry_s=0.5 * n,
        n_expirations=n, audio_flac=audio,
        embeddings=SampleEmbeddings(SHA, vectors, tuple(range(0, 2 * n, 2)), tuple(range(1, 2 * n, 2))),
    )  # fmt: skip


@pytest.fixture()
def reg(tmp_path: Path):
    with Registry.open(tmp_path / "state", RegistrySettings()) as r:
        yield r


def test_a_discharge_recording_is_stored_with_its_period(reg: Registry) -> None:
    with reg.transaction() as conn:
        Registry.insert_infant(conn, "ada", "", "ward1")
        Registry.insert_sample(conn, "ada", _sample("birth"))
        Registry.insert_sample(conn, "ada", _sample("discharge", n=3))
    assert [(s.period, s.n_expirations) for s in reg.samples("ada")] == [("birth", 2), ("discharge", 3)]
    with pytest.raises(RegistryError, match=r"^period 'later' is not one of birth, discharge$"):
        _sample("later")


def test_require_infant_returns_the_enrolled_and_names_the_fix_for_others(reg: Registry) -> None:
    with reg.transaction() as conn:
        Registry.insert_infant(conn, "ada", "Ada", "ward1")
    infant = reg.require_infant("ada")
    assert (infant.baby_id, infant.display_name, infant.room, infant.status) == (
        "ada",
        "Ada",
        "ward1",
        "active",
    )
    with pytest.raises(RegistryError, match=r"^baby 'zed' is not enrolled; see `cryid enroll list`$"):
        reg.require_infant("zed")


def test_reads_of_a_baby_and_a_sample(reg: Registry) -> None:
    """Kept audio comes back as stored; a model the baby has no embeddings for gives no rows."""
    with reg.transaction() as conn:
        Registry.insert_infant(conn, "ada", "", "ward1")
        with_audio = Registry.insert_sample(conn, "ada", _sample(audio=b"fLaC and the rest"))
        without = Registry.insert_sample(conn, "ada", _sample(n=3))
    assert reg.sample_audio(with_audio) == b"fLaC and the rest"
    assert reg.sample_audio(without) is None
    assert reg.sample_audio(9999) is None
    assert reg.sample_vectors("ada", SHA).shape == (5, 8)
    assert len(reg.sample_vectors("ada", OTHER)) == 0
    assert len(reg.sample_vectors("zed", SHA)) == 0


def test_touching_a_baby_updates_its_time_only(reg: Registry) -> None:
    with reg.transaction() as conn:
        Registry.insert_infant(conn, "ada", "", "ward1")
        Registry.insert_infant(conn, "ben", "", "ward1")
        conn.execute("UPDATE infants SET updated_at = '2020-01-01T00:00:00+00:00'")
    with reg.transaction() as conn:
        Registry.touch_infant(conn, "ada")
    ada, ben = reg.infants()
    assert ada.updated_at >= ada.created_at > "2020-01-01T00:00:00+00:00"  # now (ISO 8601 UTC sorts)
    assert ben.updated_at == "2020-01-01T00:00:00+00:00"


def test_an_unusable_embedding_is_skipped_with_a_warning_naming_the_baby(
    reg: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    with reg.transaction() as conn:
        for baby in ("ada", "ben"):
            Registry.insert_infant(conn, baby, "", "ward1")
            Registry.insert_sample(conn, baby, _sample())
        conn.execute(
            "UPDATE embeddings SET vector = ? WHERE expiration_index = 0 AND sample_id = "
            "(SELECT sample_id FROM samples WHERE baby_id = 'ben')",
            (np.full(8, np.nan, "<f4").tobytes(),),
        )
    caplog.set_level(logging.WARNING, logger="cryid.enrollment.registry")
    assert sorted(reg.centroids(SHA)) == ["ada", "ben"]  # ben keeps his other embedding
    (record,) = caplog.records
    assert record.getMessage() == (
        f"registry {reg.path}: baby ben has 1 of 2 embeddings for model {SHA[:12]} that cannot be used "
        "(not 8 values, not finite, or a zero or huge norm); skipped them"
    )


def test_the_crash_points_of_a_write_are_reached_by_name(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The crash tests (tests/crash_entry.py) kill a write at a named point; both points must be met,
    in order, by an enrollment write."""
    reached: list[str] = []
    monkeypatch.setattr(registry_module, "crash_hook", reached.append)
    with reg.transaction() as conn:
        Registry.insert_infant(conn, "ada", "", "ward1")
        Registry.insert_sample(conn, "ada", _sample())
    assert reached == ["after-sample", "before-commit"]


def test_moving_a_baby_to_another_room(reg: Registry) -> None:
    with reg.transaction() as conn:
        Registry.insert_infant(conn, "ada", "", "ward1")
        Registry.insert_sample(conn, "ada", _sample())
    with reg.transaction() as conn:
        assert Registry.set_room(conn, "ada", "icu") == "ward1"
    assert reg.get_infant("ada").room == "icu"
    assert sorted(reg.centroids(SHA, room="icu")) == ["ada"] and reg.centroids(SHA, room="ward1") == {}
    with pytest.raises(RegistryError, match=r"^room 'icu/2' is not allowed"), reg.transaction() as conn:
        Registry.set_room(conn, "ada", "icu/2")
    with pytest.raises(RegistryError, match=r"^baby 'zed' is not enrolled"), reg.transaction() as conn:
        Registry.set_room(conn, "zed", "icu")
    assert reg.get_infant("ada").room == "icu"
