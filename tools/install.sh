#!/usr/bin/env bash
# Install edged as a systemd service: a venv under /opt/edged, the unit, the config, the
# credential file; then enable the service. Idempotent: an existing config or password file is
# never overwritten, and re-running upgrades the package and the unit.
#
#   sudo tools/install.sh                 # this machine
#   DESTDIR=/tmp/root tools/install.sh    # a staging root (images, tests): nothing is started
#   tools/install.sh --dry-run            # print every step, change nothing
#
# Environment: DESTDIR (default: empty = /), PREFIX (/opt/edged), PYTHON (python3),
# EDGED_SKIP_PIP=1 (lay out files only; for tests), EDGED_START=0 (enable but do not start).
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/opt/edged}"
PYTHON="${PYTHON:-python3}"
root="${DESTDIR:-/}"

usage() {
  cat <<USAGE
usage: tools/install.sh [--dry-run] [--help]

Install edged as a systemd service: a venv in \$PREFIX/venv (pip install of this checkout),
/etc/edged/edged.yaml and an empty /etc/edged/mqtt-password (both kept if present), the unit
/etc/systemd/system/edged.service; then enable it (and start it, unless DESTDIR or
EDGED_START=0). Needs root unless DESTDIR points at a writable staging root.

options:
  -n, --dry-run   print every step (paths, commands) and change nothing
  -h, --help      print this help and exit

environment:
  DESTDIR         staging root; nothing is started (now: ${DESTDIR:-empty, i.e. /})
  PREFIX          install prefix (now: $PREFIX)
  PYTHON          interpreter that creates the venv (now: $PYTHON)
  EDGED_SKIP_PIP  1: lay out files only, no venv or pip
  EDGED_START     0: enable the service but do not start it
USAGE
}

dry_run=0
for arg in "$@"; do
  case "$arg" in
    -h | --help) usage; exit 0 ;;
    -n | --dry-run) dry_run=1 ;;
    *) printf 'install: unknown option %s\n\n' "$arg" >&2; usage >&2; exit 2 ;;
  esac
done

say() { printf 'install: %s\n' "$*"; }
# Every change goes through run or render, so that --dry-run can print it instead.
run() {
  if [ "$dry_run" = 1 ]; then
    printf 'would run:'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}
# render SRC DEST SED-EXPR: DEST (mode 0644) is SRC with SED-EXPR applied.
render() {
  if [ "$dry_run" = 1 ]; then
    printf "would write: %s (0644) = sed -e '%s' %s\n" "$2" "$3" "$1"
  else
    sed -e "$3" "$1" > "$2"
    chmod 0644 "$2"
  fi
}
# note: what a real run is doing; a dry run's "would ..." lines say it already.
note() { if [ "$dry_run" != 1 ]; then say "$*"; fi; }
if [ "$dry_run" = 1 ]; then say "dry run: nothing is changed"; fi

run install -d -m 0755 "$DESTDIR$PREFIX" "$DESTDIR$PREFIX/models" "$DESTDIR/etc/edged" \
  "$DESTDIR/etc/systemd/system"

if [ "${EDGED_SKIP_PIP:-0}" != 1 ]; then
  if [ ! -x "$DESTDIR$PREFIX/venv/bin/python" ]; then
    note "creating $PREFIX/venv"
    run "$PYTHON" -m venv "$DESTDIR$PREFIX/venv"
  fi
  note "installing edged into $PREFIX/venv (onnxruntime and its dependencies: 1-2 minutes)"
  # No --quiet: pip's own lines and progress bars show that the slow step is moving.
  run "$DESTDIR$PREFIX/venv/bin/python" -m pip install --progress-bar on --upgrade "$here"
fi

if [ -e "$DESTDIR/etc/edged/edged.yaml" ]; then
  say "keeping existing /etc/edged/edged.yaml"
else
  # The shipped example points at the bundled demo model; a real node sets model.path.
  render "$here/config/edged.yaml" "$DESTDIR/etc/edged/edged.yaml" \
    "s#^  path: ../edged/models/demo-clinical-int4.*#  path: $PREFIX/models/default   \# an exported model directory#"
  note "wrote /etc/edged/edged.yaml (set model.path and mqtt.*)"
fi

# The unit's LoadCredential= needs the file to exist even for an anonymous broker.
if [ ! -e "$DESTDIR/etc/edged/mqtt-password" ]; then
  run install -m 0600 /dev/null "$DESTDIR/etc/edged/mqtt-password"
  note "created an empty /etc/edged/mqtt-password (0600)"
fi

render "$here/systemd/edged.service" "$DESTDIR/etc/systemd/system/edged.service" \
  "s#/opt/edged#$PREFIX#g"
note "installed /etc/systemd/system/edged.service"

if [ -n "$DESTDIR" ]; then
  # Offline: systemctl --root creates the enablement symlinks without a running systemd.
  if [ "$dry_run" = 1 ]; then
    run systemctl --root="$root" enable edged.service
  elif ! systemctl --root="$root" enable edged.service >/dev/null 2>&1; then
    echo "install: systemctl --root=$root enable failed" >&2
    exit 1
  fi
  note "enabled edged.service in $root"
else
  run systemctl daemon-reload
  if [ "${EDGED_START:-1}" = 1 ]; then
    run systemctl enable --now edged.service
    note "enabled and started edged.service"
  else
    run systemctl enable edged.service
    note "enabled edged.service"
  fi
fi
