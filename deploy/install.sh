#!/usr/bin/env bash
# Install (or upgrade) cryid as a systemd service on a ward PC. Idempotent: run it again after
# `git pull` to upgrade; it changes only what differs and says so.
#
#   sudo deploy/install.sh                 # the real installation
#   deploy/install.sh --root DIR --no-pip  # stage into DIR (tests, images); systemctl acts on DIR
#
# What it installs: the `cryid` system user (member of `audio`), a virtual environment with cryid
# under /opt/cryid/venv, /etc/cryid/ (cryid.toml, root:cryid 0750), /var/lib/cryid/ (registry and
# outbox, cryid:cryid 0750), /etc/systemd/system/cryid.service, /usr/local/sbin/cryid-admin and the
# ward dashboard's page under /opt/cryid/dashboard (with an nginx snippet in /opt/cryid/nginx).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: install.sh [--root DIR] [--source DIR] [--python PYTHON] [--no-pip] [--no-systemctl]
  --root DIR      install into DIR instead of / (users go to DIR/etc/passwd; no daemon-reload/start)
  --source DIR    the cryid checkout to install (default: the one holding this script)
  --python PY     interpreter for the virtual environment (default: python3, needs >= 3.10)
  --no-pip        create the virtual environment but do not pip-install cryid into it
  --no-systemctl  do not call systemctl (enable, daemon-reload, restart)
EOF
}

ROOT=/
SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=python3
DO_PIP=1
DO_SYSTEMCTL=1
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
        --source) SOURCE="${2:?--source needs a directory}"; shift 2 ;;
        --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
        --no-pip) DO_PIP=0; shift ;;
        --no-systemctl) DO_SYSTEMCTL=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

die() { echo "install.sh: error: $*" >&2; exit 1; }
say() { echo "install: $*"; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 ...): it creates a user and root-owned folders"
[ -d "$ROOT" ] || die "--root $ROOT is not a directory; create it first"
ROOT="$(cd "$ROOT" && pwd)"
[ "$ROOT" = / ] && R="" || R="$ROOT"
[ -f "$SOURCE/pyproject.toml" ] && [ -f "$SOURCE/deploy/cryid.service" ] \
    || die "--source $SOURCE is not a cryid checkout (no pyproject.toml / deploy/cryid.service)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
    || die "$PYTHON is missing or older than 3.10; install python3 (>= 3.10) and python3-venv"

USER_NAME=cryid
OPT=/opt/cryid
VENV=$OPT/venv
ETC=/etc/cryid
STATE=/var/lib/cryid
UNIT=/etc/systemd/system/cryid.service
ADMIN=/usr/local/sbin/cryid-admin

# --- users (in $ROOT/etc/passwd when --root is given) ---------------------------------------
in_db() { # in_db passwd|group NAME
    if [ -z "$R" ]; then getent "$1" "$2" >/dev/null; else grep -q "^$2:" "$R/etc/$1" 2>/dev/null; fi
}
id_of() { # id_of passwd|group NAME -> numeric id
    if [ -z "$R" ]; then getent "$1" "$2" | cut -d: -f3; else awk -F: -v n="$2" '$1==n{print $3}' "$R/etc/$1"; fi
}
PREFIX_ARGS=()
[ -n "$R" ] && PREFIX_ARGS=(--prefix "$R")

if in_db passwd "$USER_NAME"; then
    say "ok      user $USER_NAME"
else
    useradd "${PREFIX_ARGS[@]}" --system --user-group --home-dir "$STATE" --no-create-home \
        --shell /usr/sbin/nologin --comment "cryid cry identification daemon" "$USER_NAME"
    say "created user $USER_NAME (system user, home $STATE, no login)"
fi
if in_db group audio; then
    if id_members=$(awk -F: '$1=="audio"{print $4}' "$R/etc/group") && [[ ",$id_members," == *",$USER_NAME,"* ]]; then
        say "ok      $USER_NAME in group audio"
    else
        usermod "${PREFIX_ARGS[@]}" -a -G audio "$USER_NAME"
        say "added   $USER_NAME to group audio (sound devices for cryid-admin; the unit adds it too)"
    fi
