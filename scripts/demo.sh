#!/usr/bin/env bash
# The demo: the gateway (conf/demo.yaml) on 127.0.0.1:8080 in front of a real SEKMET FHIR R4
# server on 127.0.0.1:8090, callers authenticated by a real OpenID provider on 127.0.0.1:9400,
# events of every write on a Kafka-protocol broker (tansu) on 127.0.0.1:19092.
# Loads sample data through the gateway and shows allowed and refused calls, then data-level
# security: a practitioner and two patients linked with /manage see only their own data, and an
# opt-out Consent hides one patient's data from the practitioner on the next request; finally an
# Observation is created, updated and deleted, and the events of all these writes are read back
# from the topic fhir-events.
# Keeps running until Ctrl-C when started from a terminal (DEMO_KEEP=0 to exit at once).
# PEERS=<dir> keeps the peers (and their logs) somewhere else than .cache/peers.
set -euo pipefail
cd "$(dirname "$0")/.."
GW=http://127.0.0.1:8080/fhir
PEERS=${PEERS:-$PWD/.cache/peers}
SPOOL=/tmp/fhir-gateway-demo-spool   # events.spool.dir of conf/demo.yaml
TRAIL=/tmp/fhir-gateway-demo-audit.jsonl TRAIL_KEY=/tmp/fhir-gateway-demo-audit.key   # audit: of conf/demo.yaml

scripts/prereqs.sh
scripts/peers.sh install
echo "== building the gateway"
cargo build --quiet --bin fhir-gateway
# The audit trail's checkpoint key (a secret: mode 600) and a fresh trail for this run.
rm -f "$TRAIL" "$TRAIL_KEY" "$TRAIL.fhir-sent"
(umask 077; head -c 48 /dev/urandom | base64 >"$TRAIL_KEY")
target/debug/fhir-gateway -t -c conf/demo.yaml

cleanup() {
  [ -n "${GW_PID:-}" ] && kill "$GW_PID" 2>/dev/null && wait "$GW_PID" 2>/dev/null
  # Only the peers this run started: a test run or a second terminal may be using the others.
  [ -n "${STARTED:-}" ] && scripts/peers.sh stop $STARTED
  rm -rf "$SPOOL"
  rm -f "$TRAIL_KEY"
}
trap cleanup EXIT
if curl -s -o /dev/null http://127.0.0.1:8080/ 2>/dev/null; then
  echo "127.0.0.1:8080 is already in use: stop whatever listens there first"; exit 1
