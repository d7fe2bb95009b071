#!/usr/bin/env bash
# The project's whole test command (CI runs it through .ci/run):
#   1. installs whatever is missing of scripts/packages.txt and PySocks
#      (scripts/install.sh --missing-only: no apt/pip call when nothing is),
#   2. runs `cargo test --workspace --all-targets --locked`, with
#      MSOCKS_FUZZ_CASES defaulting to 20000 when CI is set,
# and exits with cargo's status. Extra arguments go to `cargo test`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

header() {
    printf '\n'
    printf '=%.0s' {1..72}
    printf '\n== %s\n' "$*"
    printf '=%.0s' {1..72}
    printf '\n'
}

header "step 1/3: test dependencies (scripts/install.sh --missing-only)"
"$ROOT/scripts/install.sh" --missing-only

header "step 2/3: environment"
if ! command -v cargo >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if [[ -n ${CI:-} ]]; then
    export MSOCKS_FUZZ_CASES="${MSOCKS_FUZZ_CASES:-20000}"
fi
echo "CI=${CI:-<unset>}  MSOCKS_FUZZ_CASES=${MSOCKS_FUZZ_CASES:-<unset: the tests use their default>}"
cargo --version
rustc --version
for tool in curl proxychains4 python3 microsocks danted; do
    printf '%-13s %s\n' "$tool" "$(command -v "$tool" || echo 'NOT FOUND')"
done

header "step 3/3: cargo test --workspace --all-targets --locked $*"
status=0
cargo test --workspace --all-targets --locked "$@" || status=$?

header "cargo test exited with status $status"
exit "$status"