else
    say "note    no group audio on this system; the unit's SupplementaryGroups=audio needs it"
fi
UID_N=$(id_of passwd "$USER_NAME")
GID_N=$(id_of group "$USER_NAME")

# --- folders and files ------------------------------------------------------------------------
ensure_dir() { # ensure_dir PATH MODE UID GID
    local p="$R$1"
    if [ ! -d "$p" ]; then
        install -d -m "$2" -o "$3" -g "$4" "$p"
        say "created $1 ($2 $(owner_name "$3" "$4"))"
    elif [ "$(stat -c '%a %u %g' "$p")" != "${2#0} $3 $4" ]; then
        chmod "$2" "$p" && chown "$3:$4" "$p"
        say "fixed   $1 ($2 $(owner_name "$3" "$4"))"
    else
        say "ok      $1"
    fi
}
owner_name() { if [ "$1" = "$UID_N" ]; then u=$USER_NAME; else u=root; fi
               if [ "$2" = "$GID_N" ]; then g=$USER_NAME; else g=root; fi; echo "$u:$g"; }
# ensure_file SRC DST MODE UID GID [keep]: with `keep`, an admin-edited DST is left alone and the
# shipped version is written beside it as DST.dist.
ensure_file() {
    local src="$1" dst="$R$2"
    if [ ! -e "$dst" ]; then
        install -m "$3" -o "$4" -g "$5" "$src" "$dst"
        say "created $2"
    elif cmp -s "$src" "$dst"; then
        if [ "$(stat -c '%a %u %g' "$dst")" != "${3#0} $4 $5" ]; then
            chmod "$3" "$dst" && chown "$4:$5" "$dst"
            say "fixed   $2 (mode/owner)"
        else
            say "ok      $2"
        fi
        rm -f "$dst.dist"
    elif [ "${6:-}" = keep ]; then
        if ! cmp -s "$src" "$dst.dist" 2>/dev/null; then
            install -m "$3" -o "$4" -g "$5" "$src" "$dst.dist"
        fi
        say "kept    $2 (edited by you; the shipped version is $2.dist)"
    else
        install -m "$3" -o "$4" -g "$5" "$src" "$dst"
        say "updated $2"
    fi
}

# System folders are created when missing (a fresh --root) but never re-moded.
for d in /opt /var/lib /etc/systemd/system /usr/local/sbin; do
    if [ ! -d "$R$d" ]; then install -d -m 0755 "$R$d"; say "created $d"; fi
done
ensure_dir "$OPT" 0755 0 0
ensure_dir "$ETC" 0750 0 "$GID_N"
ensure_dir "$STATE" 0750 "$UID_N" "$GID_N"
ensure_dir "$STATE/incoming" 0750 "$UID_N" "$GID_N"

