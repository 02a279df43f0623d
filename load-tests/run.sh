#!/usr/bin/env bash
# Load-test harness: direct upstream vs nginx proxy_pass vs fhir-gateway without auth
# (insecure_dev) and with JWT auth against the project's test OIDC provider, all on 127.0.0.1.
#
#   load-tests/run.sh                 RUNS=3, DURATION=10s per run
#   QUICK=1 load-tests/run.sh         1 run of 3 s (smoke test of the harness)
#   RUNS=5 DURATION=20s load-tests/run.sh
#
# Other knobs: CONNS (wrk/h2load connections, 32), RATE_PCT (fixed rate as % of the gateway's
# peak, 50), PROXY_CPU (1) / LOADGEN_CPU (0), SKIP_BUILD=1 (use the existing release binary),
# OIDC_PORT (19400) and PEERS (.cache/load-tests-peers) for the IdP run by scripts/peers.sh.
#
# Writes load-tests/results/latest.md and load-tests/results/latency.png. Everything it starts
# is stopped by PID on exit; its temp folder is removed. See load-tests/README.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
RESULTS=$HERE/results
BIN=$REPO/target/release/fhir-gateway

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
  RUNS=${RUNS:-1}
  DURATION=${DURATION:-3s}
else
  RUNS=${RUNS:-3}
  DURATION=${DURATION:-10s}
fi
CONNS=${CONNS:-32}
RATE_PCT=${RATE_PCT:-50}
PROXY_CPU=${PROXY_CPU:-1}
LOADGEN_CPU=${LOADGEN_CPU:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
OIDC_PORT=${OIDC_PORT:-19400}
# Not the tests' .cache/peers: scripts/test.sh stops every peer there, and 'peers.sh start oidc'
# stops whatever oidc.pid in its PEERS folder names before starting its own.
PEERS=${PEERS:-$REPO/.cache/load-tests-peers}

UP_PORT=18090
NGX_PORT=18081
GW_PORT=18080
GWJ_PORT=18082
RES_PATH=/fhir/Patient/1
declare -A URL=(
  [direct]=http://127.0.0.1:$UP_PORT$RES_PATH
  [nginx]=http://127.0.0.1:$NGX_PORT$RES_PATH
  [gateway]=http://127.0.0.1:$GW_PORT$RES_PATH
  [gateway-jwt]=http://127.0.0.1:$GWJ_PORT$RES_PATH
)
PATHS=(direct nginx gateway gateway-jwt)
IDP=http://127.0.0.1:$OIDC_PORT
PEERS_SH=$REPO/scripts/peers.sh
AUDIENCE=api://fhir-gateway
TOKEN=""
TOKEN_EXP=0

log() { printf '[load-tests] %s\n' "$*" >&2; }
die() {
  printf '[load-tests] ERROR: %s\n' "$*" >&2
  exit 1
}

# ---------------------------------------------------------------- arguments
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer (got '$RUNS')"
[[ $CONNS =~ ^[1-9][0-9]*$ ]] || die "CONNS must be a positive integer (got '$CONNS')"
[[ $RATE_PCT =~ ^[1-9][0-9]*$ ]] || die "RATE_PCT must be a positive integer (got '$RATE_PCT')"
[[ $OIDC_PORT =~ ^[1-9][0-9]*$ ]] || die "OIDC_PORT must be a port number (got '$OIDC_PORT')"
if [[ $DURATION =~ ^([1-9][0-9]*)s?$ ]]; then
  DUR_S=${BASH_REMATCH[1]}
elif [[ $DURATION =~ ^([1-9][0-9]*)m$ ]]; then
  DUR_S=$((BASH_REMATCH[1] * 60))
else
  die "DURATION must look like 10s, 10 or 2m (got '$DURATION')"
fi
NCPU=$(nproc)
((PROXY_CPU < NCPU && LOADGEN_CPU < NCPU)) ||
  die "PROXY_CPU=$PROXY_CPU / LOADGEN_CPU=$LOADGEN_CPU need a CPU this machine lacks (nproc=$NCPU)"
[[ $PROXY_CPU != "$LOADGEN_CPU" ]] || log "warning: proxies and load generator share CPU $PROXY_CPU"

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
[[ -x $PEERS_SH ]] || die "$PEERS_SH not found"

# ---------------------------------------------------------------- cleanup
TMP=$(mktemp -d "${TMPDIR:-/tmp}/fhir-load-tests.XXXXXX")
PIDS=()
NAMES=()
LOADGEN_PID=""
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
    # Pingora: SIGINT = fast shutdown (SIGTERM waits out the grace period). nginx: SIGTERM = fast.
    if [[ ${NAMES[i]} == gateway* ]]; then
      stop_pid "${PIDS[i]}" INT
    else
      stop_pid "${PIDS[i]}" TERM
    fi
  done
  if ((IDP_STARTED)); then # peers.sh stops it by the PID it recorded in $PEERS/oidc.pid
    PEERS=$PEERS OIDC_PORT=$OIDC_PORT "$PEERS_SH" stop oidc >&2 || log "warning: 'peers.sh stop oidc' failed"
  fi
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

# ---------------------------------------------------------------- build
if [[ $SKIP_BUILD == 1 ]]; then
  log "SKIP_BUILD=1: using $BIN as it is"
else
  log "cargo build --release (slow on a cold cache)"
  (cd "$REPO" && cargo build --release) || die "cargo build --release failed"
fi
[[ -x $BIN ]] || die "$BIN not found"

for p in "$UP_PORT" "$NGX_PORT" "$GW_PORT" "$GWJ_PORT" "$OIDC_PORT"; do
  ! port_busy "$p" || die "127.0.0.1:$p is already in use; stop whatever listens there first"
done

# The test IdP's code (oidc-provider under node; the script also installs the SEKMET venv).
log "scripts/peers.sh install (PEERS=$PEERS; idempotent, slow the first time)"
PEERS=$PEERS "$PEERS_SH" install >"$TMP/peers-install.log" 2>&1 ||
  die "scripts/peers.sh install failed: $(tail -n 20 "$TMP/peers-install.log")"

# ---------------------------------------------------------------- payload (~1 KB FHIR Patient)
BASE=http://127.0.0.1:$UP_PORT/fhir
mkdir -p "$TMP/www/fhir/Patient" "$TMP/up" "$TMP/ngx" "$TMP/gw" "$TMP/gwj"
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
  }
}
EOF
} >"$TMP/up/nginx.conf"
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
    }
  }
}
EOF
} >"$TMP/ngx/nginx.conf"

