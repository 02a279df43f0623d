#!/usr/bin/env bash
# Issue 7: zero failed requests while the fleet changes under load, on one machine (127.0.0.1).
#
#   1. Rolling restart behind HAProxy: INSTANCES gateways behind HAProxy (Debian package), a fixed
#      request rate through HAProxy the whole time; each instance in turn gets SIGTERM, exits,
#      is started again and is taken back by HAProxy before the next one goes.
#   2. Upgrade under load: one gateway, the load sent to it directly (no balancer); a new process
#      is started with `-u`, the old one gets SIGQUIT, hands its listening socket over and exits.
#
#   load-tests/fleet.sh                     DURATION=30s per scenario, RATE=1000, INSTANCES=3
#   DURATION=60s RATE=3000 load-tests/fleet.sh
#   SKIP_BUILD=1 load-tests/fleet.sh
#
# Knobs:
#   DURATION    length of the load in each scenario (default 30s; 30s, 30 or 2m). The procedure
#               starts LEAD s into the load and must be over LEAD s before it ends, else the
#               script fails and asks for more
#   RATE        total request rate, req/s (default 1000), spread over CONNS connections
#   CONNS       load-generator connections (default 16)
#   INSTANCES   gateways behind HAProxy (default 3, at least 2)
#   LEAD        seconds of load before the procedure and at least after it (default 3)
#   SETTLE      seconds between two instances once the previous one is back (default 1)
#   STOP_SIGNAL TERM (default) = the graceful stop under test; INT = a negative control: Pingora's
#               fast shutdown, no drain, to see what the drain saves (HAProxy must retry or fail)
#   SKIP_BUILD  1 = use target/release/fhir-gateway as it is (default: cargo build --release)
#   BASE_PORT   first of the ports this script uses (default 18380): HAProxy BASE_PORT, its
#               stats page BASE_PORT+1, the nginx upstream BASE_PORT+2, the gateways
#               BASE_PORT+11.. (scenario 1) and BASE_PORT+20 (scenario 2)
#   PROXY_CPU (1) / LOADGEN_CPU (0)   gateways / HAProxy, nginx and the load generator
#
# Load: a small fixed-rate HTTP/1.1 client (Python asyncio, written to the temp folder): CONNS
# keep-alive connections, one request at a time each (no pipelining), a new connection after a
# `Connection: close` answer or a closed connection, no retries, one record per request. A request
# counts as failed when it got no complete answer (refused, reset, closed, 10 s timeout) or an
# answer that is not 2xx. (Not h2load: with --rps it pipelines a request when an answer is late and
# counts requests as failed when a server closes connections, with no socket error; README.)
# Writes load-tests/results/fleet.md and prints it; exits non-zero when any request failed.
# Everything it starts is stopped by PID on exit; its temp folder is removed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
RESULTS=$HERE/results
OUT=$RESULTS/fleet.md
BIN=$REPO/target/release/fhir-gateway

DURATION=${DURATION:-30s}
RATE=${RATE:-1000}
CONNS=${CONNS:-16}
INSTANCES=${INSTANCES:-3}
LEAD=${LEAD:-3}
SETTLE=${SETTLE:-1}
SKIP_BUILD=${SKIP_BUILD:-0}
STOP_SIGNAL=${STOP_SIGNAL:-TERM}
BASE_PORT=${BASE_PORT:-18380}
PROXY_CPU=${PROXY_CPU:-1}
LOADGEN_CPU=${LOADGEN_CPU:-0}

# Gateway and HAProxy settings under test (written into the results).
DRAIN_S=2      # health.drain_seconds
GRACE_S=1      # pingora.grace_period_seconds
SHUTDOWN_S=2   # pingora.graceful_shutdown_timeout_seconds
CHECK_INTER=300 # HAProxy health-check interval, ms
CHECK_FALL=1
CHECK_RISE=2

log() { printf '[fleet] %s\n' "$*" >&2; }
die() {
  printf '[fleet] ERROR: %s\n' "$*" >&2
  exit 1
}

# ---------------------------------------------------------------- arguments
for v in RATE CONNS INSTANCES LEAD BASE_PORT; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
[[ $STOP_SIGNAL == TERM || $STOP_SIGNAL == INT ]] || die "STOP_SIGNAL must be TERM or INT (got '$STOP_SIGNAL')"
[[ $SETTLE =~ ^[0-9]+$ ]] || die "SETTLE must be a whole number of seconds (got '$SETTLE')"
((INSTANCES >= 2)) || die "INSTANCES must be at least 2: with one instance a restart has nowhere to send traffic"
((INSTANCES <= 8)) || die "INSTANCES must be at most 8 (ports BASE_PORT+11..+18)"
if [[ $DURATION =~ ^([1-9][0-9]*)s?$ ]]; then
  DUR_S=${BASH_REMATCH[1]}
elif [[ $DURATION =~ ^([1-9][0-9]*)m$ ]]; then
  DUR_S=$((BASH_REMATCH[1] * 60))
else
  die "DURATION must look like 30s, 30 or 2m (got '$DURATION')"
fi
((RATE >= CONNS)) || die "RATE ($RATE) must be at least CONNS ($CONNS)"
NCPU=$(nproc)
((PROXY_CPU < NCPU && LOADGEN_CPU < NCPU)) ||
  die "PROXY_CPU=$PROXY_CPU / LOADGEN_CPU=$LOADGEN_CPU need a CPU this machine lacks (nproc=$NCPU)"

