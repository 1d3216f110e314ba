#!/bin/sh
# Builds what the qemu guest boots: the installed Debian kernel unpacked to an ELF vmlinux
# (booted directly through PVH: unpacking the XZ bzImage under emulation costs ~3.5 s per
# boot) and an initramfs of busybox-static, the modules walkie's kernel tests need and
# tools/vm/init. Needs the packages tools/deps.sh installs: linux-image-amd64,
# busybox-static, kmod, cpio (and python3 for the unpacking).
#
#   tools/vm/mkguest.sh OUTDIR      → OUTDIR/vmlinux, OUTDIR/initramfs.cpio.gz, OUTDIR/kernel
#
# Idempotent and cached: nothing is rebuilt while the kernel and tools/vm/init are unchanged.
set -eu
out=${1:?usage: mkguest.sh OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)

die() { echo "mkguest: $*" >&2; exit 1; }

# The newest installed kernel that has its modules.
kver=""
for img in $(ls -v /boot/vmlinuz-* 2>/dev/null); do
  v=${img#/boot/vmlinuz-}
  [ -d "/lib/modules/$v" ] && kver=$v
done
[ -n "$kver" ] || die "no kernel in /boot with modules in /lib/modules: install linux-image-amd64 (make deps)"
busybox=$(command -v busybox 2>/dev/null || true)
[ -x /bin/busybox ] && busybox=/bin/busybox
[ -n "$busybox" ] || die "busybox not found: install busybox-static (make deps)"
command -v modprobe >/dev/null || [ -x /sbin/modprobe ] || die "modprobe not found: install kmod"
command -v cpio >/dev/null || die "cpio not found: install cpio (make deps)"

# The modules, in the order modprobe would load them.
MODULES="virtio_pci 9pnet_virtio 9p evdev uinput snd-aloop snd-hrtimer"
stamp="$kver $(cksum < "$here/init") $(cksum < "$0") $MODULES"
mkdir -p "$out"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] \
   && [ -f "$out/vmlinux" ] && [ -f "$out/initramfs.cpio.gz" ]; then
  exit 0
fi

tmp=$(mktemp -d "$out/build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# vmlinux: the XZ stream inside the bzImage, as scripts/extract-vmlinux finds it.
python3 - "/boot/vmlinuz-$kver" "$tmp/vmlinux" <<'PY' || die "cannot unpack /boot/vmlinuz-$kver"
import lzma, sys
data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit("no XZ stream in the kernel image")
elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
if elf[:4] != b"\x7fELF":
    sys.exit("the unpacked kernel is not an ELF file")
open(sys.argv[2], "wb").write(elf)
PY

root="$tmp/root"
mkdir -p "$root/bin" "$root/proc" "$root/sys" "$root/dev" "$root/host" "$root/modules"
cp "$busybox" "$root/bin/busybox"
cp "$here/init" "$root/init"
chmod 755 "$root/init"
: > "$root/modules/order"
for m in $MODULES; do
  PATH=$PATH:/sbin modprobe -S "$kver" --show-depends "$m" | while read -r cmd path _; do
    [ "$cmd" = insmod ] || continue
    name=$(basename "$path")
    grep -qx "$name" "$root/modules/order" && continue
    cp "$path" "$root/modules/$name"
    echo "$name" >> "$root/modules/order"
  done
done
(cd "$root" && find . | cpio -o -H newc --quiet) | gzip -1 > "$tmp/initramfs.cpio.gz"
mv "$tmp/vmlinux" "$out/vmlinux"
mv "$tmp/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
echo "$kver" > "$out/kernel"
echo "$stamp" > "$out/stamp"
