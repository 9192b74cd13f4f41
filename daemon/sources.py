"""Audio sources for the daemon: a microphone, an audio file, raw s16le on stdin.

Every source delivers ``AudioChunk``s of float32 mono 16 kHz audio whose ``start_sample`` counts the
samples delivered before it (so it equals the segmenter's stream position). Sources are plain classes:
``open()``, ``read(timeout_s) -> AudioChunk | None`` (None: nothing yet, or end of stream when ``eof``),
``close()``; iteration yields chunks until the end. Threads belong to the service.

The microphone's PortAudio callback only copies the block into a bounded queue (never blocks; a full
queue drops the block and counts it). A device that errors, stops or goes silent for
``stall_timeout_s`` is closed and reopened with capped exponential back-off; every change is reported
through ``on_state`` (and the log) so the service can publish the outage. sounddevice is imported only
when a microphone is opened, so files and stdin work on machines without PortAudio.
"""

from __future__ import annotations

import logging
import queue
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

import numpy as np
from pydantic import Field

from cryid.models.audio import SAMPLE_RATE, AudioError, StreamResampler, to_mono_float32
from cryid.models.errors import CryidError
from cryid.models.strict import StrictModel

logger = logging.getLogger(__name__)


class SourceError(CryidError):
    """A source that cannot be used as configured; the message names the problem and the fix."""


class SourceSettings(StrictModel):
    """Where the audio comes from and how it is delivered."""

    device: str | None = Field(
        None,
        description="Microphone: device index or (part of) its name, see `cryid devices`; None: default.",
    )
    chunk_ms: int = Field(
        40,
        ge=10,
        le=2000,
        description="Audio per chunk read from a file, stdin or the mic (a chunk's length adds to latency).",
    )
    mic_queue_chunks: int = Field(
        500,
        ge=2,
        le=100000,
        description="Bounded queue after the audio callback; when full, chunks are dropped.",
    )
    reopen_min_s: float = Field(
        0.5, gt=0.0, le=60.0, description="First delay before reopening a failed mic."
    )
    reopen_max_s: float = Field(30.0, gt=0.0, le=3600.0, description="Cap of the doubling reopen delay.")
    stall_timeout_s: float = Field(
        3.0, gt=0.0, le=600.0, description="A mic that delivers nothing this long is treated as failed."
    )
    flat_timeout_s: float = Field(
        60.0, gt=0.0, le=86400.0, description="Audio flat this long (silence, constant, clipped) is an alarm."
    )


@dataclass(frozen=True)
class AudioChunk:
    """Float32 mono audio at ``sample_rate``; ``start_sample`` counts from the start of the source."""

    samples: np.ndarray = field(repr=False)
    start_sample: int
    sample_rate: int = SAMPLE_RATE

    @property
    def end_sample(self) -> int:
        return self.start_sample + int(self.samples.size)

    @property
    def duration_s(self) -> float:
        return self.samples.size / self.sample_rate


@dataclass(frozen=True)
class SourceState:
    """Health of a live source, reported on every change."""

    ok: bool
    message: str
    outages: int
    since: float = field(default_factory=time.time)  # UNIX time of the change


