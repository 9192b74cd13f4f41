"""Sub-commands of the daemon layer: run, devices, demo, config check, schema."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from cryid.daemon.config import Settings

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the daemon's sub-commands to ``cryid``'s parser."""
    run = sub.add_parser("run", help="listen and publish identifications on MQTT (the daemon)")
    run.add_argument(
        "--source",
        default="mic",
        help="mic (default), an audio file (WAV, FLAC, ...), or - for raw s16le 16 kHz stdin",
    )
    run.add_argument(
        "--realtime", action="store_true", help="play a file at real speed (default: as fast as possible)"
    )
    run.add_argument(
        "--config", type=Path, default=argparse.SUPPRESS, help="TOML config file (or CRYID_CONFIG)"
    )
    run.set_defaults(func=cmd_run)

    devices = sub.add_parser("devices", help="list the audio input devices")
    devices.set_defaults(func=cmd_devices)

    demo = sub.add_parser(
        "demo",
        help="the whole job end to end on a fresh machine: enroll, replay, identify (own broker and "
        "topics: never a ward's)",
    )
    demo.add_argument("--babies", type=int, default=3, help="babies to enroll (2-8)")
    demo.add_argument(
        "--synthetic", action="store_true", help="use generated cries even when real ones exist"
    )
    demo.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="DIR",
        help="real cries in CryCeleb layout (default: CRYID_DEMO_DATA, else ../shared/data/donateacry-cc "
        "from the working directory; generated cries when absent)",
    )
    demo.add_argument("--realtime", action="store_true", help="replay the nursery stream at real speed")
    demo.add_argument(
        "--keep", type=Path, default=None, help="keep the demo state (registry, outbox, stream) here"
    )
    demo.add_argument(
        "--broker",
        default=None,
        metavar="HOST:PORT",
        help="publish on this MQTT broker (anonymous, demo topics cryid-demo/... only) instead of the "
        "demo's own embedded one",
    )
    demo.add_argument(
        "--seed", type=int, default=None, help="pick other babies (shuffled by this seed) than the default"
    )
    demo.add_argument(
        "--dashboard", action="store_true", help="also serve the ward dashboard beside the demo's broker"
    )
    demo.set_defaults(func=cmd_demo)

    config = sub.add_parser("config", help="show or check the configuration")
    csub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = csub.add_parser("check", help="print the effective configuration (secrets masked)")
    check.add_argument("--json", action="store_true", help="JSON instead of TOML")
    check.add_argument(
        "--config", type=Path, default=argparse.SUPPRESS, help="TOML config file (or CRYID_CONFIG)"
    )
    check.set_defaults(func=cmd_config_check)

    schema = sub.add_parser("schema", help="print the JSON Schema of the MQTT payloads")
    schema.set_defaults(func=cmd_schema)

    register_dashboard(sub)


def register_dashboard(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``cryid dashboard``: defaults from ``dashboard.*`` in the configuration."""
    dash = sub.add_parser("dashboard", help="serve the ward's web page (it connects to the broker itself)")
    dash.add_argument("--host", default=None, help="address to serve on (dashboard.host)")
    dash.add_argument("--port", type=int, default=None, help="port to serve on (dashboard.port)")
    dash.add_argument("--broker-url", default=None, help="broker websockets URL, ws(s)://HOST:PORT/")
    dash.add_argument("--username", default=None, help="broker user the page signs in as")
    dash.add_argument(
        "--password-file", type=Path, default=None, help="that user's password, handed to the page"
    )
    dash.add_argument("--tls-cert", type=Path, default=None, help="serve over HTTPS with this certificate")
    dash.add_argument("--tls-key", type=Path, default=None, help="private key of --tls-cert")
    dash.add_argument(
        "--config", type=Path, default=argparse.SUPPRESS, help="TOML config file (or CRYID_CONFIG)"
    )
    dash.set_defaults(func=cmd_dashboard)


# --------------------------------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from cryid.daemon.service import build_service

    service: Any
    if settings.sources is not None:  # several microphones / rooms: cryid.daemon.multi
        from cryid.daemon.multi import build_multi_service
        from cryid.daemon.sourcelist import SourcesError

        if args.source != "mic":
            raise SourcesError(f"--source {args.source} and a sources list are both given; use one of them")
        service = build_multi_service(settings, getattr(args, "config", None))
    else:
        service = build_service(settings, args.source, args.realtime, getattr(args, "config", None))
    service.install_signal_handlers()
    code = service.run()
    service.close()
    if code and service.fatal:
        print(f"cryid: error: {service.fatal}", file=sys.stderr)
    return code


def cmd_devices(args: argparse.Namespace, settings: Settings) -> int:
    from cryid.daemon.sources import list_input_devices

    devices = list_input_devices()
    if not devices:
        print("no audio input devices found (is a microphone connected? is the user in group 'audio'?)")
        return 1
    from cryid.daemon.sourcelist import devices_snippet

    for d in devices:
        print(d)
    print("\n# one [[sources]] table per microphone, for the configuration file (set each room):\n")
    print(devices_snippet(devices), end="")
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from cryid.daemon.demo import run_demo

    return run_demo(
        settings,
        babies=args.babies,
        synthetic=args.synthetic,
        realtime=args.realtime,
        keep=args.keep,
        broker=args.broker,
        seed=args.seed,
        dashboard=args.dashboard,
        data=args.data,
    )


# ------------------------------------------------------------------------------------ config
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _inline(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_inline(x)}" for k, x in v.items() if x is not None) + "}"
    return _toml_value(v)


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Settings as TOML (unset values as comments), ready to copy into a config file."""
    lines: list[str] = []
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for k, v in data.items():
        if isinstance(v, dict) or _is_table_list(v):
            continue
        lines.append(f"# {k} = (unset)" if v is None else f"{k} = {_toml_value(v)}")
    for k, v in data.items():  # [[sources]]: an array of tables
        for item in v if _is_table_list(v) else []:
            lines.append(f"\n[[{prefix}{k}]]")
            lines += [f"{ik} = {_inline(iv)}" for ik, iv in item.items() if iv is not None]
    for k, v in tables.items():
        name = f"{prefix}{k}"
        lines.append(f"\n[{name}]")
        lines.append(to_toml(v, name + ".").strip("\n"))
    return "\n".join(lines) + "\n"


def masked(settings: Settings) -> dict[str, Any]:
    """The effective settings with secrets replaced by ``**********``."""
    return settings.model_dump(mode="json")  # SecretStr dumps masked


def cmd_config_check(args: argparse.Namespace, settings: Settings) -> int:
    from cryid.models.manifest import load_manifest

    settings.mqtt.resolved_password()  # an unreadable password file is an error here, not at 3 a.m.
    load_manifest(Path(settings.model).expanduser())  # so is a missing or broken model
    from cryid.daemon.sourcelist import resolve_sources

    resolve_sources(settings)  # and a sources list that cannot work
    data = masked(settings)
    print(json.dumps(data, indent=2) if args.json else to_toml(data), end="" if not args.json else "\n")
    return 0


def cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    from cryid.daemon.events import schema_text

    print(schema_text())
    return 0


def cmd_dashboard(args: argparse.Namespace, settings: Settings) -> int:
    from cryid.daemon.dashboard import run_dashboard

    names = ("host", "port", "broker_url", "username", "password_file", "tls_cert", "tls_key")
    return run_dashboard(settings, {n: getattr(args, n) for n in names})
