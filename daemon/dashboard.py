"""``cryid dashboard``: serves the ward's web page (``daemon/dashboard/``) and its ``config.json``.

The page is static (HTML, CSS, JS and the vendored mqtt.js: no build step, no CDN); the browser
itself connects to the broker over MQTT websockets, so this server only hands out files. Any web
server can do the same (``deploy/nginx/cryid-dashboard.conf``); this one adds ``/config.json``
built from ``dashboard.*`` (broker URL, user name, rooms, alert time).

Passwords: ``config.json`` never holds one unless the operator gives ``--password-file`` (or
``dashboard.password_file``). Then the page signs in by itself: meant for the read-only
``dashboard`` user on a wall screen, where nobody can type a password. Anyone who can load the page
can then read that password, so give it only for the read-only user, and serve the page over TLS
(``--tls-cert/--tls-key``, or nginx) on the ward network. Without it the page asks for the user and
password (a nurse signs in as ``nurse`` to get the confirm buttons) and keeps them only for the
browser tab's session.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import os
import ssl
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationError

from cryid.models.errors import SettingsError, validation_message
from cryid.models.strict import StrictModel

if TYPE_CHECKING:
    from cryid.daemon.config import Settings

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "dashboard"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".md": "text/markdown"}


class DashboardSettings(StrictModel):
    """The ward dashboard page (``cryid dashboard``) and the retained state the daemon keeps for it."""

    host: str = Field("127.0.0.1", description="Address the page is served on (0.0.0.0: every interface).")
    port: int = Field(8080, ge=0, le=65535, description="Port the page is served on (0: any free port).")
    broker_url: str = Field(
        "ws://127.0.0.1:9001/",
        pattern=r"^(wss?://\S+|/\S*)$",
        description="The broker's MQTT websockets URL as the browser sees it (wss://HOST:8884/), "
        "or a path on the page's own server (/mqtt behind nginx).",
    )
    username: str | None = Field(
        None, description="Broker user the page signs in as (the read-only `dashboard`); unset: anonymous."
    )
    password_file: Path | None = Field(
        None,
        description="File with that user's password, handed to the page so it signs in by itself "
        "(wall screens; read-only users only). Unset: the page asks for user and password.",
    )
    tls_cert: Path | None = Field(None, description="Certificate (PEM) to serve the page over HTTPS.")
    tls_key: Path | None = Field(None, description="Private key (PEM) of tls_cert.")
    rooms: list[str] = Field(
        default_factory=list, description="Rooms the page follows; empty: the configured `room`."
    )
    alert_after_min: float = Field(
        5.0, gt=0.0, le=600.0, description="A baby crying longer than this is shown as a long-crying alert."
    )
    uncertain_below: float = Field(
        0.8, ge=0.0, le=1.0, description="Episodes with a confidence below this are listed as uncertain."
    )
    silent_below_dbfs: float = Field(
        -80.0, ge=-150.0, le=0.0, description="Microphone level under which the page warns it is silent."
    )
    nurse_users: list[str] = Field(
        default_factory=lambda: ["nurse"],
        description="Users shown the confirm / reassign / not-this-baby buttons (the broker's ACL decides "
        "what they may publish).",
    )
    crying_timeout_s: float = Field(
        30.0,
        gt=0.0,
        le=3600.0,
        description="Daemon: a baby not heard for this long is no longer shown crying (the episode's "
        "final event ends it sooner).",
    )


def page_rooms(settings: Settings, dash: DashboardSettings) -> list[dict[str, str]]:
    """The rooms the page follows (``dashboard.rooms``, else this configuration's rooms), each with its
    topic prefix; a room of this configuration's several-room daemon (``[[sources]]``) also names the
    daemon's own status topic (its last will, docs/mqtt.md#availability) as ``daemon_status``."""
    from cryid.daemon.multi import daemon_status_topic, room_prefix

    own = list(dict.fromkeys(e.room for e in settings.sources or []))  # this daemon's rooms, in order
    several = len(own) > 1
    rooms = []
    for r in dash.rooms or own or [settings.room]:
        if r in own:
            room = {"room": r, "prefix": room_prefix(settings, r, several)}
            if several:
                room["daemon_status"] = daemon_status_topic(settings)
        else:
            room = {"room": r, "prefix": settings.mqtt.prefix(r) if r == settings.room else f"cryid/{r}"}
        rooms.append(room)
    return rooms


def page_config(settings: Settings, dash: DashboardSettings) -> dict[str, Any]:
    """What ``/config.json`` says: broker, user, rooms and display settings (a password only from a file)."""
    cfg: dict[str, Any] = {
        "broker_url": dash.broker_url,
        "username": dash.username,
        "rooms": page_rooms(settings, dash),
        "alert_after_min": dash.alert_after_min,
        "uncertain_below": dash.uncertain_below,
        "silent_below_dbfs": dash.silent_below_dbfs,
        "nurse_users": dash.nurse_users,
        "stats_interval_s": settings.mqtt.stats_interval_s,
        "mqtt_protocol": settings.mqtt.protocol,  # the daemon's broker is the page's broker
    }
    if dash.password_file is not None:
        path = dash.password_file.expanduser()
        try:
            cfg["password"] = path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise SettingsError(
                f"dashboard.password_file: cannot read {path} ({exc.strerror}); fix the path or its "
                "permissions, or leave it out so the page asks for the password"
            ) from exc
        if dash.username is None:
            raise SettingsError(
                "dashboard.password_file is set but dashboard.username is not; give --username"
            )
    return cfg


def static_files(root: Path = STATIC_DIR) -> dict[str, tuple[bytes, str]]:
    """URL path -> (content, type) of every file of the page, read once (nothing else is served)."""
    if not (root / "index.html").is_file():
        raise SettingsError(f"the dashboard's files are missing ({root / 'index.html'}); reinstall cryid")
    files: dict[str, tuple[bytes, str]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            url = "/" + path.relative_to(root).as_posix()
            guess = mimetypes.guess_type(path.name)[0]
            ctype = _TYPES.get(path.suffix) or guess or "application/octet-stream"
            if ctype.startswith("text/"):
                ctype += "; charset=utf-8"
            files[url] = (path.read_bytes(), ctype)
    files["/"] = files["/index.html"]
    return files


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "cryid-dashboard"
    sys_version = ""

    def do_GET(self) -> None:
        self._send(head=False)

    def do_HEAD(self) -> None:
        self._send(head=True)

    def _send(self, head: bool) -> None:
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        if path == "/config.json":
            body, ctype, cache = self.server.config_body, "application/json", "no-store"
        elif path in self.server.files:
            (body, ctype), cache = self.server.files[path], "no-cache"
        else:
            self.send_error(HTTPStatus.NOT_FOUND, "not part of the dashboard")
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class DashboardServer(HTTPServer):
    """One thread, HTTP/1.0 (a connection per request): a handful of screens, small files."""

    def __init__(
        self,
        config: dict[str, Any],
        host: str,
        port: int,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        root: Path = STATIC_DIR,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise SettingsError(
                "give both --tls-cert and --tls-key (dashboard.tls_cert / tls_key), or neither"
            )
        self.files = static_files(root)
        self.config_body = json.dumps(config, indent=1).encode()
        context = None
        if tls_cert is not None and tls_key is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                context.load_cert_chain(str(tls_cert.expanduser()), str(tls_key.expanduser()))
            except (OSError, ssl.SSLError) as exc:
                raise SettingsError(
                    f"cannot load the TLS certificate {tls_cert} / key {tls_key}: {exc}; give PEM files"
                ) from exc
        try:
            super().__init__((host, port), _Handler)
        except OSError as exc:
            raise SettingsError(
                f"cannot serve the dashboard on {host}:{port} ({exc.strerror}); choose another --port/--host"
            ) from exc
        if context is not None:
            self.socket = context.wrap_socket(self.socket, server_side=True)
        self.tls = context is not None

    @property
    def url(self) -> str:
        host = self.server_address[0]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"{'https' if self.tls else 'http'}://{shown}:{self.server_address[1]}/"


def build_server(settings: Settings, dash: DashboardSettings | None = None) -> DashboardServer:
    """The server for ``settings.dashboard`` (or ``dash``), with its ``config.json``."""
    dash = dash or settings.dashboard
    config = page_config(settings, dash)
    server = DashboardServer(config, dash.host, dash.port, dash.tls_cert, dash.tls_key)
    if "password" in config and not server.tls and dash.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "the page hands out the password of %s over plain HTTP on %s; serve it with --tls-cert/--tls-key",
            dash.username,
            dash.host,
        )
    return server


def run_dashboard(settings: Settings, overrides: dict[str, Any]) -> int:
    """``cryid dashboard``: serve until interrupted."""
    try:
        dash = settings.dashboard.model_validate(
            settings.dashboard.model_dump() | {k: v for k, v in overrides.items() if v is not None}
        )
    except ValidationError as exc:
        raise SettingsError(f"dashboard.{validation_message(exc, inputs=True)}; fix it") from exc
    server = build_server(settings, dash)
    print(f"ward dashboard: {server.url} (broker {dash.broker_url}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def page_weight(root: Path = STATIC_DIR) -> dict[str, int]:
    """Bytes the browser loads for the page (every file it requests), by file."""
    names = ["index.html", "dashboard.css", "dashboard.js", "vendor/mqtt.min.js"]
    return {n: os.path.getsize(root / n) for n in names}