cat >"$TMP/gw/gateway.yaml" <<EOF
listen:
  - addr: 127.0.0.1:$GW_PORT
upstream:
  url: $BASE
auth:
  mode: insecure_dev
logging:
  level: warn
  access_log: false
pingora:
  threads: 1
  pid_file: $TMP/gw/pingora.pid
  upgrade_sock: $TMP/gw/pingora_upgrade.sock
EOF

# The same gateway with real JWT validation against the test IdP (keys via OIDC discovery).
cat >"$TMP/gwj/gateway.yaml" <<EOF
listen:
  - addr: 127.0.0.1:$GWJ_PORT
upstream:
  url: $BASE
auth:
  mode: jwt
  issuers:
    - name: bench
      issuer: $IDP
      discovery_url: $IDP/.well-known/openid-configuration
      audiences: ["$AUDIENCE"]
logging:
  level: warn
  access_log: false
pingora:
  threads: 1
  pid_file: $TMP/gwj/pingora.pid
  upgrade_sock: $TMP/gwj/pingora_upgrade.sock
EOF

for d in up ngx; do
  nginx -t -q -p "$TMP/$d" -e stderr -c "$TMP/$d/nginx.conf" 2>"$TMP/$d/test.log" ||
    die "nginx config $d invalid: $(cat "$TMP/$d/test.log")"
done
"$BIN" -t -c "$TMP/gw/gateway.yaml" >"$TMP/gw/test.log" 2>&1 ||
  die "gateway config invalid: $(cat "$TMP/gw/test.log")"
"$BIN" -t -c "$TMP/gwj/gateway.yaml" >"$TMP/gwj/test.log" 2>&1 ||
  die "gateway-jwt config invalid: $(cat "$TMP/gwj/test.log")"

# ---------------------------------------------------------------- start
start_bg upstream "$LOADGEN_CPU" nginx -p "$TMP/up" -e stderr -c "$TMP/up/nginx.conf"
wait_http upstream "${URL[direct]}"
start_bg nginx-proxy "$PROXY_CPU" nginx -p "$TMP/ngx" -e stderr -c "$TMP/ngx/nginx.conf"
wait_http nginx-proxy "${URL[nginx]}"
start_bg gateway "$PROXY_CPU" env -u RUST_LOG "$BIN" -c "$TMP/gw/gateway.yaml"
wait_http gateway "${URL[gateway]}"

