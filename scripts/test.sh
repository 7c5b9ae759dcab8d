#!/usr/bin/env bash
# The whole test suite, against a real nginx: installs nginx, curl and unshare when missing,
# then runs every unit and integration test. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$PATH:/usr/sbin:/sbin"
cargo test --workspace --locked "$@"