HAP_PORT=$BASE_PORT
STATS_PORT=$((BASE_PORT + 1))
UP_PORT=$((BASE_PORT + 2))
UPG_PORT=$((BASE_PORT + 20))
GW_PORTS=()
for ((i = 1; i <= INSTANCES; i++)); do GW_PORTS+=($((BASE_PORT + 10 + i))); done
RES_PATH=/fhir/Patient/1

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
need haproxy haproxy
need python3 python3
need taskset util-linux
need curl curl
need ss iproute2
# The Debian package starts the system haproxy service where systemd runs; this script never
# touches it (it listens on nothing in the default configuration) and runs its own haproxy.

# ---------------------------------------------------------------- processes and cleanup
TMP=$(mktemp -d "${TMPDIR:-/tmp}/fhir-fleet.XXXXXX")
declare -A LIVE=() # name -> pid of every process started and not yet reaped
LOADGEN_PID=""

stop_pid() { # stop_pid <pid> <signal>: signal, wait up to 10 s, then SIGKILL; reaps it
  local pid=$1 sig=$2 i
  if kill -0 "$pid" 2>/dev/null; then
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid did not stop on SIG$sig, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? name f
  trap - EXIT INT TERM
  ((rc == 0)) || log "exit status $rc: stopping everything this script started"
  if [[ -n $LOADGEN_PID ]]; then
    stop_pid "$LOADGEN_PID" INT
  fi
  if ((rc != 0)) && [[ -d $TMP ]]; then
    for f in "$TMP"/logs/*.log; do
      [[ -s $f ]] || continue
      log "--- last lines of $(basename "$f") ---"
      tail -n 12 "$f" >&2 || true
    done
  fi
  for name in "${!LIVE[@]}"; do
    # Pingora: SIGINT = fast shutdown (SIGTERM would drain first). nginx, haproxy: SIGTERM = fast.
    if [[ $name == gw* || $name == upg* ]]; then
      stop_pid "${LIVE[$name]}" INT
    else
      stop_pid "${LIVE[$name]}" TERM
    fi
  done
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$TMP/logs" "$TMP/www/fhir/Patient" "$TMP/up"

now() { echo "$EPOCHREALTIME"; }              # seconds since the epoch, microseconds
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; } # seconds since $1
port_busy() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }
http_code() { curl -s -o /dev/null --max-time 1 -w '%{http_code}' "$1" 2>/dev/null || true; }

start_bg() { # start_bg <name> <cpu> <log> <command...>: pinned, in $TMP, LIVE[name] = pid
  local name=$1 cpu=$2 logf=$3
  shift 3
  (cd "$TMP" && exec taskset -c "$cpu" "$@") >>"$logf" 2>&1 &
  LIVE[$name]=$!
}

wait_code() { # wait_code <url> <code> <seconds> <pid>: until the URL answers <code>
  local url=$1 code=$2 deadline
  deadline=$(awk -v t="$EPOCHREALTIME" -v s="$3" 'BEGIN { printf "%.6f", t + s }')
  while :; do
    [[ $(http_code "$url") == "$code" ]] && return 0
    [[ -z ${4:-} ]] || kill -0 "$4" 2>/dev/null || return 1
    awk -v t="$EPOCHREALTIME" -v d="$deadline" 'BEGIN { exit !(t > d) }' && return 1
    sleep 0.05
  done
}

wait_gone() { # wait_gone <pid> <seconds>: until the (child) process has exited; reaps it -> RC
  local pid=$1 i
  for ((i = 0; i < $2 * 20; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  kill -0 "$pid" 2>/dev/null && return 1
  RC=0
  wait "$pid" 2>/dev/null || RC=$?
  return 0
}

# ---------------------------------------------------------------- build
if [[ $SKIP_BUILD == 1 ]]; then
  log "SKIP_BUILD=1: using $BIN as it is"
else
  log "cargo build --release --bin fhir-gateway (waits if another build holds the lock)"
  (cd "$REPO" && cargo build --release --bin fhir-gateway) >"$TMP/build.log" 2>&1 ||
    die "cargo build --release failed: $(tail -n 20 "$TMP/build.log")"
fi
[[ -x $BIN ]] || die "$BIN not found"

for p in "$HAP_PORT" "$STATS_PORT" "$UP_PORT" "${GW_PORTS[@]}" "$UPG_PORT"; do
  ! port_busy "$p" || die "127.0.0.1:$p is already in use (set BASE_PORT to move all ports)"
done

# ---------------------------------------------------------------- upstream: nginx, a small FHIR Patient
BASE=http://127.0.0.1:$UP_PORT/fhir
cat >"$TMP/www/fhir/Patient/1" <<EOF
{
  "resourceType": "Patient",
  "id": "1",
  "meta": {"versionId": "1", "lastUpdated": "2024-05-01T10:00:00Z", "source": "$BASE/Patient/1"},
  "active": true,
  "name": [{"use": "official", "family": "Doe", "given": ["Jane"]}],
  "gender": "female",
  "birthDate": "1974-12-25",
  "managingOrganization": {"reference": "$BASE/Organization/1"}
}
EOF
USER_LINE=""
if [[ $EUID == 0 ]]; then # workers would drop to 'nobody', who cannot read $TMP
  USER_LINE="user $(id -un) $(id -gn);"
fi
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
  open_file_cache max=16;
  server {
    listen 127.0.0.1:$UP_PORT;
    root $TMP/www;
  }
}
EOF
nginx -t -q -p "$TMP/up" -e stderr -c "$TMP/up/nginx.conf" 2>"$TMP/up/test.log" ||
  die "nginx config invalid: $(cat "$TMP/up/test.log")"
start_bg upstream "$LOADGEN_CPU" "$TMP/logs/upstream.log" nginx -p "$TMP/up" -e stderr -c "$TMP/up/nginx.conf"
wait_code "$BASE/Patient/1" 200 10 "${LIVE[upstream]}" || die "the nginx upstream did not answer 200"
log "upstream: nginx on 127.0.0.1:$UP_PORT (pid ${LIVE[upstream]})"

# ---------------------------------------------------------------- gateway configs
gw_conf() { # gw_conf <name> <port>: $TMP/<name>/gateway.yaml
  mkdir -p "$TMP/$1"
  cat >"$TMP/$1/gateway.yaml" <<EOF
listen:
  - addr: 127.0.0.1:$2
upstream:
  url: $BASE
auth:
  mode: insecure_dev
logging:
  level: warn
  access_log: false
health:
  upstream_check_interval_ms: 200
  drain_seconds: $DRAIN_S
events:
  file: $TMP/$1/events.jsonl
pingora:
  threads: 1
  grace_period_seconds: $GRACE_S
  graceful_shutdown_timeout_seconds: $SHUTDOWN_S
  pid_file: $TMP/$1/gateway.pid
  upgrade_sock: $TMP/$1/upgrade.sock
EOF
  "$BIN" -t -c "$TMP/$1/gateway.yaml" >"$TMP/$1/test.log" 2>&1 ||
    die "gateway config $1 invalid: $(cat "$TMP/$1/test.log")"
}

GEN=() # per instance: how many times it was started (its log is logs/gw<i>.<gen>.log)
start_gw() { # start_gw <i>: LIVE[gw<i>]
  local i=$1
  GEN[i]=$((${GEN[i]:-0} + 1))
  start_bg "gw$i" "$PROXY_CPU" "$TMP/logs/gw$i.${GEN[i]}.log" env -u RUST_LOG "$BIN" -c "$TMP/gw$i/gateway.yaml"
}

# ---------------------------------------------------------------- load generator
cat >"$TMP/load.py" <<'EOF'
"""Fixed-rate HTTP/1.1 GETs over keep-alive connections, every request recorded (fleet.sh).

argv: host port path rate conns duration out.tsv. Each of `conns` connections sends on its own
schedule (rate/conns per second, staggered), one request at a time (no pipelining; a late answer
delays the next request, which then goes at once). A `Connection: close` answer or a closed
connection makes the next request open a new connection. Nothing is retried. One TSV row per
request: start (s since the epoch), status (-1 = no complete answer), ms, 1 if the connection was
reused, the error.
"""
import asyncio
import sys
import time

host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rate, conns, duration, out = float(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), sys.argv[7]
TIMEOUT = 10.0
REQ = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: fleet-load\r\n"
       "Accept: application/fhir+json\r\n\r\n").encode()
rows = []


class BadResponse(Exception):
    pass


async def read_response(reader):
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    first = head[0].split(" ", 2)
    if len(first) < 2 or not first[0].startswith("HTTP/1.") or not first[1].isdigit():
        raise BadResponse("bad status line %r" % head[0][:60])
    status = int(first[1])
    hdrs = {}
    for line in head[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            hdrs[k.strip().lower()] = v.strip().lower()
    close = "close" in hdrs.get("connection", "") or first[0] == "HTTP/1.0"
    if "chunked" in hdrs.get("transfer-encoding", ""):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                break
            await reader.readexactly(size + 2)
    elif "content-length" in hdrs:
        await reader.readexactly(int(hdrs["content-length"]))
    elif status not in (204, 304) and status >= 200:
        await reader.read()  # delimited by the close
        close = True
    return status, close


def describe(e):
    if isinstance(e, asyncio.IncompleteReadError):
        return "connection closed before a complete answer (%d bytes of it read)" % len(e.partial)
    if isinstance(e, asyncio.TimeoutError):
        return "no answer within %.0f s" % TIMEOUT
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ConnectionResetError):
        return "connection reset"
    return "%s: %s" % (type(e).__name__, e)


async def client(i, t_start):
    loop = asyncio.get_running_loop()
    interval = conns / rate
    nxt, end = t_start + i * interval / conns, t_start + duration
    reader = writer = None
    while nxt < end:
        if nxt > loop.time():
            await asyncio.sleep(nxt - loop.time())
        nxt += interval
        wall, m0, reused = time.time(), loop.time(), writer is not None
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
            writer.write(REQ)
            status, close = await asyncio.wait_for(read_response(reader), TIMEOUT)
            err = ""
        except Exception as e:  # every failure is a record, never a retry
            status, close, err = -1, True, describe(e)
        rows.append((wall, status, (loop.time() - m0) * 1000, int(reused), err))
        if close and writer is not None:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def main():
    t0 = asyncio.get_running_loop().time() + 0.02
    await asyncio.gather(*(client(i, t0) for i in range(conns)))


asyncio.run(main())
rows.sort()
with open(out, "w") as f:
    for r in rows:
        f.write("%.6f\t%d\t%.3f\t%d\t%s\n" % r)
EOF
LOADGEN="$CONNS keep-alive connections x $(awk -v r="$RATE" -v c="$CONNS" 'BEGIN { printf "%g", r / c }') req/s (= $RATE req/s), HTTP/1.1 GET, one request at a time per connection, no retries"

LOAD_T0=0
start_load() { # start_load <name> <port>: the client in the background; LOAD_T0 = its start
  LOAD_T0=$(now)
  taskset -c "$LOADGEN_CPU" timeout $((DUR_S * 2 + 60)) \
    python3 "$TMP/load.py" 127.0.0.1 "$2" "$RES_PATH" "$RATE" "$CONNS" "$DUR_S" "$TMP/$1.tsv" \
    >"$TMP/$1.load.log" 2>&1 &
  LOADGEN_PID=$!
}

finish_load() { # finish_load <name>: waits for the client -> LOAD_* figures, $TMP/<name>.bad
  local rc=0 name=$1
  wait "$LOADGEN_PID" || rc=$?
  LOADGEN_PID=""
  if ((rc != 0)) || [[ ! -s $TMP/$name.tsv ]]; then
    die "the load generator ($name) exited with $rc: $(tail -n 8 "$TMP/$name.load.log")"
  fi
  read -r LOAD_TOTAL LOAD_OK LOAD_NON2XX LOAD_NOANSWER LOAD_NEWCONN LOAD_RPS < <(awk -F'\t' '
    NR == 1 { t0 = $1 } { t1 = $1; n++ }
    $2 >= 200 && $2 < 300 { ok++ } $2 == -1 { na++ } $2 != -1 && ($2 < 200 || $2 >= 300) { bad++ }
    $4 == 0 { nc++ }
    END { printf "%d %d %d %d %d %.0f\n", n, ok, bad, na, nc, (t1 > t0 ? (n - 1) / (t1 - t0) : 0) }' "$TMP/$name.tsv")
  read -r LOAD_P50 LOAD_P99 LOAD_PMAX < <(awk -F'\t' '$2 != -1 { print $3 }' "$TMP/$name.tsv" | sort -g | awk '
    { v[NR] = $1 }
    END {
      if (NR == 0) { print "nan nan nan"; exit }
      i50 = int(NR * 0.50); if (i50 < NR * 0.50) i50++
      i99 = int(NR * 0.99); if (i99 < NR * 0.99) i99++
      printf "%.2f %.2f %.2f\n", v[i50], v[i99], v[NR] }')
  LOAD_BAD=$((LOAD_TOTAL - LOAD_OK))
  # Failed requests: start time since the load started, status (-1 = no answer), ms, reused, error.
  awk -F'\t' -v t0="$LOAD_T0" '!($2 >= 200 && $2 < 300) {
      printf "+%.3f s  status %s  %.1f ms  %s  %s\n", $1 - t0, $2, $3, ($4 ? "reused connection" : "new connection"), $5 }' \
    "$TMP/$name.tsv" >"$TMP/$name.bad"
  LOAD_KINDS=$(awk -F'\t' '!($2 >= 200 && $2 < 300) { k = ($2 == -1 ? $5 : "status " $2); c[k]++ }
    END { for (k in c) printf "%s%d x %s", (n++ ? "; " : ""), c[k], k }' "$TMP/$name.tsv")
  awk -v a="$LOAD_RPS" -v r="$RATE" 'BEGIN { exit !(a < 0.9 * r) }' &&
    log "warning: $name achieved $LOAD_RPS req/s of $RATE: the load generator or the machine could not keep up"
  return 0
}

TIMELINE=() # "scenario<TAB>t (s since the load started)<TAB>event"
event() { # event <scenario> <text>
  local t
  t=$(since "$LOAD_T0")
  TIMELINE+=("$1"$'\t'"$t"$'\t'"$2")
  log "  [$1 +${t}s] $2"
}

check_time_left() { # check_time_left <scenario>: the procedure must end LEAD s before the load
  local left
  left=$(awk -v t0="$LOAD_T0" -v t="$EPOCHREALTIME" -v d="$DUR_S" 'BEGIN { printf "%.1f", t0 + d - t }')
  awk -v l="$left" -v lead="$LEAD" 'BEGIN { exit !(l < lead) }' &&
    die "$1: the procedure ended ${left}s before the load did (need >= ${LEAD}s): raise DURATION (now ${DUR_S}s)"
  log "  $1: procedure over, ${left}s of load left"
}

# ================================================================ 1. rolling restart behind HAProxy
log "scenario 1: rolling restart of $INSTANCES gateways behind HAProxy, $RATE req/s for ${DUR_S}s"
for ((i = 1; i <= INSTANCES; i++)); do
  gw_conf "gw$i" "${GW_PORTS[i - 1]}"
  start_gw "$i"
done
for ((i = 1; i <= INSTANCES; i++)); do
  wait_code "http://127.0.0.1:${GW_PORTS[i - 1]}/readyz" 200 15 "${LIVE[gw$i]}" ||
    die "gateway gw$i did not answer /readyz 200 within 15 s"
  log "gw$i on 127.0.0.1:${GW_PORTS[i - 1]} ready (pid ${LIVE[gw$i]}, CPU $PROXY_CPU)"
done

# HAProxy 2.6 (Debian 12): retry-on knows conn-failure, empty-response, junk-response,
# response-timeout, 0rtt-rejected, 404, 408, 425, 500-504, all-retryable-errors (not 429).
mkdir -p "$TMP/haproxy"
{
  cat <<EOF
global
  log stderr format raw local0 info
  maxconn 4096
  pidfile $TMP/haproxy/haproxy.pid

defaults
  mode http
  log global
  option httplog
  option dontlog-normal
  option http-keep-alive
  option redispatch 1
  retries 3
  retry-on conn-failure empty-response response-timeout
  timeout connect 1s
  timeout client 30s
  timeout server 5s
  timeout http-request 10s
  timeout http-keep-alive 30s
  timeout queue 5s
  timeout check 1s

listen stats
  bind 127.0.0.1:$STATS_PORT
  stats enable
  stats uri /stats
  stats refresh 1s

frontend fhir
  bind 127.0.0.1:$HAP_PORT
  default_backend gateways

backend gateways
  balance roundrobin
  option httpchk
  http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host 127.0.0.1
  http-check expect status 200
  default-server inter ${CHECK_INTER}ms fall $CHECK_FALL rise $CHECK_RISE
EOF
  for ((i = 1; i <= INSTANCES; i++)); do
    echo "  server gw$i 127.0.0.1:${GW_PORTS[i - 1]} check"
  done
} >"$TMP/haproxy/haproxy.cfg"
haproxy -c -q -f "$TMP/haproxy/haproxy.cfg" >"$TMP/haproxy/check.log" 2>&1 ||
  die "haproxy config invalid: $(cat "$TMP/haproxy/check.log")"
start_bg haproxy "$LOADGEN_CPU" "$TMP/logs/haproxy.log" haproxy -db -f "$TMP/haproxy/haproxy.cfg"

STATS_URL="http://127.0.0.1:$STATS_PORT/stats;csv"
hap_csv() { curl -s --max-time 1 "$STATS_URL" 2>/dev/null || true; }
hap_field() { # hap_field <proxy> <server|BACKEND> <column name>
  hap_csv | awk -F, -v p="$1" -v s="$2" -v c="$3" '
    NR == 1 { sub(/^# /, ""); for (i = 1; i <= NF; i++) col[$i] = i; next }
    $1 == p && $2 == s { print $(col[c]) }'
}
wait_hap() { # wait_hap <server> <status regex> <seconds>
  local i
  for ((i = 0; i < $3 * 50; i++)); do
    [[ $(hap_field gateways "$1" status) =~ $2 ]] && return 0
    sleep 0.02
  done
  return 1
}
for ((i = 1; i <= INSTANCES; i++)); do
  wait_hap "gw$i" '^UP$' 10 || die "HAProxy never marked gw$i UP (status: $(hap_field gateways "gw$i" status))"
done
wait_code "http://127.0.0.1:$HAP_PORT$RES_PATH" 200 5 || die "HAProxy does not answer 200 for $RES_PATH"
body=$(curl -s --max-time 2 "http://127.0.0.1:$HAP_PORT$RES_PATH")
if ! grep -qE '"resourceType": *"Patient"' <<<"$body" || grep -qF "127.0.0.1:$UP_PORT" <<<"$body"; then
  die "HAProxy -> gateway answered something else: ${body:0:300}"
fi
log "HAProxy on 127.0.0.1:$HAP_PORT (pid ${LIVE[haproxy]}): all $INSTANCES gateways UP; a request through it answers the Patient"

S1=rolling
declare -A T=() # timings: <scenario>.<instance>.<what> -> seconds
start_load "$S1" "$HAP_PORT"
log "load: $LOADGEN, through HAProxy, ${DUR_S}s"
sleep "$LEAD"
for ((i = 1; i <= INSTANCES; i++)); do
  kill -0 "$LOADGEN_PID" 2>/dev/null || die "the load generator stopped early: $(tail -n 5 "$TMP/$S1.load.log")"
  pid=${LIVE[gw$i]}
  t0=$(now)
  kill "-$STOP_SIGNAL" "$pid"
  event "$S1" "gw$i (pid $pid): SIG$STOP_SIGNAL"
  wait_hap "gw$i" '^DOWN' 5 || die "HAProxy did not mark gw$i DOWN within 5 s of SIG$STOP_SIGNAL"
  T[$i.down]=$(since "$t0")
  event "$S1" "gw$i: HAProxy marks it DOWN ($(hap_field gateways "gw$i" check_status) $(hap_field gateways "gw$i" check_code)), $(since "$t0")s after SIG$STOP_SIGNAL"
  wait_gone "$pid" 20 || die "gw$i (pid $pid) still running 20 s after SIG$STOP_SIGNAL"
  unset "LIVE[gw$i]"
  T[$i.exit]=$(since "$t0")
  T[$i.rc]=$RC
  event "$S1" "gw$i: exited with status $RC, $(since "$t0")s after SIG$STOP_SIGNAL"
  ((RC == 0)) || die "gw$i exited with status $RC after SIG$STOP_SIGNAL"
  t1=$(now)
  start_gw "$i"
  event "$S1" "gw$i: started again (pid ${LIVE[gw$i]})"
  wait_code "http://127.0.0.1:${GW_PORTS[i - 1]}/readyz" 200 15 "${LIVE[gw$i]}" ||
    die "restarted gw$i did not answer /readyz 200 within 15 s"
  T[$i.ready]=$(since "$t1")
  event "$S1" "gw$i: /readyz 200, $(since "$t1")s after the start"
  wait_hap "gw$i" '^UP$' 10 || die "HAProxy did not mark the restarted gw$i UP within 10 s"
  T[$i.up]=$(since "$t1")
  T[$i.out]=$(since "$t0")
  event "$S1" "gw$i: HAProxy marks it UP, $(since "$t1")s after the start ($(since "$t0")s out of the pool)"
  sleep "$SETTLE"
done
check_time_left "$S1"
finish_load "$S1"
event "$S1" "load over"
S1_TOTAL=$LOAD_TOTAL S1_OK=$LOAD_OK S1_BAD=$LOAD_BAD S1_NON2XX=$LOAD_NON2XX S1_NOANSWER=$LOAD_NOANSWER
S1_NEWCONN=$LOAD_NEWCONN S1_RPS=$LOAD_RPS S1_P50=$LOAD_P50 S1_P99=$LOAD_P99 S1_PMAX=$LOAD_PMAX S1_KINDS=$LOAD_KINDS
log "scenario 1: $S1_TOTAL requests, $S1_OK 2xx, $S1_BAD failed ($S1_NON2XX non-2xx, $S1_NOANSWER unanswered)"

# HAProxy's own counters: retries and redispatches tell whether a retry hid a gateway error.
HAP_ROWS=$(hap_csv | awk -F, '
  NR == 1 { sub(/^# /, ""); for (i = 1; i <= NF; i++) col[$i] = i; next }
  $1 == "gateways" {
    printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $2, $(col["stot"]), $(col["hrsp_2xx"]),
      $(col["hrsp_5xx"]), $(col["econ"]), $(col["eresp"]), $(col["wretr"]), $(col["wredis"]), $(col["chkdown"]) }')
HAP_RETRIES=$(hap_field gateways BACKEND wretr)
HAP_REDISP=$(hap_field gateways BACKEND wredis)
HAP_ECON=$(hap_field gateways BACKEND econ)
HAP_ERESP=$(hap_field gateways BACKEND eresp)
HAP_LOG_LINES=$(grep -c ' fhir gateways' "$TMP/logs/haproxy.log" || true)
HAP_LOG_SAMPLE=$(grep ' fhir gateways' "$TMP/logs/haproxy.log" | head -n 10 || true)
stop_pid "${LIVE[haproxy]}" TERM
unset "LIVE[haproxy]"
for ((i = 1; i <= INSTANCES; i++)); do
  stop_pid "${LIVE[gw$i]}" INT
  unset "LIVE[gw$i]"
done

# ================================================================ 2. upgrade under load (SIGQUIT + -u)
S2=upgrade
log "scenario 2: graceful upgrade of one gateway (SIGQUIT + -u), $RATE req/s straight at it for ${DUR_S}s"
gw_conf upg "$UPG_PORT"
UPG_URL="http://127.0.0.1:$UPG_PORT"
start_bg upg-old "$PROXY_CPU" "$TMP/logs/upgrade-old.log" env -u RUST_LOG "$BIN" -c "$TMP/upg/gateway.yaml"
OLD_PID=${LIVE[upg-old]}
wait_code "$UPG_URL/readyz" 200 15 "$OLD_PID" || die "the gateway to upgrade did not answer /readyz 200"
listener() { # listener: "inode pids" of the listening socket on UPG_PORT
  ss -Hltnpe "sport = :$UPG_PORT" | awk '{
    ino = ""; for (i = 1; i <= NF; i++) if ($i ~ /^ino:/) { ino = substr($i, 5) }
    s = $0; pids = ""
    while (match(s, /pid=[0-9]+/)) { pids = pids (pids == "" ? "" : ",") substr(s, RSTART + 4, RLENGTH - 4); s = substr(s, RSTART + RLENGTH) }
    print ino, pids }'
}
read -r SOCK_INODE_BEFORE SOCK_PIDS_BEFORE < <(listener)
log "old gateway pid $OLD_PID on $UPG_URL (listening socket inode $SOCK_INODE_BEFORE, held by $SOCK_PIDS_BEFORE)"
rm -f "$TMP/upg/upgrade.sock"

start_load "$S2" "$UPG_PORT"
log "load: $LOADGEN, straight at the gateway, ${DUR_S}s"
sleep "$LEAD"
kill -0 "$LOADGEN_PID" 2>/dev/null || die "the load generator stopped early: $(tail -n 5 "$TMP/$S2.load.log")"
t0=$(now)
# Pingora's order: the new process first; it binds upgrade_sock and waits (5 x 1 s) for the fds.
start_bg upg-new "$PROXY_CPU" "$TMP/logs/upgrade-new.log" env -u RUST_LOG "$BIN" -c "$TMP/upg/gateway.yaml" -u
NEW_PID=${LIVE[upg-new]}
event "$S2" "new process started with -u (pid $NEW_PID)"
for ((k = 0; k < 100; k++)); do
  [[ -S $TMP/upg/upgrade.sock ]] && break
  kill -0 "$NEW_PID" 2>/dev/null || die "the new process (pid $NEW_PID) exited before binding upgrade_sock"
  sleep 0.02
done
[[ -S $TMP/upg/upgrade.sock ]] || die "the new process never created $TMP/upg/upgrade.sock"
T[u.sock]=$(since "$t0")
event "$S2" "new process listens on upgrade_sock, $(since "$t0")s after its start"
t1=$(now)
kill -QUIT "$OLD_PID"
event "$S2" "old process (pid $OLD_PID): SIGQUIT"
for ((k = 0; k < 250; k++)); do
  [[ $(listener | awk '{ print $2 }') == *"$NEW_PID"* ]] && break
  sleep 0.02
done
read -r SOCK_INODE_DURING SOCK_PIDS_DURING < <(listener)
[[ $SOCK_PIDS_DURING == *"$NEW_PID"* ]] ||
  die "the new process never held the listening socket (held by: $SOCK_PIDS_DURING)"
T[u.handover]=$(since "$t1")
event "$S2" "listening socket inode $SOCK_INODE_DURING held by pids $SOCK_PIDS_DURING, $(since "$t1")s after SIGQUIT"
wait_gone "$OLD_PID" 30 || die "old gateway (pid $OLD_PID) still running 30 s after SIGQUIT"
unset "LIVE[upg-old]"
T[u.exit]=$(since "$t1")
T[u.rc]=$RC
event "$S2" "old process exited with status $RC, $(since "$t1")s after SIGQUIT"
kill -0 "$NEW_PID" 2>/dev/null || die "the new process (pid $NEW_PID) is gone"
read -r SOCK_INODE_AFTER SOCK_PIDS_AFTER < <(listener)
UPG_READY=$(http_code "$UPG_URL/readyz")
event "$S2" "listening socket inode $SOCK_INODE_AFTER held by pid $SOCK_PIDS_AFTER only; /readyz $UPG_READY"
sleep "$SETTLE"
check_time_left "$S2"
finish_load "$S2"
event "$S2" "load over"
S2_TOTAL=$LOAD_TOTAL S2_OK=$LOAD_OK S2_BAD=$LOAD_BAD S2_NON2XX=$LOAD_NON2XX S2_NOANSWER=$LOAD_NOANSWER
S2_NEWCONN=$LOAD_NEWCONN S2_RPS=$LOAD_RPS S2_P50=$LOAD_P50 S2_P99=$LOAD_P99 S2_PMAX=$LOAD_PMAX S2_KINDS=$LOAD_KINDS
log "scenario 2: $S2_TOTAL requests, $S2_OK 2xx, $S2_BAD failed ($S2_NON2XX non-2xx, $S2_NOANSWER unanswered)"
# After the load: the new process answers requests itself (the old one is gone).
POST_CODE=$(http_code "$UPG_URL$RES_PATH")
POST_PIDS=$(listener | awk '{ print $2 }')

# ---------------------------------------------------------------- gateway logs
GW_LOG_WARN=$(cat "$TMP"/logs/gw*.log "$TMP"/logs/upgrade-*.log |
  grep -vE 'insecure_dev: callers are NOT authenticated' | grep -cE '\b(WARN|ERROR)\b' || true)
GW_LOG_SAMPLE=$(cat "$TMP"/logs/gw*.log "$TMP"/logs/upgrade-*.log |
  grep -vE 'insecure_dev: callers are NOT authenticated' | grep -E '\b(WARN|ERROR)\b' | head -n 12 || true)

# ---------------------------------------------------------------- report
COMMIT=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if ! git -C "$REPO" diff --quiet HEAD -- 2>/dev/null; then
  COMMIT="$COMMIT (working tree has uncommitted changes)"
fi
CPU_MODEL=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
verdict() { if (($1 == 0)); then echo "**0 failed**"; else echo "**$1 FAILED**"; fi; }
bad_block() { # bad_block <scenario> <title>
  [[ -s $TMP/$1.bad ]] || return 0
  echo
  echo "Failed requests in $2, first 25 of $(wc -l <"$TMP/$1.bad") (start, seconds since the load started):"
  echo
  echo '```'
  head -n 25 "$TMP/$1.bad"
  echo '```'
}
mkdir -p "$RESULTS"
{
  echo "# fhir-gateway fleet: rolling restart and upgrade under load"
  echo
  echo "- Date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "- Machine: nproc=$NCPU, CPU: ${CPU_MODEL:-unknown}, kernel $(uname -r), $(sed -n 's/^PRETTY_NAME="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' /etc/os-release)"
  echo "- Git commit: $COMMIT"
  echo "- Command: \`DURATION=${DUR_S}s RATE=$RATE CONNS=$CONNS INSTANCES=$INSTANCES$([[ $STOP_SIGNAL == TERM ]] || echo " STOP_SIGNAL=$STOP_SIGNAL") load-tests/fleet.sh\`"
  echo "- Tools: $(haproxy -v 2>&1 | head -1 | awk '{ print $1, $2, $3 }'), $(nginx -v 2>&1 | sed 's/.*: //'), $(python3 --version 2>&1) (the load generator)"
  echo "- Load: $LOADGEN, GET $RES_PATH for ${DUR_S}s per scenario; the procedure starts ${LEAD}s into the load. A request fails when it gets no complete answer (refused, reset, closed, 10 s timeout) or a non-2xx one."
  echo "- Gateways: release build, \`pingora.threads: 1\`, \`auth.mode: insecure_dev\`, log level warn, no access log, \`health.drain_seconds: $DRAIN_S\`, \`pingora.grace_period_seconds: $GRACE_S\`, \`graceful_shutdown_timeout_seconds: $SHUTDOWN_S\`; each its own port, pid_file and upgrade_sock; upstream: nginx serving a small FHIR Patient"
  echo "- Pinning: gateways on CPU $PROXY_CPU; HAProxy, nginx and the load generator on CPU $LOADGEN_CPU"
  echo
  echo "## Results"
  echo
  echo "| scenario | requests | 2xx | failed | of which non-2xx / unanswered | new connections | achieved req/s | p50 ms | p99 ms | max ms | verdict |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
  echo "| 1. rolling restart of $INSTANCES gateways behind HAProxy | $S1_TOTAL | $S1_OK | $S1_BAD | $S1_NON2XX / $S1_NOANSWER | $S1_NEWCONN | $S1_RPS | $S1_P50 | $S1_P99 | $S1_PMAX | $(verdict "$S1_BAD") |"
  echo "| 2. upgrade of one gateway (SIGQUIT + \`-u\`), no balancer | $S2_TOTAL | $S2_OK | $S2_BAD | $S2_NON2XX / $S2_NOANSWER | $S2_NEWCONN | $S2_RPS | $S2_P50 | $S2_P99 | $S2_PMAX | $(verdict "$S2_BAD") |"
  echo
  echo "\"new connections\": requests that had to open a connection (the first of each connection, and every one after a \`Connection: close\` answer)."
  echo
  echo "## 1. Rolling restart behind HAProxy"
  echo
  echo "HAProxy $(haproxy -v 2>&1 | head -1 | awk '{ print $3 }') on 127.0.0.1:$HAP_PORT: \`balance roundrobin\`, \`option httpchk\` + \`http-check send meth GET uri /readyz ver HTTP/1.1\`, \`http-check expect status 200\`, \`inter ${CHECK_INTER}ms fall $CHECK_FALL rise $CHECK_RISE\`, \`option redispatch 1\`, \`retries 3\`, \`retry-on conn-failure empty-response response-timeout\`, timeouts connect 1s / server 5s / check 1s, keep-alive on both sides."
  echo "For each gateway in turn: SIG$STOP_SIGNAL$([[ $STOP_SIGNAL == INT ]] && echo ' (**negative control**: fast shutdown, no drain)'); wait until HAProxy marks it DOWN and until it exits; start it again (same config); wait for /readyz 200 and for HAProxy to mark it UP; ${SETTLE}s pause; next."
  echo
  echo "| instance | SIG$STOP_SIGNAL → HAProxy DOWN s | SIG$STOP_SIGNAL → exit s (status) | restart → /readyz 200 s | restart → HAProxy UP s | out of the pool s |"
  echo "|---|---:|---:|---:|---:|---:|"
  for ((i = 1; i <= INSTANCES; i++)); do
    echo "| gw$i | ${T[$i.down]} | ${T[$i.exit]} (${T[$i.rc]}) | ${T[$i.ready]} | ${T[$i.up]} | ${T[$i.out]} |"
  done
  echo
  echo "HAProxy counters at the end (\`econ\` connect errors, \`eresp\` response errors, \`wretr\` retries, \`wredis\` redispatches): backend retries **$HAP_RETRIES**, redispatches **$HAP_REDISP**, connect errors $HAP_ECON, response errors $HAP_ERESP."
  if ((HAP_RETRIES + HAP_REDISP + HAP_ECON + HAP_ERESP == 0)); then
    echo "No request needed HAProxy's \`retry-on\`/\`redispatch\`: the gateways' drain alone (\`/readyz\` 503 first, \`Connection: close\` on answers, listener open for \`drain_seconds\`) kept every request whole; the retries are a second line of defence."
  else
    echo "HAProxy retried or redispatched requests: the per-server rows show which gateway gave the connect or response errors; without \`retry-on\` those requests would have failed."
  fi
  echo
  echo "| server | sessions | 2xx | 5xx | econ | eresp | wretr | wredis | times marked DOWN |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  echo "$HAP_ROWS"
  echo
  echo "HAProxy logged $HAP_LOG_LINES abnormal request(s) (\`option httplog\` + \`dontlog-normal\`)."
  if [[ -n $HAP_LOG_SAMPLE ]]; then
    echo
    echo '```'
    echo "$HAP_LOG_SAMPLE"
    echo '```'
  fi
  if [[ -n $S1_KINDS ]]; then
    echo
    echo "Failures by kind: $S1_KINDS."
  fi
  bad_block "$S1" "the rolling restart"
  echo
  echo "## 2. Upgrade under load (SIGQUIT + \`-u\`)"
  echo
  echo "One gateway on 127.0.0.1:$UPG_PORT, the load sent to it directly. Pingora's order: the new process is started with the same configuration plus \`-u\` (no \`-d\`, so this script owns its PID; under systemd it is \`-u -d\` and the PID comes from pid_file); once it has bound upgrade_sock, the old one gets SIGQUIT, sends it the listening socket, answers with \`Connection: close\` and keeps accepting for Pingora's 5 s close timeout, then stops accepting and exits after the grace periods."
  echo
  echo "| step | value |"
  echo "|---|---|"
  echo "| old pid → new pid | $OLD_PID → $NEW_PID |"
  echo "| new process start → upgrade_sock bound | ${T[u.sock]} s |"
  echo "| SIGQUIT → new process holds the listening socket | ${T[u.handover]} s |"
  echo "| SIGQUIT → old process exited (status) | ${T[u.exit]} s (${T[u.rc]}) |"
  echo "| listening socket before / during / after (inode: pids) | $SOCK_INODE_BEFORE: $SOCK_PIDS_BEFORE / $SOCK_INODE_DURING: $SOCK_PIDS_DURING / $SOCK_INODE_AFTER: $SOCK_PIDS_AFTER |"
  echo "| after the load: GET $RES_PATH, /readyz, socket holder | $POST_CODE, $UPG_READY, pid $POST_PIDS |"
  echo
  echo "The same socket inode before, during and after: the listener was handed over, never closed and re-bound."
  if [[ -n $S2_KINDS ]]; then
    echo
    echo "Failures by kind: $S2_KINDS."
  fi
  bad_block "$S2" "the upgrade"
  echo
  echo "## Timeline"
  echo
  echo "Seconds since the scenario's load started."
  echo
  echo "| scenario | t s | event |"
  echo "|---|---:|---|"
  for e in "${TIMELINE[@]}"; do
    IFS=$'\t' read -r sc t what <<<"$e"
    echo "| $sc | $t | $what |"
  done
  echo
  echo "## Gateway logs"
  echo
  echo "$GW_LOG_WARN WARN/ERROR line(s) in the gateways' logs (level warn; the insecure_dev start-up warning left out). \`pingora_core::server::transfer_fd ... No incoming socket transfer, sleep 1s and try again\` is the new process waiting for the old one's sockets (it was started first, as Pingora prescribes), not a fault."
  if [[ -n $GW_LOG_SAMPLE ]]; then
    echo
    echo '```'
    echo "$GW_LOG_SAMPLE"
    echo '```'
  fi
  echo
  echo "How to run and read this: [../README.md](../README.md#fleet-rolling-restart-and-upgrade-under-load)."
} >"$OUT"

log "wrote $OUT"
echo
cat "$OUT"
((S1_BAD == 0 && S2_BAD == 0)) || die "failed requests: rolling restart $S1_BAD, upgrade $S2_BAD (see $OUT)"
[[ ${T[u.rc]} == 0 ]] || die "the old process exited with status ${T[u.rc]} after SIGQUIT"
[[ $POST_CODE == 200 && $POST_PIDS == "$NEW_PID" ]] ||
  die "after the upgrade: GET answered $POST_CODE, socket held by '$POST_PIDS' (new pid $NEW_PID)"
log "OK: 0 failed requests in both scenarios"
