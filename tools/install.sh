#!/bin/sh
# `make install` / `make uninstall`: walkie for one user, no root needed.
#   tools/install.sh install     binary, user unit, docs; config and env only if absent
#   tools/install.sh uninstall   removes what install wrote, unless you changed it since
# Variables: BIN (the walkie binary to install, default target/release/walkie),
# PREFIX (default ~/.local), UNITDIR (default ~/.config/systemd/user), DESTDIR (staging).
# Your configuration (~/.config/walkie/config.toml) and service environment (…/env) are
# never overwritten; uninstall removes them only when they are exactly as installed.
set -eu
cd "$(dirname "$0")/.."
action="${1:-}"
: "${HOME:?HOME is not set}"
BIN="${BIN:-target/release/walkie}"
PREFIX="${PREFIX:-$HOME/.local}"
CONFIG_HOME="${XDG_CONFIG_HOME:-$HOME/.config}"
UNITDIR="${UNITDIR:-$CONFIG_HOME/systemd/user}"
DESTDIR="${DESTDIR:-}"
BINDIR="$PREFIX/bin"
DOCDIR="$PREFIX/share/doc/walkie"
CONFDIR="$CONFIG_HOME/walkie"
MANIFEST="$PREFIX/share/walkie/installed"

say() { printf '%s\n' "$*"; }

# The directories to create, outermost first, so uninstall can remove the ones it made.
made_dirs=""
mkdir_p() {
  d="$1" missing=""
  while [ ! -d "$DESTDIR$d" ]; do missing="$d $missing"; d=$(dirname "$d"); done
  for m in $missing; do
    if [ "$m" = "$1" ]; then mode="${2:-755}"; else mode=755; fi
    mkdir -m "$mode" "$DESTDIR$m"
    made_dirs="$made_dirs$m
"
  done
}

checksum() { sha256sum "$1" | cut -d' ' -f1; }

# put SRC DEST MODE [keep]: copies and records "sha path"; `keep` never replaces a file.
files=""
put() {
  if [ "${4:-}" = keep ] && [ -e "$DESTDIR$2" ]; then
    say "kept   $2 (exists; yours is never overwritten)"
    return
  fi
  mkdir_p "$(dirname "$2")"
  tmp="$DESTDIR$2.walkie-new.$$"
  cp "$1" "$tmp" && chmod "$3" "$tmp" && mv -f "$tmp" "$DESTDIR$2"
  files="$files$(checksum "$DESTDIR$2") $2
"
  say "wrote  $2"
}

# systemctl --user, when there is a user manager to talk to.
user_systemctl() {
  [ -z "$DESTDIR" ] && command -v systemctl >/dev/null 2>&1 && systemctl --user "$@" 2>/dev/null
}

service_path() {
  # The PATH the service gets: this one's useful parts, with the install dir and the
  # directory of `claude` (where the installing shell finds it) in front.
  p="$BINDIR:$HOME/.local/bin"
  claude=$(command -v claude 2>/dev/null || true)
  case "$claude" in /*) p="$p:$(dirname "$claude")" ;; esac
  node=$(command -v node 2>/dev/null || true)
  case "$node" in /*) p="$p:$(dirname "$node")" ;; esac
  p="$p:/usr/local/bin:/usr/bin:/bin"
  # Deduplicate, keep the order.
  printf '%s' "$p" | tr ':' '\n' | awk 'NF && !seen[$0]++' | paste -sd: -
}

install_all() {
  [ -x "$BIN" ] || { say "install: $BIN is not built (run make install, or set BIN=)" >&2; exit 1; }
  if [ -e "$DESTDIR$MANIFEST" ]; then
    say "install: replacing the earlier installation"
    # Keep the record of what the earlier install wrote (config, env), to merge below.
    old=$(cat "$DESTDIR$MANIFEST")
  else
    old=""
  fi
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  sed -e "s|@BINDIR@|$BINDIR|g" -e "s|@DOCDIR@|$DOCDIR|g" tools/systemd/walkie.service.in >"$work/walkie.service"
  sed -e "s|@PATHLINE@|PATH=$(service_path)|" tools/systemd/env.in >"$work/env"
  "$BIN" config example >"$work/config.toml"

  put "$BIN" "$BINDIR/walkie" 755
  put "$work/walkie.service" "$UNITDIR/walkie.service" 644
  put README.md "$DOCDIR/README.md" 644
  put LICENSE "$DOCDIR/LICENSE" 644
  for doc in docs/*.md; do put "$doc" "$DOCDIR/$doc" 644; done
  mkdir_p "$CONFDIR" 700
  put "$work/config.toml" "$CONFDIR/config.toml" 644 keep
  put "$work/env" "$CONFDIR/env" 600 keep

  mkdir_p "$(dirname "$MANIFEST")"
  {
    # Earlier entries for files this run kept (config, env) still belong to walkie.
    printf '%s\n' "$old" | awk 'NF && $1 != "dir"' | while read -r sum path; do
      printf '%s' "$files" | grep -q " $path\$" || printf '%s %s\n' "$sum" "$path"
    done
    printf '%s' "$files"
    printf '%s\n' "$old" | awk '$1 == "dir"'
    printf '%s' "$made_dirs" | awk 'NF { print "dir " $0 }'
  } | awk 'NF && !seen[$0]++' >"$DESTDIR$MANIFEST.new"
  mv -f "$DESTDIR$MANIFEST.new" "$DESTDIR$MANIFEST"

  if user_systemctl daemon-reload; then
    say "systemd: reloaded the user units"
  else
    say "systemd: no user manager here; run 'systemctl --user daemon-reload' where walkie runs"
  fi
  case ":$PATH:" in *":$BINDIR:"*) ;; *) say "note: $BINDIR is not on your PATH" ;; esac
  say ""
  say "Next: put your OpenAI key in $CONFDIR/env, check with 'walkie doctor', then"
  say "  systemctl --user enable --now walkie && loginctl enable-linger \"\$USER\""
}

uninstall_all() {
  if [ ! -e "$DESTDIR$MANIFEST" ]; then
    say "uninstall: nothing installed under $PREFIX ($MANIFEST is missing)" >&2
    exit 1
  fi
  if user_systemctl is-enabled --quiet walkie || user_systemctl is-active --quiet walkie; then
    user_systemctl disable --now walkie || true
    say "systemd: stopped and disabled walkie"
  fi
  dirs=""
  while read -r sum path; do
    if [ "$sum" = dir ]; then dirs="$path
$dirs"; continue; fi
    [ -e "$DESTDIR$path" ] || continue
    if [ "$(checksum "$DESTDIR$path")" = "$sum" ]; then
      rm -f "$DESTDIR$path"
      say "removed $path"
    else
      say "kept   $path (changed since it was installed)"
    fi
  done <"$DESTDIR$MANIFEST"
  rm -f "$DESTDIR$MANIFEST"
  # Innermost first; only the empty ones.
  printf '%s' "$dirs" | awk 'NF' | sort -r | while read -r d; do
    rmdir "$DESTDIR$d" 2>/dev/null || true
  done
  if user_systemctl daemon-reload; then say "systemd: reloaded the user units"; fi
}

case "$action" in
  install) install_all ;;
  uninstall) uninstall_all ;;
  *) say "usage: tools/install.sh install|uninstall" >&2; exit 2 ;;
esac
