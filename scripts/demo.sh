#!/usr/bin/env bash
# The demo: the gateway (conf/demo.yaml) on 127.0.0.1:8080 in front of a real SEKMET FHIR R4
# server on 127.0.0.1:8090, callers authenticated by a real OpenID provider on 127.0.0.1:9400.
# Loads sample data through the gateway and shows allowed and refused calls.
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
  scripts/peers.sh stop sekmet oidc
}
trap cleanup EXIT
if curl -s -o /dev/null http://127.0.0.1:8080/ 2>/dev/null; then
  echo "127.0.0.1:8080 is already in use: stop whatever listens there first"; exit 1
fi
SEKMET_LOG_INBOUND=false scripts/peers.sh start sekmet oidc

target/debug/fhir-gateway -c conf/demo.yaml >"$PEERS/gateway-demo.log" 2>&1 &
GW_PID=$!
for _ in $(seq 100); do curl -fsS -o /dev/null http://127.0.0.1:8080/readyz 2>/dev/null && break; sleep 0.1; done
curl -fsS http://127.0.0.1:8080/readyz >/dev/null || { echo "gateway did not become ready"; cat "$PEERS/gateway-demo.log"; exit 1; }

show() { # title, then a curl command line
  echo; echo "== $1"; shift
  echo "\$ curl $*" | sed -E 's/Bearer [A-Za-z0-9._-]+/Bearer <token>/g' 
  curl -sS "$@" | head -c 1200; echo
}

token() { # client id → access token from the demo IdP (client credentials)
  curl -fsS -u "$1:${1%-app}-secret" -d grant_type=client_credentials ${2:+--data-urlencode "scope=$2"} \
    http://127.0.0.1:9400/token | python3 -c 'import sys,json; print(json.load(sys.stdin)["access_token"])'
}
ADMIN=$(token admin-app); READER=$(token reader-app); WRITER=$(token writer-app)
OTHER_TENANT=$(token other-tenant-app)

echo; echo "== loading sample data (tests/fixtures/fhir) through the gateway, as admin-app"
for f in tests/fixtures/fhir/*.json; do
  code=$(curl -sS -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Bearer $ADMIN" \
    -H 'Content-Type: application/fhir+json' --data-binary @"$f" "$GW")
  echo "POST $GW  <- $f  => $code"
done

show "health and readiness" http://127.0.0.1:8080/readyz
show "SMART discovery (anonymous)" "$GW/.well-known/smart-configuration"
show "reader-app searches: links and fullUrls name the gateway, never the FHIR server" \
  -H "Authorization: Bearer $READER" "$GW/Patient?_count=1&_elements=name,gender"
show "writer-app creates: Location points at the gateway" -i -X POST -H "Authorization: Bearer $WRITER" \
  -H 'Content-Type: application/fhir+json' \
  -d '{"resourceType":"Patient","name":[{"family":"Demo","given":["Ada"]}]}' "$GW/Patient"
show "reader-app may not write: 403 naming the rule" -i -X POST -H "Authorization: Bearer $READER" \
  -H 'Content-Type: application/fhir+json' -d '{"resourceType":"Patient"}' "$GW/Patient"
show "writer-app may not read: 403" -i -H "Authorization: Bearer $WRITER" "$GW/Patient?_count=1"
show "no token: 401 with WWW-Authenticate" -i "$GW/Patient"
show "a token from a tenant the gateway does not serve: 401" -i -H "Authorization: Bearer $OTHER_TENANT" "$GW/Patient"
show "XML works too (reader-app)" -H "Authorization: Bearer $READER" "$GW/Patient?family=Demo&_format=xml"
show "spoofed audit headers are replaced by the real identity (SEKMET sees oid-reader-app)" -i \
  -H "Authorization: Bearer $READER" -H 'X-MS-AZUREFHIR-AUDIT-USERID: spoof' "$GW/Patient?_count=0"
PID=$(curl -fsS -H "Authorization: Bearer $READER" "$GW/Patient?_count=1&_elements=id" | python3 -c 'import sys,json; print(json.load(sys.stdin)["entry"][0]["resource"]["id"])')
show "EverythingPatient: Patient/$PID/\$everything assembled by the gateway (first bytes)" \
  -H "Authorization: Bearer $READER" "$GW/Patient/$PID/\$everything"
show "DateSort: every Observation of the patient, newest first, one page" \
  -H "Authorization: Bearer $READER" "$GW/Observation?subject=Patient/$PID&_sort=-date&_count=5&_elements=effectiveDateTime"
show "module metrics (Prometheus, 127.0.0.1:9091)" "http://127.0.0.1:9091/metrics"
show "errors are OperationOutcomes" -i "http://127.0.0.1:8080/nothing-here"
show "hostile paths are refused before they reach the server" --path-as-is -i -H "Authorization: Bearer $READER" "$GW/..%2fmanage"

echo; echo "== gateway access log (last lines)"; grep " access\]" "$PEERS/gateway-demo.log" | tail -n 5
if [ -t 0 ] && [ "${DEMO_KEEP:-1}" != 0 ]; then
  echo; echo "The gateway is on $GW (FHIR server on 127.0.0.1:8090). Ctrl-C stops both."
  wait "$GW_PID"
fi
