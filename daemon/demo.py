"""``cryid demo``: the main job end to end on a fresh machine, nothing set up, no ward touched.

1. A temporary state directory (or ``--keep DIR``); the configured model (default: the shipped one) with
   its calibration and the configured ``identifier.min_confidence``: the demo decides exactly as the
   daemon would, it invents no threshold.
2. Enrolls a few babies through ``cryid.enrollment`` in the demo's own room ``demo``: real cries from
   ``donateacry-cc`` when it is present (``--data DIR``, else ``CRYID_DEMO_DATA``, else
   ``../shared/data/donateacry-cc`` from the working directory, a fresh clone's folder): each
   baby is enrolled from its first recording session and cries in the stream from a later session, and
   all come from one recording channel, as on a ward with one microphone; else generated cries.
3. Builds a nursery stream: a bout of each enrolled baby and of one baby nobody enrolled, with room
   noise between them, and remembers who cried when.
4. Starts its own MQTT broker (embedded amqtt) on a free port, or uses ``--broker HOST:PORT``; publishes
   only under ``cryid-demo/demo`` with its own client ids, so it never touches a live ward's topics or
   session, subscribes, replays the stream through the daemon's own ``Service`` and prints each
   decision as it is published (confidence; the likeliest candidates), then compares every final
   episode decision with the ground truth: named right, named wrong, not named.
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import soundfile as sf
from paho.mqtt.enums import CallbackAPIVersion

from cryid.daemon import nursery
from cryid.daemon.config import Settings
from cryid.daemon.service import ServiceError
from cryid.models.audio import SAMPLE_RATE
from cryid.models.errors import UsageError

logger = logging.getLogger(__name__)

# Relative to the working directory: the README runs `cryid demo` in a fresh clone, beside ../shared.
DEFAULT_DEMO_DATA = Path("..") / "shared" / "data" / "donateacry-cc"
DEMO_ROOM = "demo"
DEMO_PREFIX = "cryid-demo/demo"  # never cryid/<room>: a live ward's daemon and dashboards live there
# A ward hears every baby through one microphone. donateacry-cc infants were recorded by different
# phones (true 16 kHz iOS audio, or 8 kHz AMR); a room mixing them lets the model tell phones apart
# instead of babies, and a baby nobody enrolled is then confidently "found" as the one enrolled baby
# with its phone type. The demo's room therefore takes its babies from one channel.
DEMO_CHANNEL = "ios-ima4-16k"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_broker(spec: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``HOST``: port 1883) of ``--broker``."""
    host, _, port = spec.rpartition(":") if ":" in spec else (spec, "", "1883")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"--broker {spec!r}: give HOST:PORT, e.g. 127.0.0.1:1883")
    return host, int(port)


class EmbeddedBroker:
    """amqtt on localhost in a background asyncio loop (anonymous, QoS 1 works with paho 2)."""

    def __init__(self, port: int, ws_port: int | None = None) -> None:
        from amqtt.broker import Broker

        self.port = port
        self.ws_port = ws_port  # a websockets listener too, for the dashboard (`cryid demo --dashboard`)
        self._loop = asyncio.new_event_loop()
        listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}}
        if ws_port is not None:
            listeners["ws"] = {"type": "ws", "bind": f"127.0.0.1:{ws_port}"}
        config = {
            "listeners": listeners,
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._broker = Broker(config, loop=self._loop)
        # amqtt warns "Received PUBACK for unknown pending message" when a client acknowledges a message it
        # sent again while the demo shuts down its connections: broker chatter, not the demo's news.
        logging.getLogger("amqtt.mqtt.protocol.handler").setLevel(logging.ERROR)
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
            raise ServiceError(f"could not start the embedded MQTT broker on port {self.port}: {self._error}")

    def stop(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            fut.result(5)
        except (TimeoutError, concurrent.futures.TimeoutError):
            logger.info("the embedded broker took over 5 s to shut down; stopping its loop")
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


def _probability(c: dict[str, Any]) -> str:
    """A candidate's probability, or its cosine score when the model has no calibration."""
    return f" cos {c['score']:.2f}" if c.get("probability") is None else f" {c['probability']:.2f}"


def describe(ev: dict[str, Any]) -> str:
    """One line for an event: the decision, its confidence, and the likeliest candidates."""
    conf = "-" if ev.get("confidence") is None else f"{ev['confidence']:.2f}"
    cands = ", ".join(f"{c['baby_id']}{_probability(c)}" for c in ev.get("candidates") or [])
    if ev["baby_id"]:
        return f"{ev['baby_id']:<10} named      confidence {conf}  (candidates {cands or '-'})"
    return f"{'-':<10} not named  confidence {conf}  probably {cands or 'nobody enrolled'}"


class Printer:
    """Subscribes to the demo's topics and prints each identification as it arrives."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        self.events: list[dict[str, Any]] = []
        self.prefix = prefix
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._retained: set[str] = set()  # topics that arrived retained with a payload
        self._last_message = time.monotonic()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"cryid-demo-viewer-{os.getpid()}"
        )
        self.client.on_connect = lambda c, *_: c.subscribe(f"{prefix}/#", qos=1)
        self.client.on_subscribe = lambda *_: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise ServiceError(f"the demo could not subscribe at {host}:{port}")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self._last_message = time.monotonic()
            if msg.retain and msg.payload:
                self._retained.add(msg.topic)
        is_event = "/baby/" in msg.topic or msg.topic.endswith("/unknown")
        if msg.retain or msg.topic.endswith("/state") or not is_event:
            return
        ev = json.loads(msg.payload)
        with self._lock:
            if any(e["event_id"] == ev["event_id"] for e in self.events):
                return  # at-least-once delivery: de-duplicate by event_id
            self.events.append(ev)
        tag = "EPISODE   " if ev["kind"] == "episode" else "expiration"
        print(
            f"  {ev['stream_offset_s']:7.2f} s  {tag}  {describe(ev)}  n={ev['n_expirations']}"
            f"  -> {msg.topic}",
            flush=True,
        )

    def clear_retained(self, quiet_s: float = 0.5, limit_s: float = 5.0) -> list[str]:
        """Remove every retained topic the demo left under its prefix (status, roster, baby states) from a
        broker that outlives the demo: subscribe again (the broker resends what it retains), then clear
        each with an empty retained message. Returns the cleared topics."""
        with self._lock:
            self._retained.clear()
            self._last_message = time.monotonic()
        self._ready.clear()
        self.client.subscribe(f"{self.prefix}/#", qos=1)
        self._ready.wait(5)
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            with self._lock:
                if time.monotonic() - self._last_message >= quiet_s:
                    break
            time.sleep(0.05)
        with self._lock:
            topics = sorted(self._retained)
        for topic in topics:
            self.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        return topics

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass(frozen=True)
class DemoBaby:
    """A baby of the demo: enrollment recordings and the bout it cries in the stream."""

    baby_id: str
    enrollment: list[np.ndarray]
    bout: np.ndarray


def demo_data(data: Path | None = None) -> Path:
    """Where the demo looks for real cries: ``--data``, else ``CRYID_DEMO_DATA``, else
    ``DEFAULT_DEMO_DATA``; an explicit ``--data`` must hold the data set."""
    if data is None:
        return Path(os.environ.get("CRYID_DEMO_DATA") or DEFAULT_DEMO_DATA)
    if not (Path(data) / "metadata.csv").is_file():
        raise UsageError(
            f"--data {data}: no metadata.csv there; give the donateacry-cc folder or drop --data"
        )
    return Path(data)


def _cries(babies: int, synthetic: bool, seed: int | None, data: Path) -> tuple[list[DemoBaby], str]:
    """Candidate babies in order (the demo enrolls the first that enroll well, the next stays unknown)
    and where their cries come from."""
    if not synthetic and (data / "metadata.csv").is_file():
        out = [
            DemoBaby(b.baby_id, b.birth, np.concatenate(b.later))
            for b in nursery.real_cries(data, babies + 8, seed, channel=DEMO_CHANNEL)
        ]
        if len(out) > babies:
            return out, (
                f"real cries from {data} (Donate-a-cry corpus, ODbL; one recording channel, "
                f"{DEMO_CHANNEL}, as one ward microphone): enrolled from a first recording session, crying "
                "from a later one"
            )
    voices = nursery.voices(babies + 1, seed=1 if seed is None else seed)
    out = [
        DemoBaby(f"baby{i + 1}", [nursery.bout(v, 6.0, seed=100 + i)], nursery.bout(v, 3.0, seed=200 + i))
        for i, v in enumerate(voices)
    ]
    return out, "generated cry-like audio (one voice per baby)"


def _decision_rule(settings: Settings, calibration: Any) -> str:
    ident = settings.identifier
    if calibration is None:
        min_score = ident.fallback_min_score if ident.min_score is None else ident.min_score
        min_margin = ident.fallback_min_margin if ident.min_margin is None else ident.min_margin
        return (
            f"the model has NO calibration: a baby is named on cosine thresholds (min_score {min_score}, "
            f"min_margin {min_margin}); fix: `cryid model calibrate {settings.model} --data DIR`"
        )
    rule = f"a baby is named when its calibrated confidence >= min_confidence {ident.min_confidence}"
    if ident.min_confidence_unconfirmed >= 1.0:
        rule += " once a nurse has confirmed one of its cries (never from birth recordings alone)"
    else:
        rule += f" (min_confidence_unconfirmed {ident.min_confidence_unconfirmed} until a cry is confirmed)"
    extra = [f"{k} {getattr(ident, k)}" for k in ("min_score", "min_margin") if getattr(ident, k) is not None]
    fitted = calibration.data or "unknown data"
    if calibration.fitted_at:
        fitted += f", {calibration.fitted_at}"
    return rule + (f" and {' and '.join(extra)}" if extra else "") + f" (calibration: {fitted})"


def run_demo(
    settings: Settings,
    babies: int = 3,
    synthetic: bool = False,
    realtime: bool = False,
    keep: Path | None = None,
    broker: str | None = None,
    seed: int | None = None,
    dashboard: bool = False,
    data: Path | None = None,
) -> int:
    """Run the demo; returns 0 when the pipeline ran (the summary says how well it identified)."""
    from cryid.daemon.service import build_service, load_embedder
    from cryid.enrollment.enroll import EnrollmentError
    from cryid.enrollment.registry import Registry

    if not 2 <= babies <= 8:
        raise UsageError(f"--babies {babies}: choose 2 to 8")
    host, port = parse_broker(broker) if broker else ("127.0.0.1", 0)
    data_dir = demo_data(data)
    tmp = None if keep else tempfile.TemporaryDirectory(prefix="cryid-demo-")
    state = Path(keep) if keep else Path(tmp.name)  # type: ignore[union-attr]
    state.mkdir(parents=True, exist_ok=True)
    embedded: EmbeddedBroker | None = None
    printer: Printer | None = None
    web: Any = None  # the dashboard's server (--dashboard)
    try:
        embedder = load_embedder(settings)
        calibration = embedder.manifest.calibration
        print(f"cryid demo: model {settings.model} ({embedder.sha256[:12]}), state in {state}")
        candidates, what = _cries(babies, synthetic, seed, data_dir)
        print(f"enrolling {babies} babies in room {DEMO_ROOM!r} from {what} ...")
        demo_settings = settings.model_copy(update={"room": DEMO_ROOM, "state_dir": state})
        bouts: list[tuple[str | None, np.ndarray]] = []
        with Registry.open(state, settings.registry) as registry:
            for baby in candidates:
                if len(bouts) == babies:
                    bouts.append((None, baby.bout))  # the next baby cries but is not enrolled
                    print(f"  {baby.baby_id}: not enrolled (plays the baby nobody enrolled)")
                    break
                try:
                    res = nursery.enroll(
                        registry, embedder, demo_settings, baby.baby_id, baby.enrollment, DEMO_ROOM
                    )
                except EnrollmentError as exc:
                    print(f"  {baby.baby_id}: skipped ({exc})")
                    continue
                print(f"  {baby.baby_id}: {res.n_expirations} expirations, {res.cry_s:.1f} s of cry")
                bouts.append((baby.baby_id, baby.bout))
        if len(bouts) != babies + 1:
            raise ServiceError("not enough usable cries for the demo; try `cryid demo --synthetic`")
        wav, truth = nursery.nursery_stream(bouts, gap_s=6.0, seed=7)
        stream = state / "nursery.wav"
        sf.write(stream, wav, SAMPLE_RATE)
        if broker is None:
            port = _free_port()
            embedded = EmbeddedBroker(port, ws_port=_free_port() if dashboard else None)
            embedded.start()
            print(f"started the demo's own MQTT broker on {host}:{port}")
        else:
            print(f"using the MQTT broker at {host}:{port} (demo topics only)")
        run_settings = demo_settings.model_copy(
            update={
                "mqtt": settings.mqtt.model_copy(
                    update={
                        "host": host, "port": port, "username": None, "password": None,
                        "password_file": None, "tls": False, "ca_file": None,
                        "client_id": f"cryid-demo-{os.getpid()}", "topic_prefix": DEMO_PREFIX,
                    }
                    | ({"protocol": "3.1.1"} if embedded is not None else {}),  # amqtt has no MQTT 5
                ),
            }
        )
        print(f"decisions: {_decision_rule(settings, calibration)}")
        print(f"topics: {DEMO_PREFIX}/# (never a ward's cryid/<room>)")
        printer = Printer(host, port, DEMO_PREFIX)
        if dashboard:
            web = _start_dashboard(run_settings, embedded)
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
            raise ServiceError(service.fatal or "the daemon stopped with an error")
        if embedded is None:
            printer.clear_retained()
        summary(printer.events, truth)
        if web is not None:
            _wait_for_ctrl_c()
        return 0
    finally:
        if web is not None:
            web.shutdown()
            web.server_close()
        if printer is not None:
            printer.close()
        if embedded is not None:
            embedded.stop()
        if tmp is not None:
            tmp.cleanup()


def _truth_of(ev: dict[str, Any], truth: list[nursery.Truth]) -> nursery.Truth | None:
    return next((t for t in truth if t.start_s - 0.5 <= ev["stream_offset_s"] <= t.end_s), None)


def summary(events: list[dict[str, Any]], truth: list[nursery.Truth]) -> dict[str, int]:
    """Print every final episode decision against the ground truth; returns the counts."""
    episodes = sorted((e for e in events if e["kind"] == "episode"), key=lambda e: e["stream_offset_s"])
    counts = dict.fromkeys(
        ("named right", "named wrong", "not named", "not named (nobody enrolled)", "not named (no cry)"), 0
    )
    first = 0  # unnamed cries of enrolled babies whose likeliest candidate was the right baby
    print("\nsummary (final episode decisions vs ground truth):")
    for ev in episodes:
        t = _truth_of(ev, truth)
        who = "no cry" if t is None else (t.baby_id or "not enrolled")
        if ev["baby_id"] is None:
            if t is None:
                verdict = "not named (no cry)"
            else:
                verdict = "not named" if t.baby_id else "not named (nobody enrolled)"
            cands = ev.get("candidates") or []
            if verdict == "not named" and cands and t is not None and cands[0]["baby_id"] == t.baby_id:
                first += 1
        else:
            verdict = "named right" if t is not None and ev["baby_id"] == t.baby_id else "named wrong"
        counts[verdict] += 1
        print(f"  {ev['stream_offset_s']:6.1f} s  {who:<12} -> {describe(ev)}  {verdict.upper()}")
    heard = {id(t) for e in episodes if (t := _truth_of(e, truth)) is not None}
    missed = [t for t in truth if id(t) not in heard]
    for t in missed:
        print(f"  {t.start_s:6.1f} s  {t.baby_id or 'not enrolled':<12} -> no episode (no cry detected)")
    n_exp = sum(e["kind"] == "expiration" for e in events)
    print(
        f"{len(episodes)} episodes: {counts['named right']} named right, "
        f"{counts['named wrong']} named WRONG, "
        f"{counts['not named']} enrolled babies not named, {counts['not named (nobody enrolled)']} cries of "
        f"the baby nobody enrolled not named, {counts['not named (no cry)']} other sounds not named "
        f"({n_exp} provisional expiration events); the right baby was "
        f"the likeliest candidate of {first} of the {counts['not named']} unnamed cries of enrolled babies"
    )
    return counts



def _start_dashboard(settings: Settings, broker: EmbeddedBroker | None) -> Any:
    """``--dashboard``: serve the ward page beside the demo's broker and print its URL."""
    from cryid.daemon.dashboard import DashboardServer, page_config

    dash = settings.dashboard
    if broker is not None and broker.ws_port is not None:
        url, where = f"ws://127.0.0.1:{broker.ws_port}/", "the embedded broker's websockets listener"
        anonymous = {"broker_url": url, "username": None, "password_file": None, "rooms": []}
        dash = dash.model_copy(update=anonymous)
    else:
        where = "dashboard.broker_url: that broker needs a websockets listener"
    port = dash.port if _port_free(dash.port) else 0
    server = DashboardServer(page_config(settings, dash), dash.host, port, dash.tls_cert, dash.tls_key)
    threading.Thread(target=server.serve_forever, name="dashboard", daemon=True).start()
    print(f"ward dashboard: open {server.url} in a browser (broker {dash.broker_url}, {where})", flush=True)
    return server


def _wait_for_ctrl_c() -> None:
    print("the dashboard stays up to be looked at; Ctrl-C ends the demo", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        print("demo ended")


def _port_free(port: int) -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
