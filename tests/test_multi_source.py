"""Several sources and rooms in one daemon (``[[sources]]``, issue 16).

Real parts: ``cryid run --config`` as a subprocess, the shipped model, real cries from
../shared/data/donateacry-cc (babies enrolled from their birth recordings, the daemon hears a discharge
recording), a real mosquitto, file sources played at real speed. The two-microphone case uses two file
sources fed the same cry with a small offset and a lower level on one (what two microphones of one room
hear); tests/test_virtual_mic.py holds the PulseAudio variant.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from cryid.daemon import nursery
from cryid.models.audio import load_audio
from tests.fixtures.broker import Broker, Received, Subscriber
from tests.fixtures.cli import cryid_env
from tests.fixtures.data import dac_rows
from tests.fixtures.pulse import PulseServer

pytestmark = pytest.mark.slow  # starts mosquitto and cryid run: not in `pytest -m "not slow"`

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "default"
CRYID = [sys.executable, "-m", "cryid.daemon.cli"]
SR = 16000
ROOMS = {"room1": ["dac0126", "dac0084"], "room2": ["dac0136", "dac0256"]}  # enrolled per room


def _files(dac_dir: Path, baby: str, period: str) -> list[Path]:
    return [dac_dir / r["file_name"] for r in dac_rows(split="dev", period=period) if r["baby_id"] == baby]


@pytest.fixture(scope="module")
def ward_state(tmp_path_factory: pytest.TempPathFactory, dac_dir: Path) -> Path:
    """A registry with dac0126 and dac0084 in room1, dac0136 and dac0256 in room2 (birth recordings)."""
    from cryid.enrollment import enroll
    from cryid.enrollment.config import RegistrySettings
    from cryid.enrollment.registry import Registry
    from cryid.models.config import SegmenterSettings
    from cryid.models.embedder import Embedder

    state = tmp_path_factory.mktemp("ward") / "state"
    embedder = Embedder(MODEL)
    with Registry.open(state, RegistrySettings()) as registry:
        for room, babies in ROOMS.items():
            for baby in babies:
                samples = enroll.prepare_files(
                    _files(dac_dir, baby, "B"), period="birth", segmenter=SegmenterSettings(),
                    embedder_factory=lambda: embedder, keep_audio=False,
                )  # fmt: skip
                enroll.add(registry, baby, samples, RegistrySettings(), room=room)
    return state


def _stream(path: Path, cry: np.ndarray, before_s: float, after_s: float, gain_db: float = 0.0) -> Path:
    rng = np.random.default_rng(len(str(path)))
    wav = np.concatenate(
        [nursery.room_noise(before_s, rng), cry * 10 ** (gain_db / 20), nursery.room_noise(after_s, rng)]
    )
    sf.write(path, wav.astype(np.float32), SR, subtype="PCM_16")
    return path


class Ward:
    """One test's daemon set-up: a copy of ``ward_state`` in ``tmp_path/state``, a fresh mosquitto, a
    subscriber on ``cryid/#`` (made before the daemon starts) and ``cryid run --config tmp_path/cryid.toml``
    with the shipped model and stats every second."""

    def __init__(self, tmp_path: Path, state: Path, broker: Broker, sub: Subscriber) -> None:
        self.tmp_path, self.state, self.broker, self.sub = tmp_path, state, broker, sub
        self.stderr = ""  # cryid run's, once stopped (``running``)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``cryid_env(base)`` plus the state directory, the model and the broker."""
        env = cryid_env(base)
        env |= {
            "CRYID_STATE_DIR": str(self.state), "CRYID_MODEL": str(MODEL),
            "CRYID_MQTT__HOST": self.broker.host, "CRYID_MQTT__PORT": str(self.broker.port),
            "CRYID_MQTT__STATS_INTERVAL_S": "1",
        }  # fmt: skip
        return env

    def _command(self, config: str) -> list[str]:
        cfg = self.tmp_path / "cryid.toml"
        cfg.write_text(config)
        return [*CRYID, "-v", "run", "--config", str(cfg)]

    def run(self, config: str, timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
        """``cryid run`` to the end of its file sources."""
        return subprocess.run(
            self._command(config), env=self.env(), capture_output=True, text=True, timeout=timeout_s
        )

    @contextmanager
    def running(
        self, config: str, pulse: dict[str, str], online_room: str
    ) -> Iterator[subprocess.Popen[str]]:
        """``cryid run`` (PulseAudio client environment ``pulse``) from ``online_room``'s online status on;
        stopped with SIGTERM on leaving, its stderr then in ``self.stderr``."""
        from tests.test_virtual_mic import _stop, _wait

        daemon = subprocess.Popen(self._command(config), env=self.env(pulse), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            _wait(lambda: any(m.topic == f"cryid/{online_room}/status" and m.payload == b"online"
                              for m in self.sub.messages), "online status", daemon, 120)  # fmt: skip
            yield daemon
        finally:
            self.stderr = _stop(daemon)

    def events(self, room: str) -> list[dict[str, Any]]:
        return [e for e in self.sub.events() if e["_topic"].startswith(f"cryid/{room}/")]

    def stats(self, room: str) -> list[dict[str, Any]]:
        return [m.json() for m in self.sub.messages if m.topic == f"cryid/{room}/stats"]


@pytest.fixture
def ward(
    ward_state: Path, mosquitto: Broker, subscriber_factory: Callable[..., Subscriber], tmp_path: Path
) -> Ward:
    state = tmp_path / "state"
    shutil.copytree(ward_state, state)
    return Ward(tmp_path, state, mosquitto, subscriber_factory(mosquitto, "cryid/#"))


def test_two_rooms_each_publish_their_own_babies_on_their_own_topics(
    ward: Ward, dac_dir: Path, tmp_path: Path
) -> None:
    cry1 = load_audio(_files(dac_dir, "dac0126", "D")[0])
    cry2 = load_audio(_files(dac_dir, "dac0136", "D")[0])
    a = _stream(tmp_path / "a.wav", cry1, 1.0, 1.0)
    b = _stream(tmp_path / "b.wav", cry2, 1.5, 1.0)
    done = ward.run(
        f'[[sources]]\nname = "cot-a"\nroom = "room1"\nfile = "{a}"\n\n'
        f'[[sources]]\nname = "cot-b"\nroom = "room2"\nfile = "{b}"\n'
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ward.sub.wait_for(
        lambda ms: sum(m.topic.endswith("/status") and m.payload == b"offline" for m in ms) >= 2, 30
    )
    for room, babies in ROOMS.items():
        events = ward.events(room)
        episodes = [e for e in events if e["kind"] == "episode"]
        assert len(episodes) == 1, (room, events)
        assert all(e["room"] == room for e in events)
        # each room compares its cries only with its own babies
        assert all({c["baby_id"] for c in e["candidates"]} <= set(babies) for e in events), events
        assert episodes[0]["n_candidates"] == len(babies)
        assert all(e["levels_dbfs"] is None for e in events)  # one microphone in the room
        (name,) = {s["name"] for st in ward.stats(room) for s in st["sources"]}
        assert name == ("cot-a" if room == "room1" else "cot-b")
    ep1 = next(e for e in ward.events("room1") if e["kind"] == "episode")
    assert ep1["best_baby_id"] == "dac0126", ep1  # the held-back cry of dac0126 ranks it first
    assert ep1["_topic"] in ("cryid/room1/baby/dac0126", "cryid/room1/unknown")
    statuses = [(m.topic, m.payload) for m in ward.sub.messages if m.topic.endswith("/status")]
    for room in ROOMS:
        assert (f"cryid/{room}/status", b"online") in statuses and (
            f"cryid/{room}/status",
            b"offline",
        ) in statuses


def test_two_microphones_of_one_room_hearing_one_cry_give_one_episode(
    ward: Ward, dac_dir: Path, tmp_path: Path
) -> None:
    """The same cry reaches the far microphone 120 ms later and 12 dB quieter: one event per expiration,
    one episode, embedded from the near microphone, with both levels."""
    cry = load_audio(_files(dac_dir, "dac0126", "D")[0])
    near = _stream(tmp_path / "near.wav", cry, 1.0, 1.0)
    far = _stream(tmp_path / "far.wav", cry, 1.12, 0.88, gain_db=-12.0)
    done = ward.run(
        f'[[sources]]\nname = "near"\nroom = "room1"\nfile = "{near}"\n\n'
        f'[[sources]]\nname = "far"\nroom = "room1"\nfile = "{far}"\n'
    )
    assert done.returncode == 0, done.stderr[-3000:]
    events = ward.events("room1")
    episodes = [e for e in events if e["kind"] == "episode"]
    expirations = [e for e in events if e["kind"] == "expiration"]
    assert len(episodes) == 1, events
    ep = episodes[0]
    assert ep["n_expirations"] == len(expirations) >= 1
    # as many identifications as one microphone alone gives (tests/test_live_pipeline's pipeline on near)
    single = _single_source_expirations(near)
    assert len(expirations) == single, (len(expirations), single)
    assert set(ep["levels_dbfs"]) == {"near", "far"}
    assert ep["levels_dbfs"]["near"] > ep["levels_dbfs"]["far"] + 6.0
    for e in expirations:  # each expiration is near's (the far one may cut the cry differently)
        assert e["levels_dbfs"]["near"] > e["levels_dbfs"].get("far", -200.0) + 6.0
        assert e["level_dbfs"] <= e["levels_dbfs"]["near"] + 0.01
    assert ep["best_baby_id"] == "dac0126"


def _single_source_expirations(path: Path) -> int:
    from cryid.daemon.config import IdentifierSettings
    from cryid.daemon.live import LivePipeline
    from cryid.models.config import SegmenterSettings
    from cryid.models.embedder import Embedder

    pipe = LivePipeline(Embedder(MODEL), SegmenterSettings(), IdentifierSettings(), room="x")
    wav = load_audio(path)
    outs = [o for i in range(0, wav.size, 640) for o in pipe.feed(wav[i : i + 640])] + pipe.flush()
    return sum(o.identification.kind == "expiration" for o in outs)


def test_a_failing_source_leaves_the_other_room_publishing(ward: Ward, dac_dir: Path, tmp_path: Path) -> None:
    """room1's file is damaged 2 s in (the FLAC decoder loses sync: a real decoding error); room2's cry
    comes later and is still identified; room1 reports its source down with the reason."""
    rng = np.random.default_rng(3)
    broken = tmp_path / "broken.flac"
    sf.write(broken, nursery.room_noise(8.0, rng), SR, format="FLAC")
    data = bytearray(broken.read_bytes())
    cut = len(data) // 4
    data[cut : cut + 20000] = b"\xaa" * 20000
    broken.write_bytes(bytes(data))
    good = _stream(tmp_path / "good.wav", load_audio(_files(dac_dir, "dac0136", "D")[0]), 4.0, 1.0)
    done = ward.run(
        f'[[sources]]\nname = "broken"\nroom = "room1"\nfile = "{broken}"\n\n'
        f'[[sources]]\nname = "good"\nroom = "room2"\nfile = "{good}"\n'
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "source broken failed" in done.stderr and "cannot decode the audio" in done.stderr
    msgs: list[Received] = list(ward.sub.messages)
    down = next(
        i for i, m in enumerate(msgs)
        if m.topic == "cryid/room1/stats"
        and any(not s["ok"] and "cannot decode" in (s["error"] or "") for s in m.json()["sources"])
    )  # fmt: skip
    room2 = [
        i
        for i, m in enumerate(msgs)
        if (m.topic.startswith("cryid/room2/baby/") and not m.topic.endswith("/state"))
        or m.topic == "cryid/room2/unknown"
    ]
    assert room2 and min(room2) > down, "room2 published nothing after room1's source failed"
    assert any(json.loads(msgs[i].payload)["kind"] == "episode" for i in room2)
    assert b"down" in [m.payload for m in msgs if m.topic == "cryid/room1/status/source"]


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ("sources = []\n", "sources is an empty list"),
        (
            '[[sources]]\nname = "a"\nroom = "r1"\ndevice = "USB"\n'
            '[[sources]]\nname = "b"\nroom = "r2"\ndevice = "usb"\n',
            "both use device usb",
        ),
        ('room = "r3"\n[[sources]]\nname = "a"\nroom = "r1"\ndevice = "USB"\n', "room 'r3' has no source"),
        (
            '[[sources]]\nname = "a"\nroom = "r1"\n[[sources]]\nname = "a"\nroom = "r2"\nfile = "x.wav"\n',
            "used twice",
        ),
        ('[[sources]]\nname = "a"\nroom = "r1"\ndevice = "USB"\nfile = "x.wav"\n', "sets device and file"),
        ('[[sources]]\nname = "a"\nroom = "r1"\nsegmenter = { hangover_ms = -5 }\n', "segmenter.hangover_ms"),
    ],
)
@pytest.mark.parametrize("command", [["config", "check"], ["run"]])
def test_bad_source_lists_are_refused_with_one_line(
    tmp_path: Path, toml: str, words: str, command: list[str]
) -> None:
    cfg = tmp_path / "cryid.toml"
    cfg.write_text(toml)
    env = cryid_env()
    env |= {"CRYID_STATE_DIR": str(tmp_path / "state"), "CRYID_MODEL": str(MODEL)}
    done = subprocess.run([*CRYID, *command, "--config", str(cfg)], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cryid: error: ") and words in lines[0], done.stderr
    assert not (tmp_path / "state").exists()  # nothing was opened or written


def test_config_check_prints_the_sources_as_toml_again(tmp_path: Path) -> None:
    import tomllib

    cfg = tmp_path / "cryid.toml"
    cfg.write_text('[[sources]]\nname = "a"\nroom = "r1"\ndevice = "USB"\ngain_db = 6.0\n'
                   'segmenter = { gate_margin_db = 10.0 }\n'
                   '[[sources]]\nname = "b"\nroom = "r2"\nfile = "x.wav"\n')  # fmt: skip
    env = cryid_env()
    done = subprocess.run([*CRYID, "config", "check", "--config", str(cfg)], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = tomllib.loads(done.stdout)
    assert [s["name"] for s in data["sources"]] == ["a", "b"]
    assert (
        data["sources"][0]["segmenter"] == {"gate_margin_db": 10.0} and data["sources"][0]["gain_db"] == 6.0
    )


# Two virtual microphones in one room -------------------------------------------------------------------
@pytest.fixture
def two_virtual_mics(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A private PulseAudio with null sinks ``cotA``, ``cotB`` (and ``quiet``, the default source); ALSA
    devices ``micA``/``micB`` (in the HOME's .asoundrc) record their monitors, so PortAudio lists two
    microphones that hear what ``paplay --device=cotA|cotB`` plays. Yields PulseAudio's client environment.
    The default source, where PulseAudio moves the capture of a device that goes away, hears nothing."""
    pulse = PulseServer(tmp_path, sinks=("cotA", "cotB", "quiet"), default="quiet",
                        alsa={"micA": "cotA", "micB": "cotB"})  # fmt: skip
    try:
        pulse.start()
        yield pulse.env
    finally:
        pulse.stop()


def test_two_virtual_microphones_of_one_room_playing_one_cry_give_one_episode(
    two_virtual_mics: dict[str, str], ward: Ward, dac_dir: Path, tmp_path: Path
) -> None:
    """``cryid run`` records micA and micB (PortAudio, ALSA's pulse plugin) for room1; the same held-back
    cry is played into both at once, 12 dB quieter into micB: one episode, named from micA's audio,
    with both microphones' levels. Nothing is mocked."""
    from tests.test_virtual_mic import _wait

    cry = load_audio(_files(dac_dir, "dac0126", "D")[0])
    loud = _stream(tmp_path / "loud.wav", cry, 0.2, 0.2)
    quiet = _stream(tmp_path / "quiet.wav", cry, 0.2, 0.2, gain_db=-12.0)
    config = (
        '[[sources]]\nname = "near"\nroom = "room1"\ndevice = "micA"\n\n'
        '[[sources]]\nname = "far"\nroom = "room1"\ndevice = "micB"\n'
    )
    with ward.running(config, two_virtual_mics, online_room="room1") as daemon:
        time.sleep(1.0)  # both streams capture
        players = [
            subprocess.Popen(["paplay", f"--device={sink}", str(wav)], env=ward.env(two_virtual_mics),
                             stderr=subprocess.PIPE)
            for sink, wav in (("cotA", loud), ("cotB", quiet))
        ]  # fmt: skip
        for p in players:
            assert p.wait(timeout=60) == 0
        _wait(lambda: any(e["kind"] == "episode" for e in ward.sub.events()), "episode event", daemon, 120)
        time.sleep(2.0)  # a second episode (the other microphone's copy) would come within the gap
    assert daemon.returncode == 0, ward.stderr[-3000:]
    events = ward.events("room1")
    episodes = [e for e in events if e["kind"] == "episode"]
    assert len(episodes) == 1, events
    ep = episodes[0]
    assert set(ep["levels_dbfs"]) == {"near", "far"}, ep
    assert ep["levels_dbfs"]["near"] > ep["levels_dbfs"]["far"] + 6.0, ep["levels_dbfs"]
    assert ep["best_baby_id"] == "dac0126", ep
    expirations = [e for e in events if e["kind"] == "expiration"]
    assert ep["n_expirations"] == len(expirations)
    for e in expirations:  # each expiration is near's (the far one may cut the cry differently)
        assert e["levels_dbfs"]["near"] > e["levels_dbfs"].get("far", -200.0) + 6.0, e["levels_dbfs"]
        assert e["level_dbfs"] <= e["levels_dbfs"]["near"] + 0.01
    stats = ward.stats("room1")[-1]
    assert {s["name"] for s in stats["sources"]} == {"near", "far"}


def test_virtual_microphones_that_go_flat_or_vanish_are_reopened_and_the_other_room_keeps_publishing(
    two_virtual_mics: dict[str, str], ward: Ward, dac_dir: Path, tmp_path: Path
) -> None:
    """micA hears room1, micB room2, both with quiet room noise playing into them.

    1. micB's noise stops: it delivers digital silence, a flat line, and is reopened after flat_timeout_s.
    2. micB's PulseAudio sink is unloaded (a microphone unplugged): PulseAudio moves the capture to the
       default source, which hears nothing, so micB goes flat and is reopened, which fails while the device
       is gone: room2 reports its source down, and room1 still identifies a cry.
    3. The sink comes back: micB is reopened on its own and room2 hears a cry again."""
    from tests.test_virtual_mic import _wait

    env_pa = two_virtual_mics
    cry = _stream(tmp_path / "cry.wav", load_audio(_files(dac_dir, "dac0126", "D")[0]), 0.2, 0.2)
    cry2 = _stream(tmp_path / "cry2.wav", load_audio(_files(dac_dir, "dac0136", "D")[0]), 0.2, 0.2)
    noise = tmp_path / "noise.wav"  # below segmenter.min_level_dbfs, but far from a flat line
    sf.write(
        noise, nursery.room_noise(180.0, np.random.default_rng(5), level_dbfs=-70.0), SR, subtype="PCM_16"
    )
    config = (
        '[[sources]]\nname = "a"\nroom = "room1"\ndevice = "micA"\n\n'
        '[[sources]]\nname = "b"\nroom = "room2"\ndevice = "micB"\n\n'
        "[source]\nflat_timeout_s = 2.0\nreopen_max_s = 1.0\n"
    )

    def micb(**want: Any) -> Callable[[], bool]:
        def check() -> bool:
            stats = ward.stats("room2")
            got = stats[-1]["sources"][0] if stats else {}
            return bool(stats) and all(got[k] == v if not callable(v) else v(got[k]) for k, v in want.items())

        return check

    def pactl(*args: str) -> str:
        return subprocess.run(["pactl", *args], env=env_pa, capture_output=True, text=True, check=True).stdout

    def room_noise(sink: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["paplay", f"--device={sink}", str(noise)], env=env_pa, stderr=subprocess.DEVNULL
        )

    players = {"cotA": room_noise("cotA"), "cotB": room_noise("cotB")}
    try:
        with ward.running(config, env_pa, online_room="room2") as daemon:
            _wait(micb(ok=True), "micB capturing", daemon, 30)
            time.sleep(
                3.0
            )  # longer than flat_timeout_s: the room noise keeps both microphones from being flat
            assert micb(ok=True, flat=False, reopens=0)()
            # 1. flat
            players["cotB"].kill()
            _wait(micb(flat=True, reopens=lambda n: n >= 1), "micB flat and reopened", daemon, 30)
            players["cotB"] = room_noise("cotB")
            _wait(micb(flat=False, ok=True), "micB not flat", daemon, 30)
            # 2. unplugged
            modules = pactl("list", "short", "modules").splitlines()
            pactl("unload-module", next(line.split()[0] for line in modules if "sink_name=cotB" in line))
            _wait(micb(ok=False), "micB reported down", daemon, 30)
            assert subprocess.run(["paplay", "--device=cotA", str(cry)], env=env_pa).returncode == 0
            _wait(
                lambda: any(e["kind"] == "episode" for e in ward.events("room1")), "room1 episode", daemon, 60
            )
            assert micb(ok=False)(), "micB came back while its sink was gone"
            # 3. back
            pactl("load-module", "module-null-sink", "sink_name=cotB", "rate=16000", "channels=1")
            players["cotB"] = room_noise("cotB")
            _wait(micb(ok=True), "micB reopened", daemon, 60)
            time.sleep(1.0)
            assert subprocess.run(["paplay", "--device=cotB", str(cry2)], env=env_pa).returncode == 0
            _wait(
                lambda: any(e["kind"] == "episode" for e in ward.events("room2")), "room2 episode", daemon, 60
            )
    finally:
        for p in players.values():
            p.kill()
            p.wait()
    assert daemon.returncode == 0, ward.stderr[-3000:]
    assert "source b flat" in ward.stderr and "cannot open microphone 'micB'" in ward.stderr
    assert ward.stats("room2")[-1]["sources"][0]["reopens"] >= 2
    assert all({c["baby_id"] for c in e["candidates"]} <= set(ROOMS["room2"]) for e in ward.events("room2"))
    assert [e["best_baby_id"] for e in ward.events("room1") if e["kind"] == "episode"] == ["dac0126"]


def test_devices_prints_a_sources_table_per_microphone(
    two_virtual_mics: dict[str, str], tmp_path: Path
) -> None:
    """``cryid devices`` lists micA and micB and a ready-to-paste ``[[sources]]`` table for each, which
    ``cryid config check`` accepts once the rooms are set."""
    import tomllib

    env = cryid_env(two_virtual_mics)
    done = subprocess.run([*CRYID, "devices"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    snippet = done.stdout.split("\n[[sources]]", 1)[1]
    tables = tomllib.loads("[[sources]]" + snippet)["sources"]
    assert {"micA", "micB"} <= {t["device"] for t in tables}, done.stdout
    cfg = tmp_path / "cryid.toml"
    cfg.write_text("[[sources]]" + snippet)
    cmd = [*CRYID, "config", "check", "--config", str(cfg)]
    env["CRYID_MODEL"] = str(MODEL)
    checked = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert len(tomllib.loads(checked.stdout)["sources"]) == len(tables)
