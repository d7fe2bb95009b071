#!/usr/bin/env bash
# Sets up a Debian machine for msocks: the system packages listed in
# scripts/packages.txt, the Python module PySocks, and a release build of the
# `msocks` binary. Idempotent; run as root (or with sudo available), from any
# directory.
#
# Usage: scripts/install.sh [--deps-only | --missing-only]
#   (default)       apt-get update + install every listed package, PySocks,
#                   then `cargo build --release --locked -p msocks`
#   --deps-only     packages and PySocks only, no build
#   --missing-only  like --deps-only, but touches apt (update + install) only
#                   when a listed package is not installed yet, and pip only
#                   when `import socks` fails: fast when nothing is missing.
#                   scripts/test.sh uses this mode.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODE=full
case "${1:-}" in
"") ;;
--deps-only) MODE=deps ;;
--missing-only) MODE=missing ;;
-h | --help)
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
*)
    echo "install.sh: unknown argument: $1 (try --help)" >&2
    exit 2
    ;;
esac

PACKAGES_FILE="$ROOT/scripts/packages.txt"
# Package names: comments and blank lines stripped.
mapfile -t PACKAGES < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$PACKAGES_FILE" | grep -v '^$')

step() { printf '\n==> %s\n' "$*"; }

SUDO=()
if [[ $EUID -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "install.sh: not root and no sudo: cannot install system packages" >&2
        exit 1
    fi
fi

retry() { # retry N CMD...: for apt/pip hiccups
    local n=$1 i
    shift
    for ((i = 1; i <= n; i++)); do
        if "$@"; then return 0; fi
        if ((i < n)); then
            echo "   (attempt $i of $n failed: $*; retrying in $((i * 5)) s)" >&2
            sleep $((i * 5))
        fi
    done
    return 1
}

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

install_system_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        is_installed "$p" || missing+=("$p")
    done
    if [[ $MODE == missing && ${#missing[@]} -eq 0 ]]; then
        step "system packages: all ${#PACKAGES[@]} from scripts/packages.txt are installed"
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install.sh: apt-get not found (this script is for Debian); missing: ${missing[*]:-none}" >&2
        exit 1
    fi
    if [[ ${#missing[@]} -gt 0 ]]; then
        step "system packages missing: ${missing[*]}"
    fi

    step "apt-get update"
    retry 3 "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update

    step "checking with apt-cache policy that every package exists"
    local unknown=() candidate
    for p in "${PACKAGES[@]}"; do
        candidate="$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')"
        if [[ -z $candidate || $candidate == "(none)" ]]; then
            unknown+=("$p")
        else
            printf '   %-14s %s\n' "$p" "$candidate"
        fi
    done
    if [[ ${#unknown[@]} -gt 0 ]]; then
        echo "install.sh: no installable candidate for: ${unknown[*]} (edit scripts/packages.txt)" >&2
        exit 1
    fi

    local to_install=("${PACKAGES[@]}")
    if [[ $MODE == missing ]]; then
        to_install=("${missing[@]}")
    fi
    step "apt-get install -y ${to_install[*]}"
    # Keep package scripts from starting daemons (danted, iperf3) on
    # machines without an init system: policy-rc.d exit 101 = "not allowed".
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
        "${SUDO[@]}" chmod +x "$policy"
        added_policy=1
    fi
    local rc=0
    retry 2 "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${to_install[@]}" || rc=$?
    if [[ $added_policy -eq 1 ]]; then
        "${SUDO[@]}" rm -f "$policy"
    fi
    if [[ $rc -ne 0 ]]; then
        echo "install.sh: apt-get install failed (status $rc)" >&2
        exit "$rc"
    fi
}

install_pysocks() {
    if [[ $MODE == missing ]] && python3 -c 'import socks' >/dev/null 2>&1; then
        step "PySocks: already importable by $(command -v python3)"
        return 0
    fi
    step "pip install PySocks (for $(command -v python3))"
    local out rc=0
    # Plain pip first (works for pyenv/venv Pythons); only a Debian-managed
    # Python refuses with "externally-managed-environment" (PEP 668).
    out="$(PIP_ROOT_USER_ACTION=ignore python3 -m pip install --disable-pip-version-check PySocks 2>&1)" || rc=$?
    printf '%s\n' "$out"
    if [[ $rc -ne 0 ]]; then
        if grep -q 'externally-managed-environment' <<<"$out"; then
            step "pip: externally managed Python; retrying with --break-system-packages"
            retry 2 env PIP_ROOT_USER_ACTION=ignore python3 -m pip install \
                --disable-pip-version-check --break-system-packages PySocks
        else
            echo "install.sh: pip install PySocks failed (status $rc)" >&2
            exit "$rc"
        fi
    fi
    python3 -c 'import socks; print("   PySocks", socks.__version__, "at", socks.__file__)'
}

find_cargo() {
    if ! command -v cargo >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 || {
        echo "install.sh: cargo not found (install a Rust toolchain first)" >&2
        exit 1
    }
}

install_system_packages
install_pysocks

if [[ $MODE == full ]]; then
    find_cargo
    step "cargo build --release --locked -p msocks"
    cargo build --release --locked -p msocks
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/msocks"
    step "done: the msocks binary is $BIN"
    "$BIN" --version 2>/dev/null || true
else
    step "done (dependencies only)"
fi