# The IdP (panva oidc-provider via the project's scripts/peers.sh), pinned with the load
# generator; it is only on the path at start-up (discovery, JWKS) and when a token is fetched.
IDP_STARTED=1 # set first: a failed start can leave the process running
TOKEN_TTL=3600 PEERS=$PEERS OIDC_PORT=$OIDC_PORT taskset -c "$LOADGEN_CPU" "$PEERS_SH" start oidc \
  >"$TMP/peers-start.log" 2>&1 || die "scripts/peers.sh start oidc failed: $(cat "$TMP/peers-start.log")"
log "started oidc IdP at $IDP (pid $(cat "$PEERS/oidc.pid" 2>/dev/null || echo '?'), CPU $LOADGEN_CPU)"

start_bg gateway-jwt "$PROXY_CPU" env -u RUST_LOG "$BIN" -c "$TMP/gwj/gateway.yaml"
wait_http gateway-jwt "http://127.0.0.1:$GWJ_PORT/readyz" # 200 once the signing keys are loaded

# ---------------------------------------------------------------- token
b64url_decode() { # base64url without padding on stdin -> bytes
  local s
  s=$(tr '_-' '/+')
  while ((${#s} % 4)); do s+="="; done
  printf '%s' "$s" | base64 -d 2>/dev/null
}

get_token() { # a client-credentials access token for reader-app -> TOKEN, TOKEN_EXP
  local resp tok exp_in parts payload
  resp=$(curl -sS --max-time 10 -u reader-app:reader-secret -d grant_type=client_credentials "$IDP/token") ||
    die "token request to $IDP/token failed"
  tok=$(sed -n 's/.*"access_token" *: *"\([^"]*\)".*/\1/p' <<<"$resp")
  exp_in=$(sed -n 's/.*"expires_in" *: *\([0-9]*\).*/\1/p' <<<"$resp")
  [[ -n $tok && -n $exp_in ]] || die "no access_token/expires_in from $IDP/token: $resp"
  IFS=. read -r -a parts <<<"$tok"
  [[ ${#parts[@]} == 3 && $tok =~ ^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$ ]] ||
    die "access token is not a compact JWT: ${tok:0:40}..."
  b64url_decode <<<"${parts[0]}" | grep -q '"alg":"RS256"' ||
    die "JWT header is not RS256: $(b64url_decode <<<"${parts[0]}")"
  payload=$(b64url_decode <<<"${parts[1]}")
  grep -qF "\"iss\":\"$IDP\"" <<<"$payload" || die "JWT iss is not $IDP: $payload"
  grep -qF "$AUDIENCE" <<<"$payload" || die "JWT aud lacks $AUDIENCE: $payload"
  TOKEN=$tok
  TOKEN_EXP=$((EPOCHSECONDS + exp_in))
  log "token for reader-app: RS256 JWT, ${#tok} bytes, expires in ${exp_in} s"
}

ensure_token() { # ensure_token <seconds>: a token that stays valid that long (plus a margin)
  ((TOKEN_EXP - EPOCHSECONDS > $1 + 60)) && return 0
  get_token
  ((TOKEN_EXP - EPOCHSECONDS > $1 + 60)) ||
    die "a token lives $((TOKEN_EXP - EPOCHSECONDS)) s; one gateway-jwt block needs $(($1 + 60)) s: lower RUNS/DURATION"
}

AUTH=()
auth_for() { # auth_for <path>: AUTH = the header arguments (curl/wrk/h2load -H) for that path
  AUTH=()
  if [[ $1 == gateway-jwt ]]; then
    AUTH=(-H "Authorization: Bearer $TOKEN")
  fi
}
get_token
ensure_token $((RUNS * (DUR_S * 3 + 30) + 31)) # fail now, not after phase 1, if tokens live too briefly

# ---------------------------------------------------------------- correctness
check_body() { # check_body <path> <must contain> <must not contain>
  local code
  auth_for "$1"
  code=$(curl -s --max-time 5 "${AUTH[@]}" -o "$TMP/body.$1" -D "$TMP/headers.$1" -w '%{http_code}' "${URL[$1]}")
  [[ $code == 200 ]] || die "$1: HTTP $code from ${URL[$1]}"
  grep -qiE '^content-type: *application/fhir\+json' "$TMP/headers.$1" ||
    die "$1: content-type is not application/fhir+json: $(grep -i '^content-type' "$TMP/headers.$1")"
  grep -qF "$2" "$TMP/body.$1" || die "$1: body lacks $2: $(head -c 400 "$TMP/body.$1")"
  if [[ -n $3 ]] && grep -qF "$3" "$TMP/body.$1"; then
    die "$1: body still contains $3: $(grep -F "$3" "$TMP/body.$1" | head -3)"
  fi
}
check_body direct "127.0.0.1:$UP_PORT/fhir/Patient/1" ""
check_body nginx "127.0.0.1:$UP_PORT/fhir/Patient/1" ""
check_body gateway "http://127.0.0.1:$GW_PORT/fhir/Patient/1" "127.0.0.1:$UP_PORT"
REWRITES=$(grep -o "http://127.0.0.1:$GW_PORT/fhir" "$TMP/body.gateway" | wc -l)
log "gateway OK: 200, $REWRITES URLs rewritten to http://127.0.0.1:$GW_PORT/fhir, none left to :$UP_PORT"
check_body gateway-jwt "http://127.0.0.1:$GWJ_PORT/fhir/Patient/1" "127.0.0.1:$UP_PORT"
JWT_REWRITES=$(grep -o "http://127.0.0.1:$GWJ_PORT/fhir" "$TMP/body.gateway-jwt" | wc -l)
((JWT_REWRITES == REWRITES)) || die "gateway-jwt rewrote $JWT_REWRITES URLs, gateway $REWRITES"
status_of() { curl -s --max-time 5 -o /dev/null -w '%{http_code}' "$@" "${URL[gateway-jwt]}"; }
code=$(status_of)
[[ $code == 401 ]] || die "gateway-jwt without a token: HTTP $code, expected 401"
BAD_TOKEN=${TOKEN:0:$((${#TOKEN} - 20))}$(if [[ ${TOKEN: -20:1} == A ]]; then echo B; else echo A; fi)${TOKEN: -19}
code=$(status_of -H "Authorization: Bearer $BAD_TOKEN")
[[ $code == 401 ]] || die "gateway-jwt with a tampered signature: HTTP $code, expected 401"
log "gateway-jwt OK: 200 with the token, 401 without one and with a tampered signature"

# ---------------------------------------------------------------- measurements
RUNS_TSV=$TMP/runs.tsv # phase path run rps p50_ms p99_ms [target]
: >"$RUNS_TSV"
ERRORS=()

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

run_wrk() { # run_wrk <path> <seconds> <outfile>
  auth_for "$1"
  run_loadgen "$3" timeout $(($2 + 30)) taskset -c "$LOADGEN_CPU" \
    wrk -t1 -c"$CONNS" -d"$2s" --latency "${AUTH[@]}" "${URL[$1]}" ||
    die "wrk against $1 failed: $(cat "$3")"
}

PHASE1="wrk -t1 -c$CONNS -d${DUR_S}s --latency (closed loop)"
log "phase 1: peak req/s, $PHASE1, $RUNS run(s) per path"
for path in "${PATHS[@]}"; do
  [[ $path != gateway-jwt ]] || ensure_token $((RUNS * (DUR_S + 30) + 31))
  run_wrk "$path" 1 "$TMP/warmup.txt" # warm pools and caches, not recorded
  for ((r = 1; r <= RUNS; r++)); do
    out=$TMP/wrk.$path.$r.txt
    run_wrk "$path" "$DUR_S" "$out"
    read -r rps p50 p99 non2xx sockerr total < <(parse_wrk "$out")
    log "  $path run $r: $rps req/s, p50 $p50 ms, p99 $p99 ms, non-2xx $non2xx, socket errors $sockerr"
    ((total > 0)) || ERRORS+=("peak/$path run $r: no requests completed")
    ((non2xx == 0)) || ERRORS+=("peak/$path run $r: $non2xx non-2xx/3xx responses")
    ((sockerr == 0)) || ERRORS+=("peak/$path run $r: socket errors: $(grep 'Socket errors' "$out")")
    printf 'peak\t%s\t%s\t%s\t%s\t%s\n' "$path" "$r" "$rps" "$p50" "$p99" >>"$RUNS_TSV"
  done
done
((${#ERRORS[@]} == 0)) || die "errors during the peak phase: ${ERRORS[*]}"

col_median() { # col_median <phase> <path> <column 4..7>
  awk -F'\t' -v ph="$1" -v p="$2" -v c="$3" '$1 == ph && $2 == p { print $c }' "$RUNS_TSV" | median
}
GW_PEAK=$(col_median peak gateway 4)
awk -v x="$GW_PEAK" 'BEGIN { exit !(x > 0) }' || die "gateway peak is $GW_PEAK req/s"

# Fixed rate with h2load: --rps is per client, so the total is CONNS x per-client rate. Clients
# are started in batches 1 ms apart (-r/--rate-period) so that their request timers are spread
# over the inter-request interval instead of all firing in the same instant.
PER_CLIENT=$(awk -v p="$GW_PEAK" -v pct="$RATE_PCT" -v c="$CONNS" 'BEGIN { printf "%.2f", p * pct / 100 / c }')
TARGET=$(awk -v r="$PER_CLIENT" -v c="$CONNS" 'BEGIN { printf "%.0f", r * c }')
NREQ=$((TARGET * DUR_S))
BATCH=$(awk -v r="$TARGET" -v c="$CONNS" 'BEGIN {
  interval_ms = 1000 * c / r; b = int(c / interval_ms); if (b < c / interval_ms) b++
  if (b < 1) b = 1; if (b > c) b = c; print b }')
PHASE2="h2load --h1 -c$CONNS --rps $PER_CLIENT (= $TARGET req/s total) -n $NREQ -r $BATCH --rate-period 1ms"
log "phase 2: fixed rate at ${RATE_PCT}% of the gateway's peak ($GW_PEAK req/s): $PHASE2"

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

for path in "${PATHS[@]}"; do
  [[ $path != gateway-jwt ]] || ensure_token $((RUNS * (DUR_S * 3 + 30) + 31))
  run_wrk "$path" 1 "$TMP/warmup.txt"
  auth_for "$path"
  for ((r = 1; r <= RUNS; r++)); do
    out=$TMP/h2load.$path.$r.txt
    lg=$TMP/h2load.$path.$r.tsv
    run_loadgen "$out" timeout $((DUR_S * 3 + 30)) taskset -c "$LOADGEN_CPU" \
      h2load --h1 -c "$CONNS" --rps "$PER_CLIENT" -n "$NREQ" -r "$BATCH" --rate-period 1ms \
      "${AUTH[@]}" --log-file "$lg" "${URL[$path]}" || die "h2load against $path failed: $(tail -5 "$out")"
    read -r rps p50 p99 non2xx count < <(parse_h2load_log "$lg")
    read -r failed errored tmo < <(awk '/^requests:/ {
      for (i = 1; i <= NF; i++) { if ($i ~ /^failed/) f = $(i-1); if ($i ~ /^errored/) e = $(i-1); if ($i ~ /^timeout/) t = $(i-1) }
    } END { print f + 0, e + 0, t + 0 }' "$out")
    log "  $path run $r: $rps req/s achieved, p50 $p50 ms, p99 $p99 ms, non-2xx $non2xx, failed $failed, errored $errored, timeout $tmo"
    ((count == NREQ)) || ERRORS+=("rate/$path run $r: $count of $NREQ requests logged")
    ((non2xx == 0)) || ERRORS+=("rate/$path run $r: $non2xx non-2xx responses")
    ((failed + errored + tmo == 0)) || ERRORS+=("rate/$path run $r: $(grep '^requests:' "$out")")
    printf 'rate\t%s\t%s\t%s\t%s\t%s\n' "$path" "$r" "$rps" "$p50" "$p99" >>"$RUNS_TSV"
  done
done
((${#ERRORS[@]} == 0)) || die "errors during the fixed-rate phase: ${ERRORS[*]}"

# ---------------------------------------------------------------- report
declare -A M
for ph in peak rate; do
  for path in "${PATHS[@]}"; do
    M[$ph.$path.rps]=$(col_median "$ph" "$path" 4)
    M[$ph.$path.p50]=$(col_median "$ph" "$path" 5)
    M[$ph.$path.p99]=$(col_median "$ph" "$path" 6)
  done
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
delta() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.3f", a - b }'; }
fmt() { awk -v a="$1" 'BEGIN { printf "%.3f", a }'; }
fmt0() { awk -v a="$1" 'BEGIN { printf "%.0f", a }'; }

table() { # table <phase>
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
    rps=$(fmt0 "${M[$1.$path.rps]}")
    p50=$(fmt "${M[$1.$path.p50]}")
    p99=$(fmt "${M[$1.$path.p99]}")
    local d50 d99
    d50=$(delta "${M[$1.$path.p50]}" "${M[$1.direct.p50]}")
    d99=$(delta "${M[$1.$path.p99]}" "${M[$1.direct.p99]}")
    if [[ $1 == rate ]]; then
      echo "| $path | $TARGET | $rps | $p50 | $p99 | $d50 | $d99 |"
    else
      echo "| $path | $rps | $p50 | $p99 | $d50 | $d99 |"
    fi
  done
  echo
  echo "- gateway/nginx req/s: **$(ratio "${M[$1.gateway.rps]}" "${M[$1.nginx.rps]}")**," \
    "gateway/direct req/s: **$(ratio "${M[$1.gateway.rps]}" "${M[$1.direct.rps]}")**"
  echo "- added p99 vs direct: gateway **$(delta "${M[$1.gateway.p99]}" "${M[$1.direct.p99]}") ms**," \
    "gateway-jwt **$(delta "${M[$1.gateway-jwt.p99]}" "${M[$1.direct.p99]}") ms**," \
    "nginx $(delta "${M[$1.nginx.p99]}" "${M[$1.direct.p99]}") ms"
  echo "- auth cost: gateway-jwt/gateway req/s: **$(ratio "${M[$1.gateway-jwt.rps]}" "${M[$1.gateway.rps]}")**," \
    "gateway-jwt/nginx req/s: **$(ratio "${M[$1.gateway-jwt.rps]}" "${M[$1.nginx.rps]}")**;" \
    "gateway-jwt − gateway: p50 $(delta "${M[$1.gateway-jwt.p50]}" "${M[$1.gateway.p50]}") ms," \
    "p99 $(delta "${M[$1.gateway-jwt.p99]}" "${M[$1.gateway.p99]}") ms"
}

COMMIT=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if ! git -C "$REPO" diff --quiet HEAD -- 2>/dev/null; then
  COMMIT="$COMMIT (working tree has uncommitted changes)"
fi
CPU_MODEL=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
[[ -n $CPU_MODEL ]] || CPU_MODEL=unknown
mkdir -p "$RESULTS"
{
  echo "# fhir-gateway load test: latest results"
  echo
  echo "- Date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "- Machine: nproc=$NCPU, CPU: $CPU_MODEL, kernel $(uname -r)"
  echo "- Git commit: $COMMIT"
  echo "- Mode: RUNS=$RUNS, DURATION=${DUR_S}s, QUICK=$QUICK; every figure is the median of $RUNS run(s)"
  echo "- Pinning: gateway / nginx proxy on CPU $PROXY_CPU; upstream nginx and load generator on CPU $LOADGEN_CPU"
  echo "- Gateway: release build, pingora threads=1, logging warn, no access log; nginx: 1 worker"
  echo "- Auth: gateway = \`insecure_dev\`; gateway-jwt = \`jwt\` (RS256, keys by OIDC discovery from the test IdP at $IDP), every request with \`Authorization: Bearer\` + one reader-app client-credentials token (${#TOKEN} bytes); the gateway caches verified tokens, so this is the cache-hit path, not one RS256 verification per request"
  echo "- Payload: $RES_PATH, $PAYLOAD_BYTES bytes application/fhir+json; the gateway rewrites $REWRITES URLs per response"
  echo "- Tools: $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}'), $(h2load --version 2>&1 | head -1), $(nginx -v 2>&1 | sed 's/.*: //')"
  echo
  echo "## 1. Peak throughput (closed loop)"
  echo
  echo "\`$PHASE1\` per path. The latencies here are closed-loop (coordinated omission): use section 2 for latency."
  echo
  table peak
  echo
  echo "## 2. Latency at a fixed rate (${RATE_PCT}% of the gateway's peak)"
  echo
  echo "\`$PHASE2\` per path; percentiles from h2load's per-request log."
  echo
  table rate
  echo
  echo "## Raw runs"
  echo
  echo "| phase | path | run | req/s | p50 ms | p99 ms |"
  echo "|---|---|---:|---:|---:|---:|"
  awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6 }' "$RUNS_TSV"
  echo
  echo "Chart: [latency.png](latency.png). How to read this: [../README.md](../README.md)."
} >"$RESULTS/latest.md"

# ---------------------------------------------------------------- chart
{
  for path in "${PATHS[@]}"; do
    printf '%s %s %s %s %s\n' "$path" "${M[rate.$path.p50]}" "${M[rate.$path.p99]}" \
      "${M[peak.$path.p50]}" "${M[peak.$path.p99]}"
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

log "wrote $RESULTS/latest.md and $RESULTS/latency.png ($PNG_BYTES bytes)"
echo
sed -n '/^## 1/,/^## Raw/p' "$RESULTS/latest.md" | sed '$d'
