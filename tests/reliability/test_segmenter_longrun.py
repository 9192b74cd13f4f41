"""Months on a ward: the segmenter must hear the tenth hour of a stream like the first.

WebRTC VAD adapts its noise model to what it hears; the segmenter feeds it only gated (mostly cry)
frames, so one long-lived VAD object learned crying as noise: twelve 30-minute loops of the same
audio gave 577 expirations in the first loop and 456 in the last. Hours of looped real cries go
through one ``Segmenter`` here, faster than real time, in big chunks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryid.models.audio import SAMPLE_RATE, load_audio
from cryid.models.segmenter import Segmenter
from tests.fixtures.data import dac_rows

SR = SAMPLE_RATE
HOURS = 6.0


@pytest.mark.slow
def test_hours_of_looped_crying_give_the_same_count_every_loop(dac_dir: Path) -> None:
    wav = np.concatenate([load_audio(dac_dir / r["file_name"]) for r in dac_rows(split="dev")])
    seg = Segmenter()
    wav = wav[: wav.size // seg.frame_len * seg.frame_len]  # whole frames: every loop starts on a frame
    loops = int(np.ceil(HOURS * 3600 * SR / wav.size))  # 24 loops of 15.4 min
    chunk = 60 * SR
    counts = []
    for _ in range(loops):
        n = 0
        for i in range(0, wav.size, chunk):
            n += len(seg.process(wav[i : i + chunk]))
        counts.append(n)
    # 439 expirations per loop before the pitch check (min_voiced_fraction), 376 with it
    assert counts[0] >= 300, f"the comparison needs real crying: {counts[0]} expirations in one loop"
    print(f"\n[segmenter] expirations per loop over {HOURS:g} h: {counts}")
    worst = max(abs(c - counts[0]) for c in counts)
    assert worst <= 0.01 * counts[0], f"expirations per loop drift over {HOURS:g} h: {counts}"
