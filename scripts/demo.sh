#!/usr/bin/env bash
# The demo: the gateway (conf/demo.yaml) on 127.0.0.1:8080 in front of a real SEKMET FHIR R4
# server on 127.0.0.1:8090. Loads sample data through the gateway and shows a few calls.
# Keeps running until Ctrl-C when started from a terminal (DEMO_KEEP=0 to exit at once).
set -euo pipefail
cd "$(dirname "$0")/.."
GW=http://127.0.0.1:8080/fhir
PEERS=${PEERS:-$PWD/.cache/peers}

scripts/prereqs.sh
scripts/peers.sh install
echo "== building the gateway"
cargo build --quiet --bin fhir-gateway
target/debug/fhir-gateway -t -c conf/demo.yaml

cleanup() {
  [ -n "${GW_PID:-}" ] && kill "$GW_PID" 2>/dev/null && wait "$GW_PID" 2>/dev/null
  scripts/peers.sh stop sekmet
}
trap cleanup EXIT
if curl -s -o /dev/null http://127.0.0.1:8080/ 2>/dev/null; then
  echo "127.0.0.1:8080 is already in use: stop whatever listens there first"; exit 1
fi
SEKMET_LOG_INBOUND=false scripts/peers.sh start sekmet

target/debug/fhir-gateway -c conf/demo.yaml >"$PEERS/gateway-demo.log" 2>&1 &
GW_PID=$!
for _ in $(seq 100); do curl -fsS -o /dev/null http://127.0.0.1:8080/readyz 2>/dev/null && break; sleep 0.1; done
curl -fsS http://127.0.0.1:8080/readyz >/dev/null || { echo "gateway did not become ready"; cat "$PEERS/gateway-demo.log"; exit 1; }

show() { # title, then a curl command line
  echo; echo "== $1"; shift
  echo "\$ curl $*"
  curl -sS "$@" | head -c 1200; echo
}

echo; echo "== loading sample data (tests/fixtures/fhir) through the gateway"
for f in tests/fixtures/fhir/*.json; do
  code=$(curl -sS -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/fhir+json' --data-binary @"$f" "$GW")
  echo "POST $GW  <- $f  => $code"
done

show "health and readiness" http://127.0.0.1:8080/readyz
show "search: links and fullUrls name the gateway, never the FHIR server" "$GW/Patient?_count=1&_elements=name,gender"
show "create: Location points at the gateway" -i -X POST -H 'Content-Type: application/fhir+json' \
  -d '{"resourceType":"Patient","name":[{"family":"Demo","given":["Ada"]}]}' "$GW/Patient"
show "XML works too" "$GW/Patient?family=Demo&_format=xml"
show "the caller's token is dropped, a spoofed audit header too (see SEKMET's view: none)" -i \
  -H 'Authorization: Bearer not-forwarded' -H 'X-MS-AZUREFHIR-AUDIT-USERID: spoof' "$GW/Patient?_count=0"
show "errors are OperationOutcomes" -i "http://127.0.0.1:8080/nothing-here"
show "hostile paths are refused before they reach the server" --path-as-is -i "$GW/..%2fmanage"

echo; echo "== gateway access log (last lines)"; grep " access\]" "$PEERS/gateway-demo.log" | tail -n 5
if [ -t 0 ] && [ "${DEMO_KEEP:-1}" != 0 ]; then
  echo; echo "The gateway is on $GW (FHIR server on 127.0.0.1:8090). Ctrl-C stops both."
  wait "$GW_PID"
fi
