"""Sources: files of any format/rate/channels, raw stdin, and the microphone's failure handling."""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from cryid.daemon.sources import (
    AudioChunk,
    FileSource,
    MicSource,
    SourceError,
    SourceSettings,
    SourceState,
    StdinSource,
    list_input_devices,
    load_sounddevice,
    make_source,
    resolve_device,
)
from cryid.models.audio import SAMPLE_RATE, AudioError, StreamResampler, load_audio, resample
from cryid.models.segmenter import segment
from tests.fixtures.data import dac_rows

SR = SAMPLE_RATE


def _drain(source: Any) -> list[AudioChunk]:
    with source:
        return list(source)


@pytest.fixture(scope="module")
def cry_file(dac_dir: Path) -> Path:
    return dac_dir / dac_rows(split="dev")[4]["file_name"]


def test_file_source_gives_load_audio_samples_in_contiguous_chunks(cry_file: Path) -> None:
    chunks = _drain(FileSource(cry_file, chunk_ms=32))
    assert [c.start_sample for c in chunks] == list(np.cumsum([0] + [c.samples.size for c in chunks[:-1]]))
    assert all(c.samples.dtype == np.float32 for c in chunks)
    np.testing.assert_array_equal(np.concatenate([c.samples for c in chunks]), load_audio(cry_file))


def test_stereo_44k_wav_works_like_the_original(cry_file: Path, tmp_path: Path) -> None:
    mono = load_audio(cry_file)
    up = resample(mono, SR, 44100)
    stereo = np.stack([up, 0.5 * up], axis=1)  # different channels: the down-mix must average them
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 44100, subtype="PCM_16")
    chunks = _drain(FileSource(path, chunk_ms=100))
    wav = np.concatenate([c.samples for c in chunks])
    np.testing.assert_allclose(wav, load_audio(path), atol=1e-6)
    assert abs(wav.size - mono.size) <= 1
    n = min(wav.size, mono.size)
    # after 44.1 kHz and back, the same expirations are found (to within a frame)
    a, b = segment(0.75 * mono[:n]), segment(wav[:n])
    assert len(a) == len(b) >= 1
    for x, y in zip(a, b, strict=True):
        assert abs(x.start_sample - y.start_sample) <= 480 and abs(x.end_sample - y.end_sample) <= 480


def test_realtime_file_is_paced_like_a_microphone(cry_file: Path) -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    src = FileSource(cry_file, realtime=True, chunk_ms=100, clock=lambda: now[0], sleep=sleep)
    chunks = _drain(src)
    total = sum(c.samples.size for c in chunks) / SR
    assert now[0] - 100.0 == pytest.approx(total, abs=1e-6)  # the last chunk is due when its audio ends
    # a short timeout returns None before the chunk is due, without losing it
    now[0] = 0.0
    src = FileSource(cry_file, realtime=True, chunk_ms=100, clock=lambda: now[0], sleep=sleep)
    with src:
        assert src.read(timeout_s=0.01) is None
        first = src.read(timeout_s=1.0)
    assert first is not None and first.start_sample == 0


def test_close_from_another_thread_ends_reading_cleanly(cry_file: Path) -> None:
    """The service closes the source from its main thread while the reader thread reads."""
    src = FileSource(cry_file, realtime=True, chunk_ms=20)
    src.open()
    got: list[AudioChunk] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            got.extend(src)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.3)
    src.close()
    t.join(2.0)
    assert not t.is_alive() and not errors and src.eof
    assert 0 < sum(c.samples.size for c in got) < load_audio(cry_file).size  # stopped part-way

    mic = MicSource(device=2, backend=FakeSoundDevice())
    mic.open()
    closer = threading.Timer(0.2, mic.close)
    closer.start()
    t0 = time.monotonic()
    assert mic.read(timeout_s=5.0) is None
    assert time.monotonic() - t0 < 2.0 and mic.eof


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.wav", None, "no such file"),
        ("notes.wav", b"this is a text file, not audio\n" * 20, "not a readable audio file"),
        ("empty.wav", b"", "not a readable audio file"),
    ],
)
def test_bad_files_fail_with_one_clear_line(
    tmp_path: Path, name: str, content: bytes | None, message: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AudioError, match=message) as err:
        FileSource(path).open()
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_wav_without_samples_and_directory_fail(tmp_path: Path) -> None:
    path = tmp_path / "header-only.wav"
    sf.write(path, np.zeros((0, 1), np.float32), SR)
    with pytest.raises(AudioError, match="holds no audio samples"):
        FileSource(path).open()
    with pytest.raises(AudioError, match="is a directory"):
        FileSource(tmp_path).open()


