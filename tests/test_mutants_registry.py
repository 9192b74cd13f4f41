"""Registry behaviour that mutation testing showed unchecked (bench/mutation.py enrollment/registry.py).

A real SQLite registry in a temporary state directory, written through its write API
(``Registry.write``) and read back through its public reads; an old time and a damaged embedding are
written with plain SQL (``tests/fixtures/registry.tamper``), as an older or damaged file would hold them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from cryid.enrollment.config import RegistrySettings
from cryid.enrollment.registry import NewSample, Registry, RegistryError, SampleEmbeddings
from tests.fixtures.registry import tamper

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
    with reg.write() as tx:
        tx.insert_infant("ada", "", "ward1")
        tx.insert_sample("ada", _sample("birth"))
        tx.insert_sample("ada", _sample("discharge", n=3))
    assert [(s.period, s.n_expirations) for s in reg.samples("ada")] == [("birth", 2), ("discharge", 3)]
    with pytest.raises(RegistryError, match=r"^period 'later' is not one of birth, discharge$"):
        _sample("later")


def test_require_infant_returns_the_enrolled_and_names_the_fix_for_others(reg: Registry) -> None:
    with reg.write() as tx:
        tx.insert_infant("ada", "Ada", "ward1")
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
    with reg.write() as tx:
        tx.insert_infant("ada", "", "ward1")
        with_audio = tx.insert_sample("ada", _sample(audio=b"fLaC and the rest"))
        without = tx.insert_sample("ada", _sample(n=3))
    assert reg.sample_audio(with_audio) == b"fLaC and the rest"
    assert reg.sample_audio(without) is None
    assert reg.sample_audio(9999) is None
    assert reg.sample_vectors("ada", SHA).shape == (5, 8)
    assert len(reg.sample_vectors("ada", OTHER)) == 0
    assert len(reg.sample_vectors("zed", SHA)) == 0


def test_touching_a_baby_updates_its_time_only(reg: Registry) -> None:
    with reg.write() as tx:
        tx.insert_infant("ada", "", "ward1")
        tx.insert_infant("ben", "", "ward1")
    tamper(reg.path, "UPDATE infants SET updated_at = '2020-01-01T00:00:00+00:00'")
    with reg.write() as tx:
        tx.touch_infant("ada")
    ada, ben = reg.infants()
    assert ada.updated_at >= ada.created_at > "2020-01-01T00:00:00+00:00"  # now (ISO 8601 UTC sorts)
    assert ben.updated_at == "2020-01-01T00:00:00+00:00"


def test_an_unusable_embedding_is_skipped_with_a_warning_naming_the_baby(
    reg: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    with reg.write() as tx:
        for baby in ("ada", "ben"):
            tx.insert_infant(baby, "", "ward1")
            tx.insert_sample(baby, _sample())
    tamper(
        reg.path,
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


def test_moving_a_baby_to_another_room(reg: Registry) -> None:
    with reg.write() as tx:
        tx.insert_infant("ada", "", "ward1")
        tx.insert_sample("ada", _sample())
    with reg.write() as tx:
        assert tx.set_room("ada", "icu") == "ward1"
    assert reg.get_infant("ada").room == "icu"
    assert sorted(reg.centroids(SHA, room="icu")) == ["ada"] and reg.centroids(SHA, room="ward1") == {}
    with pytest.raises(RegistryError, match=r"^room 'icu/2' is not allowed"), reg.write() as tx:
        tx.set_room("ada", "icu/2")
    with pytest.raises(RegistryError, match=r"^baby 'zed' is not enrolled"), reg.write() as tx:
        tx.set_room("zed", "icu")
    assert reg.get_infant("ada").room == "icu"


def test_a_write_reads_a_babys_status(reg: Registry) -> None:
    """What enrollment checks before it writes: active, discharged, or not enrolled (None)."""
    with reg.write() as tx:
        tx.insert_infant("ada", "", "ward1")
        tx.insert_infant("ben", "", "ward1", status="discharged")
        assert (tx.infant_status("ada"), tx.infant_status("ben"), tx.infant_status("zed")) == (
            "active",
            "discharged",
            None,
        )
        assert tx.has_infant("ada") and not tx.has_infant("zed")


def test_re_embedding_a_sample_replaces_its_vectors_and_cry_figures(reg: Registry) -> None:
    """A new model's embeddings of a kept recording: its expiration count and cry time follow the new
    segmentation; the old model's embeddings stay; a sample deleted meanwhile is reported, not created."""
    with reg.write() as tx:
        tx.insert_infant("ada", "", "ward1")
        sample_id = tx.insert_sample("ada", _sample(n=2))
    vectors = np.random.default_rng(9).normal(size=(3, 8)).astype(np.float32)
    emb = SampleEmbeddings(OTHER, vectors, (0, 100, 200), (50, 150, 250))
    with reg.write() as tx:
        assert tx.reembed_sample(sample_id, emb, cry_s=2.5) is True
        assert tx.reembed_sample(9999, emb, cry_s=1.0) is False
    (info,) = reg.samples("ada")
    assert (info.n_expirations, info.cry_s, sorted(info.models)) == (3, 2.5, [SHA, OTHER])
    stored = reg.sample_embeddings(sample_id, OTHER)
    np.testing.assert_array_equal(stored.vectors, vectors)
    assert (stored.start_samples, stored.end_samples) == ((0, 100, 200), (50, 150, 250))
    assert len(reg.sample_embeddings(sample_id, SHA).vectors) == 2