ensure_file "$SOURCE/deploy/cryid.toml" "$ETC/cryid.toml" 0640 0 "$GID_N" keep
ensure_file "$SOURCE/deploy/cryid.service" "$UNIT" 0644 0 0
ensure_file "$SOURCE/deploy/cryid-admin" "$ADMIN" 0755 0 0
ensure_file "$SOURCE/README.md" "$OPT/README.md" 0644 0 0
# The guides the README links to (docs/admin.md for this PC), with the generated reference.
ensure_dir "$OPT/docs" 0755 0 0
ensure_dir "$OPT/docs/reference" 0755 0 0
for f in "$SOURCE"/docs/*.md "$SOURCE"/docs/*.png "$SOURCE"/docs/reference/*.md; do
    if [ -f "$f" ]; then ensure_file "$f" "$OPT/docs/${f#"$SOURCE"/docs/}" 0644 0 0; fi
done

# The ward dashboard's static page, for nginx (deploy/nginx/cryid-dashboard.conf) or any web server;
# config.json (broker URL, user, rooms) is the admin's to edit: kept across upgrades like cryid.toml.
ensure_dir "$OPT/dashboard" 0755 0 0
ensure_dir "$OPT/dashboard/vendor" 0755 0 0
ensure_dir "$OPT/nginx" 0755 0 0
for f in index.html dashboard.css dashboard.js vendor/mqtt.min.js vendor/LICENSE.md vendor/VENDOR.md; do
    ensure_file "$SOURCE/daemon/dashboard/$f" "$OPT/dashboard/$f" 0644 0 0
done
ensure_file "$SOURCE/deploy/nginx/config.json" "$OPT/dashboard/config.json" 0644 0 0 keep
ensure_file "$SOURCE/deploy/nginx/cryid-dashboard.conf" "$OPT/nginx/cryid-dashboard.conf" 0644 0 0

# --- virtual environment ------------------------------------------------------------------------
if [ -x "$R$VENV/bin/python" ]; then
    say "ok      $VENV"
elif [ "$DO_PIP" -eq 1 ]; then
    "$PYTHON" -m venv "$R$VENV"
    say "created $VENV (virtual environment, $("$PYTHON" -V))"
else
    "$PYTHON" -m venv --without-pip "$R$VENV"
    say "created $VENV (virtual environment without pip: --no-pip)"
fi
if [ "$DO_PIP" -eq 1 ]; then
    "$R$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$SOURCE"
    say "installed $("$R$VENV/bin/python" -m pip show cryid 2>/dev/null | awk '/^Version:/{print "cryid " $2}') from $SOURCE into $VENV"
else
    say "skipped pip install of cryid (--no-pip)"
fi

# --- systemd -------------------------------------------------------------------------------------
PASSWORD_READY=0
[ -s "$R$ETC/mqtt-password" ] && PASSWORD_READY=1
if [ "$DO_SYSTEMCTL" -eq 0 ]; then
    say "skipped systemctl (--no-systemctl)"
elif [ -n "$R" ] || [ ! -d /run/systemd/system ]; then
    # A staged root, or a system not booted with systemd (image build, container): enable offline.
    systemctl --root="${R:-/}" enable cryid.service >/dev/null 2>&1 \
        || die "systemctl --root=${R:-/} enable cryid.service failed"
    say "enabled cryid.service in ${R:-/} (offline: systemd is not managing this root now)"
else
    systemctl daemon-reload
    systemctl enable cryid.service >/dev/null 2>&1
    say "enabled cryid.service (starts at boot)"
    if [ "$PASSWORD_READY" -eq 1 ]; then
        systemctl restart cryid.service
        say "restarted cryid.service"
    fi
fi

# --- what is left ----------------------------------------------------------------------------------
echo
echo "cryid is installed. Left to do:"
n=1
if [ "$PASSWORD_READY" -eq 0 ]; then
    echo "  $n. The broker: set up users, ACL and certificate (deploy/mosquitto/PASSWORDS.md), then"
    echo "     put this PC's MQTT password in $ETC/mqtt-password (root only):"
    echo "       install -m 0600 -o root -g root /dev/stdin $ETC/mqtt-password   # type it, then Ctrl-D"
    n=$((n + 1))
fi
echo "  $n. Check $ETC/cryid.toml (room, broker host/port/TLS, microphone), then: sudo cryid-admin config check"
n=$((n + 1))
echo "  $n. Pick the microphone: sudo cryid-admin devices"
n=$((n + 1))
echo "  $n. Enroll the babies: sudo cryid-admin enroll record BABY_ID --seconds 20"
echo "     (or copy cry recordings under $STATE/incoming/ and: sudo cryid-admin enroll add BABY_ID FILES...)"
n=$((n + 1))
echo "  $n. Start and watch: sudo systemctl start cryid && journalctl -u cryid -f"
n=$((n + 1))
echo "  $n. Ward dashboard: serve $OPT/dashboard with nginx ($OPT/nginx/cryid-dashboard.conf says how)"
echo "     after editing $OPT/dashboard/config.json, or run: cryid dashboard --help"
