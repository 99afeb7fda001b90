#!/usr/bin/env bash
# edged on the boards it targets, from an x86 machine: builds a Debian bookworm arm64 root
# filesystem, installs edged and its runtime dependencies there as aarch64 wheels, and runs the
# ARM subset of the tests (`pytest -m arm64`) under qemu-user emulating a Raspberry Pi 4's
# Cortex-A72 and a Raspberry Pi 5's Cortex-A76.
#
# Why the CPU models matter: qemu's default CPU (`max`) has every ARMv8/v9 extension, so code that
# uses an instruction the Pi 4 lacks passes under plain arm64 emulation and dies with SIGILL on
# the board. onnxruntime 1.21.0 did exactly that (microsoft/onnxruntime#23957, #24112).
#
# Usage: tools/arm64_check.sh [--cpu cortex-a72|cortex-a76]... [--onnxruntime VERSION]
#                             [--rebuild] [--keep-going] [-- PYTEST_ARGS...]
#   --cpu           emulate only this CPU (repeatable; default: cortex-a72 and cortex-a76)
#   --onnxruntime   install this onnxruntime release instead of the project's requirement,
#                   to check a release before allowing it (e.g. --onnxruntime 1.21.0)
#   --rebuild       rebuild the cached root filesystem and its venvs (a cached venv keeps the
#                   releases it resolved when it was made; CI machines start without one)
#   --keep-going    run every CPU even after one has failed
#   --print-cpuinfo CPU  print the /proc/cpuinfo the guest sees for CPU, and exit
#   --bench-load DIR  instead of the tests, measure the memory a start of the model in DIR costs
#                   on each CPU (tools/bench_load.py, plain start): the C heap its load
#                   allocates is the guest's own (RSS under qemu-user also holds the emulator);
#                   times under emulation mean nothing
# Environment:
#   EDGED_ARM64_CACHE   where the root filesystem is kept (default ~/.cache/edged/arm64)
#   EDGED_ARM64_MIRROR  Debian mirror (default: the one this machine's apt uses)
#
# Needs root (mmdebstrap, chroot, mounts) and binfmt_misc; installs qemu-user-static,
# binfmt-support and mmdebstrap with apt if they are missing. Mounts live in a private mount
# namespace, so nothing is left mounted when the script ends, however it ends.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SELF="$ROOT/tools/$(basename "$0")"
CACHE=${EDGED_ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edged/arm64}
SUITE=bookworm
ROOTFS="$CACHE/rootfs-$SUITE"
# python3-pip is not used (the venv brings its own pip) but keeps the image what a Pi OS user has.
PACKAGES=python3,python3-venv,python3-pip,ca-certificates,mosquitto,mosquitto-clients
CHROOT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { printf '\033[1m[arm64]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[arm64] error:\033[0m %s\n' "$*" >&2; exit 2; }
now() { date +%s; }

# ---------------------------------------------------------------------------------------------
# /proc/cpuinfo as the board's kernel prints it. qemu 7.2 (Debian 12) passes the host's x86
# cpuinfo through, on which onnxruntime's CPU detection crashes; a cpuinfo that disagrees with
# QEMU_CPU (say, a Pi 5's on the A72 model) makes it pick dotprod kernels the emulated CPU lacks,
# which is a setup error, not a finding. So the fake matches the model exactly. One entry per
# host CPU, because the guest sees the host's CPU count through sysfs.
fake_cpuinfo() {
  local cpu=$1 n i features variant part revision model hw_revision
  n=$(nproc --all)
  case $cpu in
    cortex-a72)  # Raspberry Pi 4 Model B (BCM2711), ARMv8.0-A
      features="fp asimd evtstrm crc32 cpuid"
      variant=0x0 part=0xd08 revision=3
      model="Raspberry Pi 4 Model B Rev 1.5" hw_revision=d03115 ;;
    cortex-a76)  # Raspberry Pi 5 Model B (BCM2712), ARMv8.2-A with dotprod and LSE atomics
      features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
      variant=0x4 part=0xd0b revision=1
      model="Raspberry Pi 5 Model B Rev 1.0" hw_revision=d04170 ;;
    *) die "no cpuinfo for CPU model '$cpu' (known: cortex-a72, cortex-a76)" ;;
  esac
  for ((i = 0; i < n; i++)); do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\n' "$i" "$features"
    printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: %s\n' "$variant"
    printf 'CPU part\t: %s\nCPU revision\t: %s\n\n' "$part" "$revision"
  done
  printf 'Revision\t: %s\nSerial\t\t: 10000000edged000\nModel\t\t: %s\n' "$hw_revision" "$model"
}