fi
# A peer port held by something this script did not start (another checkout's peers, a test run)
# would be used as if it were ours: refuse instead.
for p in sekmet:8090 oidc:9400 kafka:19092; do
  name=${p%%:*} port=${p#*:}
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null &&
     ! { [ -f "$PEERS/$name.pid" ] && kill -0 "$(cat "$PEERS/$name.pid")" 2>/dev/null; }; then
    echo "127.0.0.1:$port ($name) is in use by a process not started from $PEERS: stop it first"; exit 1
  fi
done
# The broker starts empty (in memory); events a previous run left in the spool would be replayed
# into it as if they were this run's.
rm -rf "$SPOOL"
STARTED=""
for name in sekmet oidc kafka; do
  { [ -f "$PEERS/$name.pid" ] && kill -0 "$(cat "$PEERS/$name.pid")" 2>/dev/null; } || STARTED="$STARTED $name"
done
SEKMET_LOG_INBOUND=false scripts/peers.sh start sekmet oidc kafka

target/debug/fhir-gateway -c conf/demo.yaml >"$PEERS/gateway-demo.log" 2>&1 &
GW_PID=$!
for _ in $(seq 100); do curl -fsS -o /dev/null http://127.0.0.1:8080/readyz 2>/dev/null && break; sleep 0.1; done
curl -fsS http://127.0.0.1:8080/readyz >/dev/null || { echo "gateway did not become ready"; cat "$PEERS/gateway-demo.log"; exit 1; }

show() { # title, then a curl command line
  echo; echo "== $1"; shift
  echo "\$ curl $*" | sed -E 's/Bearer [A-Za-z0-9._-]+/Bearer <token>/g' 
  local out; out=$(mktemp)
  curl -sS -o "$out" "$@" || true   # (not piped into head: curl fails when head stops reading)
  head -c 1200 "$out"; rm -f "$out"; echo
}

token() { # client id → access token from the demo IdP (client credentials)
  curl -fsS -u "$1:${1%-app}-secret" -d grant_type=client_credentials ${2:+--data-urlencode "scope=$2"} \
    http://127.0.0.1:9400/token | python3 -c 'import sys,json; print(json.load(sys.stdin)["access_token"])'
}
ADMIN=$(token admin-app); READER=$(token reader-app); WRITER=$(token writer-app)
OTHER_TENANT=$(token other-tenant-app)

echo; echo "== loading sample data (tests/fixtures/fhir) through the gateway, as admin-app"
# X-Request-Id becomes the events' correlation id: the summary at the end groups them by it.
for f in tests/fixtures/fhir/*.json; do
  code=$(curl -sS -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Bearer $ADMIN" \
    -H "X-Request-Id: demo-load-$(basename "$f" .json)" \
    -H 'Content-Type: application/fhir+json' --data-binary @"$f" "$GW")
  echo "POST $GW  <- $f  => $code"
done

show "health and readiness" http://127.0.0.1:8080/readyz
# The steps that show patient data use admin-app (a bypass role of ParticipantFilter): reader-app is
# nobody in the FHIR server (no fhirUser, no link), so it sees no patient data on this route.
show "SMART discovery (anonymous)" "$GW/.well-known/smart-configuration"
show "admin-app searches: links and fullUrls name the gateway, never the FHIR server" \
  -H "Authorization: Bearer $ADMIN" "$GW/Patient?_count=1&_elements=name,gender"
show "writer-app creates: Location points at the gateway" -i -X POST -H "Authorization: Bearer $WRITER" \
  -H 'Content-Type: application/fhir+json' \
  -d '{"resourceType":"Patient","name":[{"family":"Demo","given":["Ada"]}]}' "$GW/Patient"
show "reader-app may not write: 403 naming the rule" -i -X POST -H "Authorization: Bearer $READER" \
  -H 'Content-Type: application/fhir+json' -d '{"resourceType":"Patient"}' "$GW/Patient"
show "writer-app may not read: 403" -i -H "Authorization: Bearer $WRITER" "$GW/Patient?_count=1"
show "no token: 401 with WWW-Authenticate" -i "$GW/Patient"
show "a token from a tenant the gateway does not serve: 401" -i -H "Authorization: Bearer $OTHER_TENANT" "$GW/Patient"
show "XML works too (admin-app; filtered callers get JSON only)" -H "Authorization: Bearer $ADMIN" "$GW/Patient?family=Demo&_format=xml"
show "spoofed audit headers are replaced by the real identity (SEKMET sees oid-reader-app)" -i \
  -H "Authorization: Bearer $READER" -H 'X-MS-AZUREFHIR-AUDIT-USERID: spoof' "$GW/Patient?_count=0"
PID=$(curl -fsS -H "Authorization: Bearer $ADMIN" "$GW/Patient?_count=1&_elements=id" | python3 -c 'import sys,json; print(json.load(sys.stdin)["entry"][0]["resource"]["id"])')
show "EverythingPatient: Patient/$PID/\$everything assembled by the gateway (first bytes)" \
  -H "Authorization: Bearer $ADMIN" "$GW/Patient/$PID/\$everything"
show "DateSort: every Observation of the patient, newest first, one page" \
  -H "Authorization: Bearer $ADMIN" "$GW/Observation?subject=Patient/$PID&_sort=-date&_count=5&_elements=effectiveDateTime"
show "module metrics (Prometheus, 127.0.0.1:9091)" "http://127.0.0.1:9091/metrics"
show "errors are OperationOutcomes" -i "http://127.0.0.1:8080/nothing-here"
show "hostile paths are refused before they reach the server" --path-as-is -i -H "Authorization: Bearer $READER" "$GW/..%2fmanage"

# ---- Data-level security: ParticipantFilter and ConsentOptOut (docs/modules.md) ----------------
SEK=http://127.0.0.1:8090/fhir   # SEKMET itself: the demo seeds it directly, as a hospital system would
TENANT=11111111-1111-1111-1111-111111111111
PRACT=$(token practitioner-app); PATIENT=$(token patient-app); OPTOUT=$(token optout-patient-app)

summary() { # reads a FHIR JSON body on stdin → "Type/id, Type/id" or the OperationOutcome's diagnostics
  python3 -c '
import sys, json
raw = sys.stdin.read()
try:
    b = json.loads(raw)
except ValueError:
    print(raw[:200].strip() or "(no body)"); sys.exit()
def rid(r): return "%s/%s" % (r.get("resourceType"), r.get("id", "-"))
def oo(r): return "; ".join(i.get("diagnostics", i.get("code", "")) for i in r.get("issue", []))
if b.get("resourceType") == "Bundle":
    shown = [rid(e["resource"]) for e in b.get("entry", []) if e.get("search", {}).get("mode") != "outcome" and "resource" in e]
    notes = [oo(e["resource"]) for e in b.get("entry", []) if e.get("search", {}).get("mode") == "outcome"]
    print("returned: " + (", ".join(shown) or "nothing") + ("  [total %s]" % b["total"] if "total" in b else "  [no total]")
          + "".join("\n      notice: " + n for n in notes))
elif b.get("resourceType") == "OperationOutcome":
    print(oo(b))
elif "resourceType" in b:
    print(rid(b))
else:
    print(json.dumps(b))
'
}

ask() { # who token method url [json body] → one readable line: what was asked, status, ids
  local who=$1 tok=$2 method=$3 url=$4 body=${5:-} out code
  out=$(mktemp)
  code=$(curl -sS -o "$out" -w '%{http_code}' -X "$method" -H "Authorization: Bearer $tok" \
    -H 'Accept: application/fhir+json' ${body:+-H 'Content-Type: application/fhir+json' --data-binary "$body"} "$url")
  printf '  %-19s %-6s %s\n      => %s  %s\n' "$who" "$method" "${url#http://127.0.0.1:8080}" "$code" "$(summary <"$out")"
  rm -f "$out"
}

seed() { # Type/id json → PUT straight into SEKMET
  local code
  code=$(curl -sS -o /dev/null -w '%{http_code}' -X PUT -H 'Content-Type: application/fhir+json' \
    --data-binary "$2" "$SEK/$1")
  case $code in 200|201) echo "  PUT $SEK/$1 => $code" ;; *) echo "  PUT $SEK/$1 => $code (failed)"; exit 1 ;; esac
}

echo; echo "== data-level security: seeding SEKMET directly (fixed demo- ids, PUT: safe to re-run)"
# A new run starts without the opt-out. Deleted straight in SEKMET, so a running gateway would keep
# it cached up to cache_ttl_minutes; this script starts a fresh gateway every time.
echo "  DELETE $SEK/Consent/demo-optout => $(curl -sS -o /dev/null -w '%{http_code}' -X DELETE "$SEK/Consent/demo-optout")"
seed Practitioner/demo-dr '{"resourceType":"Practitioner","id":"demo-dr","name":[{"family":"House","given":["Gregory"],"prefix":["Dr"]}]}'
for p in ann:Ann:Lee bob:Bob:Marley; do
  IFS=: read -r id given family <<<"$p"
  seed "Patient/demo-$id" "{\"resourceType\":\"Patient\",\"id\":\"demo-$id\",\"name\":[{\"family\":\"$family\",\"given\":[\"$given\"]}],\"generalPractitioner\":[{\"reference\":\"Practitioner/demo-dr\"}]}"
  seed "Observation/demo-obs-$id" "{\"resourceType\":\"Observation\",\"id\":\"demo-obs-$id\",\"status\":\"final\",\"code\":{\"coding\":[{\"system\":\"http://loinc.org\",\"code\":\"8867-4\",\"display\":\"Heart rate\"}]},\"subject\":{\"reference\":\"Patient/demo-$id\"},\"effectiveDateTime\":\"2026-01-15T09:30:00Z\",\"valueQuantity\":{\"value\":72,\"unit\":\"beats/minute\",\"system\":\"http://unitsofmeasure.org\",\"code\":\"/min\"}}"
done

echo; echo "== /manage (Administrator only): who each demo app is in the FHIR server"
for l in practitioner-app:Practitioner/demo-dr patient-app:Patient/demo-ann optout-patient-app:Patient/demo-bob; do
  app=${l%%:*} ref=${l#*:}
  printf '  POST /manage/link %-19s -> %-22s => ' "$app" "$ref"
  curl -sS -w '  %{http_code}\n' -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \
    -d "{\"tenant\":\"$TENANT\",\"oid\":\"oid-$app\",\"reference\":\"$ref\"}" http://127.0.0.1:8080/manage/link
done
printf '  GET  /manage/find?type=Patient&name=Marley => '
curl -sS -H "Authorization: Bearer $ADMIN" 'http://127.0.0.1:8080/manage/find?type=Patient&name=Marley'; echo
printf '  POST /manage/link as reader-app => '
curl -sS -o /dev/null -w '%{http_code} (Administrator only)\n' -H "Authorization: Bearer $READER" \
  -H 'Content-Type: application/json' -d '{"oid":"x","reference":"Patient/demo-ann"}' http://127.0.0.1:8080/manage/link

HR="$GW/Observation?code=http://loinc.org%7C8867-4&_count=50"   # every heart rate, any patient
echo; echo "== ParticipantFilter: the same search, filtered for whoever asks (Ann and Bob are Dr House's patients)"
ask practitioner-app "$PRACT" GET "$HR"
ask patient-app "$PATIENT" GET "$HR"
ask patient-app "$PATIENT" GET "$GW/Observation/demo-obs-ann"
ask patient-app "$PATIENT" GET "$GW/Observation/demo-obs-bob"
ask reader-app "$READER" GET "$HR"
echo "      (reader-app has no fhirUser and no link: it is nobody in the FHIR server, so no patient data)"

echo; echo "== ConsentOptOut: Bob withholds his data from everyone (category LOINC 59284-0, no actor)"
TODAY=$(date -u +%F)
CONSENT=$(cat <<JSON
{"resourceType":"Consent","id":"demo-optout","status":"active",
 "scope":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/consentscope","code":"patient-privacy"}]},
 "category":[{"coding":[{"system":"http://loinc.org","code":"59284-0","display":"Patient Consent"}]}],
 "patient":{"reference":"Patient/demo-bob"},"dateTime":"$TODAY",
 "policyRule":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"OPTOUT"}]},
 "provision":{"type":"deny","period":{"start":"$TODAY"}}}
JSON
)
# Patients have no write role here: the hospital's writer-app records Bob's decision through the
# gateway, so every cache of this instance forgets Consents at once. The write happens; its result
# (Bob's data) is withheld from writer-app, which is nobody in the FHIR server.
ask writer-app "$WRITER" PUT "$GW/Consent/demo-optout" "$CONSENT"
ask practitioner-app "$PRACT" GET "$HR"
ask practitioner-app "$PRACT" GET "$GW/Observation/demo-obs-bob"
ask optout-patient-app "$OPTOUT" GET "$HR"
ask patient-app "$PATIENT" GET "$HR"

# ---- Break-the-glass and the audit trail (docs/audit.md) ----------------------------------------
echo; echo "== break-the-glass: Dr House needs Bob's data in an emergency, despite the opt-out"
glass() { # reason (empty: none) → one readable line
  local out code; out=$(mktemp)
  code=$(curl -sS -o "$out" -w '%{http_code}' -H "Authorization: Bearer $PRACT" -H 'Accept: application/fhir+json' \
    ${1:+-H "X-Break-The-Glass: $1"} "$GW/Observation/demo-obs-bob")
  printf '  %-19s GET    /fhir/Observation/demo-obs-bob%s\n      => %s  %s\n' practitioner-app \
    "${1:+  (X-Break-The-Glass: $1)}" "$code" "$(summary <"$out")"
  rm -f "$out"
}
glass ""
glass " "
glass "unconscious patient in the ED, allergies unknown"
glass ""
echo "      (no reason: refused; with one: served for break_the_glass.minutes, and audited)"
printf '  GET /manage/glass (admin-app) => '
curl -sS -H "Authorization: Bearer $ADMIN" http://127.0.0.1:8080/manage/glass; echo

echo; echo "== who saw Bob's data: the audit trail (GET /manage/audit?patient=Patient/demo-bob, admin-app)"
curl -sS -H "Authorization: Bearer $ADMIN" 'http://127.0.0.1:8080/manage/audit?patient=Patient/demo-bob' | python3 -c '
import sys, json
b = json.load(sys.stdin)
for e in b.get("entry", []):
    ev = e["resource"]; who = ev["agent"][0]
    user = who.get("altId") or who.get("who", {}).get("identifier", {}).get("value", "?")
    what = next((x["description"] for x in ev["entity"] if x.get("description", "").startswith(("GET", "POST", "PUT"))), "")
    why = (who.get("purposeOfUse") or [{}])[0].get("text")
    print("  %s  %-32s %-14s %s%s" % (ev["recorded"], user, ev["subtype"][0]["code"], what,
          "  [break-the-glass: %s]" % why if why else ""))
print("  (%d records name Patient/demo-bob; the opt-out kept it from everyone else)" % b.get("total", 0))
'
printf '  Bob reads his own access log (patient_access_log: true): GET /manage/audit as optout-patient-app => '
curl -sS -o /dev/null -w '%{http_code}\n' -H "Authorization: Bearer $OPTOUT" 'http://127.0.0.1:8080/manage/audit?patient=Patient/demo-bob'
printf '  ... and Ann'"'"'s: => '
curl -sS -o /dev/null -w '%{http_code} (only their own)\n' -H "Authorization: Bearer $OPTOUT" 'http://127.0.0.1:8080/manage/audit?patient=Patient/demo-ann'
printf '  the same question asked of SEKMET (audit.fhir sends every AuditEvent there): GET AuditEvent?entity=Patient/demo-bob => '
# The sink sends every interval_ms (500 ms here): wait until it caught up with the file.
for _ in $(seq 1 40); do
  [ "$(cut -d' ' -f1 "$TRAIL.fhir-sent" 2>/dev/null)" = "$(stat -c %s "$TRAIL")" ] && break
  sleep 0.25
done
curl -sS 'http://127.0.0.1:8090/fhir/AuditEvent?entity=Patient/demo-bob&_summary=count' \
  | python3 -c 'import sys, json; print("%s records: the ones above, and the /manage/audit answers since, which showed Bob'"'"'s records (reading the log is an access too)" % json.load(sys.stdin).get("total"))'

# ---- Events: PublishFHIREvent → spool → Kafka topic fhir-events (docs/events.md) ------------------
echo; echo "== PublishFHIREvent: writer-app creates, updates and deletes an Observation of Ann"
OBS='{"resourceType":"Observation","status":"preliminary","code":{"coding":[{"system":"http://loinc.org","code":"8310-5","display":"Body temperature"}]},"subject":{"reference":"Patient/demo-ann"},"effectiveDateTime":"2026-01-16T08:00:00Z","valueQuantity":{"value":37.9,"unit":"Cel","system":"http://unitsofmeasure.org","code":"Cel"}}'
hdrs=$(mktemp); out=$(mktemp)
code=$(curl -sS -o "$out" -D "$hdrs" -w '%{http_code}' -X POST -H "Authorization: Bearer $WRITER" \
  -H 'Accept: application/fhir+json' -H 'Content-Type: application/fhir+json' --data-binary "$OBS" "$GW/Observation")
LOC=$(tr -d '\r' <"$hdrs" | sed -n 's/^[Ll]ocation: *//p')
printf '  %-19s %-6s %s\n      => %s  %s\n      Location: %s\n' writer-app POST /fhir/Observation "$code" "$(summary <"$out")" "$LOC"
rm -f "$hdrs" "$out"
OBS_ID=$(echo "$LOC" | sed -E 's#.*/Observation/([^/]+)(/_history/.*)?$#\1#')
[ "$code" = 201 ] && [ -n "$OBS_ID" ] || { echo "the create failed"; exit 1; }
ask writer-app "$WRITER" PUT "$GW/Observation/$OBS_ID" \
  "$(echo "$OBS" | sed "s/\"status\":\"preliminary\"/\"id\":\"$OBS_ID\",\"status\":\"final\"/")"
