# Shared by scripts/demo and scripts/test: find Python >= 3.11, make or reuse .venv,
# install oomguard into it with the given extras. Sourced, not run.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${OOMGUARD_VENV:-$REPO/.venv}

say() { printf '%s\n' "setup: $*" >&2; }

apt_install() {
  # Install Debian packages that are missing; one apt-get update only if needed.
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

find_python() {
  local c
  for c in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 &&
       "$c" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  apt_install python3 python3-venv
  command -v python3
}

ensure_venv() {  # ensure_venv EXTRAS  e.g. ensure_venv dev
  local extras=${1:-}
  local stamp="$VENV/.oomguard-installed-${extras:-base}"
  if [ ! -x "$VENV/bin/python" ]; then
    local py; py=$(find_python)
    say "creating $VENV with $py"
    "$py" -m venv "$VENV"
  fi
  if [ ! -e "$stamp" ] || [ "$REPO/pyproject.toml" -nt "$stamp" ]; then
    say "installing oomguard${extras:+[$extras]} into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    "$VENV/bin/python" -m pip install -q -e "$REPO${extras:+[$extras]}"
    touch "$stamp"
  fi
}

require_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "$(basename "$0"): run as root (it makes memory cgroups): sudo $0 $*" >&2
    exit 2
  fi
}

ensure_on_path() {
  # Leave a usable `oomguard` command. As root, link /usr/local/bin/oomguard to this
  # checkout's venv when that name is free or already one of this checkout's links (never
  # over someone else's install); otherwise say the one line that makes it usable.
  local bindir=${OOMGUARD_BIN_DIR:-/usr/local/bin}
  local target="$VENV/bin/oomguard" link="$bindir/oomguard" current bindir_hint
  ON_PATH_HINT=""
  if [ "$(command -v oomguard 2>/dev/null || true)" = "$target" ]; then return 0; fi
  if [ "$(id -u)" -eq 0 ] && [ -d "$bindir" ]; then
    if [ ! -e "$link" ] && [ ! -L "$link" ]; then
      ln -s "$target" "$link" && say "linked $link -> $target" && _bindir_on_path "$bindir" && return 0
    elif [ -L "$link" ]; then
      current=$(readlink "$link")
      case "$current" in
        "$REPO"/*/bin/oomguard|"$target")
          [ "$current" = "$target" ] || { ln -sfn "$target" "$link" && say "linked $link -> $target"; }
          _bindir_on_path "$bindir" && return 0 ;;
      esac
    fi
  fi
  [ -L "$link" ] && [ "$(readlink "$link")" = "$target" ] && bindir_hint=$bindir || bindir_hint="$VENV/bin"
  ON_PATH_HINT="export PATH=\"$bindir_hint:\$PATH\"  # oomguard is in $bindir_hint"
  say "oomguard is not on PATH: $ON_PATH_HINT"
}

_bindir_on_path() { case ":$PATH:" in *":$1:"*) return 0 ;; *) return 1 ;; esac; }