def _open_as(user: str, path: Path) -> str:
    """``FileSource(path).open()`` in a forked child that dropped to ``user`` (the test runs as root in
    CI, and root reads any file): "ok", or the exception's type and message."""
    import pwd

    pw = pwd.getpwnam(user)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            try:
                FileSource(path).open()
                msg = "ok"
            except Exception as exc:  # reported to the parent, which asserts on it
                msg = f"{type(exc).__name__}: {exc}"
            os.write(w, msg.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        out = fh.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return out


def test_unreadable_file_fails(cry_file: Path) -> None:
    """As an unprivileged user (``nobody`` when the suite runs as root): mode 000 is refused in one line,
    and the same file made readable opens (so the refusal is the permission's doing)."""
    folder = Path(tempfile.mkdtemp(prefix="cryid-unreadable-"))  # not under tmp_path: nobody must reach it
    try:
        folder.chmod(0o755)
        path = folder / "locked.flac"
        path.write_bytes(cry_file.read_bytes())
        path.chmod(0)
        if os.geteuid() != 0:
            with pytest.raises(AudioError, match="not a readable audio file"):
                FileSource(path).open()
            return
        got = _open_as("nobody", path)
        assert got.startswith("AudioError: ") and "not a readable audio file" in got and "\n" not in got, got
        path.chmod(0o644)
        assert _open_as("nobody", path) == "ok"
    finally:
        shutil.rmtree(folder)


def test_truncated_file_delivers_what_decodes_then_fails_clearly(tmp_path: Path, cry_file: Path) -> None:
    path = tmp_path / "truncated.flac"
    path.write_bytes(cry_file.read_bytes()[: cry_file.stat().st_size // 2])
    src = FileSource(path, chunk_ms=100)
    got: list[AudioChunk] = []
    with pytest.raises(AudioError, match="cannot decode the audio") as err, src:
        got.extend(src)
    assert got, "the decodable first half is delivered before the error"
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_stdin_raw_s16le_with_odd_byte_count() -> None:
    pcm = (np.sin(np.arange(5000) / 7.0) * 20000).astype("<i2")
    raw = pcm.tobytes() + b"\x01"  # a partial trailing sample
    src = StdinSource(io.BytesIO(raw), chunk_ms=10)
    chunks = _drain(src)
    got = np.concatenate([c.samples for c in chunks])
    np.testing.assert_array_equal(got, pcm.astype(np.float32) / 32768.0)
    assert src.dropped_bytes == 1 and src.eof


def test_stdin_pipe_carries_split_samples_and_honours_the_timeout() -> None:
    """A real pipe: odd-sized writes split samples across reads; an idle pipe times out with None."""
    rfd, wfd = os.pipe()
    reader = os.fdopen(rfd, "rb")
    src = StdinSource(reader, chunk_ms=10)
    src.open()
    assert src.read(timeout_s=0.05) is None and not src.eof
    pcm = np.arange(-500, 500, dtype="<i2")
    data = pcm.tobytes()
    os.write(wfd, data[:301])  # ends in the middle of a sample
    first = src.read(timeout_s=1.0)
    assert first is not None and first.samples.size == 150
    os.write(wfd, data[301:])
    os.close(wfd)
    rest = [c for c in iter(lambda: src.read(timeout_s=1.0), None)]
    got = np.concatenate([first.samples, *[c.samples for c in rest]])
    np.testing.assert_array_equal(got, pcm.astype(np.float32) / 32768.0)
    assert src.read(timeout_s=0.1) is None and src.eof
    reader.close()


def test_stream_resampler_equals_whole_signal_resampling() -> None:
    rng = np.random.default_rng(0)
    for rate in (8000, 22050, 44100, 48000):
        x = rng.normal(0, 0.1, rate + 77).astype(np.float32)
        r = StreamResampler(rate)
        pieces = [r.process(x[i : i + 333]) for i in range(0, x.size, 333)] + [r.flush()]
        np.testing.assert_allclose(np.concatenate(pieces), resample(x, rate, SR), atol=1e-6)


# -- microphone ---------------------------------------------------------------------------------
# A physical microphone cannot run on this machine (no sound card; PortAudio is not installed), so
# these tests hand MicSource a fake sounddevice module, ONLY to drive the device-failure and reopen
# logic. The real capture path is tested with a virtual microphone by the deploy tests (issue 7).


class FakeStream:
    def __init__(self, backend: FakeSoundDevice, **kw: Any) -> None:
        self.kw, self.backend, self.active, self.closed = kw, backend, False, False

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def close(self) -> None:
        self.closed = True

    def feed(self, samples: np.ndarray) -> None:  # what PortAudio's thread would do
        self.kw["callback"](samples.reshape(-1, 1).astype(np.float32), samples.size, None, None)

    def die(self) -> None:  # device unplugged: PortAudio stops the stream
        self.active = False
        self.kw["finished_callback"]()


class FakeSoundDevice:
    """The part of sounddevice that MicSource uses; ``fail_opens`` makes the next opens raise."""

    class PortAudioError(Exception):
        pass

    def __init__(self, rates: tuple[int, ...] = (16000, 48000), default_rate: int = 48000) -> None:
        self.devices = [
            {
                "name": "HDA Intel PCH: ALC257 Analog",
                "hostapi": 0,
                "max_input_channels": 2,
                "default_samplerate": 48000.0,
            },
            {"name": "HDMI output", "hostapi": 0, "max_input_channels": 0, "default_samplerate": 48000.0},
            {
                "name": "USB Ward Mic",
                "hostapi": 0,
                "max_input_channels": 1,
                "default_samplerate": float(default_rate),
            },
        ]
        self.rates, self.fail_opens, self.streams = rates, 0, []
        self.default = SimpleNamespace(device=(0, 1))

    def query_devices(self, device: int | None = None, kind: str | None = None) -> Any:
        return self.devices if device is None else self.devices[device]

    def query_hostapis(self) -> list[dict[str, str]]:
        return [{"name": "ALSA"}]

    def check_input_settings(self, device: int | None = None, samplerate: float = 0, **kw: Any) -> None:
        if int(samplerate) not in self.rates:
            raise self.PortAudioError("Invalid sample rate")

    def InputStream(self, **kw: Any) -> FakeStream:
        if self.fail_opens:
            self.fail_opens -= 1
            raise self.PortAudioError("Error opening InputStream: Device unavailable [PaErrorCode -9985]")
        stream = FakeStream(self, **kw)
        self.streams.append(stream)
        return stream


class FakeClock:
    """Real monotonic time plus what ``sleep`` skipped: back-off waits cost no test time."""

    def __init__(self) -> None:
        self.skipped = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return time.monotonic() + self.skipped

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.skipped += s


def test_mic_reopens_with_capped_backoff_and_reports_the_outage() -> None:
    sd, clock, states = FakeSoundDevice(), FakeClock(), []
    settings = SourceSettings(device="ward mic", reopen_min_s=0.5, reopen_max_s=2.0)
    mic = MicSource(settings=settings, on_state=states.append, backend=sd, clock=clock, sleep=clock.sleep)
    mic.open()
    assert mic.state.ok and mic.capture_rate == 16000 and sd.streams[0].kw["device"] == 2
    sd.streams[0].feed(np.full(1600, 0.25, np.float32))
    chunk = mic.read(timeout_s=1.0)
    assert chunk is not None and chunk.start_sample == 0 and chunk.samples.size == 1600

    sd.fail_opens = 4  # unplugged: the next four opens fail
    sd.streams[0].die()
    assert mic.read(timeout_s=3.0) is None  # waits through the back-off, never raises
    assert not mic.state.ok and mic.state.outages == 1 and "reopening" in states[-1].message
    assert sd.streams[0].closed and len(sd.streams) == 1
    assert mic.read(timeout_s=5.0) is None  # still retrying: the fifth open succeeds after 7.5 s
    assert mic.state.ok and len(sd.streams) == 2
    # back-off before each attempt: 0.5 s, then doubling, capped at reopen_max_s
    waits = [round(s, 3) for s in clock.sleeps if s > 0.01]
    assert sum(waits) == pytest.approx(7.5, abs=0.01)
    assert max(waits) == pytest.approx(2.0, abs=0.01)
    assert [s.ok for s in states] == [True, False, True]
    assert all(isinstance(s, SourceState) for s in states)
    sd.streams[1].feed(np.full(800, 0.1, np.float32))
    after = mic.read(timeout_s=1.0)
    assert after is not None and after.start_sample == 1600  # the stream position continues
    mic.close()
    assert mic.eof and mic.read(timeout_s=0.1) is None and len(sd.streams) == 2  # closed stays closed


def test_mic_absent_at_start_is_an_outage_not_a_crash() -> None:
    sd, clock, states = FakeSoundDevice(), FakeClock(), []
    sd.fail_opens = 1
    mic = MicSource(device=2, on_state=states.append, backend=sd, clock=clock, sleep=clock.sleep)
    mic.open()
    assert not mic.state.ok and mic.state.outages == 1 and "cannot open microphone" in mic.state.message
    assert mic.read(timeout_s=0.6) is None and mic.state.ok
    assert [s.ok for s in states] == [False, True]


def test_mic_stall_is_treated_as_a_failure() -> None:
    sd, clock = FakeSoundDevice(), FakeClock()
    mic = MicSource(
        device=2, settings=SourceSettings(stall_timeout_s=3.0), backend=sd, clock=clock, sleep=clock.sleep
    )
    mic.open()
    clock.skipped += 5.0  # no callback for 5 s
    assert mic.read(timeout_s=0.3) is None
    assert sd.streams[0].closed and mic.state.outages == 1 and "no audio for 3.0 s" in mic.state.message


def test_mic_callback_never_blocks_and_counts_drops() -> None:
    sd = FakeSoundDevice()
    mic = MicSource(device="USB Ward Mic", settings=SourceSettings(mic_queue_chunks=3), backend=sd)
    mic.open()
    done = threading.Event()

    def portaudio_thread() -> None:
        for _ in range(10):
            sd.streams[0].feed(np.zeros(160, np.float32))
        done.set()

    threading.Thread(target=portaudio_thread).start()
    assert done.wait(2.0), "the callback blocked on a full queue"
    assert mic.dropped_chunks == 7
    assert sum(1 for _ in iter(lambda: mic.read(timeout_s=0.05), None)) == 3
    mic.close()


def test_mic_without_16k_captures_at_device_rate_and_resamples() -> None:
    sd = FakeSoundDevice(rates=(48000,))
    mic = MicSource(device="usb", settings=SourceSettings(), backend=sd)
    mic.open()
    assert mic.capture_rate == 48000 and sd.streams[0].kw["samplerate"] == 48000
    tone = np.sin(2 * np.pi * 440 * np.arange(48000) / 48000).astype(np.float32)
    for i in range(0, tone.size, 4800):
        sd.streams[0].feed(tone[i : i + 4800])
    got = np.concatenate([c.samples for c in iter(lambda: mic.read(timeout_s=0.05), None)])
    want = resample(tone, 48000, SR)
    np.testing.assert_allclose(got, want[: got.size], atol=1e-6)
    assert got.size >= want.size - 100
    mic.close()


def test_device_listing_and_choice() -> None:
    sd = FakeSoundDevice()
    devices = list_input_devices(sd)
    assert [(d.index, d.name, d.is_default) for d in devices] == [
        (0, "HDA Intel PCH: ALC257 Analog", True),
        (2, "USB Ward Mic", False),
    ]
    assert resolve_device(None, devices) is None
    assert resolve_device("2", devices) == 2
    assert resolve_device("usb ward mic", devices) == 2
    with pytest.raises(SourceError, match="no input device with index 1"):
        resolve_device(1, devices)
    with pytest.raises(SourceError, match="matches no input device"):
        resolve_device("Blue Yeti", devices)
    with pytest.raises(SourceError, match="matches several"):
        resolve_device("a", devices)
    with pytest.raises(SourceError, match="matches no input device"):
        MicSource(device="Blue Yeti", backend=sd).open()  # a wrong name is a config error, not retried


def test_missing_portaudio_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import fails as without PortAudio
    with pytest.raises(SourceError, match="PortAudio"):
        load_sounddevice()


def test_make_source(cry_file: Path) -> None:
    settings = SourceSettings(chunk_ms=50)
    assert isinstance(make_source("-", settings), StdinSource)
    assert isinstance(make_source("mic", settings), MicSource)
    src = make_source(str(cry_file), settings, realtime=False)
    assert isinstance(src, FileSource) and src.chunk_ms == 50


def test_real_portaudio_unknown_device_is_a_config_error() -> None:
    """With the real sounddevice/PortAudio (when installed): a wrong device name fails at open, clearly."""
    try:
        backend = load_sounddevice()
    except SourceError as exc:
        pytest.skip(f"PortAudio not available here: {exc}")
    with pytest.raises(SourceError, match="matches no input device") as err:
        MicSource(device="no such microphone 7f3a").open()
    assert "cryid devices" in str(err.value) or "source.device" in str(err.value)
    assert all(d.max_input_channels >= 1 for d in list_input_devices(backend))
