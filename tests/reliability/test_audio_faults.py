"""Bad audio on a ward: a DC offset, a few NaN samples, a stream of NaN (issue 15, item 9).

The segmenter is the one path the daemon, enrollment and evaluation share, so it is tested directly
on real cries; the all-NaN stream goes through the whole daemon to its stats.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cryid.daemon.config import MqttSettings, ServiceSettings, Settings
from cryid.daemon.service import build_service
from cryid.models.audio import SAMPLE_RATE, load_audio
from cryid.models.segmenter import Expiration, Segmenter
from tests.fixtures.broker import Broker
from tests.fixtures.data import dac_rows

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`

SR = SAMPLE_RATE


@pytest.fixture(scope="module")
def cries(dac_dir: Path) -> list[np.ndarray]:
    """40 dev recordings (about 4.5 min of real crying, pauses and room noise)."""
    return [load_audio(dac_dir / r["file_name"]) for r in dac_rows(split="dev")[:40]]


def _cry_s(wavs: list[np.ndarray]) -> float:
    total = 0.0
    for w in wavs:
        seg = Segmenter()
        total += sum(e.duration_s for e in seg.process(w) + seg.flush())
    return total


@pytest.mark.parametrize("offset", [0.01, 0.1])
def test_a_dc_offset_finds_as_much_crying(cries: list[np.ndarray], offset: float) -> None:
    clean = _cry_s(cries)
    shifted = _cry_s([w + np.float32(offset) for w in cries])
    assert clean > 60.0, "the comparison needs real crying"
    assert shifted >= 0.97 * clean, f"DC {offset}: {shifted:.1f} s of crying found, {clean:.1f} s without"


def _run(seg: Segmenter, wav: np.ndarray, chunk: int = 1600) -> list[Expiration]:
    out: list[Expiration] = []
    for i in range(0, wav.size, chunk):
        out += seg.process(wav[i : i + chunk])
    return out + seg.flush()


def test_ten_nan_samples_lose_nothing_after_them(cries: list[np.ndarray]) -> None:
    wav = np.concatenate(cries[:16])
    at = 20 * SR + 123
    broken = wav.copy()
    broken[at : at + 10] = np.nan
    broken[at + 5] = np.inf
    clean = _run(Segmenter(), wav)
    seg = Segmenter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning on stderr
        got = _run(seg, broken)
    assert seg.nonfinite_samples == 10
    later = SR  # one second after the NaN: the filter and the frame holding them are behind
    want = [(e.start_sample, e.end_sample) for e in clean if e.start_sample > at + later]
    have = [(e.start_sample, e.end_sample) for e in got if e.start_sample > at + later]
    assert len(want) >= 10, "the comparison needs expirations after the NaN"
    assert have == want
    assert all(np.isfinite(e.audio).all() and np.isfinite(e.level_dbfs) for e in got)


def test_an_all_nan_stream_reports_the_source_not_ok(tmp_path: Path, mosquitto: Broker) -> None:
    path = tmp_path / "nan.wav"
    sf.write(path, np.full(5 * SR, np.nan, np.float32), SR, subtype="FLOAT")
    settings = Settings(
        room="ward1",
        state_dir=tmp_path / "state",
        mqtt=MqttSettings(host=mosquitto.host, port=mosquitto.port, reconnect_min_s=0.2),
        service=ServiceSettings(shutdown_timeout_s=5.0),
    )
    service = build_service(settings, str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert service.run() == 0
        stats = service.stats()
    finally:
        service.close()
    assert stats.source_ok is False
    assert "NaN" in (stats.source_error or "")
    assert stats.nonfinite_samples == 5 * SR
    assert stats.input_level_dbfs is None or np.isfinite(stats.input_level_dbfs)
