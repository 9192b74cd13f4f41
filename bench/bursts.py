"""Segmenter on bursty ward noise: expirations cut from non-cry bursts, and real cries kept among them.

Run: ``python bench/bursts.py [--data DIR] [--seconds 300] [--seeds 3] [--cries 20]``.
Streams (``bench/_bursts.py``): a quiet room (pink noise at -60 dBFS) with a burst under 2 s every 1-4 s
(pink-noise bursts, door slams and clatter, unvoiced speech-like noise), no cry; then the same rooms with
real donateacry-cc dev recordings mixed in at their recorded level, and those recordings in the
quiet room without bursts (the clean count). Each is segmented with the pitch check off
(``min_voiced_fraction=0``, the segmenter before it) and with the default settings. A measurement, not a
test (``tests/test_segmenter_bursts.py`` is the test).
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np

from _bursts import ROOM_DBFS, Event, bursty_room, mix_cries, pink
from _common import DATA_DIR
from cryid.models.audio import load_audio
from cryid.models.config import SegmenterSettings
from cryid.models.segmenter import Expiration, segment


def overlapping(e: Expiration, events: list[Event]) -> list[Event]:
    return [v for v in events if v.start < e.end_sample and e.start_sample < v.end]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA_DIR)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cries", type=int, default=20, help="dev recordings mixed into each room")
    args = ap.parse_args()
    files = sorted((args.data / "audio" / "dev").rglob("*.flac"))
    if not files:
        raise SystemExit(f"no FLAC files under {args.data}/audio/dev; pass --data DIR (donateacry-cc)")
    step = max(1, len(files) // args.cries)
    cries = [load_audio(f) for f in files[::step][: args.cries]]
    configs = {
        "check off (before)": SegmenterSettings(min_voiced_fraction=0.0),
        "default": SegmenterSettings(),
    }
    print(f"{args.seeds} rooms of {args.seconds:.0f} s; {len(cries)} dev recordings mixed into each")
    for name, settings in configs.items():
        noise = collections.Counter()
        bursts = collections.Counter()
        clean_n = clean_s = mixed_n = mixed_s = mixed_off = 0.0
        for seed in range(1, args.seeds + 1):
            room, events = bursty_room(np.random.default_rng(seed), args.seconds)
            bursts.update(v.kind for v in events)
            for e in segment(room, settings):
                hit = overlapping(e, events)
                noise[hit[0].kind if hit else "room"] += 1
            quiet = pink(np.random.default_rng(100 + seed), room.size) * 10 ** (ROOM_DBFS / 20)
            for base, mixed in ((quiet.astype(np.float32), False), (room, True)):
                wav, cry_events = mix_cries(np.random.default_rng(200 + seed), base, cries)
                found = segment(wav, settings)
                on = [e for e in found if overlapping(e, cry_events)]
                if mixed:
                    mixed_n += len(on)
                    mixed_s += sum(e.duration_s for e in on)
                    mixed_off += len(found) - len(on)
                else:
                    clean_n += len(on)
                    clean_s += sum(e.duration_s for e in on)
        print(f"\n{name}")
        print(f"  (a) bursts, no cry: {sum(bursts.values())} bursts {dict(bursts)}")
        print(f"      expirations: {sum(noise.values())} {dict(noise)}")
        print(f"  (b) cries alone in a quiet room: {clean_n:.0f} expirations, {clean_s:.1f} s")
        print(
            f"      cries among the bursts: {mixed_n:.0f} expirations on cries, {mixed_s:.1f} s; "
            f"{mixed_off:.0f} off cries"
        )


if __name__ == "__main__":
    main()
