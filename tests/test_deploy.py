"""deploy/: the systemd unit verifies and is hardened; install.sh is idempotent; uninstall keeps the registry.

install.sh and uninstall.sh run for real, into a test root (``--root``): users go to the root's own
copies of /etc/passwd, /etc/group, /etc/shadow, /etc/gshadow (``useradd --prefix``), and
``systemctl --root`` enables the unit there. Only ``--no-pip`` differs from the real path (pip
installing the project with its dependencies takes minutes; the venv itself is created).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "cryid.service"
EXEC = "/opt/cryid/venv/bin/cryid"
ETC_DBS = ("passwd", "group", "shadow", "gshadow")
SYSTEM_DIRS = ("etc/systemd/system", "opt", "usr/local/sbin", "var/lib")


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian: apt-get install systemd passwd); .ci/run installs it")
    return path


def _unit_entries(text: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (systemd allows repeated keys)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_has_the_service_contract() -> None:
    e = _unit_entries(UNIT.read_text())
    assert e["Type"] == ["notify"]
    assert int(e["WatchdogSec"][0]) > 0
    assert e["Restart"] == ["on-failure"]
    assert e["User"] == ["cryid"] and e["StateDirectory"] == ["cryid"]
    assert e["LoadCredential"] == ["mqtt-password:/etc/cryid/mqtt-password"]
    assert "CRYID_CONFIG=/etc/cryid/cryid.toml" in e["Environment"]
    assert e["ExecStart"] == [f"{EXEC} run --source mic"]
    for key in ("ProtectSystem", "ProtectHome", "NoNewPrivileges", "PrivateTmp"):
        assert e[key][0] in ("strict", "yes"), key
    assert e["DeviceAllow"] == ["char-alsa rw"] and e["DevicePolicy"] == ["closed"]


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    analyze = _need("systemd-analyze")
    # As shipped: the only possible complaint is that the venv is not installed on this machine.
    res = subprocess.run([analyze, "verify", "--man=no", str(UNIT)], capture_output=True, text=True)
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    if Path(EXEC).exists():
        assert res.returncode == 0 and lines == [], lines
    else:
        assert lines == [f"cryid.service: Command {EXEC} is not executable: No such file or directory"], lines
    # The same unit with ExecStart pointing at an installed cryid entry point: fully clean.
    cryid = Path(sys.executable).parent / "cryid"
    if not cryid.exists():
        pytest.skip(f"no cryid entry point beside {sys.executable}; run pip install -e .")
    copy = tmp_path / "cryid.service"
    copy.write_text(UNIT.read_text().replace(EXEC, str(cryid)))
    res = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (res.stdout + res.stderr).strip() == ""


def test_systemd_analyze_security_exposure_is_ok() -> None:
    analyze = _need("systemd-analyze")
    res = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(UNIT)], capture_output=True, text=True
    )
    m = re.search(r"Overall exposure level for cryid\.service: ([0-9.]+) (\w+)", res.stdout)
    assert m is not None, res.stdout + res.stderr
    exposure, rating = float(m.group(1)), m.group(2)
    assert rating in ("PERFECT", "SAFE", "OK"), res.stdout
    assert exposure <= 2.0, res.stdout


# Every hardening directive of the unit, by name, with its value; "no"/empty values say why.
HARDENING: dict[str, list[str]] = {
    "NoNewPrivileges": ["yes"],
    "CapabilityBoundingSet": [""],
    "AmbientCapabilities": [""],
    "ProtectSystem": ["strict"],
    "ProtectHome": ["yes"],
    "PrivateTmp": ["yes"],
    "PrivateDevices": ["no"],  # would hide /dev/snd: DevicePolicy + DeviceAllow instead
    "DevicePolicy": ["closed"],
    "DeviceAllow": ["char-alsa rw"],
    "ProtectKernelTunables": ["yes"],
    "ProtectKernelModules": ["yes"],
    "ProtectKernelLogs": ["yes"],
    "ProtectControlGroups": ["yes"],
    "ProtectClock": ["yes"],
    "ProtectHostname": ["yes"],
    "ProtectProc": ["invisible"],
    "RestrictNamespaces": ["yes"],
    "RestrictRealtime": ["yes"],
    "RestrictSUIDSGID": ["yes"],
    "LockPersonality": ["yes"],
    "MemoryDenyWriteExecute": ["no"],  # sounddevice's cffi callback needs W+X memory
    "RemoveIPC": ["yes"],
    "KeyringMode": ["private"],
    "PrivateMounts": ["yes"],
    "RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"],
    "IPAddressDeny": ["any"],
    "IPAddressAllow": ["localhost 10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 fc00::/7 fe80::/10"],
    "SystemCallArchitectures": ["native"],
    "SystemCallFilter": ["@system-service", "~@privileged @resources"],
    "SystemCallErrorNumber": ["EPERM"],
    "UMask": ["0077"],
    "User": ["cryid"],
    "NotifyAccess": ["main"],
}

# The checks of `systemd-analyze security` the unit does not pass, each with the reason and the
# analyser's description (which pins how far it is open).
ANALYZE_EXCEPTIONS: dict[str, str] = {
    "RootDirectory=/RootImage=": "Service runs within the host's root directory",  # not set in the unit
    "SupplementaryGroups=": "Service runs with supplementary groups",  # audio, for /dev/snd
    "PrivateDevices=": "Service potentially has access to hardware devices",  # the microphone
    "MemoryDenyWriteExecute=": "Service may create writable executable memory mappings",  # cffi
    "RestrictAddressFamilies=~AF_UNIX": "Service may allocate local sockets",  # sd_notify, journal
    "RestrictAddressFamilies=~AF_(INET|INET6)": "Service may allocate Internet sockets",  # MQTT
    # not set in the unit:
    "ProcSubset=": "Service has full access to non-process /proc files (/proc subset=)",
    "PrivateNetwork=": "Service has access to the host's network",  # the broker
    "PrivateUsers=": "Service has access to other users",  # not set in the unit
    "DeviceAllow=": "Service has a device ACL with some special devices: char-rtc:r char-alsa:rw",  # ALSA
    "IPAddressDeny=": "Service defines IP address allow list with non-localhost entries",  # ward LAN
}


def test_unit_sets_every_hardening_directive() -> None:
    e = _unit_entries(UNIT.read_text())
    wrong = {k: (e.get(k), v) for k, v in HARDENING.items() if e.get(k) != v}
    assert not wrong, f"hardening directives changed or missing (got, want): {wrong}"


def test_systemd_analyze_passes_every_check_but_the_documented_ones() -> None:
    """Each of systemd's own security checks, by name: all pass except ANALYZE_EXCEPTIONS, each open
    exactly as far as its description says (e.g. IPAddressDeny=any with an allow list)."""
    analyze = _need("systemd-analyze")
    res = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", "--json=short", str(UNIT)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    checks = {c["name"]: c for c in json.loads(res.stdout)}
    assert len(checks) > 60 and "IPAddressDeny=" in checks
    failing = {name: c["description"] for name, c in checks.items() if not c["set"]}
    assert failing == ANALYZE_EXCEPTIONS


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    from cryid.daemon.config import Settings

    for var in [v for v in os.environ if v.startswith("CRYID_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("CRYID_CONFIG", str(DEPLOY / "cryid.toml"))
    settings = Settings()
    assert settings.room == "nursery"
    assert settings.mqtt.username == "cryid-nursery"
    assert settings.mqtt.password_file == Path("mqtt-password")
    # The ACL grants this PC's user exactly its room's topics (tests/test_mosquitto_acl.py checks them).
    acl = (DEPLOY / "mosquitto" / "acl").read_text()
    assert f"user {settings.mqtt.username}\ntopic write cryid/{settings.room}/status\n" in acl
    assert f"topic read cryid/{settings.room}/cmd/#\n" in acl


def _snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path under root with its type, mode, owner, group and content hash (or link target)."""
    snap: dict[str, tuple[object, ...]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            extra: object = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            extra = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            extra = None
        snap[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, extra)
    return snap


def _ids(root: Path, db: str, name: str) -> int:
    for line in (root / "etc" / db).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise LookupError(f"{name} not in {db}")


def _run(script: str, *args: str) -> str:
    res = subprocess.run([str(DEPLOY / script), *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{script} {args} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


@pytest.fixture
def test_root(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("install.sh creates a user and root-owned folders: the test needs root (CI runs as root)")
    for tool in ("useradd", "usermod", "userdel", "groupdel", "systemctl"):
        _need(tool)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for db in ETC_DBS:
        shutil.copy2(f"/etc/{db}", root / "etc" / db)
    for d in SYSTEM_DIRS:
        (root / d).mkdir(parents=True, exist_ok=True)
    return root


def test_install_twice_is_idempotent_and_uninstall_keeps_the_registry(test_root: Path) -> None:
    root = test_root
    before = _snapshot(root)

    out1 = _run("install.sh", "--root", str(root), "--no-pip")
    after1 = _snapshot(root)
    out2 = _run("install.sh", "--root", str(root), "--no-pip")
    after2 = _snapshot(root)
    assert after1 == after2, "second install.sh run changed the tree"
    assert re.search(r"^install: (created|updated|fixed|added) ", out2, re.M) is None, out2
    assert "created user cryid" in out1 and "Left to do" in out2 and "mqtt-password" in out2

    uid, gid = _ids(root, "passwd", "cryid"), _ids(root, "group", "cryid")
    audio = next(ln for ln in (root / "etc/group").read_text().splitlines() if ln.startswith("audio:"))
    assert "cryid" in audio.split(":")[3].split(",")
    expect = {
        "opt/cryid": (0o755, 0, 0),
        "etc/cryid": (0o750, 0, gid),
        "etc/cryid/cryid.toml": (0o640, 0, gid),
        "var/lib/cryid": (0o750, uid, gid),
        "etc/systemd/system/cryid.service": (0o644, 0, 0),
        "usr/local/sbin/cryid-admin": (0o755, 0, 0),
    }
    for rel, (mode, owner, group) in expect.items():
        _, got_mode, got_uid, got_gid, _ = after2[rel]
        assert (got_mode, got_uid, got_gid) == (mode, owner, group), rel
    assert (root / "etc/systemd/system/cryid.service").read_bytes() == UNIT.read_bytes()
    assert (root / "opt/cryid/venv/bin/python").exists()
    for doc in ("README.md", "docs/admin.md", "docs/reference/configuration.md", "docs/dashboard.png"):
        assert (root / "opt/cryid" / doc).read_bytes() == (REPO / doc).read_bytes(), doc
    wants = root / "etc/systemd/system/multi-user.target.wants/cryid.service"
    assert os.readlink(wants) == "/etc/systemd/system/cryid.service"

    # An admin's edit of the config survives a re-install; the shipped version lands beside it.
    toml = root / "etc/cryid/cryid.toml"
    toml.write_text(toml.read_text().replace('room = "nursery"', 'room = "nicu-2"'))
    out3 = _run("install.sh", "--root", str(root), "--no-pip")
    assert "kept    /etc/cryid/cryid.toml" in out3
    assert 'room = "nicu-2"' in toml.read_text()
    assert (root / "etc/cryid/cryid.toml.dist").read_bytes() == (DEPLOY / "cryid.toml").read_bytes()

    # The registry written by enrollment, the password written by the admin.
    registry = root / "var/lib/cryid/registry.sqlite3"
    registry.write_bytes(b"enrolled babies")
    (root / "etc/cryid/mqtt-password").write_text("secret")

    out = _run("uninstall.sh", "--root", str(root))
    for rel in (
        "opt/cryid",
        "etc/systemd/system/cryid.service",
        "usr/local/sbin/cryid-admin",
        "etc/cryid/cryid.toml.dist",
    ):
        assert not (root / rel).exists(), rel
    assert not wants.is_symlink() and not wants.exists()
    assert registry.read_bytes() == b"enrolled babies"
    assert (root / "etc/cryid/mqtt-password").read_text() == "secret"
    assert _ids(root, "passwd", "cryid") == uid
    assert "kept    /var/lib/cryid" in out

    _run("uninstall.sh", "--root", str(root), "--purge")
    after_purge = _snapshot(root)
    # Back to the tree before installation (useradd/userdel leave their *- backup files).
    after_purge = {k: v for k, v in after_purge.items() if not re.fullmatch(r"etc/\w+-", k)}
    assert after_purge.keys() == before.keys()
    for db in ETC_DBS:
        assert (root / "etc" / db).read_text() == Path(f"/etc/{db}").read_text(), db


def test_install_refuses_bad_input(tmp_path: Path) -> None:
    res = subprocess.run([str(DEPLOY / "install.sh"), "--bogus"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown option --bogus" in res.stderr
    if os.geteuid() == 0:
        res = subprocess.run(
            [str(DEPLOY / "install.sh"), "--root", str(tmp_path), "--source", str(tmp_path), "--no-pip"],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 1 and "is not a cryid checkout" in res.stderr
        assert list(tmp_path.iterdir()) == [], "nothing may be written on bad input"


def test_cryid_admin_runs_as_the_service_user_with_the_credential() -> None:
    """deploy/cryid-admin with its paths pointed into a temporary folder and the service user `nobody`."""
    if os.geteuid() != 0:
        pytest.skip("cryid-admin switches to the service user: the test needs root")
    _need("runuser")
    # Not under pytest's tmp_path: that is private to root, and `nobody` must reach the fake cryid.
    with tempfile.TemporaryDirectory(prefix="cryid-admin-test-") as d:
        tmp_path = Path(d)
        tmp_path.chmod(0o755)
        _check_cryid_admin(tmp_path)


def _check_cryid_admin(tmp_path: Path) -> None:
    password = tmp_path / "mqtt-password"
    password.write_text("s3cret\n")
    password.chmod(0o600)
    fake = tmp_path / "cryid"  # stands in for the venv's cryid: reports who runs it with what
    fake.write_text(
        '#!/bin/sh\necho "user=$(id -un) args=$* config=$CRYID_CONFIG state=$CRYID_STATE_DIR"\n'
        'echo "creds=$CREDENTIALS_DIRECTORY password=$(cat "$CREDENTIALS_DIRECTORY/mqtt-password")"\n'
    )
    fake.chmod(0o755)
    script = (DEPLOY / "cryid-admin").read_text()
    for old, new in (
        ("CRYID=/opt/cryid/venv/bin/cryid", f"CRYID={fake}"),
        ("SERVICE_USER=cryid", "SERVICE_USER=nobody"),
        ("PASSWORD_FILE=/etc/cryid/mqtt-password", f"PASSWORD_FILE={password}"),
    ):
        assert old in script
        script = script.replace(old, new)
    admin = tmp_path / "cryid-admin"
    admin.write_text(script)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(mode=0o755)
    env = dict(os.environ, TMPDIR=str(tmpdir))
    res = subprocess.run(["sh", str(admin), "enroll", "list"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    first, second = res.stdout.splitlines()
    assert first == "user=nobody args=enroll list config=/etc/cryid/cryid.toml state=/var/lib/cryid"
    assert second.startswith(f"creds={tmpdir}/cryid-admin.") and second.endswith("password=s3cret")
    assert list(tmpdir.iterdir()) == [], "the credential copy must be removed"
