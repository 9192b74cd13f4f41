"""The live pipeline without threads or broker: the shipped ONNX model on real cries.

Chunk-size invariance of ``feed``, references updated while feeding (the next expiration uses them,
none lost when updates race), and the health counters' snapshot under concurrent increments.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from cryid.daemon.config import IdentifierSettings
from cryid.daemon.live import (
    LivePipeline,
    NewIdentifierSettings,
    NewReferences,
    Output,
    PipelineHealth,
)
from cryid.models.audio import SAMPLE_RATE, load_audio
from cryid.models.config import EmbedderSettings, SegmenterSettings
from cryid.models.pipeline import embed_expirations
from cryid.models.scoring import ReferenceSet, centroid
from tests.fixtures.data import REPO_ROOT, dac_rows

N_BABIES = 3
# The streaming of the pipeline is tested here, not the segmenter: the first dev babies' recordings
# (dac0320's hum, dac0149's noise) hold no pitched cry, the segmenter's pitch check drops them, and the
# shipped model does not tell the next three apart (dac0093's D scores 0.57 against dac0018's B, 0.26
# against its own). So this file cuts expirations without that check (tests/test_segmenter*.py test it).
SEGMENTER = SegmenterSettings(min_voiced_fraction=0.0)
GAP_S = 8.0  # silence between recordings: longer than identifier.episode_gap_s, each one is an episode


class Ward(NamedTuple):
    refs: ReferenceSet
    order: list[str]  # the baby of each recording, in stream order
    stream: np.ndarray
    first_end: int  # the sample after the first recording and its silence


@pytest.fixture(scope="module")
def embedder(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    from cryid.models.embedder import Embedder

    shipped = REPO_ROOT / "models" / "default"
    model_dir = (
        shipped if (shipped / "model.onnx").is_file() else Path(request.getfixturevalue("onnx_model_dir"))
    )
    return Embedder(model_dir, EmbedderSettings(warmup=False))


@pytest.fixture(scope="module")
def ward(dac_dir: Path, embedder) -> Ward:  # type: ignore[no-untyped-def]
    """Birth centroids of the first dev babies with cries at B, and a stream of their D recordings
    separated by silence."""
    settings = SEGMENTER
    birth: dict[str, np.ndarray] = {}
    stream: list[np.ndarray] = []
    order: list[str] = []
    gap = np.zeros(int(GAP_S * SAMPLE_RATE), np.float32)
    for baby in dict.fromkeys(r["baby_id"] for r in dac_rows(split="dev", period="D")):
        b_files = [r["file_name"] for r in dac_rows(split="dev", period="B") if r["baby_id"] == baby][:2]
        d_file = next(r["file_name"] for r in dac_rows(split="dev", period="D") if r["baby_id"] == baby)
        items = [i for f in b_files for i in embed_expirations(load_audio(dac_dir / f), settings, embedder)]
        d_wav = load_audio(dac_dir / d_file)
        if len(items) < 2 or not embed_expirations(d_wav, settings, embedder):
            continue
        birth[baby] = centroid(np.stack([i.embedding for i in items]))
        stream += [d_wav, gap]
        order.append(baby)
        if len(birth) == N_BABIES:
            break
    assert len(birth) == N_BABIES, f"fewer than {N_BABIES} dev babies with cries at B and D in {dac_dir}"
    calibration = embedder.manifest.calibration
    weight = calibration.confirmed_weight if calibration is not None else 0.75
    return Ward(ReferenceSet(birth, None, weight), order, np.concatenate(stream), stream[0].size + gap.size)


def _pipeline(embedder, refs: ReferenceSet | None = None) -> LivePipeline:  # type: ignore[no-untyped-def]
    return LivePipeline(
        embedder,
        SEGMENTER,
        IdentifierSettings(),
        refs,
        room="nursery-1",
        calibration=embedder.manifest.calibration,
    )


def _run(pipe: LivePipeline, stream: np.ndarray, chunk: int) -> list[Output]:
    out: list[Output] = []
    for i in range(0, stream.size, chunk):
        out += pipe.feed(stream[i : i + chunk])
    return out + pipe.flush()


def _key(o: Output) -> tuple[object, ...]:
    r, ev = o.identification, o.event
    return (r.kind, r.start_sample, r.end_sample, r.n_expirations, ev.decision, ev.baby_id, ev.best_baby_id)


def test_chunk_size_does_not_change_the_identifications(embedder, ward) -> None:  # type: ignore[no-untyped-def]
    refs, order, stream, _ = ward
    runs = {chunk: _run(_pipeline(embedder, refs), stream, chunk) for chunk in (160, 512, SAMPLE_RATE)}
    ten_ms = runs[160]
    episodes = [o for o in ten_ms if o.identification.kind == "episode"]
    assert len(episodes) == N_BABIES, "each recording, separated by silence, is one episode"
    # a sanity check of the identifications (the model, not the streaming): the shipped model takes
    # dac0320's D for dac0149 since the GMM branch; the exact checks below are the streaming's
    right = sum(o.event.best_baby_id == b for o, b in zip(episodes, order, strict=True))
    assert right >= N_BABIES - 1, "the best match is the baby crying"
    assert sum(o.identification.kind == "expiration" for o in ten_ms) >= N_BABIES
    for chunk, outputs in runs.items():
        assert [_key(o) for o in outputs] == [_key(o) for o in ten_ms], f"{chunk}-sample chunks differ"
        got = np.array([o.event.score for o in outputs], dtype=float)
        want = np.array([o.event.score for o in ten_ms], dtype=float)
        np.testing.assert_allclose(got, want, atol=1e-4)
        # the event's times come from sample indices, not from when the chunk arrived
        offsets = [(o.event.stream_offset_s, o.event.duration_s) for o in outputs]
        assert offsets == [(o.event.stream_offset_s, o.event.duration_s) for o in ten_ms]


def test_references_applied_while_feeding_are_used_by_the_next_expiration(embedder, ward) -> None:  # type: ignore[no-untyped-def]
    refs, order, stream, _ = ward
    pipe = _pipeline(embedder)  # nobody enrolled yet
    first_end = ward.first_end  # the first recording and the silence after it
    before = _run_part(pipe, stream[:first_end])
    assert before and all(o.event.n_candidates == 0 and o.event.baby_id is None for o in before)
    pipe.apply(NewReferences(refs))  # e.g. an enrollment while the daemon listens
    assert pipe.enrolled == [], "an update waits for the next chunk"
    after = _run_part(pipe, stream[first_end:]) + pipe.flush()
    assert pipe.enrolled == sorted(order)
    assert after and all(o.event.n_candidates == N_BABIES for o in after), "every later result is scored"
    episodes = [o.event.best_baby_id for o in after if o.identification.kind == "episode"]
    assert episodes[-(N_BABIES - 1) :] == order[1:]


def _run_part(pipe: LivePipeline, wav: np.ndarray, chunk: int = 512) -> list[Output]:
    return [o for i in range(0, wav.size, chunk) for o in pipe.feed(wav[i : i + chunk])]


def test_no_update_is_lost_when_two_threads_apply_while_feeding(embedder, ward) -> None:  # type: ignore[no-untyped-def]
    refs, order, _, _ = ward
    pipe = _pipeline(embedder)
    one = ReferenceSet({order[0]: np.ones(embedder.dim, np.float32)})
    per_thread = 300
    start = threading.Barrier(3)

    def references() -> None:
        start.wait()
        for k in range(per_thread):
            pipe.apply(NewReferences(refs if k == per_thread - 1 else one))

    def thresholds() -> None:
        start.wait()
        for k in range(per_thread):
            pipe.apply(NewIdentifierSettings(IdentifierSettings(episode_gap_s=1.0 + k)))

    threads = [threading.Thread(target=references), threading.Thread(target=thresholds)]
    for t in threads:
        t.start()
    start.wait()
    silence = np.zeros(160, np.float32)
    while any(t.is_alive() for t in threads):
        pipe.feed(silence)
    for t in threads:
        t.join()
    pipe.feed(silence)
    assert pipe.updates_applied == 2 * per_thread
    assert pipe.enrolled == sorted(order), "the last references of their thread are in use"
    assert pipe.identifier_settings.episode_gap_s == float(per_thread), "and the last thresholds of theirs"


def test_apply_refuses_what_is_not_an_update(embedder) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match="not a pipeline update"):
        _pipeline(embedder).apply(IdentifierSettings())  # type: ignore[arg-type]


def test_health_snapshot_loses_nothing_while_other_threads_count() -> None:
    health = PipelineHealth()
    writers, per_writer = 4, 20000
    done = threading.Event()
    snaps = []

    def write() -> None:
        for k in range(per_writer):
            health.chunk(k, 1.0, 2.0, 3, 0, False)
            health.add_busy(0.5)
            health.expiration()
            health.event("episode" if k % 2 else "expiration")

    def read() -> None:
        while not done.is_set():
            snaps.append(health.snapshot_and_reset())

    reader = threading.Thread(target=read)
    threads = [threading.Thread(target=write) for _ in range(writers)]
    reader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join()
    snaps.append(health.snapshot_and_reset())
    total = writers * per_writer
    assert len(snaps) > 2, "the reader snapshotted while the writers counted"
    assert sum(s.audio_s for s in snaps) == total  # exact: whole numbers in float64
    assert sum(s.busy_s for s in snaps) == total / 2
    assert sum(s.sumsq for s in snaps) == 2 * total
    assert sum(s.n_level for s in snaps) == 3 * total
    last = snaps[-1]
    assert (last.expirations, last.events, last.episodes) == (total, total, total // 2)
    for a, b in itertools.pairwise(snaps):  # totals never go back
        assert a.expirations <= b.expirations and a.events <= b.events