# Runs COMMAND... inside the root filesystem as CPU, with a clean environment (host pip and
# Python settings must not leak in). Must be called inside the private mount namespace.
in_chroot() {
  local cpu=$1 venv=$2
  shift 2
  env -i HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" QEMU_CPU="$cpu" \
    PATH="$venv/bin:$CHROOT_PATH" PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    HYPOTHESIS_STORAGE_DIRECTORY=/tmp/hypothesis \
    chroot "$ROOTFS" "$@"
}

# Mounts what a process in the chroot needs. Only ever run inside `unshare --mount`.
mount_guest() {
  local cpu=$1
  mount -t proc proc "$ROOTFS/proc"
  fake_cpuinfo "$cpu" > "$CACHE/cpuinfo-$cpu"
  mount --bind "$CACHE/cpuinfo-$cpu" "$ROOTFS/proc/cpuinfo"
  mount --rbind /dev "$ROOTFS/dev"
  mount --rbind /sys "$ROOTFS/sys"
  mount -t tmpfs -o size=2g tmpfs "$ROOTFS/tmp"
  mkdir -p "$ROOTFS/src"
  mount --bind "$ROOT" "$ROOTFS/src"
  mount -o remount,bind,ro "$ROOTFS/src"   # the tests must not write into the checkout
  cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf" 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------------
ensure_host_tools() {
  local missing=()
  command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
  command -v update-binfmts >/dev/null || missing+=(binfmt-support)
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
  command -v unshare >/dev/null || missing+=(util-linux)
  [ ${#missing[@]} -eq 0 ] && return
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
}

# The kernel must hand aarch64 ELF files to qemu, with the F flag: the interpreter is opened at
# registration, so it works inside a chroot that has no qemu of its own.
ensure_binfmt() {
  local entry=/proc/sys/fs/binfmt_misc/qemu-aarch64
  [ -e /proc/sys/fs/binfmt_misc/status ] \
    || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
    || die "cannot mount binfmt_misc (needs root on the host, not in an unprivileged container)"
  if [ ! -e "$entry" ] || ! grep -qx enabled "$entry"; then
    update-binfmts --enable qemu-aarch64 || die "update-binfmts --enable qemu-aarch64 failed"
  fi
  grep -q '^flags:.*F' "$entry" \
    || die "$entry lacks the F (fix binary) flag; re-register qemu-aarch64 with binfmt-support"
}

# The Debian mirror this machine's apt uses (deb822 or one-line sources), else deb.debian.org.
host_mirror() {
  local uri
  uri=$(awk '/^URIs:/ && !/security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' /etc/apt/sources.list 2>/dev/null || true)
  echo "${EDGED_ARM64_MIRROR:-${uri:-http://deb.debian.org/debian}}"
}

ensure_rootfs() {
  local stamp="$ROOTFS/.edged-rootfs" want="$SUITE $PACKAGES"
  if [ "$REBUILD" = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    log "root filesystem: cached at $ROOTFS"
    return
  fi
  local mirror t0 tmp="$ROOTFS.new"
  mirror=$(host_mirror)
  log "building the $SUITE arm64 root filesystem from $mirror (about 2-3 minutes)"
  t0=$(now)
  rm -rf "$tmp"
  mmdebstrap --quiet --arch=arm64 --variant=apt --include="$PACKAGES" "$SUITE" "$tmp" "$mirror" \
    || die "mmdebstrap failed (mirror $mirror; set EDGED_ARM64_MIRROR to use another)"
  # A TLS-intercepting proxy's CA (as on this workplace's machines) must be trusted inside too,
  # or pip cannot reach PyPI.
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$tmp/usr/local/share/ca-certificates/"
    env -i PATH="$CHROOT_PATH" chroot "$tmp" update-ca-certificates >/dev/null 2>&1 \
      || die "update-ca-certificates failed inside the root filesystem"
  fi
  echo "$want" > "$tmp/.edged-rootfs"
  rm -rf "$ROOTFS"
  mv "$tmp" "$ROOTFS"
  log "root filesystem: built in $(($(now) - t0)) s"
}

# The runtime requirements from pyproject.toml, plus the test tools, one per line; with
# --onnxruntime the onnxruntime requirement is replaced by that exact release.
requirements() {
  python3 - "$ROOT/pyproject.toml" "$ORT_VERSION" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
ort = sys.argv[2]
def name(req):
    return re.split(r"[ <>=!~\[;]", req, maxsplit=1)[0].lower()
reqs = list(project["dependencies"])
if ort:
    reqs = [r for r in reqs if name(r) != "onnxruntime"] + [f"onnxruntime=={ort}"]
reqs += [r for r in project["optional-dependencies"]["dev"] if name(r) in ("pytest", "hypothesis")]
print("\n".join(reqs))
EOF
}

# A venv per requirement set, so the project's pins and an --onnxruntime probe do not disturb
# each other. Every dependency must come as a wheel: a Pi must not need a compiler.
ensure_venv() {
  local reqs key t0
  reqs=$(requirements)
  key=$(printf '%s\n' "$reqs" | sha256sum | cut -c1-12)
  VENV=/opt/edged-venvs/$key
  export EDGED_ARM64_VENV=$VENV   # the re-invoked script reads it
  if [ ! -f "$ROOTFS$VENV/.complete" ]; then
    log "installing the aarch64 wheels into $VENV:" $reqs
    t0=$(now)
    rm -rf "${ROOTFS:?}$VENV"
    printf '%s\n' "$reqs" > "$ROOTFS/requirements-$key.txt"
    unshare --mount --propagation private "$SELF" --_in-namespace "${CPUS[0]}" \
      sh -c "python3 -m venv $VENV && $VENV/bin/pip install --quiet --only-binary=:all: \
             -r /requirements-$key.txt" \
      || die "installing the runtime dependencies as aarch64 wheels failed (see above)"
    touch "$ROOTFS$VENV/.complete"
    log "dependencies installed in $(($(now) - t0)) s"
  fi
  # The project itself, freshly built from this checkout (a pure-Python wheel) every run.
  rm -rf "$CACHE/wheel" && mkdir -p "$CACHE/wheel"
  python3 -m pip wheel --quiet --no-deps --wheel-dir "$CACHE/wheel" "$ROOT" >/dev/null \
    || die "building the edged wheel failed"
  rm -f "$ROOTFS"/edged-*.whl
  cp "$CACHE"/wheel/edged-*.whl "$ROOTFS/"
  local check="pip check"
  [ -n "$ORT_VERSION" ] && check=true   # an override may break the project's own pin on purpose
  unshare --mount --propagation private "$SELF" --_in-namespace "${CPUS[0]}" \
    sh -c "pip install --quiet --no-deps --force-reinstall /edged-*.whl && $check" \
    || die "installing edged into $VENV failed"
}

# ---------------------------------------------------------------------------------------------
# One CPU model: the CLI end to end on the committed model, then the ARM subset of the tests
# (or, with --bench-load, the memory measurement only).
# Prints one summary line; returns non-zero on failure.
run_cpu() {
  local cpu=$1 t0 rc stage stages=(smoke tests)
  [ -n "${EDGED_ARM64_BENCH_MODEL:-}" ] && stages=(bench-load)
  t0=$(now)
  log "=== $cpu ==="
  for stage in "${stages[@]}"; do
    set +e
    unshare --mount --propagation private "$SELF" --_in-namespace "$cpu" "$stage" "${PYTEST_ARGS[@]}"
    rc=$?
    set -e
    if [ $rc -ne 0 ]; then
      local why="exit status $rc"
      [ $rc -gt 128 ] && why="killed by signal $((rc - 128))$( [ $rc -eq 132 ] && echo ' (SIGILL: Illegal instruction; this build uses an instruction the CPU lacks)')"
      SUMMARY+=("$cpu: FAILED in $stage after $(($(now) - t0)) s: $why")
      return 1
    fi
  done
  SUMMARY+=("$cpu: passed in $(($(now) - t0)) s")
}

# Inside the private mount namespace: mount, then run one stage in the chroot.
in_namespace() {
  local cpu=$1 stage=$2
  shift 2
  ulimit -c 0   # a SIGILL under qemu would otherwise leave a core file in the root filesystem
  mount_guest "$cpu"
  case $stage in
    smoke)
      # Imports, CPU detection, model load and generation through the installed CLI, then the
      # demo end to end. faulthandler names the frame if the runtime dies on an illegal
      # instruction.
      in_chroot "$cpu" "$VENV" sh -c '
        set -e
        echo "guest: $(uname -m), $(grep -m1 "CPU part" /proc/cpuinfo), QEMU_CPU=$QEMU_CPU"
        python3 -X faulthandler -c "import onnxruntime as o; print(\"onnxruntime\", o.__version__, o.get_available_providers())"
        cd /src && edged ask --model edged/models/tiny-qwen3-int4 --max-tokens 8 --seed 1 "Is a resting pulse of 118 high?"
        echo
        # The README main job: broker, daemon and simulated wearables; exits 1 on a missing reply.
        # Run from / on the installed wheel, without --model: its bundled model is package data.
        cd / && edged demo --seconds 120 >/tmp/demo.log 2>&1 \
          || { cat /tmp/demo.log; exit 1; }
        echo "edged demo: $(grep -c "^  advice" /tmp/demo.log) advice, $(grep -c "^  alert" /tmp/demo.log) alerts, $(grep -c "^  error" /tmp/demo.log) error"' ;;
    tests)
      in_chroot "$cpu" "$VENV" sh -c 'cd /src && exec python3 -X faulthandler -m pytest -m arm64 -q \
        -p no:cacheprovider "$@"' pytest "$@" ;;
    bench-load)
      mkdir -p "$ROOTFS/mnt/model"
      mount --bind "$EDGED_ARM64_BENCH_MODEL" "$ROOTFS/mnt/model"
      mount -o remount,bind,ro "$ROOTFS/mnt/model"
      in_chroot "$cpu" "$VENV" sh -c 'cd /src && exec python3 tools/bench_load.py /mnt/model \
        --configs plain --repeats 1 --tokens 8' ;;
    *)
      # Setup commands (venv, pip) run under the first CPU model asked for (the Pi 4's by
      # default, so nothing installed may need more than a Pi 4 has).
      in_chroot "$cpu" "$VENV" "$stage" "$@" ;;
  esac
}