class AudioSource:
    """Common part: position counting, iteration, context manager."""

    name = "source"

    def __init__(self) -> None:
        self._pos = 0
        self._eof = False
        self._dropped = 0

    @property
    def eof(self) -> bool:
        return self._eof

    @property
    def dropped_chunks(self) -> int:
        return self._dropped

    def open(self) -> None:
        raise NotImplementedError

    def read(self, timeout_s: float | None = None) -> AudioChunk | None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the source; safe to call twice."""

    def _chunk(self, samples: np.ndarray) -> AudioChunk:
        chunk = AudioChunk(np.ascontiguousarray(samples, dtype=np.float32), self._pos)
        self._pos += int(samples.size)
        return chunk

    def __iter__(self) -> Iterator[AudioChunk]:
        while True:
            chunk = self.read(1.0)
            if chunk is not None:
                yield chunk
            elif self._eof:
                return

    def __enter__(self) -> AudioSource:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FileSource(AudioSource):
    """Any libsndfile format (WAV, FLAC, OGG, ...), down-mixed and resampled to 16 kHz while streaming.

    Gives exactly the samples of ``cryid.models.audio.load_audio``. ``realtime`` paces the chunks at
    the speed a microphone would deliver them; otherwise as fast as the reader takes them.
    """

    def __init__(
        self,
        path: str | Path,
        realtime: bool = False,
        chunk_ms: int = 100,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.name = str(self.path)
        self.realtime = realtime
        self.chunk_ms = chunk_ms
        self._clock, self._sleep = clock, sleep
        self._file: Any = None
        self._lock = threading.Lock()  # close() may come from another thread than read()
        self._closed = False
        self._pending: np.ndarray | None = None
        self._t0: float | None = None

    def open(self) -> None:
        if self._file is not None:
            return
        import soundfile as sf

        p = self.path
        if not p.exists():
            raise AudioError(f"{p}: no such file; give an existing audio file to --source")
        if p.is_dir():
            raise AudioError(f"{p}: is a directory, expected an audio file")
        try:
            f = sf.SoundFile(str(p))
        except Exception as exc:  # libsndfile raises its own error types for every bad format
            first = (str(exc).splitlines() or [repr(exc)])[0]
            raise AudioError(f"{p}: not a readable audio file ({first}); use WAV or FLAC") from exc
        if f.frames == 0:
            f.close()
            raise AudioError(f"{p}: the file holds no audio samples; record some audio first")
        self._file = f
        self._block = max(1, f.samplerate * self.chunk_ms // 1000)
        self._resampler = StreamResampler(f.samplerate, SAMPLE_RATE)
        logger.info(
            "reading %s: %d Hz, %d channel(s), %.1f s", p, f.samplerate, f.channels, f.frames / f.samplerate
        )

    def _next_samples(self) -> np.ndarray | None:
        while True:
            try:
                data = self._file.read(self._block, dtype="float32", always_2d=True)
            except Exception as exc:  # a file corrupt after its header
                raise AudioError(f"{self.path}: cannot decode the audio ({exc}); re-encode the file") from exc
            if data.shape[0] == 0:
                tail = self._resampler.flush()
                self._eof = True
                return tail if tail.size else None
            out = self._resampler.process(to_mono_float32(data))
            if out.size:
                return out

    def read(self, timeout_s: float | None = None) -> AudioChunk | None:
        if self._file is None and not self._closed:
            self.open()
        if self._pending is None:
            with self._lock:
                if self._eof or self._closed:
                    self._eof = True
                    return None
                self._pending = self._next_samples()
            if self._pending is None:
                return None
        if self.realtime:
            now = self._clock()
            if self._t0 is None:
                self._t0 = now
            due = self._t0 + (self._pos + self._pending.size) / SAMPLE_RATE
            wait = due - now
            if timeout_s is not None and wait > timeout_s:
                self._sleep(max(0.0, timeout_s))
                return None
            if wait > 0:
                self._sleep(wait)
        samples, self._pending = self._pending, None
        return self._chunk(samples)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._file is not None:
                self._file.close()
                self._file = None


class StdinSource(AudioSource):
    """Raw 16 kHz mono signed 16-bit little-endian PCM from a binary stream (``--source -``)."""

    name = "stdin"

    def __init__(self, stream: BinaryIO | None = None, chunk_ms: int = 100) -> None:
        super().__init__()
        self._stream = stream
        self._bytes = max(2, SAMPLE_RATE * chunk_ms // 1000 * 2)
        self._carry = b""
        self.dropped_bytes = 0

    def open(self) -> None:
        if self._stream is None:
            stdin = sys.stdin
            if stdin is None or getattr(stdin, "buffer", None) is None or stdin.closed:
                raise SourceError(
                    "--source -: standard input is closed; pipe raw s16le 16 kHz mono audio into it, "
                    "e.g. `arecord -f S16_LE -r 16000 -c 1 | cryid run --source -`"
                )
            self._stream = stdin.buffer

    def _wait_readable(self, timeout_s: float | None) -> bool:
        try:
            fd = self._stream.fileno()  # type: ignore[union-attr]
        except (AttributeError, OSError, ValueError):
            return True  # an in-memory stream: always readable
        if timeout_s is None:
            return True
        ready, _, _ = select.select([fd], [], [], max(0.0, timeout_s))
        return bool(ready)

    def read(self, timeout_s: float | None = None) -> AudioChunk | None:
        if self._stream is None:
            self.open()
        if self._eof or not self._wait_readable(timeout_s):
            return None
        reader = getattr(self._stream, "read1", None) or self._stream.read  # type: ignore[union-attr]
        data = reader(self._bytes)
        if not data:
            self._eof = True
            if self._carry:
                self.dropped_bytes += len(self._carry)
                logger.warning("stdin ended inside a sample: dropped %d trailing byte", len(self._carry))
                self._carry = b""
            return None
        data = self._carry + data
        whole = len(data) // 2 * 2
        self._carry = data[whole:]
        if whole == 0:
            return None
        pcm = np.frombuffer(data[:whole], dtype="<i2")
        return self._chunk(pcm.astype(np.float32) / 32768.0)


@dataclass(frozen=True)
class InputDevice:
    """An input device as PortAudio sees it (``cryid devices``)."""

    index: int
    name: str
    hostapi: str
    max_input_channels: int
    default_samplerate: float
    is_default: bool


def load_sounddevice() -> ModuleType:
    """Import sounddevice, or say how to get PortAudio."""
    try:
        import sounddevice
    except (OSError, ImportError) as exc:  # no PortAudio library, or sounddevice not installed
        raise SourceError(
            f"cannot use a microphone: {exc}; install PortAudio (apt install libportaudio2) "
            "or read a file with --source PATH"
        ) from exc
    return sounddevice


def list_input_devices(backend: ModuleType | None = None) -> list[InputDevice]:
    """Input devices (with at least one input channel), in PortAudio's order."""
    sd = backend or load_sounddevice()
    try:
        devices = list(sd.query_devices())
        hostapis = list(sd.query_hostapis())
        default_in = (
            sd.default.device[0] if isinstance(sd.default.device, (list, tuple)) else sd.default.device
        )
    except Exception as exc:  # PortAudio's own error types
        raise SourceError(f"cannot list audio devices: {exc}") from exc
    out = []
    for i, d in enumerate(devices):
        if int(d.get("max_input_channels", 0)) < 1:
            continue
        api = hostapis[d["hostapi"]]["name"] if 0 <= d.get("hostapi", -1) < len(hostapis) else "?"
        out.append(
            InputDevice(
                index=i,
                name=str(d["name"]),
                hostapi=str(api),
                max_input_channels=int(d["max_input_channels"]),
                default_samplerate=float(d["default_samplerate"]),
                is_default=(i == default_in),
            )
        )
    return out