ask writer-app "$WRITER" DELETE "$GW/Observation/$OBS_ID"
echo "      (writer-app is nobody in the FHIR server: it gets back what it created, not the updated"
echo "       resource; every write happened)"
ask reader-app "$READER" DELETE "$GW/Observation/demo-obs-ann"
echo "      (refused: no write, no event)"

echo; echo "== the gateway's event metrics (127.0.0.1:9091) once the spool is drained"
for _ in $(seq 100); do
  depth=$(curl -fsS http://127.0.0.1:9091/metrics | sed -n 's/^fhirgw_events_spool_depth //p')
  [ "$depth" = 0 ] && break; sleep 0.1
done
curl -fsS http://127.0.0.1:9091/metrics | grep -E '^fhirgw_events_(total|spool_depth|delivery_seconds_count)' | sed 's/^/  /'

echo; echo "== the events of this demo's writes: topic fhir-events on 127.0.0.1:19092, from the beginning"
"$PEERS/kafka-venv/bin/python" - <<'PY'
# Partitions are assigned, not subscribed: a consumer-group join takes ~20 s on tansu.
import collections, json, time
from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING
c = Consumer({"bootstrap.servers": "127.0.0.1:19092", "group.id": "fhir-gateway-demo",
              "enable.auto.commit": False})
parts = c.list_topics("fhir-events", timeout=10).topics["fhir-events"].partitions
c.assign([TopicPartition("fhir-events", p, OFFSET_BEGINNING) for p in sorted(parts)])
events, quiet_since, deadline = [], time.time(), time.time() + 30
while time.time() - quiet_since < 2 and time.time() < deadline:  # until 2 s without a message
    m = c.poll(0.2)
    if m is None:
        continue
    if m.error():
        print("  consumer error:", m.error()); continue
    quiet_since = time.time()
    cid = dict((k, (v or b"").decode()) for k, v in (m.headers() or [])).get("correlationid", "")
    events.append(((m.key() or b"").decode(), json.loads(m.value()), cid))
c.close()
load = collections.OrderedDict()
for key, e, cid in events:
    if cid.startswith("demo-load-"):
        load.setdefault(cid, []).append((key, e))
for cid, evs in load.items():
    actions = collections.Counter(e["action"] for _, e in evs)
    types = collections.Counter(e["resourcetype"] for _, e in evs)
    keys = collections.Counter(k for k, _ in evs)
    print("  %s (one transaction, %d events): %s" % (cid, len(evs), ", ".join("%s %d" % a for a in actions.items())))
    print("      " + ", ".join("%s %d" % t for t in types.most_common()))
    print("      keys: " + ", ".join("%s x%d" % k for k in keys.most_common()))
rows = [("key", "action", "resource", "version", "patient", "user")] + [
    (key, e["action"], "%s/%s" % (e["resourcetype"], e["id"] or "-"), e.get("version") or "-",
     e.get("patient") or "-", e.get("user") or "-")
    for key, e, cid in events if not cid.startswith("demo-load-")]
widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
for r in rows:
    print("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
print("  %d events in all" % len(events))
updated = [(k, e, cid) for k, e, cid in events if e["action"] == "Updated"]
if updated:
    k, e, cid = updated[-1]
    print("  the update's event in full (key %s, header correlationid %s):" % (k, cid))
    print("  " + json.dumps(e))
PY
echo "  (the sample data's entries, writer-app's Patient, the Consent, then the Observation's create,"
echo "   update and delete; nothing for reads, refused writes, /manage, or what was seeded into SEKMET"
echo "   directly. The delete is keyed Observation/<id>, not Patient/demo-ann: SEKMET answers a delete"
echo "   with an OperationOutcome, not the resource, so the gateway cannot tell whose Observation it was.)"

echo; echo "== gateway access log (last lines)"; grep " access\]" "$PEERS/gateway-demo.log" | tail -n 5

echo; echo "== the audit trail is intact: fhir-gateway audit verify $TRAIL --key-file $TRAIL_KEY"
# Records reach the file within a batch (about 20 ms); /manage/audit above already waited for them.
target/debug/fhir-gateway audit verify "$TRAIL" --key-file "$TRAIL_KEY" | sed 's/^/  /'
cp "$TRAIL" "$TRAIL.tampered"
python3 - "$TRAIL.tampered" <<'PY'
import sys
p = sys.argv[1]; lines = open(p).read().splitlines()
rec = [i for i, l in enumerate(lines) if '"event"' in l]
lines[rec[2]] = lines[rec[2]].replace('"outcome":"0"', '"outcome":"4"', 1)  # one record edited
del lines[rec[5]]                                                         # one deleted
open(p, "w").write("\n".join(lines) + "\n")
PY
echo "== ... and a copy with one record edited and one deleted is caught:"
target/debug/fhir-gateway audit verify "$TRAIL.tampered" --key-file "$TRAIL_KEY" | sed 's/^/  /' || true
rm -f "$TRAIL.tampered"
if [ -t 0 ] && [ "${DEMO_KEEP:-1}" != 0 ]; then
  echo; echo "The gateway is on $GW (FHIR server on 127.0.0.1:8090, events on 127.0.0.1:19092 topic"
  echo "fhir-events). Ctrl-C stops them all."
  wait "$GW_PID"
fi
