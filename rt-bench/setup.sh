#!/bin/sh
# What rt-bench needs beyond `make deps` (docs/BENCHMARKS.md): a PulseAudio server the bench
# starts on its own (a clocked null sink and source, reached through the ALSA `pulse` plugin
# of Debian's libasound2-plugins), and the Python peer's venv (tools/peer/requirements.txt).
# Idempotent; works as root or through sudo. Used by `make bench` and `make test`.
#
# Note: libasound2-plugins makes ALSA's `default` PCM mean `pulse` system-wide. Nothing in
# walkie's test suite relies on what `default` is; the bench names its PCMs explicitly.
set -eu
cd "$(dirname "$0")/.."
PKGS="pulseaudio pulseaudio-utils libasound2-plugins libasound2-dev python3-venv gcc"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "bench setup: installing$missing"
  $SUDO apt-get update -qq
  # A colleague's apt-get may hold the lock for a moment: wait for it rather than fail.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq -o DPkg::Lock::Timeout=300 \
    --no-install-recommends $missing
fi
VENV="${BENCH_VENV:-.venv-bench}"
REQ=tools/peer/requirements.txt
if [ ! -f "$VENV/.ok" ] || [ "$REQ" -nt "$VENV/.ok" ]; then
  echo "bench setup: the Python peer's venv in $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ"
  touch "$VENV/.ok"
fi
