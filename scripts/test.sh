#!/usr/bin/env bash
# The whole test suite: install the Debian packages the tests need
# (idempotently), prove the install, then run every test in the workspace:
# first the unit, property and fuzz tests in a debug build (overflow
# checks, debug assertions, std's pointer-alignment checks), then
# everything in release.
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
echo "test.sh: unit, property and fuzz tests in a debug build"
timeout --kill-after=30 1200 cargo test --workspace --lib -- --test-threads=2
timeout --kill-after=30 600 cargo test -p quern-bdev --test engine --test reactor_io \
  -p quern-reactor --test reactor -p quern-vhost --test frontend_fuzz -p quern --test api \
  -- --test-threads=2
echo "test.sh: every test in a release build"
timeout --kill-after=30 3000 cargo test --workspace --release -- --test-threads=2
