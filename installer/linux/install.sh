#!/usr/bin/env bash
# Install (or upgrade) etims-agent as a systemd service. Run as root; safe to run again.
#
#   sudo installer/linux/install.sh [--binary PATH] [--no-start] [--dry-run]
#
#   --binary PATH  the one-file binary (default: etims-agent beside this script, else dist/etims-agent
#                  of the source tree this script is in; build it with `make dist`)
#   --no-start     install and enable, but do not (re)start the service
#   --dry-run      print what would be done, change nothing (needs no root)
#
# Steps: the system user etims-agent (if absent); the binary to /usr/local/bin/etims-agent
# (replaced atomically, so an upgrade never leaves half a binary); the unit to
# /etc/systemd/system/etims-agent.service; /etc/etims-agent/agent.toml from agent.toml beside this
# script, only if absent; a config check as the service user; daemon-reload, enable, restart.
set -euo pipefail

NAME=etims-agent
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PREFIX_BIN=/usr/local/bin/$NAME
UNIT_SRC=$HERE/$NAME.service
UNIT_DST=/etc/systemd/system/$NAME.service
CONFIG_SRC=$HERE/agent.toml
CONFIG_DIR=/etc/$NAME
CONFIG=$CONFIG_DIR/agent.toml
STATE_DIR=/var/lib/$NAME
DEVICE_GROUPS=(dialout lp)  # as SupplementaryGroups= in the unit

DRY_RUN=0
START=1
BINARY=""
while (($#)); do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --no-start) START=0 ;;
        --binary) BINARY=${2:?--binary needs a path}; shift ;;
        --binary=*) BINARY=${1#--binary=} ;;
        -h|--help) sed -n '2,15s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { echo "install: $*"; }
# Every change goes through run: printed always, executed unless --dry-run.
run() {
    if ((DRY_RUN)); then echo "would run:$(printf ' %q' "$@")"; else echo "+$(printf ' %q' "$@")"; "$@"; fi
}
die() { echo "install.sh: $*" >&2; exit 1; }

if [[ -z $BINARY ]]; then
    # beside this script (a release tarball), else the source tree's dist/ (after make dist)
    for candidate in "$HERE/$NAME" "$(cd "$HERE/../.." && pwd)/dist/$NAME"; do
        BINARY=$candidate
        [[ -f $candidate ]] && break
    done
fi
((DRY_RUN)) && say "dry run: nothing is changed"
if [[ ! -f $BINARY ]]; then
    ((DRY_RUN)) || die "no binary at $BINARY: build it with make dist, or give --binary PATH"
    say "no binary at $BINARY yet; a real run needs one (make dist, or --binary PATH)"
fi
[[ -f $UNIT_SRC && -f $CONFIG_SRC ]] || die "$UNIT_SRC or $CONFIG_SRC is missing; run from the installer folder"
if ((!DRY_RUN)); then
    ((EUID == 0)) || die "run as root (sudo), or try --dry-run"
    command -v systemctl >/dev/null || die "systemctl not found: this installer is for systemd machines"
    [[ -x $BINARY ]] || die "$BINARY is not executable"
fi

# 1. The service user: a system account without a login; home = the data directory.
if getent passwd "$NAME" >/dev/null; then
    say "user $NAME exists, kept"
else
    say "create system user $NAME"
    run useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "etims-agent service" "$NAME"
fi
for group in "${DEVICE_GROUPS[@]}"; do
    if ! getent group "$group" >/dev/null; then
        say "WARNING: group $group does not exist; the unit's SupplementaryGroups=${DEVICE_GROUPS[*]} would" \
            "stop the service from starting. Create it or override SupplementaryGroups= in a drop-in" \
            "(systemctl edit $NAME)."
    fi
done

# 2. The binary, replaced atomically (a running agent keeps its old copy until the restart).
say "install binary $BINARY -> $PREFIX_BIN"
run install -D -m 0755 -o root -g root "$BINARY" "$PREFIX_BIN.new"
run mv -f "$PREFIX_BIN.new" "$PREFIX_BIN"

# 3. The unit (local changes belong in drop-ins, so it is always replaced).
say "install unit -> $UNIT_DST"
run install -D -m 0644 -o root -g root "$UNIT_SRC" "$UNIT_DST"

# 4. The config: a starter one only if there is none; never overwritten.
run install -d -m 0755 -o root -g root "$CONFIG_DIR"
if [[ -e $CONFIG ]]; then
    say "config $CONFIG exists, kept"
else
    say "install starter config $CONFIG (KRA and head office simulated until you edit it)"
    run install -m 0640 -o root -g "$NAME" "$CONFIG_SRC" "$CONFIG"
fi
# The data directory before the first start too, so `sudo -u etims-agent etims-agent init` works
# at once; systemd's StateDirectory= keeps it so.
run install -d -m 0700 -o "$NAME" -g "$NAME" "$STATE_DIR"

# 5. The config must parse, read as the service reads it (as its user).
say "check config $CONFIG as user $NAME"
run runuser -u "$NAME" -- "$PREFIX_BIN" config check --config "$CONFIG"

# 6. systemd.
say "enable and (re)start $NAME.service"
run systemctl daemon-reload
run systemctl enable "$NAME.service"
if ((START)); then
    run systemctl restart "$NAME.service"
    if ((!DRY_RUN)); then
        sleep 3
        if ! systemctl is-active --quiet "$NAME.service"; then
            systemctl --no-pager --lines=20 status "$NAME.service" >&2 || true
            die "$NAME.service did not stay up; see journalctl -u $NAME"
        fi
        journalctl -u "$NAME.service" --no-pager --lines=3 -o cat 2>/dev/null || true
    fi
else
    say "not started (--no-start): systemctl start $NAME"
fi

say "done. Next: edit $CONFIG for KRA and head office, then see the README's Installing section."
