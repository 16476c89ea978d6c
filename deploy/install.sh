#!/bin/sh
# Installs edged on a board: a venv under /opt/edged, the systemd unit, /etc/edged/edged.toml and,
# optionally, a model bundle and the Mosquitto drop-in. Idempotent: run it again to upgrade; an existing
# configuration, password file or ACL is never overwritten.
#
#   deploy/install.sh [--bundle FILE] [--wheels DIR] [--mosquitto] [--no-start] [--root DIR]
#
# Offline (from a USB stick): --wheels DIR holds edged's wheels and its dependencies' (made elsewhere with
# `pip wheel . -w DIR` for the board's platform); --bundle FILE is an `edged model pack` archive.
# --root DIR installs under DIR instead of / (packaging and tests); systemctl is then left alone.
set -eu

repo=$(cd "$(dirname "$0")/.." && pwd)
root="" bundle="" wheels="" mosquitto=0 start=1
while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) bundle=$2; shift 2 ;;
        --wheels) wheels=$2; shift 2 ;;
        --mosquitto) mosquitto=1; shift ;;
        --no-start) start=0; shift ;;
        --root) root=$2; shift 2 ;;
        *) echo "install.sh: unknown option $1 (see the comment at the top)" >&2; exit 2 ;;
    esac
done

prefix="$root/opt/edged"
echo "edged: installing into $prefix"
[ -x "$prefix/venv/bin/python" ] || python3 -m venv "$prefix/venv"
if [ -n "$wheels" ]; then
    set -- --no-index --find-links "$wheels"
else
    set --
fi
# EDGED_PIP_ARGS: extra pip arguments (the tests pass --no-deps to skip the runtime wheels).
# shellcheck disable=SC2086
"$prefix/venv/bin/pip" install --quiet --disable-pip-version-check "$@" ${EDGED_PIP_ARGS:-} "$repo"
install -m 644 "$repo/README.md" "$prefix/README.md"

install -D -m 644 "$repo/deploy/edged.service" "$root/etc/systemd/system/edged.service"
if [ ! -e "$root/etc/edged/edged.toml" ]; then
    install -D -m 644 "$repo/deploy/edged.toml" "$root/etc/edged/edged.toml"
    echo "edged: wrote $root/etc/edged/edged.toml (edit it, then: edged config check /etc/edged/edged.toml)"
fi
if [ ! -e "$root/etc/edged/broker-password" ]; then  # LoadCredential= needs the file; empty means none
    install -D -m 600 /dev/null "$root/etc/edged/broker-password"
fi

if [ -n "$bundle" ]; then
    "$prefix/venv/bin/edged" model install "$bundle" --models-dir "$root/var/lib/edged/models"
fi

if [ "$mosquitto" = 1 ]; then
    install -D -m 644 "$repo/deploy/mosquitto/edged.conf" "$root/etc/mosquitto/conf.d/edged.conf"
    [ -e "$root/etc/mosquitto/edged.acl" ] || install -D -m 644 "$repo/deploy/mosquitto/edged.acl" "$root/etc/mosquitto/edged.acl"
    [ -e "$root/etc/mosquitto/edged.passwd" ] || echo "edged: create broker users with mosquitto_passwd -c $root/etc/mosquitto/edged.passwd edged"
fi

if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable edged.service
    [ "$start" = 0 ] || systemctl restart edged.service
    echo "edged: $(systemctl is-active edged.service) (journalctl -u edged -f to follow)"
fi
echo "edged: done"
