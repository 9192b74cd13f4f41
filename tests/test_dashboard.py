"""``cryid dashboard``: the server (files, config.json, headers, TLS), its CLI errors, the shipped files
(vendored mqtt.js, wheel contents) and the page's colour contrast. The page itself runs in a real
browser in tests/test_dashboard_browser.py."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import ssl
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cryid.daemon.config import MqttSettings, Settings
from cryid.daemon.dashboard import (
    CSP,
    STATIC_DIR,
    DashboardServer,
    DashboardSettings,
    build_server,
    page_config,
)
from cryid.daemon.events import BabyState, Roster
from tests.fixtures.broker import free_port
from tests.test_deploy import test_root  # noqa: F401 (the fixture: a test root for install.sh)

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, **kw: object) -> list[str]:
    return [sys.executable, "-m", "cryid.daemon.cli", *args]


@pytest.fixture()
def running() -> Iterator[list[DashboardServer]]:
    servers: list[DashboardServer] = []
    yield servers
    for s in servers:
        s.shutdown()
        s.server_close()


def _start(server: DashboardServer, servers: list[DashboardServer]) -> DashboardServer:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    servers.append(server)
    return server


def _get(server: DashboardServer, path: str, method: str = "GET") -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    conn.request(method, path)
    return conn.getresponse()


def test_config_json_names_broker_user_and_rooms_but_no_password(running: list[DashboardServer]) -> None:
    settings = Settings(
        room="ward1",
        dashboard=DashboardSettings(
            port=0,
            broker_url="wss://broker.ward.example:8884/",
            username="dashboard",
            rooms=["ward1", "ward2"],
        ),
    )
    server = _start(build_server(settings), running)
    resp = _get(server, "/config.json")
    assert resp.status == 200 and resp.getheader("Cache-Control") == "no-store"
    cfg = json.loads(resp.read())
    assert cfg["broker_url"] == "wss://broker.ward.example:8884/" and cfg["username"] == "dashboard"
    assert "password" not in cfg
    assert cfg["rooms"] == [
        {"room": "ward1", "prefix": "cryid/ward1"},
        {"room": "ward2", "prefix": "cryid/ward2"},
    ]
    assert cfg["alert_after_min"] == 5.0 and cfg["nurse_users"] == ["nurse"]
    assert cfg["mqtt_protocol"] == "5"  # the page says MQTT 5 too: the broker tells it why it is dropped


def test_password_only_from_a_file_and_the_rooms_own_prefix(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    settings = Settings(room="demo", mqtt=MqttSettings(topic_prefix="cryid-demo/demo"))
    cfg = page_config(settings, DashboardSettings(username="dashboard", password_file=pw))
    assert cfg["password"] == "s3cret"
    assert cfg["rooms"] == [{"room": "demo", "prefix": "cryid-demo/demo"}]
    with pytest.raises(ValueError, match=r"password_file: cannot read .*leave it out"):
        page_config(settings, DashboardSettings(username="dashboard", password_file=tmp_path / "nope"))
    with pytest.raises(ValueError, match="give --username"):
        page_config(settings, DashboardSettings(password_file=pw))


def test_serves_only_the_pages_files_with_safe_headers(running: list[DashboardServer]) -> None:
    server = _start(DashboardServer({"rooms": []}, "127.0.0.1", 0), running)
    index = _get(server, "/")
    body = index.read().decode()
    assert index.status == 200 and index.getheader("Content-Type") == "text/html; charset=utf-8"
    assert "default-src 'self'" in index.getheader("Content-Security-Policy", "")
    assert index.getheader("X-Content-Type-Options") == "nosniff"
    assert 'src="vendor/mqtt.min.js"' in body and "http://" not in body and "https://" not in body  # no CDN
    js = _get(server, "/vendor/mqtt.min.js")
    assert js.status == 200 and js.getheader("Content-Type").startswith("text/javascript")
    assert len(js.read()) == (STATIC_DIR / "vendor" / "mqtt.min.js").stat().st_size
    head = _get(server, "/dashboard.css", "HEAD")
    assert head.status == 200 and head.read() == b""
    for path in ("/../pyproject.toml", "/%2e%2e/dashboard.py", "/vendor/", "/nope.html", "/dashboard.py"):
        assert _get(server, path).status == 404, path


def test_https_with_the_given_certificate(tmp_path: Path, running: list[DashboardServer]) -> None:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", "key.pem", "-out", "cert.pem"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    server = _start(
        DashboardServer({}, "127.0.0.1", 0, tls_cert=tmp_path / "cert.pem", tls_key=tmp_path / "key.pem"),
        running,
    )
    assert server.url.startswith("https://127.0.0.1:")
    ctx = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    conn = http.client.HTTPSConnection("127.0.0.1", server.server_address[1], context=ctx, timeout=10)
    conn.request("GET", "/config.json")
    assert conn.getresponse().status == 200
    with pytest.raises(ValueError, match="give both --tls-cert and --tls-key"):
        DashboardServer({}, "127.0.0.1", 0, tls_cert=tmp_path / "cert.pem")
    with pytest.raises(ValueError, match="cannot load the TLS certificate"):
        DashboardServer({}, "127.0.0.1", 0, tls_cert=tmp_path / "key.pem", tls_key=tmp_path / "key.pem")


def test_cli_serves_and_prints_the_url() -> None:
    proc = subprocess.Popen(
        _cli("dashboard", "--port", "0", "--broker-url", "ws://10.0.0.5:9001/", "--username", "dashboard"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.match(r"ward dashboard: (http://127\.0\.0\.1:(\d+)/) \(broker ws://10\.0\.0\.5:9001/\)", line)
        assert m, line
        conn = http.client.HTTPConnection("127.0.0.1", int(m.group(2)), timeout=10)
        conn.request("GET", "/config.json")
        cfg = json.loads(conn.getresponse().read())
        assert cfg["broker_url"] == "ws://10.0.0.5:9001/" and cfg["username"] == "dashboard"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--username", "d", "--password-file", "/nonexistent/pw"], "dashboard.password_file: cannot read"),
        (["--broker-url", "http://broker/"], "broker_url"),
        (["--tls-cert", "/etc/hostname"], "give both --tls-cert and --tls-key"),
    ],
)
def test_cli_errors_are_one_line(args: list[str], message: str) -> None:
    done = subprocess.run(_cli("dashboard", "--port", "0", *args), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("cryid: error: ") and message in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


def test_port_in_use_is_a_one_line_error() -> None:
    port = free_port()
    first = subprocess.Popen(_cli("dashboard", "--port", str(port)), stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None and first.stdout.readline().startswith("ward dashboard: ")
        done = subprocess.run(
            _cli("dashboard", "--port", str(port)), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2 and "choose another --port" in done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
    finally:
        first.terminate()
        first.wait(10)


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYID_DASHBOARD__PORT", "8443")
    monkeypatch.setenv("CRYID_DASHBOARD__ALERT_AFTER_MIN", "3")
    s = Settings()
    assert s.dashboard.port == 8443 and s.dashboard.alert_after_min == 3.0
    assert s.dashboard.crying_timeout_s == 30.0


def test_schema_documents_the_retained_state() -> None:
    done = subprocess.run(_cli("schema"), capture_output=True, text=True, timeout=60)
    schemas = json.loads(done.stdout)
    assert schemas["<prefix>/babies"] == Roster.model_json_schema()
    assert schemas["<prefix>/baby/<baby_id>/state"] == BabyState.model_json_schema()


def test_vendored_mqtt_js_matches_its_note() -> None:
    note = (STATIC_DIR / "vendor" / "VENDOR.md").read_text()
    version = re.search(r"`mqtt@(\d+\.\d+\.\d+)`", note)
    assert version, "VENDOR.md names no exact version"
    for name in ("mqtt.min.js", "LICENSE.md"):
        digest = hashlib.sha256((STATIC_DIR / "vendor" / name).read_bytes()).hexdigest()
        assert f"`{name}`" in note and digest in note, f"{name}: sha256 {digest} is not the one in VENDOR.md"
    assert "MIT License" in (STATIC_DIR / "vendor" / "LICENSE.md").read_text()


@pytest.mark.slow
def test_the_wheel_carries_the_page(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
         str(REPO)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    wheel = next(tmp_path.glob("cryid-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("index.html", "dashboard.css", "dashboard.js", "vendor/mqtt.min.js", "vendor/LICENSE.md",
              "vendor/VENDOR.md"):  # fmt: skip
        assert f"cryid/daemon/dashboard/{f}" in names, f


# ----------------------------------------------------------------------- contrast (WCAG 2.1 AA)
def _luminance(hex_colour: str) -> float:
    rgb = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def _ratio(a: str, b: str) -> float:
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def test_rooms_of_a_several_room_daemon_name_its_own_status_topic() -> None:
    """``[[sources]]`` of several rooms: the page follows those rooms (with the daemon's prefixes) and reads
    the daemon's own status (its last will) for each; one room, or a room of another daemon: no such topic."""
    from cryid.daemon.multi import daemon_status_topic, room_prefix

    sources = [{"name": "m1", "room": "r1"}, {"name": "m2", "room": "r2"}, {"name": "m3", "room": "r1"}]
    for prefix in ("", "cryid/nicu-1"):
        settings = Settings(sources=sources, mqtt=MqttSettings(topic_prefix=prefix))
        base = prefix or "cryid"
        want = [{"room": r, "prefix": f"{base}/{r}", "daemon_status": f"{base}/status"} for r in ("r1", "r2")]
        assert page_config(settings, DashboardSettings())["rooms"] == want
        for r in want:  # as the daemon publishes them
            assert r["prefix"] == room_prefix(settings, r["room"], True)
            assert r["daemon_status"] == daemon_status_topic(settings)
    settings = Settings(room="r1", sources=sources)
    cfg = page_config(settings, DashboardSettings(rooms=["r2", "elsewhere"]))
    assert cfg["rooms"] == [
        {"room": "r2", "prefix": "cryid/r2", "daemon_status": "cryid/status"},
        {"room": "elsewhere", "prefix": "cryid/elsewhere"},
    ]
    one = Settings(sources=[{"name": "m1", "room": "r1"}], mqtt=MqttSettings(topic_prefix="site/r1"))
    assert page_config(one, DashboardSettings())["rooms"] == [{"room": "r1", "prefix": "site/r1"}]


def test_text_colours_pass_wcag_aa() -> None:
    css = (STATIC_DIR / "dashboard.css").read_text()
    var = dict(re.findall(r"--([a-z-]+):\s*(#[0-9a-f]{6})", css))
    pairs = [  # (text, background) as used in dashboard.css
        ("fg", "bg"), ("fg", "card"), ("muted", "card"), ("muted", "bg"), ("ok", "card"),
        ("cry-fg", "cry-bg"), ("alert-fg", "alert-bg"), ("warn-fg", "warn-bg"),
    ]  # fmt: skip
    for fg, bg in pairs:
        assert _ratio(var[fg], var[bg]) >= 4.5, (fg, bg, round(_ratio(var[fg], var[bg]), 2))
    assert _ratio("#ffffff", "#1b2430") >= 4.5 and _ratio("#ffffff", "#0b3d91") >= 4.5  # header, buttons
    assert _ratio(var["ok"], "#e6f4e7") >= 4.5  # the "Live" badge


# ------------------------------------------------------------------------------- deploy
def test_nginx_config_json_is_what_cryid_dashboard_would_serve() -> None:
    shipped = json.loads((REPO / "deploy" / "nginx" / "config.json").read_text())
    want = page_config(
        Settings(room="nursery"), DashboardSettings(broker_url="/cryid/mqtt", username="dashboard")
    )
    assert shipped == want, "deploy/nginx/config.json is stale: regenerate it from page_config()"
    snippet = (REPO / "deploy" / "nginx" / "cryid-dashboard.conf").read_text()
    assert "alias /opt/cryid/dashboard/;" in snippet and "location = /cryid/mqtt" in snippet
    assert CSP in snippet, "nginx must send the same Content-Security-Policy as cryid dashboard"


def test_install_puts_the_page_in_opt_and_keeps_an_edited_config(test_root: Path) -> None:  # noqa: F811
    def install() -> str:
        res = subprocess.run(
            [str(REPO / "deploy" / "install.sh"), "--root", str(test_root), "--no-pip"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    install()
    page = test_root / "opt" / "cryid" / "dashboard"
    for f in ("index.html", "dashboard.css", "dashboard.js", "vendor/mqtt.min.js", "vendor/LICENSE.md"):
        assert (page / f).read_bytes() == (STATIC_DIR / f).read_bytes(), f
        assert (page / f).stat().st_mode & 0o777 == 0o644
    assert (test_root / "opt/cryid/nginx/cryid-dashboard.conf").is_file()
    cfg = page / "config.json"
    cfg.write_text(cfg.read_text().replace("/cryid/mqtt", "wss://broker.ward.example:8884/"))
    out = install()
    assert "kept    /opt/cryid/dashboard/config.json" in out
    assert "wss://broker.ward.example:8884/" in cfg.read_text()
    assert "ok      /opt/cryid/dashboard/vendor/mqtt.min.js" in out
