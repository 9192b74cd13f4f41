"""Metrics and /healthz scraped over HTTP from a running daemon (real prometheus_client, mosquitto, ONNX).

The audio comes through a pipe (``--source -``, raw s16le), so the test decides when the source
delivers audio, when it pauses (``/healthz`` must turn 503 and say why) and when it ends.
"""

from __future__ import annotations

import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cryid.daemon import nursery
from cryid.daemon.config import IdentifierSettings, MqttSettings, ServiceSettings, Settings
from cryid.daemon.metrics import MetricsSettings
from cryid.daemon.mqtt import MqttPublisher
from cryid.daemon.outbox import Outbox
from cryid.daemon.service import Service, load_embedder
from cryid.daemon.sources import SourceSettings, StdinSource
from cryid.enrollment.registry import Registry
from cryid.models.embedder import Embedder
from tests.fixtures.broker import Broker, Subscriber, free_port

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`

REPO = Path(__file__).resolve().parents[1]
BABIES = ["ada", "ben"]


def model_dir(request: pytest.FixtureRequest) -> Path:
    shipped = REPO / "models" / "default"
    if (shipped / "model.onnx").is_file():
        return shipped
    return Path(request.getfixturevalue("onnx_model_dir"))


def enroll_state(state: Path, model: Path, babies: list[str], room: str = "w") -> None:
    """Enroll generated babies in ``room`` (the daemon compares a cry only with its own room's babies)."""
    settings = Settings(state_dir=state, model=model)
    voices = nursery.voices(len(babies) + 1, seed=1)
    embedder = Embedder(model)
    with Registry.open(state, settings.registry) as registry:
        for i, baby in enumerate(babies):
            nursery.enroll(
                registry, embedder, settings, baby, [nursery.bout(voices[i], 6, seed=100 + i)], room
            )


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value, parsed by prometheus_client's parser."""
    code, text = get(f"http://127.0.0.1:{port}/metrics")
    assert code == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def wait(cond: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s} s")
        time.sleep(0.1)


def s16(wav: np.ndarray) -> bytes:
    return (np.clip(wav, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def test_metrics_and_health_over_http(
    request: pytest.FixtureRequest,
    mosquitto: Broker,
    subscriber_factory: Callable[..., Subscriber],
    tmp_path: Path,
) -> None:
    model = model_dir(request)
    state = tmp_path / "state"
    enroll_state(state, model, BABIES)
    port = free_port()
    settings = Settings(
        room="w",
        state_dir=state,
        model=model,
        mqtt=MqttSettings(host=mosquitto.host, port=mosquitto.port, reconnect_min_s=0.2, reconnect_max_s=1.0),
        identifier=IdentifierSettings(min_score=0.0, min_margin=0.0),
        service=ServiceSettings(shutdown_timeout_s=10.0),
        source=SourceSettings(stall_timeout_s=1.0),
        metrics=MetricsSettings(port=port),
    )
    sub = subscriber_factory(mosquitto, "cryid/w/#")
    rfd, wfd = os.pipe()
    reader, writer = os.fdopen(rfd, "rb", buffering=0), os.fdopen(wfd, "wb", buffering=0)
    outbox = Outbox.open(state, settings.outbox)
    service = Service(
        settings,
        StdinSource(reader, chunk_ms=40),
        load_embedder(settings),
        Registry.open(state, settings.registry),
        outbox,
        MqttPublisher(settings.mqtt, settings.room, outbox),
    )
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(service.run()))
    runner.start()
    try:
        base = f"http://127.0.0.1:{port}"
        wait(lambda: get(base + "/healthz")[0] in (200, 503), "metrics server")
        code, body = get(base + "/healthz")
        assert (code, body.strip()) == (503, "no audio from the source yet")

        voices = nursery.voices(3, seed=1)
        bouts = [(b, nursery.bout(voices[i], 2.5, seed=200 + i)) for i, b in enumerate(BABIES)]
        stream, truth = nursery.nursery_stream(bouts, gap_s=6.0, seed=5)
        stream = np.concatenate([stream, nursery.room_noise(6.0, np.random.default_rng(4))])  # closes it
        feeder = threading.Thread(target=writer.write, args=(s16(stream),))
        feeder.start()
        wait(lambda: get(base + "/healthz")[0] == 200, "healthy while audio flows")
        feeder.join(timeout=120)
        wait(lambda: sum(e["kind"] == "episode" for e in sub.events()) == len(truth), "both episodes")

        # the pipe stays open but delivers nothing: unhealthy, with the reason
        wait(lambda: get(base + "/healthz")[0] == 503, "503 once the audio stops", timeout_s=10)
        assert get(base + "/healthz")[1].startswith("no audio from the source for ")

        m = scrape(port)
        events = sub.events()
        for kind in ("expiration", "episode"):
            for decision in ("identified", "unknown"):
                n = sum(e["kind"] == kind and e["decision"] == decision for e in events)
                assert m[("cryid_events_total", (("decision", decision), ("kind", kind)))] == n
        n_exp = sum(e["kind"] == "expiration" for e in events)
        assert m[("cryid_expirations_total", ())] == n_exp > 0
        assert m[("cryid_embed_seconds_count", ())] == n_exp
        assert m[("cryid_embed_seconds_sum", ())] > 0
        assert m[("cryid_publish_latency_seconds_count", (("kind", "expiration"),))] == n_exp
        assert m[("cryid_publish_latency_seconds_count", (("kind", "episode"),))] == len(truth)
        assert m[("cryid_babies_enrolled", ())] == len(BABIES)
        assert m[("cryid_mqtt_connected", ())] == 1
        assert m[("cryid_mqtt_reconnects_total", ())] == 0
        assert m[("cryid_source_up", ())] == 1 and m[("cryid_source_flat", ())] == 0
        assert m[("cryid_source_reopens_total", ())] == 0
        assert m[("cryid_outbox_events", ())] == 0
        assert -80.0 < m[("cryid_mic_level_dbfs", ())] < 0.0  # the room noise of the stream's tail
        info = next(labels for name, labels in m if name == "cryid_info")
        assert dict(info)["room"] == "w" and len(dict(info)["model_sha256"]) == 64
        # every series the Grafana dashboard queries exists
        dashboard = (REPO / "deploy" / "grafana" / "cryid.json").read_text()
        assert set(re.findall(r"cryid_[a-z_]+", dashboard)) <= {name for name, _ in m}

        # a broker restart: one reconnect, connected again
        mosquitto.restart()
        wait(lambda: scrape(port)[("cryid_mqtt_reconnects_total", ())] == 1, "a counted reconnect")
        assert scrape(port)[("cryid_mqtt_connected", ())] == 1

        writer.write(s16(nursery.room_noise(1.0, np.random.default_rng(3))))  # audio again: healthy
        wait(lambda: get(base + "/healthz")[0] == 200, "200 when audio flows again", timeout_s=10)
        assert get(base + "/nope")[0] == 404
    finally:
        writer.close()  # end of the stream: the daemon finishes and stops
        runner.join(timeout=60)
        service.request_stop()
        service.close()
        reader.close()
    assert codes == [0]
    with pytest.raises(urllib.error.URLError):  # the server is gone with the daemon
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
