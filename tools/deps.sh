#!/bin/sh
# Installs what walkie's build and tests need. Idempotent; works as root or through sudo.
#   tools/deps.sh          the build, the demo and the kernel tests' guest (`make deps`)
#   tools/deps.sh test     also what `make test` needs: systemd-analyze (unit check), the
#                          aarch64 cross toolchain with the arm64 ALSA library (multiarch),
#                          qemu-user to run the aarch64 build, dpkg-dev and cargo-deb (.debs)
#   tools/deps.sh cross    only the cross toolchain part (`make aarch64`, `make deb-arm64`)
#   tools/deps.sh deb      only cargo-deb and dpkg-dev (`make deb`)
set -eu
PKGS="libasound2-dev alsa-utils pkg-config python3-venv util-linux procps"
CROSS_PKGS="gcc-aarch64-linux-gnu libc6-dev-arm64-cross libasound2-dev:arm64 libc6:arm64"
DEB_PKGS="dpkg-dev"
CARGO_DEB_VERSION="3.8.0"
cross=false deb=false
case "${1:-}" in
  "") ;;
  test) PKGS="$PKGS systemd qemu-user $CROSS_PKGS $DEB_PKGS"; cross=true deb=true ;;
  cross) PKGS="$PKGS $CROSS_PKGS"; cross=true ;;
  deb) PKGS="$PKGS $DEB_PKGS"; deb=true ;;
  *) echo "usage: tools/deps.sh [test|cross|deb]" >&2; exit 2 ;;
esac
if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
if $cross && ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "deps: adding the arm64 architecture (multiarch) for libasound2-dev:arm64"
  $SUDO dpkg --add-architecture arm64
  updated=false
else
  updated=true
fi
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
if [ -n "$missing$vm_missing" ] || ! $updated; then
  echo "deps: installing$missing$vm_missing"
  $SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq
  if [ -n "$missing" ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $missing
  fi
  if [ -n "$vm_missing" ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $vm_missing
  fi
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "deps: cargo is missing: install Rust (stable, 1.85 or newer) with rustup: https://rustup.rs" >&2
  exit 1
fi
if $cross && ! rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
  echo "deps: adding the Rust target aarch64-unknown-linux-gnu"
  rustup target add aarch64-unknown-linux-gnu
fi
if $deb && ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
  echo "deps: building cargo-deb $CARGO_DEB_VERSION (once)"
  cargo install --locked --quiet cargo-deb --version "$CARGO_DEB_VERSION"
fi
