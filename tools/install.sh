#!/usr/bin/env bash
# Install edged as a systemd service: a venv under /opt/edged, the unit, the config, the
# credential file; then enable the service. Idempotent: an existing config or password file is
# never overwritten, and re-running upgrades the package and the unit.
#
#   sudo tools/install.sh                 # this machine
#   DESTDIR=/tmp/root tools/install.sh    # a staging root (images, tests): nothing is started
#
# Environment: DESTDIR (default: empty = /), PREFIX (/opt/edged), PYTHON (python3),
# EDGED_SKIP_PIP=1 (lay out files only; for tests), EDGED_START=0 (enable but do not start).
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/opt/edged}"
PYTHON="${PYTHON:-python3}"
root="${DESTDIR:-/}"

say() { printf 'install: %s\n' "$*"; }

install -d -m 0755 "$DESTDIR$PREFIX" "$DESTDIR$PREFIX/models" "$DESTDIR/etc/edged" \
  "$DESTDIR/etc/systemd/system"

if [ "${EDGED_SKIP_PIP:-0}" != 1 ]; then
  if [ ! -x "$DESTDIR$PREFIX/venv/bin/python" ]; then
    say "creating $PREFIX/venv"
    "$PYTHON" -m venv "$DESTDIR$PREFIX/venv"
  fi
  say "installing edged into $PREFIX/venv"
  "$DESTDIR$PREFIX/venv/bin/python" -m pip install --quiet --upgrade "$here"
fi

if [ -e "$DESTDIR/etc/edged/edged.yaml" ]; then
  say "keeping existing /etc/edged/edged.yaml"
else
  # The shipped example points at the bundled demo model; a real node sets model.path.
  sed -e "s#^  path: ../edged/models/demo-clinical-int4.*#  path: $PREFIX/models/default   \# an exported model directory#" \
    "$here/config/edged.yaml" > "$DESTDIR/etc/edged/edged.yaml"
  chmod 0644 "$DESTDIR/etc/edged/edged.yaml"
  say "wrote /etc/edged/edged.yaml (set model.path and mqtt.*)"
fi

# The unit's LoadCredential= needs the file to exist even for an anonymous broker.
if [ ! -e "$DESTDIR/etc/edged/mqtt-password" ]; then
  install -m 0600 /dev/null "$DESTDIR/etc/edged/mqtt-password"
  say "created an empty /etc/edged/mqtt-password (0600)"
fi

sed -e "s#/opt/edged#$PREFIX#g" "$here/systemd/edged.service" \
  > "$DESTDIR/etc/systemd/system/edged.service"
chmod 0644 "$DESTDIR/etc/systemd/system/edged.service"
say "installed /etc/systemd/system/edged.service"

if [ -n "$DESTDIR" ]; then
  # Offline: systemctl --root creates the enablement symlinks without a running systemd.
  systemctl --root="$root" enable edged.service >/dev/null 2>&1 \
    || { echo "install: systemctl --root=$root enable failed" >&2; exit 1; }
  say "enabled edged.service in $root"
else
  systemctl daemon-reload
  if [ "${EDGED_START:-1}" = 1 ]; then
    systemctl enable --now edged.service
    say "enabled and started edged.service"
  else
    systemctl enable edged.service
    say "enabled edged.service"
  fi
fi
