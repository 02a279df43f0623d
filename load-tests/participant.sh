#!/usr/bin/env bash
# Issue 5's benchmark: a practitioner's 100-entry searchset through ParticipantFilter +
# ConsentOptOut with warm caches — the gateway's overhead per request in ms, and the upstream
# calls per request (goal: none besides the search itself).
#
#   load-tests/participant.sh                  N=300 measured requests per path and case
#   N=600 RUNS=3 load-tests/participant.sh
#   SKIP_BUILD=1 CRITERION=0 load-tests/participant.sh
#
# Knobs:
#   N           measured iterations per case (default 300); one iteration = one request to each
#               path in turn (lockstep), so a shared SEKMET's changing speed hits all paths alike
#   RUNS        rounds the N iterations are split into (default 3; p50 per round in the report);
#               the statistics pool all N samples of a path
#   WARMUP      unrecorded iterations per case before the first round (default 20)
#   DURATION    not used (this benchmark counts requests, it does not run for a time)
#   SKIP_BUILD  1 = use target/release/fhir-gateway as it is (default: cargo build --release)
#   CRITERION   1 = also run `cargo bench --bench hot_path -- participant` (default 1)
#   GW_CPU (1) / LOADGEN_CPU (0)   CPUs of the gateways and of the client
#   FHIR_PORT (8090), OIDC_PORT (9400)   the SHARED peers of scripts/peers.sh (never restarted)
#   OWN_IDP     auto (default): when the shared IdP does not know practitioner-app (it runs an
#               older .ci/peers/idp.mjs), start a private copy of the current one on OWN_IDP_PORT
#               (19401) from an installed oidc-provider; 1 = always; 0 = never
#   SEKMET_DB   SEKMET's sqlite file with the traffic log (.cache/peers/sekmet/data/sekmet.db)
#   GW_PORT (18280), GWN_PORT (18281)    the two gateways this script starts; their metrics
#               listeners on GW_PORT+1000 and GWN_PORT+1000
#   LINK_SYSTEM identifier system of the identity links (urn:fhir-gateway:load-test-link):
#               a system of its own, so this script never touches links other runs rely on
#
# Writes load-tests/results/participant.md. Everything it starts is stopped by PID on exit; its
# temp folder is removed. The seeded `bench-*` resources stay in SEKMET (PUT again next time).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
RESULTS=$HERE/results
OUT=$RESULTS/participant.md

N=${N:-300}
RUNS=${RUNS:-3}
WARMUP=${WARMUP:-20}
SKIP_BUILD=${SKIP_BUILD:-0}
CRITERION=${CRITERION:-1}
GW_CPU=${GW_CPU:-1}
LOADGEN_CPU=${LOADGEN_CPU:-0}
FHIR_PORT=${FHIR_PORT:-8090}
OIDC_PORT=${OIDC_PORT:-9400}
SEKMET_DB=${SEKMET_DB:-$REPO/.cache/peers/sekmet/data/sekmet.db}
GW_PORT=${GW_PORT:-18280}
GWN_PORT=${GWN_PORT:-18281}
LINK_SYSTEM=${LINK_SYSTEM:-urn:fhir-gateway:load-test-link}
OWN_IDP=${OWN_IDP:-auto}
OWN_IDP_PORT=${OWN_IDP_PORT:-19401}
IDP_KIND="the shared test IdP"

FHIR=http://127.0.0.1:$FHIR_PORT/fhir
IDP=http://127.0.0.1:$OIDC_PORT
AUDIENCE=api://fhir-gateway
TENANT=11111111-1111-1111-1111-111111111111
PRACT_OID=oid-practitioner-app
PRACT_REF=Practitioner/bench-dr
NPAT=20  # the practitioner's patients (generalPractitioner = bench-dr)
NOBS=5   # Observations per patient
NOTHER=4 # other patients, not of record
# Case A: code urn:bench|p2 — exactly the practitioner's 100 Observations (all visible).
# Case B: code urn:bench|p2x — the same 100 (they carry both codings) + 20 of 4 other patients:
#         SEKMET returns 120 on one page (_count=120), the filter removes 20.
declare -A QUERY=(
  [A]="code=urn:bench%7Cp2&_count=100"
  [B]="code=urn:bench%7Cp2x&_count=120"
)
declare -A UP_ENTRIES=([A]=100 [B]=120) # match entries SEKMET returns
declare -A CASE_NAME=(
  [A]="100 entries, all visible (\`code=urn:bench|p2&_count=100\`)"
  [B]="120 entries from SEKMET, 20 removed (\`code=urn:bench|p2x&_count=120\`)"
)
CASES=(A B)
PATHS=(direct gateway gateway-nofilter)
declare -A BASE_URL=(
  [direct]=$FHIR
  [gateway]=http://127.0.0.1:$GW_PORT/fhir
  [gateway-nofilter]=http://127.0.0.1:$GWN_PORT/fhir
)
declare -A CLIENT=([direct]="" [gateway]=practitioner-app [gateway-nofilter]=reader-app)

