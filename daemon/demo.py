"""``cryid demo``: the main job end to end on a fresh machine, nothing set up, no ward touched.

1. A temporary state directory (or ``--keep DIR``); the configured model (default: the shipped one) with
   its calibration and the configured ``identifier`` thresholds: the demo decides exactly as the daemon
   would, it invents no threshold.
2. Enrolls a few babies through ``cryid.enrollment`` in the demo's own room ``demo``: real cries from
   ``donateacry-cc`` when it is present (``--data DIR``, else ``CRYID_DEMO_DATA``, else
   ``../shared/data/donateacry-cc`` from the working directory, a fresh clone's folder): each
   baby is enrolled from its first recording session and cries in the streams from a later session, and
   all come from one recording channel, as on a ward with one microphone; else generated cries. A baby's
   later cries are split in two (:func:`cryid.daemon.nursery.split_later`): the first part cries in act 1,
   the rest in act 2.
3. Starts its own MQTT broker (embedded amqtt) on a free port, or uses ``--broker HOST:PORT``; publishes
   only under ``cryid-demo/demo`` with its own client ids, so it never touches a live ward's topics or
   session, and prints each decision as it is published (confidence; for an unnamed one why, and the
   likeliest candidates).
4. Act 1: a nursery stream (a bout of each enrolled baby and of one baby nobody enrolled, room noise
   between them) replayed through the daemon's own ``Service``; no cry is confirmed yet, so with the
   default ``identifier.min_confidence_unconfirmed`` nobody is named. Every final episode decision is
   compared with the ground truth: named right, named wrong, not named.
5. The nurse: for each enrolled baby, the first act-1 episode that was truly that baby's is confirmed
   through :func:`cryid.enrollment.feedback.confirm`, the call behind ``cryid enroll confirm``, on the
   episode the daemon kept in the registry.
6. Act 2: a second stream of other later cries of the same babies (and of the baby nobody enrolled),
   replayed by a fresh daemon run on the same state directory; a confirmed baby can now be named at
   ``identifier.min_confidence``. The same honest summary follows.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from cryid.daemon import nursery
from cryid.daemon.config import Settings
from cryid.daemon.demo_mqtt import EmbeddedBroker, Printer, describe, free_port, parse_broker
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
NURSE = "demo nurse"  # who confirms the cries between the acts (`--by` of `cryid enroll confirm`)


@dataclass(frozen=True)
class DemoBaby:
    """A baby of the demo: enrollment recordings and the bouts it cries in act 1 and act 2 (other cries)."""

    baby_id: str
    enrollment: list[np.ndarray]
    bout: np.ndarray
    bout2: np.ndarray


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
            DemoBaby(b.baby_id, b.birth, *nursery.split_later(b.later))
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
        DemoBaby(
            f"baby{i + 1}",
            [nursery.bout(v, 6.0, seed=100 + i)],
            nursery.bout(v, 3.0, seed=200 + i),
            nursery.bout(v, 3.0, seed=300 + i),
        )
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
    """Run the demo; returns 0 when the pipeline ran (the summaries say how well it identified)."""
    from cryid.daemon.service import load_embedder

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
        enrolled, stranger = _enroll(demo_settings, embedder, candidates, babies)
        if broker is None:
            port = free_port()
            embedded = EmbeddedBroker(port, ws_port=free_port() if dashboard else None)
            embedded.start()
            print(f"started the demo's own MQTT broker on {host}:{port}")
        else:
            print(f"using the MQTT broker at {host}:{port} (demo topics only)")
        run_settings = demo_settings.model_copy(
            update={
                "mqtt": settings.mqtt.model_copy(
                    update={
                        "host": host,
                        "port": port,
                        "username": None,
                        "password": None,
                        "password_file": None,
                        "tls": False,
                        "ca_file": None,
                        "client_id": f"cryid-demo-{os.getpid()}",
                        "topic_prefix": DEMO_PREFIX,
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

        cast = [*enrolled, stranger]
        print(f"\nact 1: each baby cries once; no cry is confirmed yet{_act1_rule(settings, calibration)}")
        act1 = [(b.baby_id if b is not stranger else None, b.bout) for b in cast]
        events, truth = _act(run_settings, state / "nursery.wav", act1, 7, realtime, printer)
        summary(events, truth, "act 1")

        print(
            "\nthe nurse picks each crying baby up and confirms one of its cries "
            "(`cryid enroll confirm EPISODE_ID BABY_ID`):"
        )
        nurse_confirms(run_settings, embedder, events, truth, [b.baby_id for b in enrolled])

        print(
            "\nact 2: other later cries of the same babies, heard by a fresh daemon run on the same registry"
        )
        act2 = [(b.baby_id if b is not stranger else None, b.bout2) for b in reversed(cast)]
        events2, truth2 = _act(run_settings, state / "nursery-2.wav", act2, 8, realtime, printer)
        summary(events2, truth2, "act 2")
        if embedded is None:
            printer.clear_retained()
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


def _act1_rule(settings: Settings, calibration: Any) -> str:
    unconfirmed = settings.identifier.min_confidence_unconfirmed
    if calibration is None:
        return " (an uncalibrated model names on cosine thresholds, confirmed or not)"
    if unconfirmed >= 1.0:
        return ", so the daemon names nobody: it lists the likeliest babies"
    return f", so a baby is named only at min_confidence_unconfirmed {unconfirmed}"


def _enroll(
    settings: Settings, embedder: Any, candidates: list[DemoBaby], babies: int
) -> tuple[list[DemoBaby], DemoBaby]:
    """Enroll the first ``babies`` candidates that enroll well; the next one plays the baby nobody
    enrolled. Returns (enrolled, stranger)."""
    from cryid.enrollment.enroll import EnrollmentError
    from cryid.enrollment.registry import Registry

    enrolled: list[DemoBaby] = []
    with Registry.open(settings.state_dir, settings.registry) as registry:
        for baby in candidates:
            if len(enrolled) == babies:
                print(f"  {baby.baby_id}: not enrolled (plays the baby nobody enrolled)")
                return enrolled, baby
            try:
                res = nursery.enroll(registry, embedder, settings, baby.baby_id, baby.enrollment, DEMO_ROOM)
            except EnrollmentError as exc:
                print(f"  {baby.baby_id}: skipped ({exc})")
                continue
            print(f"  {baby.baby_id}: {res.n_expirations} expirations, {res.cry_s:.1f} s of cry")
            enrolled.append(baby)
    raise ServiceError("not enough usable cries for the demo; try `cryid demo --synthetic`")


def _act(
    settings: Settings,
    stream: Path,
    bouts: list[tuple[str | None, np.ndarray]],
    seed: int,
    realtime: bool,
    printer: Printer,
) -> tuple[list[dict[str, Any]], list[nursery.Truth]]:
    """One act: a nursery stream of ``bouts`` written to ``stream`` and replayed by a daemon run of its
    own (the state directory, registry and outbox are the demo's); returns the events and the truth."""
    from cryid.daemon.service import build_service

    wav, truth = nursery.nursery_stream(bouts, gap_s=6.0, seed=seed)
    sf.write(stream, wav, SAMPLE_RATE)
    print(
        f"replaying {wav.size / SAMPLE_RATE:.0f} s of nursery audio ({stream})"
        f"{' at real speed' if realtime else ''}:"
    )
    service = build_service(settings, str(stream), realtime=realtime)
    try:
        code = service.run()
    finally:
        service.close()
    if code:
        raise ServiceError(service.fatal or "the daemon stopped with an error")
    return printer.take(), truth


def nurse_confirms(
    settings: Settings,
    embedder: Any,
    events: list[dict[str, Any]],
    truth: list[nursery.Truth],
    baby_ids: list[str],
) -> list[Any]:
    """The nurse between the acts: for each of ``baby_ids``, the first final episode whose ground truth is
    that baby is confirmed as it, through :func:`cryid.enrollment.feedback.confirm` (what ``cryid enroll
    confirm EPISODE_ID BABY_ID`` calls) on the episode the daemon kept in the registry. Returns the
    confirmations (:class:`cryid.enrollment.episodes.Feedback`)."""
    from cryid.enrollment import feedback
    from cryid.enrollment.registry import Registry

    episodes = sorted((e for e in events if e["kind"] == "episode"), key=lambda e: e["stream_offset_s"])
    done = []
    with Registry.open(settings.state_dir, settings.registry) as registry:
        for baby_id in baby_ids:
            ev = next((e for e in episodes if getattr(_truth_of(e, truth), "baby_id", None) == baby_id), None)
            if ev is None:
                print(f"  no cry of {baby_id} was heard in act 1: nothing to confirm, it stays unconfirmed")
                continue
            f = feedback.confirm(
                registry, ev["episode_id"], baby_id, settings.registry, by=NURSE, via="cli", room=DEMO_ROOM
            )
            print(
                f"  nurse confirms the cry at {ev['stream_offset_s']:.1f} s as baby {baby_id} "
                f"(confirmation {f.confirmation_id}: `cryid enroll confirm {ev['episode_id']} {baby_id}`, "
                f"{f.n_expirations} expiration{'s' if f.n_expirations != 1 else ''})"
            )
            done.append(f)
        _, confirmed = registry.references(embedder.sha256, DEMO_ROOM, getattr(embedder, "dim", None))
    rule = (
        f"can name those babies at min_confidence {settings.identifier.min_confidence}"
        if embedder.manifest.calibration is not None
        else "names on cosine thresholds (the model has no calibration)"
    )
    print(
        f"registry: confirmed references for {', '.join(sorted(confirmed)) or 'no baby'}; the daemon scores "
        f"them beside the birth references and {rule}"
    )
    return done


def _truth_of(ev: dict[str, Any], truth: list[nursery.Truth]) -> nursery.Truth | None:
    return next((t for t in truth if t.start_s - 0.5 <= ev["stream_offset_s"] <= t.end_s), None)


def _n(count: int, one: str, many: str) -> str:
    """``1 cry``, ``2 cries``."""
    return f"{count} {one if count == 1 else many}"


def summary(
    events: list[dict[str, Any]], truth: list[nursery.Truth], title: str = "summary"
) -> dict[str, int]:
    """Print every final episode decision against the ground truth; returns the counts."""
    episodes = sorted((e for e in events if e["kind"] == "episode"), key=lambda e: e["stream_offset_s"])
    counts = dict.fromkeys(
        ("named right", "named wrong", "not named", "not named (nobody enrolled)", "not named (no cry)"), 0
    )
    first = 0  # unnamed cries of enrolled babies whose likeliest candidate was the right baby
    print(f"\n{title} (final episode decisions vs ground truth):")
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
    missed_enrolled = counts["not named"]
    print(
        f"{_n(len(episodes), 'episode', 'episodes')}: {counts['named right']} named right, "
        f"{counts['named wrong']} named WRONG, "
        f"{_n(missed_enrolled, 'cry', 'cries')} of enrolled babies not named, "
        f"{_n(counts['not named (nobody enrolled)'], 'cry', 'cries')} of the baby nobody enrolled not named, "
        f"{_n(counts['not named (no cry)'], 'other sound', 'other sounds')} not named "
        f"({_n(n_exp, 'provisional expiration event', 'provisional expiration events')}); "
        f"the right baby was the likeliest candidate of {first} of the "
        f"{_n(missed_enrolled, 'unnamed cry', 'unnamed cries')} of enrolled babies"
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
