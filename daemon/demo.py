"""``cryid demo``: the main job end to end on a fresh machine, nothing set up.

1. A temporary state directory (or ``--keep DIR``); the configured model (default: the shipped one).
2. Enrolls a few babies through ``cryid.enrollment``: real cries from ``donateacry-cc`` when it is
   present (``CRYID_DEMO_DATA`` or ``../shared/data/donateacry-cc``), else generated cries.
3. Builds a nursery stream: a bout of each enrolled baby and of one baby nobody enrolled, with room
   noise between them, and remembers who cried when.
4. Uses the configured broker when it answers, else starts an embedded amqtt broker on localhost,
   subscribes to the room's topics, replays the stream through the daemon's own ``Service`` and
   prints each identification as it is published, then a summary against the ground truth.

Demo thresholds: a fresh model's cosine scale is unknown, so the demo raises ``identifier.min_score``
to just above the similarity of the two most similar enrolled babies when that is higher than the
configured value (a cry must be closer to one baby than any two babies are to each other) and lowers
``min_margin`` to a quarter of the remaining head-room; it prints what it used.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import soundfile as sf
from paho.mqtt.enums import CallbackAPIVersion

from cryid.daemon import nursery
from cryid.daemon.config import IdentifierSettings, Settings
from cryid.models.audio import SAMPLE_RATE
from cryid.models.scoring import cosine_matrix

logger = logging.getLogger(__name__)

DEMO_DATA = Path(
    os.environ.get(
        "CRYID_DEMO_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "donateacry-cc"
    )
)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """amqtt on localhost in a background asyncio loop (anonymous, QoS 1 works with paho 2)."""

    def __init__(self, port: int) -> None:
        from amqtt.broker import Broker

        self.port = port
        self._loop = asyncio.new_event_loop()
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._broker = Broker(config, loop=self._loop)
        self._thread = threading.Thread(target=self._run, name="amqtt", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._broker.start())
        except BaseException as exc:  # reported to the caller of start()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()

    def start(self) -> None:
        self._thread.start()
        self._started.wait(10)
        if self._error is not None or not self._started.is_set():
            raise ValueError(f"could not start the embedded MQTT broker on port {self.port}: {self._error}")

    def stop(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            fut.result(5)
        except (TimeoutError, concurrent.futures.TimeoutError):
            logger.info("the embedded broker took over 5 s to shut down; stopping its loop")
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


class Printer:
    """Subscribes to the room's topics and prints each identification as it arrives."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id="cryid-demo-viewer"
        )
        self.client.on_connect = lambda c, *_: c.subscribe(f"{prefix}/#", qos=1)
        self.client.on_subscribe = lambda *_: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise ValueError(f"the demo could not subscribe at {host}:{port}")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if not ("/baby/" in msg.topic or msg.topic.endswith("/unknown")):
            return
        ev = json.loads(msg.payload)
        with self._lock:
            if any(e["event_id"] == ev["event_id"] for e in self.events):
                return  # at-least-once delivery: de-duplicate by event_id
            self.events.append(ev)
        who = ev["baby_id"] or f"unknown (closest {ev['best_baby_id']})"
        score = "-" if ev["score"] is None else f"{ev['score']:.3f}"
        margin = "-" if ev["margin"] is None else f"{ev['margin']:.3f}"
        tag = "EPISODE   " if ev["kind"] == "episode" else "expiration"
        print(
            f"  {ev['stream_offset_s']:7.2f} s  {tag}  {who:<28} score {score}  margin {margin}  "
            f"n={ev['n_expirations']}  -> {msg.topic}",
            flush=True,
        )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


Candidate = tuple[str, list[np.ndarray], np.ndarray]  # baby id, enrollment recordings, stream bout


def _cries(babies: int, synthetic: bool) -> tuple[list[Candidate], str]:
    """Candidate babies in order (the demo enrolls the first that enroll well, the next stays
    unknown) and where their cries come from."""
    if not synthetic and (DEMO_DATA / "metadata.csv").is_file():
        from cryid.models.segmenter import segment

        out: list[Candidate] = []
        for baby, recs in nursery.real_cries(DEMO_DATA, babies + 8).items():
            counts = [len(segment(r)) for r in recs]
            best = int(np.argmax(counts))
            if counts[best] >= 2 and sum(c > 0 for c in counts) >= 2:
                out.append((baby, [r for k, r in enumerate(recs) if k != best], recs[best]))
        if len(out) > babies:
            return out, f"real cries from {DEMO_DATA} (Donate-a-cry corpus, ODbL)"
    voices = nursery.voices(babies + 1, seed=1)
    out = [
        (f"baby{i + 1}", [nursery.bout(v, 6.0, seed=100 + i)], nursery.bout(v, 3.0, seed=200 + i))
        for i, v in enumerate(voices)
    ]
    return out, "generated cry-like audio (one voice per baby)"