def resolve_device(device: str | int | None, devices: list[InputDevice]) -> int | None:
    """Device index from an index or a (case-insensitive, partial) name; None: the system default."""
    if device is None or device == "":
        return None
    if isinstance(device, int) or str(device).strip().isdigit():
        idx = int(device)
        if any(d.index == idx for d in devices):
            return idx
        raise SourceError(f"no input device with index {idx}; `cryid devices` lists them")
    want = str(device).lower()
    exact = [d for d in devices if d.name.lower() == want]
    matches = exact or [d for d in devices if want in d.name.lower()]
    if len(matches) == 1:
        return matches[0].index
    names = ", ".join(f"{d.index}: {d.name}" for d in (matches or devices)) or "none"
    problem = "matches several input devices" if matches else "matches no input device"
    raise SourceError(
        f"device {device!r} {problem} ({names}); set source.device to an index or a unique name"
    )


class MicSource(AudioSource):
    """A sounddevice input stream; reopened with capped exponential back-off when it fails.

    ``backend`` is the sounddevice module (imported on ``open()`` when not given); ``on_state`` is
    called with a ``SourceState`` whenever the microphone goes down or comes back.
    """

    def __init__(
        self,
        device: str | int | None = None,
        settings: SourceSettings | None = None,
        on_state: Callable[[SourceState], None] | None = None,
        backend: ModuleType | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__()
        self.settings = settings or SourceSettings()
        self.device = self.settings.device if device is None else device
        self.name = f"mic:{self.device if self.device is not None else 'default'}"
        self._on_state = on_state
        self._sd = backend
        self._clock, self._sleep = clock, sleep
        self._queue: queue.Queue[np.ndarray] = queue.Queue(maxsize=self.settings.mic_queue_chunks)
        self._stream: Any = None
        self._resampler: StreamResampler | None = None
        self._failures = 0  # consecutive failed starts
        self._next_try = 0.0
        self._last_audio = 0.0
        self._finished = False
        self.overflows = 0  # PortAudio input overflows (audio lost inside the driver)
        self.capture_rate: int | None = None
        self.state = SourceState(ok=False, message="not opened", outages=0)
        self._lock = threading.Lock()  # close() may come from another thread than read()

    # -- PortAudio thread: copy and go, never block ---------------------------------------------
    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        if status and getattr(status, "input_overflow", False):
            self.overflows += 1
        try:
            self._queue.put_nowait(np.array(indata[:, 0], dtype=np.float32))
        except queue.Full:
            self._dropped += 1

    def _stream_finished(self) -> None:
        self._finished = True

    # -- service thread ------------------------------------------------------------------------
    def open(self) -> None:
        """Check PortAudio and the device name (config errors raise); start capturing or schedule a retry."""
        if self._sd is None:
            self._sd = load_sounddevice()
        resolve_device(self.device, list_input_devices(self._sd))  # a wrong name is a config error
        self._try_start()

    def _try_start(self) -> None:
        with self._lock:
            if not self._eof:
                self._start_stream()

    def _start_stream(self) -> None:
        sd = self._sd
        try:
            index = resolve_device(self.device, list_input_devices(sd))
            rate = SAMPLE_RATE
            try:
                sd.check_input_settings(device=index, channels=1, dtype="float32", samplerate=SAMPLE_RATE)
            except Exception:  # the device cannot do 16 kHz: capture at its own rate and resample
                rate = int(sd.query_devices(index, "input")["default_samplerate"])
            self._finished = False
            stream = sd.InputStream(
                device=index,
                channels=1,
                samplerate=rate,
                dtype="float32",
                blocksize=max(1, rate * self.settings.chunk_ms // 1000),
                callback=self._callback,
                finished_callback=self._stream_finished,
            )
            stream.start()
        except Exception as exc:  # PortAudio / device errors: report and retry later
            self._failures += 1
            delay = min(self.settings.reopen_max_s, self.settings.reopen_min_s * 2 ** (self._failures - 1))
            self._next_try = self._clock() + delay
            self._set_state(
                False, f"cannot open microphone {self.device!r}: {exc}; retrying in {delay:.1f} s"
            )
            return
        if self._resampler is None or self.capture_rate != rate:
            self._resampler = StreamResampler(rate, SAMPLE_RATE)
        self.capture_rate = rate
        self._stream = stream
        self._failures = 0
        self._last_audio = self._clock()
        self._set_state(True, f"microphone {self.device!r} capturing at {rate} Hz")

    def _set_state(self, ok: bool, message: str) -> None:
        first = self.state.message == "not opened"
        outages = self.state.outages + (1 if (not ok and (self.state.ok or first)) else 0)
        changed = ok != self.state.ok or first
        self.state = SourceState(ok=ok, message=message, outages=outages)
        if ok:
            logger.info("%s", message)
        else:
            logger.warning("%s", message)
        if changed and self._on_state is not None:
            self._on_state(self.state)

    def _fail(self, reason: str) -> None:
        self._close_stream()
        self._failures = 1
        self._next_try = self._clock() + self.settings.reopen_min_s
        self._set_state(
            False, f"microphone {self.device!r} {reason}; reopening in {self.settings.reopen_min_s:.1f} s"
        )

    def _check_health(self) -> None:
        stream = self._stream
        if self._finished or not getattr(stream, "active", True):
            self._fail("stopped (device error or unplugged)")
        elif self._clock() - self._last_audio > self.settings.stall_timeout_s:
            self._fail(f"delivered no audio for {self.settings.stall_timeout_s:.1f} s")

    def read(self, timeout_s: float | None = None) -> AudioChunk | None:
        if self._eof:  # closed
            return None
        if self._sd is None:
            self.open()
        deadline = None if timeout_s is None else self._clock() + timeout_s
        while not self._eof:
            remaining = None if deadline is None else deadline - self._clock()
            if remaining is not None and remaining <= 0:
                return None
            if self._stream is None:
                if self._clock() >= self._next_try:
                    self._try_start()
                    continue
                wait = self._next_try - self._clock()
                self._sleep(max(0.0, wait if remaining is None else min(wait, remaining)))
                continue
            try:
                raw = self._queue.get(timeout=0.1 if remaining is None else max(0.0, min(0.1, remaining)))
            except queue.Empty:
                self._check_health()
                continue
            self._last_audio = self._clock()
            out = self._resampler.process(raw) if self._resampler is not None else raw
            if out.size:
                return self._chunk(out)
        return None

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        try:
            stream.stop()
            stream.close()
        except Exception:  # a vanished device errors on close too; it is gone either way
            logger.debug("closing the failed microphone stream raised", exc_info=True)

    def close(self) -> None:
        with self._lock:
            self._eof = True
            self._close_stream()


def make_source(
    spec: str,
    settings: SourceSettings,
    realtime: bool = False,
    on_state: Callable[[SourceState], None] | None = None,
) -> AudioSource:
    """``mic`` (the configured device), ``-`` (raw s16le on stdin) or an audio file path."""
    if spec == "mic":
        return MicSource(settings.device, settings, on_state=on_state)
    if spec == "-":
        return StdinSource(chunk_ms=settings.chunk_ms)
    return FileSource(spec, realtime=realtime, chunk_ms=settings.chunk_ms)
