#!/usr/bin/env bash
# Runs every check and test of the workspace against the real peers:
# formatting, clippy, unit tests, and the integration tests (SEKMET FHIR server, the OIDC provider).
# Installs its own prerequisites and peers (under .cache/, git-ignored) and stops the peers after.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/prereqs.sh
scripts/peers.sh install
trap 'scripts/peers.sh stop' EXIT
scripts/peers.sh start

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
