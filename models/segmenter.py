"""Cut a 16 kHz stream into cry expirations: noise-floor energy gate, then WebRTC VAD.

First, NaN and infinite samples (a broken driver or file) are replaced by zeros and counted
(``nonfinite_samples``). The gate and the VAD then hear the stream through a ``highpass_hz``
Butterworth high-pass that keeps its state between chunks (a DC offset or rumble would otherwise lift
every level and keep the gate shut). The expirations keep the unfiltered audio, which the model was
trained on (training reads whole recordings, unfiltered); their ``level_dbfs`` is the high-passed one.

Per frame (``frame_ms``), in this order:

1. Level in dBFS (RMS, full scale = 0 dB). The noise floor uses minimum statistics with a bounded
   rise: it falls at once to the ``noise_floor_percentile``-th percentile (0: the minimum) of the
   levels of the last ``noise_floor_window_s`` seconds, but climbs towards it by at most
   ``noise_floor_rise_db_per_s``, so sustained crying does not become "the floor" within seconds
   (and a baby breathes between expirations, which keeps the window minimum down). It climbs at
   ``noise_floor_fast_rise_db_per_s`` once the gate has let through ``noise_after_ms`` of audio without
   a cry frame, or has stayed open ``steady_after_ms`` without a break (a fan, not a baby). It starts
   low, at ``min_level_dbfs - gate_margin_db``, so a recording that starts with crying is heard.
   Digital silence (a muted or padded input) does not enter the window.
2. Gate: the frame passes when its level is ``gate_margin_db`` above the floor and above
   ``min_level_dbfs``. Frames that fail cost one dot product: silence never reaches the VAD (nor the
   embedder); steady noise reaches it only for the few seconds the floor needs to climb.
3. WebRTC VAD (``vad_aggressiveness``) on the frames that pass, lifted so that the gate threshold sits
   at ``vad_reference_dbfs`` (WebRTC VAD ignores voices below about -45 dBFS, i.e. a phone far from
   the baby; the lift stops short of clipping a loud frame, which WebRTC VAD takes for noise); a frame
   that passes both is a cry frame. WebRTC VAD adapts its noise model to what it
   hears, and since it hears only gated (mostly cry) frames it grows deaf over hours of crying; so the
   VAD is made anew at every frame the gate shuts outside an expiration. Its decisions then depend only
   on the current run of gated frames: the tenth hour of a stream is heard like the first.
4. An expiration starts at a cry frame (with ``pre_roll_ms`` of audio before it) and ends when
   ``hangover_ms`` pass without a cry frame; it keeps ``post_roll_ms`` after its last cry frame.
   Longer than ``max_expiration_ms``: split at the quietest frame of the last ``split_search_ms``
   (so the piece is published at once). Shorter than ``min_expiration_ms``: dropped. Also dropped:
   an expiration whose cry frames, measured against the noise floor at its end, no longer stand
   ``gate_margin_db`` out (the gate opened on a rising noise floor, e.g. when a fan starts), and one
   whose frame levels span less than ``min_level_span_db`` (10th to 90th percentile: steady noise
   the VAD took for voice; a cry swells and fades).
5. Pitch: each cry frame is voiced when the YIN aperiodicity of it and the frame before is under
   ``VOICED_MAX_APERIODICITY`` (a period of 1-20 ms: f0 50-1000 Hz). An expiration with fewer than
   ``min_voiced_fraction`` voiced cry frames is dropped. WebRTC VAD calls almost any loud frame voice
   (99% of the frames of door slams, carts, clatter and unvoiced speech that pass the gate), and a burst
   under 2 s neither trips the fast floor rise (which needs gated frames the VAD rejects, or 2 s open)
   nor fails the checks above; it is not pitched. Only cry frames pay for the pitch (one FFT pair).

Everything works on whole frames, and a partial frame is carried to the next call, so the same audio
gives the same expirations whatever the chunk sizes. Time is the sample index from the stream start.
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from cryid.models.audio import SAMPLE_RATE, AudioError, HighPass, replace_nonfinite
from cryid.models.config import SegmenterSettings

logger = logging.getLogger(__name__)

DIGITAL_SILENCE_DBFS = -90.0
"""Frames below this are a muted or zero-padded input, not a room: they do not enter the noise floor."""
_FLOOR_DBFS = -100.0
_VAD_RATES = (8000, 16000, 32000, 48000)
VOICED_F0_HZ = (50.0, 1000.0)
"""Pitch range searched for periodicity: an infant cry's f0 (about 250-700 Hz) and its period-doubled,
creaky phonation (down to about 60 Hz); a higher f0 shows at a multiple of its period inside the range."""
VOICED_MAX_APERIODICITY = 0.3
"""A cry frame is voiced when its YIN aperiodicity (the cumulative-mean-normalised difference at the best
lag of ``VOICED_F0_HZ``, over the frame and the one before) is below this: 0 is exactly periodic;
noise of any colour (pink, band-passed, impulsive) stays near 1 and under 0.3 in 1.6% of its frames."""


def aperiodicity(window: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """YIN aperiodicity of ``window``: the minimum over the lags of ``VOICED_F0_HZ`` (at most a third
    of the window) of the squared-difference function normalised by its cumulative mean (de Cheveigne
    and Kawahara 2002, steps 2-3). Low for a voiced (harmonic) sound, about 1 for noise of any spectrum."""
    x = np.asarray(window, dtype=np.float64)
    lag_max = min(int(sample_rate / VOICED_F0_HZ[0]), x.size // 3)
    lag_min = max(1, min(int(sample_rate / VOICED_F0_HZ[1]), lag_max))
    w = x.size - lag_max
    n_fft = 1 << (x.size + w).bit_length()
    spec = np.fft.rfft(x, n_fft) * np.conj(np.fft.rfft(x[:w], n_fft))
    cross = np.fft.irfft(spec, n_fft)[: lag_max + 1]  # cross[t] = sum_{j<w} x[j] x[j + t]
    cum_sq = np.concatenate([[0.0], np.cumsum(x * x)])
    energy = cum_sq[w : w + lag_max + 1] - cum_sq[: lag_max + 1]  # energy[t] = sum_{j<w} x[j + t]^2
    diff = np.maximum(energy[0] + energy - 2.0 * cross, 0.0)[1:]  # lags 1..lag_max
    cum = np.cumsum(diff)
    if cum[-1] <= 1e-20:
        return 1.0  # (digital) silence: no evidence of a pitch
    norm = diff * np.arange(1, lag_max + 1) / np.maximum(cum, 1e-30)
    return float(np.min(norm[lag_min - 1 :]))


@dataclass(frozen=True)
class Expiration:
    """One cry expiration: its audio (float32 mono) and where it lies in the stream (samples)."""

    start_sample: int
    end_sample: int
    audio: np.ndarray = field(repr=False)
    level_dbfs: float
    sample_rate: int = SAMPLE_RATE

    @property
    def duration_s(self) -> float:
        return (self.end_sample - self.start_sample) / self.sample_rate

    @property
    def start_s(self) -> float:
        return self.start_sample / self.sample_rate

    @property
    def end_s(self) -> float:
        return self.end_sample / self.sample_rate


def level_dbfs(audio: np.ndarray) -> float:
    """RMS level of ``audio`` in dBFS (full-scale = 0 dB; digital silence = -100 dB)."""
    if audio.size == 0:
        return _FLOOR_DBFS
    power = float(np.mean(np.square(audio, dtype=np.float64)))
    return max(_FLOOR_DBFS, 10.0 * np.log10(power + 1e-12))


class NoiseFloor:
    """Minimum statistics with a bounded rise: falls at once, climbs at most so many dB per frame.

    The target is a low percentile of the non-silent frame levels of a sliding window (sorted
    window). Below the floor, the floor drops to the target at once; above it, the floor climbs
    towards the target by at most ``rise_db`` per frame (``fast_rise_db`` when the caller says the
    frame is noise). It starts at ``clamp_dbfs``, the lowest value it can take.
    """

    def __init__(
        self, window_frames: int, percentile: float, clamp_dbfs: float, rise_db: float, fast_rise_db: float
    ) -> None:
        self._window: deque[float | None] = deque()
        self._window_frames = max(1, window_frames)
        self._sorted: list[float] = []
        self._fraction = percentile / 100.0
        self._clamp_dbfs = clamp_dbfs
        self._rise_db = rise_db
        self._fast_rise_db = fast_rise_db
        self.value = clamp_dbfs

    def update(self, level: float, noise: bool = False) -> None:
        """Add one frame level; ``noise``: the frame is known not to be cry (faster rise)."""
        value: float | None = None if level < DIGITAL_SILENCE_DBFS else max(level, self._clamp_dbfs)
        self._window.append(value)
        if value is not None:
            bisect.insort(self._sorted, value)
        if len(self._window) > self._window_frames:
            old = self._window.popleft()
            if old is not None:
                del self._sorted[bisect.bisect_left(self._sorted, old)]
        if not self._sorted:
            return
        target = self._sorted[int(self._fraction * (len(self._sorted) - 1))]
        if target <= self.value:
            self.value = target
        else:
            self.value = min(target, self.value + (self._fast_rise_db if noise else self._rise_db))

    def reset(self) -> None:
        self._window.clear()
        self._sorted.clear()
        self.value = self._clamp_dbfs


class Segmenter:
    """Streaming expiration segmenter: ``process(chunk)`` any number of times, then ``flush()``."""

    def __init__(self, settings: SegmenterSettings | None = None, sample_rate: int = SAMPLE_RATE) -> None:
        import webrtcvad

        if sample_rate not in _VAD_RATES:
            raise AudioError(f"segmenter sample rate {sample_rate} Hz unsupported; resample to 16000 Hz")
        self.settings = settings or SegmenterSettings()
        s = self.settings
        self.sample_rate = sample_rate
        self.frame_len = sample_rate * s.frame_ms // 1000
        ms = self._ms_to_frames
        self._pre_frames = ms(s.pre_roll_ms)
        self._post_frames = ms(s.post_roll_ms)
        self._hang_frames = max(1, ms(s.hangover_ms))
        self._min_len = s.min_expiration_ms * sample_rate // 1000
        self._max_frames = max(2, ms(s.max_expiration_ms))
        self._split_frames = max(1, ms(s.split_search_ms))
        self._make_vad = lambda: webrtcvad.Vad(s.vad_aggressiveness)
        self._highpass = HighPass(s.highpass_hz, sample_rate)
        frame_s = s.frame_ms / 1000
        self._floor = NoiseFloor(
            window_frames=max(1, round(s.noise_floor_window_s / frame_s)),
            percentile=s.noise_floor_percentile,
            clamp_dbfs=s.min_level_dbfs - s.gate_margin_db,
            rise_db=s.noise_floor_rise_db_per_s * frame_s,
            fast_rise_db=s.noise_floor_fast_rise_db_per_s * frame_s,
        )
        self._noise_after_frames = max(1, ms(s.noise_after_ms))
        self._steady_after_frames = max(1, ms(s.steady_after_ms))
        self.reset()

    def _ms_to_frames(self, ms: int) -> int:
        return -(-ms // self.settings.frame_ms)  # ceil

    def reset(self) -> None:
        """Forget everything: the next sample is sample 0 of a new stream."""
        self._vad = self._make_vad()  # WebRTC VAD adapts to the stream: a new stream needs a new one
        self._vad_fresh = True  # the VAD has heard nothing since it was made
        self.vad_resets = 0
        self._highpass.reset()
        self.nonfinite_samples = 0  # NaN / inf samples replaced by zeros
        self.frames_vad = 0  # frames that reached the VAD (the gate let them through)
        self.frames_total = 0
        self._carry = np.zeros(0, dtype=np.float32)
        self._carry_f = np.zeros(0, dtype=np.float32)
        self._prev_heard = np.zeros(self.frame_len, dtype=np.float32)  # the frame before, for the pitch
        self._next_sample = 0  # stream index of the first sample of the next whole frame
        self._floor.reset()
        self._pre: deque[np.ndarray] = deque(maxlen=max(1, self._pre_frames))
        self._pre_levels: deque[float] = deque(maxlen=max(1, self._pre_frames))
        self._active = False
        self._start = 0
        self._frames: list[np.ndarray] = []
        self._levels: list[float] = []
        self._cry: list[bool] = []
        self._voiced: list[bool] = []  # per frame: a voiced cry frame
        self._since_cry = 0
        self._open_no_cry = 0  # frames the gate let through since the last cry frame
        self._open_run = 0  # frames the gate has let through without a break
        self._shut_run = 0  # frames the gate has kept shut without a break
        self.last_level_dbfs = _FLOOR_DBFS

    @property
    def open_since(self) -> int | None:
        """Stream sample at which the expiration being heard started; None between expirations."""
        return self._start if self._active else None

    @property
    def noise_floor_dbfs(self) -> float:
        return self._floor.value

    @property
    def gate_shut_s(self) -> float:
        """Seconds the gate has stayed shut outside an expiration (0 while one is heard or the gate opens):
        how long the room has been quiet, for a caller that reads audio in larger blocks then."""
        if self._active:
            return 0.0
        return self._shut_run * self.settings.frame_ms / 1000

    @property
    def samples_seen(self) -> int:
        """Samples consumed so far (whole frames plus the carried partial frame)."""
        return self._next_sample + self._carry.size

    def process(self, chunk: np.ndarray) -> list[Expiration]:
        """Feed float32 mono audio of any length; returns the expirations completed by it."""
        x = np.asarray(chunk)
        if x.ndim != 1:
            raise AudioError(f"segmenter expects 1-D mono audio, got shape {x.shape}; down-mix first")
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        x, bad = replace_nonfinite(x)
        if bad:
            if not self.nonfinite_samples:
                logger.warning("the audio holds NaN or infinite samples; they are replaced by silence")
            self.nonfinite_samples += bad
        xf = self._highpass.process(x)  # what the gate and the VAD hear; expirations keep ``x``
        buf = np.concatenate([self._carry, x]) if self._carry.size else x
        buf_f = np.concatenate([self._carry_f, xf]) if self._carry_f.size else xf
        n = buf.size // self.frame_len
        if n == 0:
            self._carry, self._carry_f = buf.copy(), buf_f.copy()
            return []
        frames = buf[: n * self.frame_len].reshape(n, self.frame_len)
        frames_f = buf_f[: n * self.frame_len].reshape(n, self.frame_len)
        self._carry = buf[n * self.frame_len :].copy()
        self._carry_f = buf_f[n * self.frame_len :].copy()
        power = np.einsum("ij,ij->i", frames_f, frames_f, dtype=np.float64) / self.frame_len
        levels = np.maximum(_FLOOR_DBFS, 10.0 * np.log10(power + 1e-12))
        out: list[Expiration] = []
        for i in range(n):
            self._frame(frames[i], frames_f[i], float(levels[i]), out)
        self.last_level_dbfs = float(levels[-1])
        return out

    def flush(self) -> list[Expiration]:
        """End of stream: close the open expiration (the trailing partial frame is ignored)."""
        out: list[Expiration] = []
        if self._active:
            self._close(out)
        return out

    def _threshold(self) -> float:
        s = self.settings
        return max(s.min_level_dbfs, self._floor.value + s.gate_margin_db)

    def _vad_gain(self) -> float:
        """int16 scale of a gated frame for the VAD: quiet streams are lifted (never attenuated)."""
        lift_db = max(0.0, self.settings.vad_reference_dbfs - self._threshold())
        return 32768.0 * 10.0 ** (lift_db / 20.0)

    def _frame(self, frame: np.ndarray, heard: np.ndarray, level: float, out: list[Expiration]) -> None:
        """One frame: ``frame`` as received (kept), ``heard`` high-passed (gate level and VAD)."""
        self.frames_total += 1
        is_cry = voiced = False
        noise = self._open_no_cry >= self._noise_after_frames or self._open_run >= self._steady_after_frames
        self._floor.update(level, noise=noise)
        if level < self._threshold():
            self._open_run = 0
            self._shut_run += 1
            if not self._active and not self._vad_fresh:
                self._vad = self._make_vad()
                self._vad_fresh = True
                self.vad_resets += 1
        else:
            self._vad_fresh = False
            self._open_run += 1
            self._shut_run = 0
            self.frames_vad += 1
            peak = float(np.max(np.abs(heard)))
            gain = min(self._vad_gain(), 32767.0 / peak) if peak > 0 else self._vad_gain()  # lift, never clip
            pcm = np.clip(heard * gain, -32768.0, 32767.0).astype(np.int16)
            is_cry = self._vad.is_speech(pcm.tobytes(), self.sample_rate)
            if is_cry and self.settings.min_voiced_fraction > 0:
                pitch_window = np.concatenate([self._prev_heard, heard])
                voiced = aperiodicity(pitch_window, self.sample_rate) < VOICED_MAX_APERIODICITY
            self._open_no_cry = 0 if is_cry else self._open_no_cry + 1
        self._prev_heard = heard
        start = self._next_sample
        self._next_sample += self.frame_len
        if not self._active:
            if is_cry:
                self._active = True
                self._frames = [*self._pre, frame]
                self._levels = [*self._pre_levels, level]
                self._cry = [False] * len(self._pre) + [True]
                self._voiced = [False] * len(self._pre) + [voiced]
                self._start = start - len(self._pre) * self.frame_len
                self._since_cry = 0
                self._pre.clear()
                self._pre_levels.clear()
            elif self._pre_frames:
                self._pre.append(frame)
                self._pre_levels.append(level)
            return
        self._frames.append(frame)
        self._levels.append(level)
        self._cry.append(is_cry)
        self._voiced.append(voiced)
        self._since_cry = 0 if is_cry else self._since_cry + 1
        if self._since_cry >= self._hang_frames:
            self._close(out)
        elif len(self._frames) >= self._max_frames:
            self._split(out)

    def _split(self, out: list[Expiration]) -> None:
        """Over-long: emit up to the quietest frame of the last ``split_search_ms``, keep the rest open."""
        lo = max(len(self._frames) - self._split_frames, len(self._frames) // 2)
        cut = lo + int(np.argmin(self._levels[lo:]))
        cut = max(cut, 1)
        self._emit(
            self._start, self._frames[:cut], self._levels[:cut], self._cry[:cut], self._voiced[:cut], out
        )
        self._start += cut * self.frame_len
        self._frames = self._frames[cut:]
        self._levels = self._levels[cut:]
        self._cry = self._cry[cut:]
        self._voiced = self._voiced[cut:]
        if not any(self._cry):  # nothing left worth keeping open
            self._active = False
            self._frames, self._levels, self._cry, self._voiced = [], [], [], []

    def _close(self, out: list[Expiration]) -> None:
        last_cry = max(i for i, c in enumerate(self._cry) if c) if any(self._cry) else -1
        keep = min(len(self._frames), last_cry + 1 + self._post_frames)
        self._emit(
            self._start, self._frames[:keep], self._levels[:keep], self._cry[:keep], self._voiced[:keep], out
        )
        # frames after the post-roll become the pre-roll of the next expiration
        for f, lv in zip(self._frames[keep:], self._levels[keep:], strict=True):
            if self._pre_frames:
                self._pre.append(f)
                self._pre_levels.append(lv)
        self._active = False
        self._frames, self._levels, self._cry, self._voiced = [], [], [], []

    def _emit(
        self,
        start: int,
        frames: list[np.ndarray],
        levels: list[float],
        cry: list[bool],
        voiced: list[bool],
        out: list[Expiration],
    ) -> None:
        if not frames:
            return
        length = len(frames) * self.frame_len
        if length < self._min_len:
            return
        cry_levels = np.asarray([lv for lv, c in zip(levels, cry, strict=True) if c])
        if cry_levels.size == 0:
            return
        cry_level = 10.0 * float(np.log10(np.mean(10.0 ** (cry_levels / 10.0))))
        if cry_level < self._threshold():
            logger.debug(
                "expiration at sample %s dropped: %.1f dBFS no longer above the gate", start, cry_level
            )
            return
        voiced_fraction = sum(voiced) / cry_levels.size
        if voiced_fraction < self.settings.min_voiced_fraction:
            logger.debug(
                "expiration at sample %s dropped: %.0f%% voiced cry frames (a burst of noise)",
                start,
                100 * voiced_fraction,
            )
            return
        p10, p90 = np.percentile(levels, [10, 90])
        if p90 - p10 < self.settings.min_level_span_db:
            logger.debug("expiration at sample %s dropped: steady level (%.1f dB span)", start, p90 - p10)
            return
        audio = np.concatenate(frames)
        out.append(
            Expiration(
                start_sample=start,
                end_sample=start + length,
                audio=audio,
                level_dbfs=10.0 * float(np.log10(np.mean(10.0 ** (np.asarray(levels) / 10.0)))),
                sample_rate=self.sample_rate,
            )
        )


def segment(
    wav: np.ndarray, settings: SegmenterSettings | None = None, sample_rate: int = SAMPLE_RATE
) -> list[Expiration]:
    """Segment a whole buffer: ``process`` then ``flush`` on a fresh ``Segmenter``."""
    seg = Segmenter(settings, sample_rate)
    return seg.process(wav) + seg.flush()
