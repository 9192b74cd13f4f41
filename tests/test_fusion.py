"""One room heard by several microphones (``cryid.daemon.fusion.RoomPipeline``), without threads or broker:
the shipped model on real cries (two dev babies' discharge recordings, one enrolled reference each).

A second microphone is the same stream 120 ms later and 12 dB quieter, over its own room noise: what a
far microphone of the same room hears.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryid.daemon import nursery
from cryid.daemon.config import IdentifierSettings
from cryid.daemon.fusion import RoomPipeline
from cryid.daemon.live import LivePipeline, Output
from cryid.models.audio import SAMPLE_RATE, load_audio
from cryid.models.config import EmbedderSettings, SegmenterSettings
from cryid.models.pipeline import embed_expirations
from cryid.models.scoring import ReferenceSet, centroid
from tests.fixtures.data import REPO_ROOT, dac_rows

BABIES = ["dac0126", "dac0136"]
DELAY = int(0.12 * SAMPLE_RATE)


@pytest.fixture(scope="module")
def embedder():  # type: ignore[no-untyped-def]
    from cryid.models.embedder import Embedder

    return Embedder(REPO_ROOT / "models" / "default", EmbedderSettings(warmup=False))


@pytest.fixture(scope="module")
def room(dac_dir: Path, embedder) -> tuple[ReferenceSet, np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """References of BABIES (birth), the near stream (their discharge cries, 8 s apart) and the far one."""
    birth = {}
    parts = []
    rng = np.random.default_rng(1)
    for baby in BABIES:
        b = [dac_dir / r["file_name"] for r in dac_rows("dev", "B") if r["baby_id"] == baby]
        items = [i for f in b for i in embed_expirations(load_audio(f), SegmenterSettings(), embedder)]
        birth[baby] = centroid(np.stack([i.embedding for i in items]))
        d = next(dac_dir / r["file_name"] for r in dac_rows("dev", "D") if r["baby_id"] == baby)
        parts += [nursery.room_noise(2.0, rng), load_audio(d), nursery.room_noise(6.0, rng)]
    near = np.concatenate(parts)
    far = np.concatenate([nursery.room_noise(DELAY / SAMPLE_RATE, rng), near[:-DELAY] * 10 ** (-12 / 20)])
    far += nursery.room_noise(far.size / SAMPLE_RATE, rng)
    return ReferenceSet(birth), near, far


def _key(outs: list[Output]) -> list[tuple[str, int, int, str | None]]:
    return [(o.identification.kind, o.event.n_expirations, o.identification.end_sample, o.event.best_baby_id)
            for o in outs]  # fmt: skip


def _room(embedder, refs: ReferenceSet, n: int) -> RoomPipeline:  # type: ignore[no-untyped-def]
    names = [("near", SegmenterSettings()), ("far", SegmenterSettings())][:n]
    return RoomPipeline(embedder, names, IdentifierSettings(), refs, room="r1")


def _feed(pipe: RoomPipeline, streams: list[np.ndarray], chunk: int, lead: int = 0) -> list[Output]:
    """Feed the streams chunk by chunk, interleaved; stream 0 runs ``lead`` samples ahead of the others."""
    out: list[Output] = []
    pos = [0] * len(streams)
    while any(p < s.size for p, s in zip(pos, streams, strict=True)):
        for i, s in enumerate(streams):
            if pos[i] >= s.size or (i > 0 and pos[i] + lead > pos[0] and pos[0] < streams[0].size):
                continue
            out += pipe.feed_from(i, s[pos[i] : pos[i] + chunk], pos[i])
            pos[i] += chunk
    return out + pipe.flush()


def test_one_source_gives_what_the_live_pipeline_gives(embedder, room) -> None:  # type: ignore[no-untyped-def]
    refs, near, _ = room
    live = LivePipeline(embedder, SegmenterSettings(), IdentifierSettings(), refs, room="r1")
    single = [o for i in range(0, near.size, 640) for o in live.feed(near[i : i + 640])] + live.flush()
    got = _feed(_room(embedder, refs, 1), [near], 640)
    assert _key(got) == _key(single)
    assert all(o.event.levels_dbfs is None for o in got)


def test_two_microphones_give_each_cry_once_from_the_clearest(embedder, room) -> None:  # type: ignore[no-untyped-def]
    """The far microphone cuts the cries differently (its own noise floor); the room's events are exactly
    the near microphone's alone, with both levels, whichever order the sources are in."""
    refs, near, far = room
    single = _feed(_room(embedder, refs, 1), [near], 640)
    pipe = _room(embedder, refs, 2)
    got = _feed(pipe, [near, far], 640)
    assert _key(got) == _key(single)  # the far microphone adds no event and changes no decision
    assert [o.event.best_baby_id for o in got if o.identification.kind == "episode"] == BABIES
    for o in got:
        lv = o.event.levels_dbfs
        assert lv is not None and lv["near"] > lv.get("far", -200.0) + 6.0, lv
        assert o.event.level_dbfs <= lv["near"] + 0.01
    assert sum("far" in (o.event.levels_dbfs or {}) for o in got) >= len(got) // 2  # far heard most
    # the order of the sources does not matter: with the loud stream second, its cut of the cries still wins
    swapped = _feed(_room(embedder, refs, 2), [far, near], 640)  # now "far" is the name of the loud one
    assert _key(swapped) == _key(single)
    assert all(o.event.levels_dbfs["far"] > o.event.levels_dbfs.get("near", -200.0) + 6.0  # type: ignore[index]
               for o in swapped)  # fmt: skip


def test_chunk_size_does_not_change_a_rooms_identifications(embedder, room) -> None:  # type: ignore[no-untyped-def]
    refs, near, far = room
    a = _feed(_room(embedder, refs, 2), [near, far], 640)
    b = _feed(_room(embedder, refs, 2), [near, far], 1600)
    assert _key(a) == _key(b)
    assert [o.event.levels_dbfs for o in a] == [o.event.levels_dbfs for o in b]


def test_a_silent_or_late_microphone_holds_nothing_back_and_adds_no_event(embedder, room) -> None:  # type: ignore[no-untyped-def]
    refs, near, far = room
    single = _feed(_room(embedder, refs, 1), [near], 640)
    ended = _room(embedder, refs, 2)
    ended.end_of(1)  # the far microphone failed for good at the start
    assert _key(_feed(ended, [near], 640)) == _key(single)
    late = _room(embedder, refs, 2)
    got = _feed(late, [near, far], 640, lead=2 * SAMPLE_RATE)  # far's audio arrives 2 s late
    assert [k for k in _key(got) if k[0] == "episode"] == [k for k in _key(single) if k[0] == "episode"]
    assert late.duplicates >= 1  # far's copies came after the cries were decided: dropped


def test_schema_shows_the_levels_per_microphone_and_the_stats_per_source() -> None:
    from cryid.daemon.events import json_schemas

    schemas = json_schemas()
    event = schemas["<prefix>/baby/<baby_id> and <prefix>/unknown"]
    assert "levels_dbfs" in event["properties"] and "levels_dbfs" not in event.get("required", [])
    stats = schemas["<prefix>/stats"]
    assert "sources" in stats["properties"] and "SourceStats" in stats["$defs"]