# ---------------------------------------------------------------------------------------------
CPUS=()
ORT_VERSION=""
REBUILD=0
KEEP_GOING=0
PYTEST_ARGS=()
VENV=${EDGED_ARM64_VENV:-/opt/edged-venvs/none}

if [ "${1:-}" = --_in-namespace ]; then
  shift
  in_namespace "$@"
  exit
fi

while [ $# -gt 0 ]; do
  case $1 in
    --cpu) CPUS+=("${2:?--cpu needs a value}"); shift 2 ;;
    --onnxruntime) ORT_VERSION=${2:?--onnxruntime needs a version}; shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    --keep-going) KEEP_GOING=1; shift ;;
    --print-cpuinfo) fake_cpuinfo "${2:?--print-cpuinfo needs a CPU model}"; exit 0 ;;
    --bench-load)
      EDGED_ARM64_BENCH_MODEL=$(cd "${2:?--bench-load needs a model directory}" && pwd) \
        || die "--bench-load: no directory '$2'"
      export EDGED_ARM64_BENCH_MODEL; shift 2 ;;
    --) shift; PYTEST_ARGS=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ ${#CPUS[@]} -gt 0 ] || CPUS=(cortex-a72 cortex-a76)
for cpu in "${CPUS[@]}"; do fake_cpuinfo "$cpu" >/dev/null; done   # reject unknown models early
[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap, chroot and mounts); try: sudo $0"
[ "$(uname -m)" = x86_64 ] || log "note: host is $(uname -m), not x86_64; emulation still applies"

START=$(now)
mkdir -p "$CACHE"
ensure_host_tools
ensure_binfmt
ensure_rootfs
ensure_venv

SUMMARY=()
FAILED=0
for cpu in "${CPUS[@]}"; do
  if ! run_cpu "$cpu"; then
    FAILED=1
    [ "$KEEP_GOING" = 1 ] || break
  fi
done

installed=$(basename "$ROOTFS$VENV"/lib/python3*/site-packages/onnxruntime-*.dist-info .dist-info)
source="the project pin"
[ -n "$ORT_VERSION" ] && source="--onnxruntime $ORT_VERSION"
log "summary (${installed/-/ }, from $source; total $(($(now) - START)) s):"
for line in "${SUMMARY[@]}"; do log "  $line"; done
exit $FAILED
