#!/usr/bin/env bash
# Remove what deploy/install.sh installed. Keeps the registry (/var/lib/cryid: enrolled babies and
# the outbox), the configuration (/etc/cryid) and the `cryid` user unless --purge is given.
#
#   sudo deploy/uninstall.sh            # remove the program, keep data and configuration
#   sudo deploy/uninstall.sh --purge    # remove everything, the registry of enrolled babies too
set -euo pipefail

usage() {
    cat <<'EOF'
usage: uninstall.sh [--root DIR] [--no-systemctl] [--purge]
  --root DIR      act on DIR instead of / (as install.sh --root)
  --no-systemctl  do not call systemctl (stop, disable, daemon-reload)
  --purge         also delete /var/lib/cryid (the registry!), /etc/cryid and the cryid user
EOF
}

ROOT=/
DO_SYSTEMCTL=1
PURGE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
        --no-systemctl) DO_SYSTEMCTL=0; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "uninstall.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

die() { echo "uninstall.sh: error: $*" >&2; exit 1; }
say() { echo "uninstall: $*"; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 ...)"
[ -d "$ROOT" ] || die "--root $ROOT is not a directory"
ROOT="$(cd "$ROOT" && pwd)"
[ "$ROOT" = / ] && R="" || R="$ROOT"

UNIT=/etc/systemd/system/cryid.service

if [ "$DO_SYSTEMCTL" -eq 0 ]; then
    say "skipped systemctl (--no-systemctl)"
elif [ -n "$R" ] || [ ! -d /run/systemd/system ]; then
    if [ -e "$R$UNIT" ]; then
        systemctl --root="${R:-/}" disable cryid.service >/dev/null 2>&1 \
            || die "systemctl --root=${R:-/} disable failed"
        say "disabled cryid.service in ${R:-/} (offline)"
    fi
else
    if systemctl cat cryid.service >/dev/null 2>&1; then
        systemctl disable --now cryid.service >/dev/null 2>&1 || die "systemctl disable --now cryid.service failed"
        say "stopped and disabled cryid.service"
    fi
fi

remove() { # remove PATH (file or folder tree)
    if [ -e "$R$1" ] || [ -L "$R$1" ]; then
        rm -rf -- "$R$1"
        say "removed $1"
    fi
}
remove "$UNIT"
remove /etc/systemd/system/cryid.service.d
remove /usr/local/sbin/cryid-admin
remove /opt/cryid
remove /etc/cryid/cryid.toml.dist
if [ -z "$R" ] && [ "$DO_SYSTEMCTL" -eq 1 ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi

if [ "$PURGE" -eq 1 ]; then
    remove /var/lib/cryid
    remove /var/lib/private/cryid
    remove /etc/cryid
    PREFIX_ARGS=()
    [ -n "$R" ] && PREFIX_ARGS=(--prefix "$R")
    if grep -q '^cryid:' "$R/etc/passwd" 2>/dev/null; then
        userdel "${PREFIX_ARGS[@]}" cryid
        say "removed user cryid"
    fi
    if grep -q '^cryid:' "$R/etc/group" 2>/dev/null; then
        groupdel "${PREFIX_ARGS[@]}" cryid
        say "removed group cryid"
    fi
else
    [ -d "$R/var/lib/cryid" ] && say "kept    /var/lib/cryid (registry of enrolled babies, outbox; --purge deletes it)"
    [ -d "$R/etc/cryid" ] && say "kept    /etc/cryid (configuration and MQTT password; --purge deletes it)"
    grep -q '^cryid:' "$R/etc/passwd" 2>/dev/null && say "kept    user cryid (owns /var/lib/cryid; --purge deletes it)"
fi
say "done"
