#!/usr/bin/env bash
# The whole test suite: install the Debian packages the tests need
# (idempotently), then run every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then
  scripts/install-test-deps.sh
else
  sudo scripts/install-test-deps.sh
fi
# prove the install step before any test: every tool runs, one QEMU version
scripts/check-test-deps.sh
# bounded, so a hung test fails CI with a message instead of running out its clock
timeout --kill-after=30 3000 cargo test --workspace --release -- --test-threads=2
