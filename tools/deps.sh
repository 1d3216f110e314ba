#!/bin/sh
# Installs the Debian packages walkie's build and tests need. Idempotent; works as root or
# through sudo. Used by `make deps` (and so by `make test`, `make demo` and .ci/run).
set -eu
PKGS="libasound2-dev alsa-utils pkg-config python3-venv util-linux procps"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
# The kernel tests' guest (tests/kernel, tools/vm): a stock Debian kernel under qemu.
# Without recommends: they would pull in a desktop stack.
VM_PKGS="qemu-system-x86 linux-image-amd64 busybox-static kmod cpio"
vm_missing=""
if [ "$(dpkg --print-architecture)" = amd64 ]; then
  for p in $VM_PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || vm_missing="$vm_missing $p"
  done
fi
if [ -n "$missing$vm_missing" ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "deps: installing$missing$vm_missing"
  $SUDO apt-get update -qq
  if [ -n "$missing" ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
  fi
  if [ -n "$vm_missing" ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $vm_missing
  fi
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "deps: cargo is missing: install Rust (stable, 1.85 or newer) with rustup: https://rustup.rs" >&2
  exit 1
fi