def _demo_thresholds(centroids: dict[str, np.ndarray], configured: IdentifierSettings) -> IdentifierSettings:
    ids = sorted(centroids)
    if len(ids) < 2:
        return configured
    sims = cosine_matrix(np.stack([centroids[b] for b in ids]), np.stack([centroids[b] for b in ids]))
    np.fill_diagonal(sims, -1.0)
    closest = float(sims.max())
    head = max(0.0, 1.0 - closest)
    return configured.model_copy(
        update={
            "min_score": round(max(configured.min_score, closest + head / 3), 4),
            "min_margin": round(min(configured.min_margin, head / 4), 4),
        }
    )


def run_demo(
    settings: Settings,
    babies: int = 3,
    synthetic: bool = False,
    realtime: bool = False,
    keep: Path | None = None,
) -> int:
    """Run the demo; returns 0 when the pipeline ran (the summary says how well it identified)."""
    from cryid.daemon.service import build_service, load_embedder
    from cryid.enrollment.enroll import EnrollmentError
    from cryid.enrollment.registry import Registry

    if not 2 <= babies <= 8:
        raise ValueError(f"--babies {babies}: choose 2 to 8")
    tmp = None if keep else tempfile.TemporaryDirectory(prefix="cryid-demo-")
    state = Path(keep) if keep else Path(tmp.name)  # type: ignore[union-attr]
    state.mkdir(parents=True, exist_ok=True)
    broker: EmbeddedBroker | None = None
    printer: Printer | None = None
    try:
        embedder = load_embedder(settings)
        print(f"cryid demo: model {settings.model} ({embedder.sha256[:12]}), state in {state}")
        candidates, what = _cries(babies, synthetic)
        print(f"enrolling {babies} babies from {what} ...")
        bouts: list[tuple[str | None, np.ndarray]] = []
        with Registry.open(state, settings.registry) as registry:
            for baby, recs, bout in candidates:
                if len(bouts) == babies:
                    bouts.append((None, bout))  # the next baby cries but is not enrolled
                    print(f"  {baby}: not enrolled (plays the unknown baby)")
                    break
                try:
                    res = nursery.enroll(registry, embedder, settings, baby, recs, settings.room)
                except EnrollmentError as exc:
                    print(f"  {baby}: skipped ({exc})")
                    continue
                print(f"  {baby}: {res.n_expirations} expirations, {res.cry_s:.1f} s of cry")
                bouts.append((baby, bout))
            centroids = registry.centroids(embedder.sha256)
        if len(bouts) != babies + 1:
            raise ValueError("not enough usable cries for the demo; try `cryid demo --synthetic`")
        wav, truth = nursery.nursery_stream(bouts, gap_s=6.0, seed=7)
        stream = state / "nursery.wav"
        sf.write(stream, wav, SAMPLE_RATE)
        host, port = settings.mqtt.host, settings.mqtt.port
        if not _reachable(host, port):
            port = port if _port_free(port) else _free_port()
            broker = EmbeddedBroker(port)
            broker.start()
            host = "127.0.0.1"
            print(
                f"no broker at {settings.mqtt.host}:{settings.mqtt.port}: "
                f"started an embedded one on {host}:{port}"
            )
        else:
            print(f"using the MQTT broker at {host}:{port}")
        ident = _demo_thresholds(centroids, settings.identifier)
        run_settings = settings.model_copy(
            update={
                "state_dir": state,
                "identifier": ident,
                "mqtt": settings.mqtt.model_copy(
                    update={"host": host, "port": port, "username": None, "password": None}
                    | ({"protocol": "3.1.1"} if broker is not None else {})  # amqtt has no MQTT 5
                ),
            }
        )
        prefix = run_settings.mqtt.prefix(run_settings.room)
        print(f"thresholds: min_score {ident.min_score}, min_margin {ident.min_margin}; topics {prefix}/#")
        printer = Printer(host, port, prefix)
        print(
            f"replaying {wav.size / SAMPLE_RATE:.0f} s of nursery audio ({stream})"
            f"{' at real speed' if realtime else ''}:"
        )
        service = build_service(run_settings, str(stream), realtime=realtime)
        try:
            code = service.run()
        finally:
            service.close()
        if code:
            raise ValueError(service.fatal or "the daemon stopped with an error")
        _summary(printer.events, truth)
        return 0
    finally:
        if printer is not None:
            printer.close()
        if broker is not None:
            broker.stop()
        if tmp is not None:
            tmp.cleanup()


def _port_free(port: int) -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


def _summary(events: list[dict[str, Any]], truth: list[nursery.Truth]) -> None:
    episodes = [e for e in events if e["kind"] == "episode"]
    right = 0
    print("\nsummary (ground truth vs final episode decisions):")
    for t in truth:
        mine = [e for e in episodes if t.start_s - 0.5 <= e["stream_offset_s"] <= t.end_s]
        said = ", ".join(e["baby_id"] or "unknown" for e in mine) or "nothing"
        ok = bool(mine) and all(e["baby_id"] == t.baby_id for e in mine)
        right += ok
        who = t.baby_id or "not enrolled"
        print(f"  {t.start_s:6.1f}-{t.end_s:6.1f} s  {who:<14} -> {said:<20} {'OK' if ok else 'WRONG'}")
    n_exp = sum(e["kind"] == "expiration" for e in events)
    print(
        f"{right}/{len(truth)} crying episodes identified correctly ({n_exp} provisional expiration events)"
    )
