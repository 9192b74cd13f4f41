"""embed_expirations: the one segment+embed path of enrollment and evaluation, with the real ONNX model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryid.models.audio import AudioError, load_audio
from cryid.models.config import EmbedderSettings, SegmenterSettings
from cryid.models.pipeline import BATCH_SIZE, EmbeddedExpiration, embed_expirations
from cryid.models.segmenter import Segmenter, segment
from tests.fixtures.data import dac_rows


@pytest.fixture(scope="module")
def embedder(shipped_model_dir: Path):  # type: ignore[no-untyped-def]
    from cryid.models.embedder import Embedder

    return Embedder(shipped_model_dir, EmbedderSettings(warmup=False))


@pytest.fixture(scope="module")
def cries(dac_dir: Path) -> np.ndarray:
    """Four real dev recordings back to back (about 28 s): dac0093 and dac0204, pitched crying (rows 4-7,
    dac0320's hum, lost all but two expirations to the segmenter's pitch check)."""
    return np.concatenate([load_audio(dac_dir / r["file_name"]) for r in dac_rows(split="dev")[22:26]])


def test_embeds_every_expiration_like_the_streaming_path(cries: np.ndarray, embedder) -> None:  # type: ignore[no-untyped-def]
    settings = SegmenterSettings()
    items = embed_expirations(cries, settings, embedder)
    expected = segment(cries, settings)
    assert len(items) == len(expected) >= 3
    assert all(isinstance(i, EmbeddedExpiration) for i in items)
    assert [(i.expiration.start_sample, i.expiration.end_sample) for i in items] == [
        (e.start_sample, e.end_sample) for e in expected
    ]
    # the daemon's way: the streaming segmenter fed in 10 ms chunks, each expiration embedded alone
    seg = Segmenter(settings)
    live = [e for i in range(0, cries.size, 160) for e in seg.process(cries[i : i + 160])] + seg.flush()
    assert len(live) == len(items)
    for item, exp in zip(items, live, strict=True):
        assert item.embedding.shape == (embedder.dim,) and item.embedding.dtype == np.float32
        np.testing.assert_allclose(item.embedding, embedder.embed(exp.audio), rtol=1e-4, atol=1e-4)
    # different expirations give different embeddings (no row copied to the next)
    embs = np.stack([i.embedding for i in items])
    assert np.linalg.matrix_rank(embs) == len(items)


def test_more_expirations_than_one_batch(cries: np.ndarray) -> None:
    class CountingEmbedder:  # a stand-in only to count the calls; the real model is tested above
        def __init__(self) -> None:
            self.calls: list[int] = []

        def embed_batch(self, wavs, sample_rate=16000):  # type: ignore[no-untyped-def]
            self.calls.append(len(wavs))
            return np.stack([np.full(4, w.size, np.float32) for w in wavs])

    wav = np.concatenate([cries] * 6)
    counting = CountingEmbedder()
    items = embed_expirations(wav, SegmenterSettings(), counting)
    assert len(items) > BATCH_SIZE and max(counting.calls) <= BATCH_SIZE and sum(counting.calls) == len(items)
    assert all(i.embedding[0] == i.expiration.audio.size for i in items)  # rows stay with their expiration


def test_silence_gives_no_embeddings_and_bad_audio_is_refused(embedder) -> None:  # type: ignore[no-untyped-def]
    assert embed_expirations(np.zeros(16000 * 5, np.float32), SegmenterSettings(), embedder) == []
    with pytest.raises(AudioError, match="mono"):
        embed_expirations(np.zeros((16000, 2), np.float32), SegmenterSettings(), embedder)
    bad = np.zeros(16000, np.float32)
    bad[100] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        embed_expirations(bad, SegmenterSettings(), embedder)
