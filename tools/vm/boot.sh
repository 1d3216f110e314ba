#!/bin/sh
# Boots the guest tools/vm/mkguest.sh built, under qemu's software emulation (TCG), with
# the host's root read-only and SHARE read-write; the guest runs SHARE/run (a shell script,
# inside the host root) and writes its exit status to SHARE/status. Prints nothing of the
# guest but kernel errors; the script's output is in SHARE/console.log.
#
#   tools/vm/boot.sh GUESTDIR SHARE TIMEOUT_S [KEEP...]
#
# The guest's /tmp is its own tmpfs; each KEEP directory under /tmp (a checkout or a target
# directory there) is bound into it from the host, read-only, so the guest still sees it.
#
# Exit status: the script's, or 124 when the boot ran out of time, or 125 when the guest
# wrote no status (kernel panic, qemu failure). qemu's own status says nothing about the
# script, so it is not used.
set -eu
guest=${1:?usage: boot.sh GUESTDIR SHARE TIMEOUT_S}
share=$(cd "${2:?usage: boot.sh GUESTDIR SHARE TIMEOUT_S}" && pwd)
limit=${3:?usage: boot.sh GUESTDIR SHARE TIMEOUT_S}
shift 3
keep=""
for dir in "$@"; do
  dir=$(cd "$dir" && pwd)
  case $dir in *[!A-Za-z0-9/._-]*) echo "boot: kept path must be plain: $dir" >&2; exit 2 ;; esac
  case $dir in /tmp/*) keep="$keep${keep:+,}$dir" ;; esac
done
qemu=${QEMU:-qemu-system-x86_64}
command -v "$qemu" >/dev/null || { echo "boot: $qemu not found: install qemu-system-x86 (make deps)" >&2; exit 127; }
case $share in *[!A-Za-z0-9/._-]*) echo "boot: share path must be plain: $share" >&2; exit 2 ;; esac
rm -f "$share/status"

# /dev/kvm here is a paravirtual hypervisor that hangs stock kernels: TCG only.
# The guest runs real-time audio on emulated CPUs: on a busy host, a higher priority keeps
# it from being starved for longer than a sound card's buffer lasts (as root; otherwise
# nice says so and runs qemu at the usual priority).
set +e
timeout -k 5 "$limit" nice -n -10 "$qemu" -accel tcg -m 1024 -smp 2 \
  -nodefaults -no-user-config -display none -monitor none -serial stdio -no-reboot \
  -kernel "$guest/vmlinux" -initrd "$guest/initramfs.cpio.gz" \
  -append "console=ttyS0 panic=-1 quiet loglevel=3 walkie.share=$share walkie.keep=$keep" \
  -fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap \
  -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
  -fsdev local,id=share,path="$share",security_model=none,multidevs=remap \
  -device virtio-9p-pci,fsdev=share,mount_tag=share </dev/null
rc=$?
set -e
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "boot: the guest did not finish within ${limit} s" >&2
  exit 124
fi
if [ ! -s "$share/status" ]; then
  echo "boot: the guest wrote no status (qemu exited with $rc)" >&2
  exit 125
fi
exit "$(cat "$share/status")"
