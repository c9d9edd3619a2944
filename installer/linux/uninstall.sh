#!/usr/bin/env bash
# Remove the etims-agent service. Run as root; safe to run again.
#
#   sudo installer/linux/uninstall.sh [--purge [--yes]] [--dry-run]
#
#   (default)  stop and disable the service, remove the unit and /usr/local/bin/etims-agent;
#              keep the data (/var/lib/etims-agent), the config (/etc/etims-agent) and the user
#   --purge    also delete /var/lib/etims-agent, /etc/etims-agent and the user etims-agent.
#              The data directory holds the fiscal journal, sales not yet signed or synced, and
#              secrets.key (without it the stored KRA cmcKey is lost): asks for "yes" unless --yes
#   --dry-run  print what would be done, change nothing (needs no root)
set -euo pipefail

NAME=etims-agent
BINARY=/usr/local/bin/$NAME
UNIT=/etc/systemd/system/$NAME.service
DROPINS=/etc/systemd/system/$NAME.service.d
CONFIG_DIR=/etc/$NAME
STATE_DIR=/var/lib/$NAME

DRY_RUN=0
PURGE=0
YES=0
while (($#)); do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --purge) PURGE=1 ;;
        --yes) YES=1 ;;
        -h|--help) sed -n '2,13s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "uninstall.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { echo "uninstall: $*"; }
run() {
    if ((DRY_RUN)); then echo "would run:$(printf ' %q' "$@")"; else echo "+$(printf ' %q' "$@")"; "$@"; fi
}
die() { echo "uninstall.sh: $*" >&2; exit 1; }

((DRY_RUN)) && say "dry run: nothing is changed"
if ((!DRY_RUN)); then
    ((EUID == 0)) || die "run as root (sudo), or try --dry-run"
    command -v systemctl >/dev/null || die "systemctl not found: this uninstaller is for systemd machines"
fi
if ((PURGE && !DRY_RUN && !YES)); then
    echo "--purge deletes $STATE_DIR: the fiscal journal, any sale not yet signed by KRA or synced to head"
    echo "office, and secrets.key (without it the stored KRA cmcKey is lost). Check first with:"
    echo "  $BINARY status --config $CONFIG_DIR/agent.toml"
    [[ -t 0 ]] || die "not a terminal: add --yes to purge"
    read -r -p 'Type yes to delete them: ' answer
    [[ $answer == yes ]] || die "nothing was changed"
fi

# 1. Stop and disable (SIGTERM: the agent finishes in-flight requests and closes the outbox).
say "stop and disable $NAME.service"
if ((DRY_RUN)) || systemctl cat "$NAME.service" >/dev/null 2>&1; then
    run systemctl disable --now "$NAME.service"
else
    say "$NAME.service is not known to systemd, nothing to stop"
fi

# 2. The unit and the binary.
say "remove unit $UNIT and binary $BINARY"
run rm -f "$UNIT"
run systemctl daemon-reload
run rm -f "$BINARY"

# 3. Data, config, drop-ins and user: only with --purge.
if ((PURGE)); then
    say "purge data $STATE_DIR, config $CONFIG_DIR, drop-ins $DROPINS and user $NAME"
    run rm -rf "$STATE_DIR" "$CONFIG_DIR" "$DROPINS"
    if ((DRY_RUN)) || getent passwd "$NAME" >/dev/null; then
        run userdel "$NAME"
    fi
    if ((DRY_RUN)) || getent group "$NAME" >/dev/null; then
        run groupdel "$NAME"
    fi
    run systemctl daemon-reload
else
    say "kept data $STATE_DIR, config $CONFIG_DIR and user $NAME (--purge removes them)"
fi
say "done"
