#!/bin/sh
# Writes what the Debian packages install beside the binary into DIR (default target/dist):
# the user unit with ExecStart=/usr/bin/walkie, the service environment and configuration
# examples. `walkie config example` comes from WALKIE (default: the release build, else a
# current debug build).
set -eu
cd "$(dirname "$0")/.."
out="${1:-target/dist}"
walkie="${WALKIE:-}"
if [ -z "$walkie" ]; then
  for candidate in target/release/walkie; do
    if [ -x "$candidate" ]; then walkie="$candidate"; break; fi
  done
fi
mkdir -p "$out"
sed -e "s|@BINDIR@|/usr/bin|g" -e "s|@DOCDIR@|/usr/share/doc/walkie|g" \
  tools/systemd/walkie.service.in >"$out/walkie.service"
sed -e "s|@PATHLINE@|#PATH=/home/YOU/.local/bin:/usr/local/bin:/usr/bin:/bin|" tools/systemd/env.in >"$out/env"
if [ -n "$walkie" ]; then
  "$walkie" config example >"$out/config.toml"
else
  # Only the cross build exists (make deb-arm64): ask a native debug build.
  cargo run --quiet --locked -p walkie -- config example >"$out/config.toml"
fi