log() { printf '[participant] %s\n' "$*" >&2; }
die() {
  printf '[participant] ERROR: %s\n' "$*" >&2
  exit 1
}

for v in N RUNS WARMUP FHIR_PORT OIDC_PORT GW_PORT GWN_PORT; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
((N >= RUNS)) || die "N ($N) must be at least RUNS ($RUNS)"
NCPU=$(nproc)
((GW_CPU < NCPU && LOADGEN_CPU < NCPU)) || die "GW_CPU/LOADGEN_CPU need a CPU this machine lacks (nproc=$NCPU)"
for c in curl taskset python3 cargo; do
  command -v "$c" >/dev/null || die "$c is needed"
done

# ---------------------------------------------------------------- cleanup
TMP=$(mktemp -d "${TMPDIR:-/tmp}/fhir-participant.XXXXXX")
PIDS=()
NAMES=()
LINKED=0
stop_pid() { # stop_pid <pid> <signal>: signal, wait up to 10 s, then SIGKILL
  local pid=$1 sig=$2 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
stop_all() {
  local i
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    stop_pid "${PIDS[i]}" INT # Pingora: SIGINT = fast shutdown
  done
  PIDS=()
}
cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  if ((LINKED)) && ((${#PIDS[@]})); then # leave no link behind (best effort)
    unlink_bench >/dev/null 2>&1 || true
  fi
  if ((rc != 0)); then
    for i in "${NAMES[@]}"; do
      [[ -s $TMP/$i.log ]] || continue
      log "--- last lines of $i log ---"
      tail -n 15 "$TMP/$i.log" >&2 || true
    done
  fi
  stop_all
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
wait_http() { # wait_http <name> <url>: up to 20 s for a 200
  local i
  for ((i = 0; i < 200; i++)); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$2" || true) == 200 ]] && return 0
    kill -0 "${PIDS[-1]}" 2>/dev/null || die "$1 exited during start-up: $(tail -5 "$TMP/$1.log")"
    sleep 0.1
  done
  die "$1 did not answer 200 at $2 within 20 s"
}

# ---------------------------------------------------------------- peers (shared: only checked)
curl -fsS --max-time 5 -o /dev/null "$FHIR/metadata" ||
  die "SEKMET is not answering at $FHIR (start the shared peers: scripts/peers.sh start sekmet oidc)"
client_ok() { # client_ok <idp> <client>: a client-credentials token can be had
  curl -fs --max-time 5 -o /dev/null -u "$2:${2%-app}-secret" -d grant_type=client_credentials "$1/token"
}
if [[ $OWN_IDP == auto ]]; then
  OWN_IDP=0
  if ! client_ok "$IDP" practitioner-app; then
    log "the IdP at $IDP gives no token to practitioner-app (an older idp.mjs?): starting a private one"
    OWN_IDP=1
  fi
fi
if [[ $OWN_IDP == 1 ]]; then
  MODS=""
  for m in "$REPO/.cache/peers/oidc/node_modules" "$REPO/.cache/load-tests-peers/oidc/node_modules"; do
    [[ -f $m/oidc-provider/package.json ]] && MODS=$m && break
  done
  [[ -n $MODS ]] || die "no installed oidc-provider under .cache/*/oidc: run scripts/peers.sh install"
  command -v node >/dev/null || die "node is needed for the private IdP"
  ! port_busy "$OWN_IDP_PORT" || die "127.0.0.1:$OWN_IDP_PORT (OWN_IDP_PORT) is already in use"
  mkdir -p "$TMP/oidc"
  cp "$REPO/.ci/peers/idp.mjs" "$TMP/oidc/idp.mjs"
  ln -s "$MODS" "$TMP/oidc/node_modules"
  IDP=http://127.0.0.1:$OWN_IDP_PORT
  OIDC_PORT=$OWN_IDP_PORT
  (cd "$TMP/oidc" && exec env PORT="$OWN_IDP_PORT" ISSUER="$IDP" KEYS_FILE="$TMP/oidc/keys.json" TOKEN_TTL=3600 \
    taskset -c "$LOADGEN_CPU" node idp.mjs) >"$TMP/oidc.log" 2>&1 &
  PIDS+=("$!")
  NAMES+=(oidc)
  IDP_KIND="a private copy of the current .ci/peers/idp.mjs started by this script: the shared one on :9400 runs an older idp.mjs without practitioner-app"
  log "started a private IdP at $IDP (pid $!, CPU $LOADGEN_CPU)"
  wait_http oidc "$IDP/.well-known/openid-configuration"
fi
curl -fsS --max-time 5 -o /dev/null "$IDP/.well-known/openid-configuration" ||
  die "the IdP is not answering at $IDP (scripts/peers.sh start oidc)"
client_ok "$IDP" practitioner-app || die "the IdP at $IDP gives no token to practitioner-app"
[[ -f $SEKMET_DB ]] || die "SEKMET's database $SEKMET_DB not found (SEKMET_DB=...)"
for p in "$GW_PORT" "$GWN_PORT" $((GW_PORT + 1000)) $((GWN_PORT + 1000)); do
  ! port_busy "$p" || die "127.0.0.1:$p is already in use"
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
BIN=$TMP/fhir-gateway # a copy: a rebuild by someone else mid-run cannot change what is measured
cp "$BIN_SRC" "$BIN"
BIN_DATE=$(date -u -r "$BIN_SRC" '+%Y-%m-%d %H:%M UTC')

# ---------------------------------------------------------------- python helpers
cat >"$TMP/helper.py" <<'PY'
"""seed | measure | calls | stats — small stdlib helpers for participant.sh."""
import base64, http.client, json, math, sqlite3, sys, time, urllib.parse, urllib.request


def token(idp, client):
    secret = client[: -len("-app")] + "-secret" if client.endswith("-app") else client + "-secret"
    req = urllib.request.Request(
        idp + "/token", data=b"grant_type=client_credentials",
        headers={"Authorization": "Basic " + base64.b64encode(f"{client}:{secret}".encode()).decode(),
                 "Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(req, timeout=10) as r:
        t = json.load(r)
    return t["access_token"], time.time() + int(t["expires_in"])


def seed(fhir, npat, nobs, nother, pract):
    """One batch Bundle of PUTs with fixed ids; every entry must answer 200 or 201."""
    gp = [{"reference": pract}]
    entries = [("Practitioner", "bench-dr", {"resourceType": "Practitioner", "id": "bench-dr",
                                             "name": [{"family": "Bench", "given": ["Dr"]}]})]

    def patient(pid, mine):
        r = {"resourceType": "Patient", "id": pid, "name": [{"family": "Bench", "given": [pid]}]}
        if mine:
            r["generalPractitioner"] = gp
        return r

    def obs(oid, pid, codes):
        return {"resourceType": "Observation", "id": oid, "status": "final",
                "code": {"coding": [{"system": "urn:bench", "code": c} for c in codes]},
                "subject": {"reference": f"Patient/{pid}"},
                "effectiveDateTime": "2024-01-01T10:00:00Z",
                "valueQuantity": {"value": 72, "unit": "/min"}}

    for i in range(npat):
        pid = f"bench-p{i:02d}"
        entries.append(("Patient", pid, patient(pid, True)))
        for j in range(nobs):
            oid = f"bench-o{i:02d}-{j}"
            entries.append(("Observation", oid, obs(oid, pid, ["p2", "p2x"])))
    for i in range(nother):
        pid = f"bench-x{i}"
        entries.append(("Patient", pid, patient(pid, False)))
        for j in range(nobs):
            oid = f"bench-x{i}-{j}"
            entries.append(("Observation", oid, obs(oid, pid, ["p2x"])))
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": r, "request": {"method": "PUT", "url": f"{t}/{i}"}} for t, i, r in entries]}
    u = urllib.parse.urlsplit(fhir)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    c.request("POST", u.path, json.dumps(bundle),
              {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json",
               "X-Request-Id": f"bench-seed-{int(time.time())}"})
    r = c.getresponse()
    body = r.read()
    if r.status != 200:
        sys.exit(f"seed: HTTP {r.status}: {body[:400]!r}")
    out = json.loads(body)
    bad = [e.get("response", {}).get("status") for e in out.get("entry", [])
           if not str(e.get("response", {}).get("status", "")).startswith(("200", "201"))]
    if len(out.get("entry", [])) != len(entries) or bad:
        sys.exit(f"seed: {len(out.get('entry', []))} of {len(entries)} entries answered, failures: {bad[:5]}")
    print(len(entries))


class Path:
    """One path: a keep-alive connection, its token (refreshed outside the timed section)."""

    def __init__(self, url, client, idp):
        self.u = urllib.parse.urlsplit(url)
        self.target = self.u.path + ("?" + self.u.query if self.u.query else "")
        self.client, self.idp, self.tok, self.exp = client, idp, None, 0
        self.conn = http.client.HTTPConnection(self.u.hostname, self.u.port, timeout=60)

    def get(self, rid):
        if self.client and self.exp - time.time() < 60:
            self.tok, self.exp = token(self.idp, self.client)
        h = {"Accept": "application/fhir+json", "X-Request-Id": rid}
        if self.tok:
            h["Authorization"] = "Bearer " + self.tok
        t0 = time.perf_counter()
        self.conn.request("GET", self.target, headers=h)
        r = self.conn.getresponse()
        body = r.read()
        ms = (time.perf_counter() - t0) * 1000
        if (r.getheader("connection") or "").lower() == "close":
            self.conn.close()
            self.conn = http.client.HTTPConnection(self.u.hostname, self.u.port, timeout=60)
        return ms, r.status, body


def measure(specs, n, idp, upstream):
    """n iterations; in each, one GET per path, the paths in turn (the first path rotates), so
    every path sees the same state of a shared upstream. specs: JSON list of
    {url, client, prefix, out}. One TSV line per request in each path's out file:
    request id, ms, status, match entries, outcome entries, bytes, 1 if the body holds upstream."""
    specs = json.loads(specs)
    paths = [Path(sp["url"], sp["client"], idp) for sp in specs]
    files = [open(sp["out"], "w") for sp in specs]
    k = len(specs)
    for i in range(n):
        for j in [(i + x) % k for x in range(k)]:
            rid = f"{specs[j]['prefix']}-{i}"
            ms, status, body = paths[j].get(rid)
            m = o = 0
            if status == 200:
                for e in json.loads(body).get("entry", []):
                    mode = e.get("search", {}).get("mode")
                    m += mode == "match"
                    o += mode == "outcome"
            files[j].write(f"{rid}\t{ms:.3f}\t{status}\t{m}\t{o}\t{len(body)}\t{int(upstream.encode() in body)}\n")
    for f in files:
        f.close()


def calls(db, prefix_file, out):
    """Rows of SEKMET's traffic log per correlation id (the prefixes given, one a line)."""
    prefixes = [p.strip() for p in open(prefix_file) if p.strip()]
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
    with open(out, "w") as f:
        for p in prefixes:
            for cid, k in c.execute(
                    "SELECT correlation_id, count(*) FROM traffic WHERE correlation_id LIKE ? GROUP BY correlation_id",
                    (p + "-%",)):
                f.write(f"{cid}\t{k}\n")


def stats(tsv):
    """mean p50 p99 of column 2 (nearest rank)."""
    v = sorted(float(l.split("\t")[1]) for l in open(tsv) if l.strip())
    rank = lambda q: v[max(0, min(len(v) - 1, math.ceil(len(v) * q - 1e-9) - 1))]
    print(f"{sum(v) / len(v):.3f} {rank(0.50):.3f} {rank(0.99):.3f} {len(v)}")


def paired(base, other):
    """median and mean of other_i - base_i (iteration by iteration)."""
    a = [float(l.split("\t")[1]) for l in open(base) if l.strip()]
    b = [float(l.split("\t")[1]) for l in open(other) if l.strip()]
    d = sorted(y - x for x, y in zip(a, b))
    med = d[len(d) // 2] if len(d) % 2 else (d[len(d) // 2 - 1] + d[len(d) // 2]) / 2
    print(f"{med:+.3f} {sum(d) / len(d):+.3f}")


if __name__ == "__main__":
    cmd, a = sys.argv[1], sys.argv[2:]
    if cmd == "seed":
        seed(a[0], int(a[1]), int(a[2]), int(a[3]), a[4])
    elif cmd == "measure":
        measure(a[0], int(a[1]), a[2], a[3])
    elif cmd == "calls":
        calls(a[0], a[1], a[2])
    elif cmd == "stats":
        stats(a[0])
    elif cmd == "paired":
        paired(a[0], a[1])
    elif cmd == "token":
        print(token(a[0], a[1])[0])
PY
py() { python3 "$TMP/helper.py" "$@"; }

# ---------------------------------------------------------------- seed SEKMET
log "seeding SEKMET ($FHIR): $PRACT_REF, $NPAT patients x $NOBS Observations, $NOTHER other patients x $NOBS"
SEEDED=$(py seed "$FHIR" "$NPAT" "$NOBS" "$NOTHER" "$PRACT_REF") || die "seeding SEKMET failed"
log "seeded $SEEDED resources (one batch of PUTs)"

# ---------------------------------------------------------------- gateways
gw_config() { # gw_config <port> <dir> <filters 0|1>
  cat <<EOF
listen:
  - addr: 127.0.0.1:$1
upstream:
  url: $FHIR
  timeouts:
    connect_ms: 1000
    read_ms: 30000
auth:
  mode: jwt
  issuers:
    - name: bench-idp
      issuer: $IDP
      discovery_url: $IDP/.well-known/openid-configuration
      audiences: ["$AUDIENCE"]
      allowed_tenants: [$TENANT]
logging:
  level: warn
  access_log: false
metrics:
  listen: 127.0.0.1:$(($1 + 1000))
pingora:
  threads: 1
  pid_file: $2/pingora.pid
  upgrade_sock: $2/pingora_upgrade.sock
identity_links:
  system: $LINK_SYSTEM
  cache_ttl_secs: 3600
EOF
  if [[ $3 == 1 ]]; then
    cat <<EOF
policy:
  read: [Reader, Administrator, Patient, Practitioner, RelatedPerson]
  write: [Writer, Administrator]
post:
  - name: ParticipantFilter
    settings: {hide_existence: false, cache_ttl_secs: 3600}
  - name: ConsentOptOut
    settings: {category: "http://loinc.org|59284-0", cache_ttl_minutes: 60}
EOF
  else
    cat <<EOF
policy:
  read: [Reader, Administrator]
  write: [Writer, Administrator]
EOF
  fi
}
mkdir -p "$TMP/gw" "$TMP/gwn"
gw_config "$GW_PORT" "$TMP/gw" 1 >"$TMP/gw/gateway.yaml"
gw_config "$GWN_PORT" "$TMP/gwn" 0 >"$TMP/gwn/gateway.yaml"
for d in gw gwn; do
  "$BIN" -t -c "$TMP/$d/gateway.yaml" >"$TMP/$d/test.log" 2>&1 || die "gateway config $d invalid: $(cat "$TMP/$d/test.log")"
done
start_bg gateway "$GW_CPU" env -u RUST_LOG "$BIN" -c "$TMP/gw/gateway.yaml"
wait_http gateway "http://127.0.0.1:$GW_PORT/readyz"
start_bg gateway-nofilter "$GW_CPU" env -u RUST_LOG "$BIN" -c "$TMP/gwn/gateway.yaml"
wait_http gateway-nofilter "http://127.0.0.1:$GWN_PORT/readyz"

# ---------------------------------------------------------------- link practitioner-app
ADMIN=$(py token "$IDP" admin-app) || die "no token for admin-app from $IDP"
LINK_BODY="{\"tenant\":\"$TENANT\",\"oid\":\"$PRACT_OID\",\"reference\":\"$PRACT_REF\"}"
manage() { # manage <method> <path> [body] -> prints "<code> <body>"
  local args=(-s --max-time 30 -o "$TMP/manage.out" -w '%{http_code}' -H "Authorization: Bearer $ADMIN")
  [[ $1 == POST ]] && args+=(-H 'Content-Type: application/json' --data-binary "$3")
  local code
  code=$(curl "${args[@]}" "http://127.0.0.1:$GW_PORT/manage/$2") || code=000
  printf '%s %s' "$code" "$(cat "$TMP/manage.out" 2>/dev/null)"
}
unlink_bench() {
  ADMIN=$(py token "$IDP" admin-app)
  manage POST unlink "$LINK_BODY"
}
res=$(manage POST link "$LINK_BODY")
if [[ ${res%% *} == 409 ]]; then
  log "practitioner-app is linked elsewhere (system $LINK_SYSTEM): unlinking that first"
  res=$(manage GET links)
  [[ ${res%% *} == 200 ]] || die "GET /manage/links: $res"
  while read -r other; do
    [[ -n $other ]] || continue
    r2=$(manage POST unlink "{\"tenant\":\"$TENANT\",\"oid\":\"$PRACT_OID\",\"reference\":\"$other\"}")
    [[ ${r2%% *} == 200 ]] || die "unlink $other: $r2"
    log "unlinked $other"
  done < <(python3 -c 'import json,sys
for l in json.loads(sys.argv[1])["links"]:
    if l.get("tenant") == sys.argv[2] and l.get("oid") == sys.argv[3]: print(l["reference"])' \
    "${res#* }" "$TENANT" "$PRACT_OID")
  res=$(manage POST link "$LINK_BODY")
fi
[[ ${res%% *} == 201 || ${res%% *} == 200 ]] || die "POST /manage/link: $res"
LINKED=1
log "linked $TENANT/$PRACT_OID -> $PRACT_REF (HTTP ${res%% *})"

# ---------------------------------------------------------------- correctness
specs_json() { # specs_json <case> <tag> <path=client>... -> the JSON list for helper.py measure
  local c=$1 tag=$2 sp p cl first=1
  shift 2
  printf '['
  for sp in "$@"; do
    p=${sp%%=*} cl=${sp#*=}
    ((first)) || printf ','
    first=0
    printf '{"url":"%s","client":"%s","prefix":"%s","out":"%s"}' "${BASE_URL[$p]}/Observation?${QUERY[$c]}" \
      "$cl" "$STAMP-$tag-$p-$c" "$RAW/$tag-$p-$c.tsv"
  done
  printf ']'
}
measure() { # measure <case> <n> <tag> <path=client>...
  local c=$1 n=$2 tag=$3 sp
  shift 3
  for sp in "$@"; do echo "$STAMP-$tag-${sp%%=*}-$c" >>"$TMP/prefixes"; done
  taskset -c "$LOADGEN_CPU" python3 "$TMP/helper.py" measure "$(specs_json "$c" "$tag" "$@")" "$n" "$IDP" \
    "127.0.0.1:$FHIR_PORT" || die "measuring case $c ($tag) failed"
}
check() { # check <path> <case> <client> <want match> <want outcome>
  local f=$RAW/check$3-$1-$2.tsv
  measure "$2" 1 "check$3" "$1=$3"
  local st m o bytes leak
  IFS=$'\t' read -r _ _ st m o bytes leak <"$f"
  [[ $st == 200 && $m == "$4" && $o == "$5" ]] ||
    die "$1, case $2, as ${3:-nobody}: HTTP $st, $m match + $o outcome entries; expected 200, $4 + $5"
  [[ $1 == direct || $leak == 0 ]] || die "$1: the body still holds 127.0.0.1:$FHIR_PORT"
  log "  ok: $1, case $2, as ${3:-no token}: $m match + $o outcome entries, $bytes bytes"
}
STAMP=pb$(date +%s)
RAW=$TMP/raw
mkdir -p "$RAW"
log "checking answers"
: >"$TMP/prefixes"
check direct A "" 100 0
check direct B "" 120 0
check gateway A practitioner-app 100 0
cp "$RAW/checkpractitioner-app-gateway-A.tsv" "$TMP/cold.tsv" # the first request after the link: cold caches
check gateway B practitioner-app 100 1
check gateway A reader-app 0 1 # a caller who is nobody sees no patient data: the filter is on
check gateway-nofilter A reader-app 100 0
check gateway-nofilter B reader-app 120 0

# ---------------------------------------------------------------- measure
# Warm-up: WARMUP iterations per case. In every iteration each path gets one request, in turn
# (helper.py measure), so a shared SEKMET's changing speed hits all paths alike.
log "warm-up: $WARMUP iterations per case"
SPECS=()
for p in "${PATHS[@]}"; do SPECS+=("$p=${CLIENT[$p]}"); done
for c in "${CASES[@]}"; do
  measure "$c" "$WARMUP" warmup "${SPECS[@]}"
done
scrape() { # scrape <port> -> "name{labels} value" lines of the module and request metrics
  curl -fsS --max-time 5 "http://127.0.0.1:$1/metrics" | grep -E '^fhirgw_(module|request)_seconds_(sum|count)' || true
}
declare -A MOD_SUM # "<case>.<path> <metric>.<sum|count>" -> totals over the measured requests
PER_ROUND=$((N / RUNS))
log "measuring: $RUNS round(s) x $PER_ROUND iterations per case; one request per path per iteration, in turn"
for ((r = 1; r <= RUNS; r++)); do
  n=$PER_ROUND
  ((r < RUNS)) || n=$((N - PER_ROUND * (RUNS - 1)))
  for c in "${CASES[@]}"; do
    scrape $((GW_PORT + 1000)) >"$TMP/before.gateway.prom"
    scrape $((GWN_PORT + 1000)) >"$TMP/before.gateway-nofilter.prom"
    measure "$c" "$n" "r$r" "${SPECS[@]}"
    for p in gateway gateway-nofilter; do
      [[ $p == gateway ]] && mport=$((GW_PORT + 1000)) || mport=$((GWN_PORT + 1000))
      scrape "$mport" >"$TMP/after.prom"
      while read -r key v1; do
        v0=$(awk -v k="$key" '$1 == k { print $2 }' "$TMP/before.$p.prom")
        # fhirgw_module_seconds_sum{..module="X"..} -> module.X.sum; fhirgw_request_seconds_count{..} -> request.count
        key="$p $(sed -E 's/^fhirgw_(module|request)_seconds_(sum|count)(\{.*module="([^"]*)".*\}|\{.*\})?$/\1.\4.\2/; s/\.\././' <<<"$key")"
        MOD_SUM[$c.$key]=$(awk -v a="${MOD_SUM[$c.$key]:-0}" -v b="$v1" -v c="${v0:-0}" 'BEGIN { printf "%.9f", a + b - c }')
      done <"$TMP/after.prom"
    done
    for p in "${PATHS[@]}"; do
      bad=$(awk -F'\t' '$3 != 200 { n++ } END { print n + 0 }' "$RAW/r$r-$p-$c.tsv")
      ((bad == 0)) || die "$p case $c: $bad non-200 answers (was SEKMET restarted by another run?)"
    done
  done
  log "  round $r done"
done
for c in "${CASES[@]}"; do
  for p in "${PATHS[@]}"; do
    cat "$RAW"/r*-"$p-$c.tsv" >"$RAW/all-$p-$c.tsv"
    # every answer had the expected entries
    want=${UP_ENTRIES[$c]}
    [[ $p == gateway ]] && want=100
    bad=$(awk -F'\t' -v w="$want" '$4 != w { n++ } END { print n + 0 }' "$RAW/all-$p-$c.tsv")
    ((bad == 0)) || die "$p case $c: $bad answers without $want match entries (did SEKMET's data change?)"
  done
done

# ---------------------------------------------------------------- upstream calls per request
sleep 1 # SEKMET's traffic log is written as it answers; leave it a moment
py calls "$SEKMET_DB" "$TMP/prefixes" "$TMP/calls.tsv" || die "reading $SEKMET_DB failed"
calls_of() { # calls_of <raw tsv> -> avg max min count_with_zero
  awk -F'\t' 'FILENAME == ARGV[1] { k[$1] = $2; next } { n++; c = k[$1] + 0; s += c; if (c > mx) mx = c; if (n == 1 || c < mn) mn = c }
    END { printf "%.2f %d %d %d\n", s / n, mx, mn, n }' "$TMP/calls.tsv" "$1"
}
COLD_ID=$(cut -f1 "$TMP/cold.tsv")
COLD_MS=$(cut -f2 "$TMP/cold.tsv")
COLD_CALLS=$(awk -F'\t' -v id="$COLD_ID" '$1 == id { print $2 }' "$TMP/calls.tsv")
read -r _ dmax dmin _ < <(calls_of "$RAW/all-direct-A.tsv")
TRAFFIC_OK=1
((dmin == 1 && dmax == 1)) || TRAFFIC_OK=0

# ---------------------------------------------------------------- criterion (optional)
res=$(unlink_bench) || true
[[ ${res%% *} == 200 ]] || log "warning: POST /manage/unlink: $res"
LINKED=0
stop_all # the gateways are not needed any more; the bench gets the CPU to itself
CRIT="not run (CRITERION=0)"
if [[ $CRITERION == 1 ]]; then
  log "cargo bench --bench hot_path -- participant (pinned to CPU $GW_CPU)"
  if (cd "$REPO" && taskset -c "$GW_CPU" cargo bench --bench hot_path -- participant) >"$TMP/bench.log" 2>&1; then
    CRIT=$(awk '/participant/ { name = $0 } /time:/ && name != "" { sub(/^.*time: *\[/, ""); sub(/\].*$/, ""); print; exit }' "$TMP/bench.log")
    lookups=$(grep -m1 'lookups during the benchmark' "$TMP/bench.log" || true)
    CRIT="[$CRIT] (criterion low / estimate / high)${lookups:+; $lookups}"
  else
    CRIT="failed: $(grep -m1 -E '^error' "$TMP/bench.log" || tail -1 "$TMP/bench.log")"
  fi
  log "criterion: $CRIT"
fi

# ---------------------------------------------------------------- report
declare -A S
for c in "${CASES[@]}"; do
  for p in "${PATHS[@]}"; do
    read -r mean p50 p99 cnt < <(py stats "$RAW/all-$p-$c.tsv")
    S[$c.$p.mean]=$mean S[$c.$p.p50]=$p50 S[$c.$p.p99]=$p99 S[$c.$p.n]=$cnt
    read -r avg mx mn _ < <(calls_of "$RAW/all-$p-$c.tsv")
    S[$c.$p.cavg]=$avg S[$c.$p.cmax]=$mx S[$c.$p.cmin]=$mn
    S[$c.$p.bytes]=$(awk -F'\t' 'NR == 1 { print $6 }' "$RAW/all-$p-$c.tsv")
    read -r S[$c.$p.pmed] S[$c.$p.pmean] < <(py paired "$RAW/all-direct-$c.tsv" "$RAW/all-$p-$c.tsv")
  done
done
d() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.3f", a - b }'; }
per_req() { # per_req <case> <path> <metric> -> mean ms, or ?
  awk -v s="${MOD_SUM[$1.$2 $3.sum]:-}" -v n="${MOD_SUM[$1.$2 $3.count]:-}" \
    'BEGIN { if (n > 0) printf "%.3f", s / n * 1000; else printf "?" }'
}
gw_times() { # gw_times <case>
  echo "request (whole, as the gateway sees it) gateway **$(per_req "$1" gateway request)** ms," \
    "gateway-nofilter $(per_req "$1" gateway-nofilter request) ms;" \
    "ParticipantFilter **$(per_req "$1" gateway module.ParticipantFilter)** ms," \
    "ConsentOptOut **$(per_req "$1" gateway module.ConsentOptOut)** ms per request"
}
COMMIT=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
git -C "$REPO" diff --quiet HEAD -- src modules Cargo.toml Cargo.lock 2>/dev/null ||
  COMMIT="$COMMIT (working tree has uncommitted changes under src/ modules/ or Cargo.*)"
CPU_MODEL=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
mkdir -p "$RESULTS"
{
  echo "# ParticipantFilter + ConsentOptOut: a practitioner's 100-entry searchset, warm caches"
  echo
  echo "- Date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "- Machine: nproc=$NCPU, CPU: ${CPU_MODEL:-unknown}, kernel $(uname -r); load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- Git commit: $COMMIT; binary built $BIN_DATE (release)"
  echo "- Command: \`N=$N RUNS=$RUNS WARMUP=$WARMUP load-tests/participant.sh\`"
  echo
  echo "## Method"
  echo
  echo "- Upstream: the shared SEKMET FHIR R4 server ($FHIR, not pinned, shared with other test runs: its time varies), seeded with one batch of PUTs: \`$PRACT_REF\`, $NPAT Patients with \`generalPractitioner\` = it, $NOBS Observations each (coded \`urn:bench|p2\` and \`urn:bench|p2x\`), and $NOTHER other Patients (not of record) with $NOBS Observations each coded \`urn:bench|p2x\` only."
  echo "- **gateway**: release \`fhir-gateway\`, \`pingora.threads: 1\`, pinned to CPU $GW_CPU, logging warn, no access log; \`auth.mode: jwt\` against the IdP at $IDP ($IDP_KIND); policy read includes Practitioner; post chain \`ParticipantFilter\` (cache_ttl_secs 3600) + \`ConsentOptOut\` (category \`http://loinc.org|59284-0\`, cache_ttl_minutes 60); \`identity_links.cache_ttl_secs: 3600\` (long TTLs so the caches stay warm for the whole run). Caller: a \`practitioner-app\` client-credentials token, linked to \`$PRACT_REF\` with \`POST /manage/link\` (identifier system \`$LINK_SYSTEM\`, of this benchmark's own, so links other runs use are never touched)."
  echo "- **gateway-nofilter**: the same gateway without post modules (the request streams) and policy read = Reader, Administrator; caller: \`reader-app\`. gateway − gateway-nofilter = what the module path and the two filters cost."
  echo "- **direct**: the same GET straight to SEKMET."
  echo "- Client: python3 \`http.client\`, one keep-alive connection per path, strictly sequential (one request at a time), pinned to CPU $LOADGEN_CPU; time from sending the request to the last body byte. The paths are measured **in lockstep**: each iteration sends one request to each path in turn (the first path rotates), so the shared SEKMET's changing speed hits all three alike, and *paired Δ* is the per-iteration difference to direct (its median is the most robust overhead figure here). $WARMUP unrecorded iterations per case first; then N = $N measured iterations per case in $RUNS round(s), pooled. Every answer is checked: HTTP 200, the expected number of \`match\` entries, no \`127.0.0.1:$FHIR_PORT\` left in gateway bodies."
  echo "- Upstream calls per request: every request carries a unique \`X-Request-Id\`; the gateway passes it to SEKMET on the search and on every lookup the filters make, and SEKMET's traffic log (\`traffic.correlation_id\` in \`$(basename "$SEKMET_DB")\`) has one row per request it received. 1 = the search itself, no lookups.$( ((TRAFFIC_OK)) || echo " **Warning: the direct path did not show exactly 1 row per request: the traffic log is not reliable here (log_inbound off?).**")"
  echo
  for c in "${CASES[@]}"; do
    echo "## Case $c: ${CASE_NAME[$c]}"
    echo
    echo "| path | answer | mean ms | p50 ms | p99 ms | Δp50 vs direct | Δp99 vs direct | paired Δ vs direct: median | paired Δ: mean | upstream calls/request avg | max |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for p in "${PATHS[@]}"; do
      case $p in
        gateway) ans="100 entries" && if [[ $c == B ]]; then ans="$ans + 1 'filtered' notice"; fi ;;
        *) ans="${UP_ENTRIES[$c]} entries" ;;
      esac
      ans="$ans, ${S[$c.$p.bytes]} B"
      echo "| $p | $ans | ${S[$c.$p.mean]} | ${S[$c.$p.p50]} | ${S[$c.$p.p99]} | $(d "${S[$c.$p.p50]}" "${S[$c.direct.p50]}") | $(d "${S[$c.$p.p99]}" "${S[$c.direct.p99]}") | ${S[$c.$p.pmed]} | ${S[$c.$p.pmean]} | ${S[$c.$p.cavg]} | ${S[$c.$p.cmax]} |"
    done
    echo
    echo "- gateway overhead per request (gateway − direct, same iteration): median **${S[$c.gateway.pmed]} ms**, mean ${S[$c.gateway.pmean]} ms; Δp50 $(d "${S[$c.gateway.p50]}" "${S[$c.direct.p50]}") ms, Δmean $(d "${S[$c.gateway.mean]}" "${S[$c.direct.mean]}") ms, Δp99 $(d "${S[$c.gateway.p99]}" "${S[$c.direct.p99]}") ms"
    echo "- of which the module path + filters (gateway − gateway-nofilter): paired median **$(d "${S[$c.gateway.pmed]}" "${S[$c.gateway-nofilter.pmed]}") ms** (difference of the paired medians), Δp50 $(d "${S[$c.gateway.p50]}" "${S[$c.gateway-nofilter.p50]}") ms, Δmean $(d "${S[$c.gateway.mean]}" "${S[$c.gateway-nofilter.mean]}") ms"
    echo "- time inside the gateway by its own metrics (\`fhirgw_*_seconds\` sum ÷ count over the measured requests): $(gw_times "$c")"
    echo "- upstream calls per gateway request with warm caches: avg **${S[$c.gateway.cavg]}**, min ${S[$c.gateway.cmin]}, max **${S[$c.gateway.cmax]}** over ${S[$c.gateway.n]} requests (goal: exactly 1)"
    echo
  done
  echo "## Cold cache and criterion"
  echo
  echo "- The first gateway request after the link (case A, cold: identity link, the practitioner's patients, their Consents): **${COLD_CALLS:-?} upstream calls**, ${COLD_MS} ms."
  echo "- Criterion, \`cargo bench --bench hot_path -- participant\` (both filters in-process on a synthetic 100-entry searchset, warm caches, no I/O): $CRIT"
  echo
  echo "## Rounds (p50 ms per round)"
  echo
  echo "| case | path | $(for ((r = 1; r <= RUNS; r++)); do printf 'round %d | ' "$r"; done)"
  echo "|---|---|$(for ((r = 1; r <= RUNS; r++)); do printf -- '---:|'; done)"
  for c in "${CASES[@]}"; do
    for p in "${PATHS[@]}"; do
      printf '| %s | %s | ' "$c" "$p"
      for ((r = 1; r <= RUNS; r++)); do
        printf '%s | ' "$(py stats "$RAW/r$r-$p-$c.tsv" | cut -d' ' -f2)"
      done
      echo
    done
  done
} >"$OUT"
log "wrote $OUT"
echo
cat "$OUT"
