#!/usr/bin/env bash
# Installs what building and testing the gateway needs on a fresh Debian machine:
# cmake (pingora's zlib-ng), pkg-config + libssl-dev (OpenSSL for pingora and rdkafka),
# python3-venv (SEKMET), curl, systemd (tests/ops_systemd.rs checks the units with systemd-analyze).
# Idempotent; skips what is already there.
set -euo pipefail
want=(cmake pkg-config libssl-dev python3-venv curl ca-certificates systemd)
missing=()
for p in "${want[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[prereqs] apt-get install ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "[prereqs] a Rust toolchain (cargo) is required: https://rustup.rs" >&2; exit 1; }
if ! command -v node >/dev/null; then
  # The OIDC test provider wants Node 20+; Debian 12's nodejs (18) runs it with a warning.
  echo "[prereqs] apt-get install nodejs npm" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi
