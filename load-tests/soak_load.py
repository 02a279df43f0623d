"""The soak's Python side (load-tests/soak.sh): seed, check, run, sample, topic, report.

Only the standard library, except `topic`, which runs with the kafka venv's python
(confluent_kafka). Every subcommand takes the context file soak.sh writes (JSON: ports, paths,
knobs) as its first argument.

  seed    ctx              PUTs the fixed soak-* resources straight into the script's own SEKMET
  check   ctx              every request kind once, sequentially: the mix's expectations hold
  run     ctx              the load: RATE req/s for DURATION, one TSV record per request
  sample  ctx <phase>      one CSV row: the gateway's process figures and its metrics
  topic   ctx <expected>   reads the events topic back: correlation ids of the events on it
  report  ctx              soak-latest.md with PASS/FAIL per goal; exit 1 on any FAIL
"""

import base64
import collections
import csv
import http.client
import json
import os
import queue
import random
import re
import signal
import sys
import threading
import time
import urllib.parse
import urllib.request

# ---------------------------------------------------------------------------- the data set
# A practitioner of record for 10 patients (generalPractitioner), one of whom (soak-p09) opted out
# of sharing with them (ConsentOptOut); 5 patients of nobody; Patient/p1, the patient behind
# bench-patient-app (its token carries fhirUser Patient/p1). Every Observation has the code
# urn:soak|vital, so one search meets every patient and the filters have work on every page.
PRACT = "Practitioner/soak-dr"
OF_RECORD = [f"soak-p{i:02d}" for i in range(10)]
OPTED_OUT = "soak-p09"
OTHERS = [f"soak-x{i}" for i in range(5)]
ME = "p1"
OBS_PER_PATIENT = 5
OWN_OBS = 20
CODE = "urn:soak|vital"
CONSENT_CATEGORY = "http://loinc.org|59284-0"

# Clients of the IdP (.ci/peers/idp.mjs); the secret is the id without "-app" plus "-secret".
PATIENT, PRACTITIONER, ADMIN, WRITER = "bench-patient-app", "practitioner-app", "admin-app", "writer-app"
CLIENTS = [PATIENT, PRACTITIONER, ADMIN, WRITER]

# ---------------------------------------------------------------------------- the mix
# kind: (default weight, statuses that count as success, what it is). Everything else — another
# status, no answer, a foreign resource in a filtered search, an upstream URL left in a body —
# is an unexpected result and fails the soak.
KINDS = {
    "read_own": (14, {200}, "patient GET one of its own Observations by id"),
    "read_foreign": (5, {403}, "patient GET another patient's Observation by id (ParticipantFilter denies)"),
    "read_pract": (6, {200}, "practitioner GET an Observation of a patient of record by id"),
    "read_optout": (2, {403}, "practitioner GET an Observation of the patient who opted out (ConsentOptOut denies)"),
    "read_admin": (8, {200}, "admin GET a seeded Observation by id (bypass role)"),
    "read_missing": (3, {404}, "admin GET an id that never existed"),
    "read_deleted": (2, {410}, "admin GET an Observation this soak deleted"),
    "search": (15, {200}, "first page of a search (patient: own or every Observation; practitioner; admin), _count=10|20"),
    "page": (15, {200}, "the next link of an earlier search, fetched by the same caller"),
    "create": (10, {201}, "writer POST Observation (an event)"),
    "update": (9, {200}, "writer PUT a live Observation it created (an event)"),
    "delete": (9, {200, 204}, "writer DELETE a live Observation it created (an event)"),
    "expired": (2, {401}, "GET with an admin token that expired (exp + clock skew passed)"),
}
WRITES = {"create", "update", "delete"}
NOT_SENT = -2  # a request dropped because it was due more than LATE_LIMIT s ago
NO_ANSWER = -1
LATE_LIMIT = 10.0
POOL_MAX = 300  # live Observations this soak created; keeps SEKMET's size flat


def load_ctx(path):
    with open(path) as f:
        return json.load(f)


def mix_of(ctx):
    """The default weights, with MIX ("kind=weight,...") applied."""
    mix = {k: v[0] for k, v in KINDS.items()}
    for part in filter(None, ctx.get("mix_override", "").replace(" ", "").split(",")):
        k, _, v = part.partition("=")
        if k not in KINDS or not v.isdigit():
            sys.exit(f"MIX: '{part}' is not <kind>=<weight> with a kind of {', '.join(KINDS)}")
        mix[k] = int(v)
    if not sum(mix.values()):
        sys.exit("MIX: every weight is 0")
    return mix


def set_keys(path, pairs):
    """soak.sh's way to add figures to the context: key=string, or key:=JSON."""
    ctx = load_ctx(path)
    for pair in pairs:
        k, _, v = pair.partition("=")
        if k.endswith(":"):
            ctx[k[:-1]] = json.loads(v)
        else:
            ctx[k] = v
    with open(path + ".tmp", "w") as f:
        json.dump(ctx, f, indent=1)
    os.replace(path + ".tmp", path)


def obs(oid, patient, value=72):
    r = {"resourceType": "Observation", "status": "final",
         "code": {"coding": [{"system": "urn:soak", "code": "vital", "display": "soak vital"}]},
         "subject": {"reference": f"Patient/{patient}"},
         "effectiveDateTime": "2026-01-01T10:00:00Z",
         "valueQuantity": {"value": value, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}}
    if oid:
        r["id"] = oid
    return r


def seeded_obs(patient):
    n = OWN_OBS if patient == ME else OBS_PER_PATIENT
    return [f"soak-o-{patient}-{j}" for j in range(n)]


# ---------------------------------------------------------------------------- seed
def seed(ctx):
    """One batch of PUTs with fixed ids into the script's own (empty) SEKMET; every entry 200/201.
    The practitioner carries the identity link of practitioner-app (what POST /manage/link would
    write), so the gateway resolves who practitioner-app is from the FHIR server itself."""
    link_value = f"{ctx['tenant']}/oid-{PRACTITIONER}"
    res = [{"resourceType": "Practitioner", "id": "soak-dr", "name": [{"family": "Soak", "given": ["Dr"]}],
            "identifier": [{"system": ctx["link_system"], "value": link_value}]}]
    for p in OF_RECORD + OTHERS + [ME]:
        r = {"resourceType": "Patient", "id": p, "name": [{"family": "Soak", "given": [p]}]}
        if p in OF_RECORD:
            r["generalPractitioner"] = [{"reference": PRACT}]
        res.append(r)
        res += [obs(o, p, 60 + j) for j, o in enumerate(seeded_obs(p))]
    res.append({
        "resourceType": "Consent", "id": "soak-optout", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{OPTED_OUT}"},
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT"}]},
        "provision": {"type": "deny", "actor": [{
            "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "PRCP"}]},
            "reference": {"reference": PRACT}}]}})
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in res]}
    c = http.client.HTTPConnection("127.0.0.1", ctx["fhir_port"], timeout=120)
    c.request("POST", "/fhir", json.dumps(bundle), {"Content-Type": "application/fhir+json"})
    r = c.getresponse()
    body = r.read()
    if r.status != 200:
        sys.exit(f"seed: HTTP {r.status}: {body[:400]!r}")
    got = json.loads(body).get("entry", [])
    bad = [e.get("response", {}).get("status") for e in got
           if not str(e.get("response", {}).get("status", "")).startswith(("200", "201"))]
    if len(got) != len(res) or bad:
        sys.exit(f"seed: {len(got)} of {len(res)} entries answered, failures: {bad[:5]}")
    print(len(res))


# ---------------------------------------------------------------------------- tokens
def fetch_token(idp, client):
    secret = client[: -len("-app")] + "-secret"
    req = urllib.request.Request(
        idp + "/token", data=b"grant_type=client_credentials",
        headers={"Authorization": "Basic " + base64.b64encode(f"{client}:{secret}".encode()).decode(),
                 "Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(req, timeout=10) as r:
        t = json.load(r)
    tok = t["access_token"]
    head = json.loads(base64.urlsafe_b64decode(tok.split(".")[0] + "=="))
    claims = json.loads(base64.urlsafe_b64decode(tok.split(".")[1] + "=="))
    return {"token": tok, "exp": int(claims["exp"]), "kid": head.get("kid", "")}


class Tokens:
    """Fresh client-credentials tokens for every client every `refresh` s (at once on SIGUSR1,
    which soak.sh sends after rotating the IdP's signing key). Old tokens are kept: once one has
    passed exp + the gateway's clock skew, the `expired` kind sends it."""

    def __init__(self, idp, refresh, skew):
        self.idp, self.refresh, self.skew = idp, refresh, skew
        self.lock = threading.Lock()
        self.current = {}
        self.old = collections.deque(maxlen=50)  # admin tokens that were replaced
        self.fetches = self.failures = 0
        self.kids = collections.Counter()  # kid -> tokens fetched signed with it
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.fetch_all(must=True)

    def fetch_all(self, must=False):
        for c in CLIENTS:
            while True:
                try:
                    t = fetch_token(self.idp, c)
                    break
                except Exception as e:  # the IdP restarting during a key rotation: retry
                    self.failures += 1
                    if must or self.stop.is_set():
                        raise SystemExit(f"token for {c} from {self.idp}: {e}")
                    time.sleep(0.5)
            with self.lock:
                prev = self.current.get(c)
                if prev and c == ADMIN:
                    self.old.append(prev)
                self.current[c] = t
                self.fetches += 1
                self.kids[t["kid"]] += 1

    def loop(self):
        while not self.stop.is_set():
            self.wake.wait(self.refresh)
            self.wake.clear()
            if not self.stop.is_set():
                self.fetch_all()

    def get(self, client):
        with self.lock:
            return self.current[client]

    def expired(self):
        with self.lock:
            now = time.time()
            done = [t for t in self.old if t["exp"] + self.skew + 2 < now]
            return done[-1] if done else None


# ---------------------------------------------------------------------------- requests
class Conn:
    """One keep-alive HTTP/1.1 connection to the gateway (reopened after a close or an error)."""

    def __init__(self, port, timeout):
        self.port, self.timeout, self.c = port, timeout, None

    def send(self, method, target, headers, body=None):
        if self.c is None:
            self.c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            self.c.request(method, target, body, headers)
            r = self.c.getresponse()
            data = r.read()
        except Exception:
            self.c.close()
            self.c = None
            raise
        if r.will_close:
            self.c.close()
            self.c = None
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), data


def describe(e):
    if isinstance(e, TimeoutError) or "timed out" in str(e):
        return "no answer in time"
    return f"{type(e).__name__}: {e}"[:200]


class Soak:
    def __init__(self, ctx, tokens):
        self.ctx, self.tokens = ctx, tokens
        self.base = f"http://127.0.0.1:{ctx['gw_port']}/fhir"
        self.upstream = f"127.0.0.1:{ctx['fhir_port']}".encode()
        self.lock = threading.Lock()
        self.live = []  # ids this soak created and has not deleted (free for update/delete)
        self.deleted = collections.deque(maxlen=500)
        self.pages = collections.deque(maxlen=200)  # (client, next URL) to fetch later
        self.rng = random.Random(ctx.get("seed", 1))
        self.n = 0

    def rid(self, kind):
        with self.lock:
            self.n += 1
            return f"{self.ctx['prefix']}-{kind}-{self.n}"

    # Each kind returns (method, target, client, body, expected kind name after any fallback);
    # the pools are taken under the lock so two workers never update or delete the same id.
    def plan(self, kind):
        rng = self.rng
        with self.lock:
            if kind == "update" and not self.live or kind == "delete" and not self.live:
                kind = "create"
            if kind == "create" and len(self.live) >= POOL_MAX:
                kind = "delete"
            if kind == "read_deleted" and not self.deleted:
                kind = "read_missing"
            if kind == "page" and not self.pages:
                kind = "search"
            if kind in ("update", "delete"):
                oid, patient = self.live.pop(rng.randrange(len(self.live)))
            elif kind == "read_deleted":
                oid = rng.choice(self.deleted)
            elif kind == "page":
                client, url = self.pages.popleft()
        if kind == "expired" and self.tokens.expired() is None:
            kind = "read_admin"  # none has expired yet (the first TOKEN_TTL + skew seconds)
        if kind == "read_own":
            return kind, "GET", f"/fhir/Observation/{rng.choice(seeded_obs(ME))}", PATIENT, None, None
        if kind == "read_foreign":
            return kind, "GET", f"/fhir/Observation/{rng.choice(seeded_obs(rng.choice(OTHERS)))}", PATIENT, None, None
        if kind == "read_pract":
            p = rng.choice([p for p in OF_RECORD if p != OPTED_OUT])
            return kind, "GET", f"/fhir/Observation/{rng.choice(seeded_obs(p))}", PRACTITIONER, None, None
        if kind == "read_optout":
            return kind, "GET", f"/fhir/Observation/{rng.choice(seeded_obs(OPTED_OUT))}", PRACTITIONER, None, None
        if kind == "read_admin":
            p = rng.choice(OF_RECORD + OTHERS + [ME])
            return kind, "GET", f"/fhir/Observation/{rng.choice(seeded_obs(p))}", ADMIN, None, None
        if kind == "read_missing":
            return kind, "GET", f"/fhir/Observation/soak-never-{rng.randrange(10**9)}", ADMIN, None, None
        if kind == "read_deleted":
            return kind, "GET", f"/fhir/Observation/{oid}", ADMIN, None, None
        if kind == "expired":
            return kind, "GET", f"/fhir/Observation/{seeded_obs(ME)[0]}", "expired", None, None
        if kind == "search":
            client, q = rng.choice([
                (PATIENT, f"subject=Patient/{ME}&_count=10"),
                (PATIENT, "code=urn:soak%7Cvital&_count=20"),
                (PRACTITIONER, "code=urn:soak%7Cvital&_count=20"),
                (ADMIN, "code=urn:soak%7Cvital&_count=20"),
            ])
            return kind, "GET", f"/fhir/Observation?{q}", client, None, None
        if kind == "page":
            u = urllib.parse.urlsplit(url)
            return kind, "GET", u.path + "?" + u.query, client, None, None
        if kind == "create":
            p = rng.choice(OF_RECORD + OTHERS + [ME])
            return kind, "POST", "/fhir/Observation", WRITER, obs(None, p, rng.randrange(40, 180)), p
        if kind == "update":
            return kind, "PUT", f"/fhir/Observation/{oid}", WRITER, obs(oid, patient, rng.randrange(40, 180)), (oid, patient)
        if kind == "delete":
            return kind, "DELETE", f"/fhir/Observation/{oid}", WRITER, None, (oid, patient)
        raise ValueError(kind)

    def execute(self, conn, kind):
        """One request of `kind`: (kind, method, status, ms, cid, kid, problem)."""
        kind, method, target, client, body, extra = self.plan(kind)
        tok = self.tokens.expired() if client == "expired" else self.tokens.get(client)
        cid = self.rid(kind)
        h = {"Accept": "application/fhir+json", "X-Request-Id": cid, "Authorization": "Bearer " + tok["token"]}
        if body is not None:
            body = json.dumps(body)
            h["Content-Type"] = "application/fhir+json"
        t0 = time.perf_counter()
        try:
            status, hdrs, data = conn.send(method, target, h, body)
            problem = ""
        except Exception as e:  # every failure is a record, never a retry
            status, hdrs, data, problem = NO_ANSWER, {}, b"", describe(e)
        ms = (time.perf_counter() - t0) * 1000
        ok = status in KINDS[kind][1]
        if ok:
            problem = self.judge(kind, client, hdrs, data, extra)
        elif not problem:
            problem = f"HTTP {status}: {data[:160]!r}"
        self.after(kind, ok and not problem, hdrs, extra)
        return kind, method, status, ms, cid, tok["kid"], problem

    def judge(self, kind, client, hdrs, data, extra):
        """What a right status can still get wrong: an upstream address left in the answer, a
        foreign resource in a filtered search, a Location not on the gateway."""
        if self.upstream in data:
            return "the body still holds the upstream address"
        if kind == "create":
            loc = hdrs.get("location", "")
            m = re.match(re.escape(self.base) + r"/Observation/([^/]+)/_history/1$", loc)
            if not m:
                return f"Location not rewritten to the gateway: {loc!r}"
        if kind in ("search", "page"):
            b = json.loads(data)
            allowed = None
            if client == PATIENT:
                allowed = {ME}
            elif client == PRACTITIONER:
                allowed = set(OF_RECORD) - {OPTED_OUT}
            for e in b.get("entry", []):
                r = e.get("resource", {})
                if e.get("search", {}).get("mode") != "match" or r.get("resourceType") != "Observation":
                    continue
                who = r.get("subject", {}).get("reference", "").rsplit("/", 1)[-1]
                if allowed is not None and who not in allowed:
                    return f"{client} was shown Observation/{r.get('id')} of Patient/{who}"
            for link in b.get("link", []):
                if not link.get("url", "").startswith(self.base):
                    return f"link {link.get('relation')} not on the gateway: {link.get('url')}"
                if link.get("relation") == "next":
                    with self.lock:
                        self.pages.append((client, link["url"]))
        return ""

    def after(self, kind, ok, hdrs, extra):
        """Pool upkeep: a created id becomes live, an updated one live again, a deleted one gone.
        An id whose write failed is dropped: its state is unknown."""
        with self.lock:
            if kind == "create" and ok:
                oid = hdrs["location"].split("/Observation/")[1].split("/")[0]
                self.live.append((oid, extra))
            elif kind == "update" and ok:
                self.live.append(extra)
            elif kind == "delete" and ok:
                self.deleted.append(extra[0])


# ---------------------------------------------------------------------------- check
def check(ctx):
    """Each kind a few times, one at a time, before the soak: the expectations of the mix must hold
    against this gateway, or a 30-minute run would only report a wrong table."""
    tokens = Tokens(ctx["idp"], 3600, ctx["skew"])
    # ids of their own: the checks' events are on the topic too, and must not pass for the load's
    soak = Soak(dict(ctx, prefix="check-" + ctx["prefix"]), tokens)
    conn = Conn(ctx["gw_port"], 30)
    bad = []
    order = ["create", "create", "update", "delete", "read_deleted", "read_own", "read_foreign",
             "read_pract", "read_optout", "read_admin", "read_missing", "search", "search", "search",
             "search", "page", "page"]
    for kind in order:
        got = soak.execute(conn, kind)
        line = f"  {got[0]:<13} {got[1]:<6} -> {got[2]}"
        if got[0] != kind:
            line += f" (asked for {kind})"
        print(line + (f"  UNEXPECTED: {got[6]}" if got[6] else ""))
        if got[6]:
            bad.append(got)
    # search once per caller: each must show its own view (the practitioner sees no opted-out data)
    for client, who in ((PATIENT, {ME}), (PRACTITIONER, set(OF_RECORD) - {OPTED_OUT}), (ADMIN, None)):
        st, _, data = conn.send("GET", f"/fhir/Observation?code=urn:soak%7Cvital&_count=200",
                                {"Authorization": "Bearer " + tokens.get(client)["token"], "Accept": "application/fhir+json"})
        subj = {e["resource"]["subject"]["reference"].rsplit("/", 1)[-1]
                for e in json.loads(data).get("entry", []) if e.get("search", {}).get("mode") == "match"}
        want = who if who is not None else set(OF_RECORD + OTHERS + [ME])
        print(f"  {client} searching every Observation sees the patients {sorted(subj)}")
        if st != 200 or subj != want:
            bad.append((client, st, sorted(subj), sorted(want)))
    st, _, _ = conn.send("GET", f"/fhir/Observation/{seeded_obs(ME)[0]}", {"Accept": "application/fhir+json"})
    print(f"  no token -> {st}")
    if st != 401:
        bad.append(("no token", st))
    if bad:
        sys.exit(f"check failed: {bad}")


# ---------------------------------------------------------------------------- run
def run(ctx):
    """Fixed-rate open loop: the scheduler puts one request kind on the queue every 1/RATE s and
    CONNS workers (one keep-alive connection each) send them. A request due more than LATE_LIMIT s
    ago is not sent but recorded as NOT_SENT (the gateway or SEKMET fell that far behind)."""
    rate, dur, conns = float(ctx["rate"]), float(ctx["duration"]), int(ctx["conns"])
    rotated = threading.Event()  # SIGUSR1 may come before the token thread runs: never fatal
    signal.signal(signal.SIGUSR1, lambda *_: rotated.set())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    tokens = Tokens(ctx["idp"], ctx["token_refresh"], ctx["skew"])
    tokens.wake = rotated
    threading.Thread(target=tokens.loop, daemon=True).start()
    soak = Soak(ctx, tokens)
    mix = mix_of(ctx)
    names, weights = list(mix), [mix[k] for k in mix]
    q = queue.Queue()
    out = open(ctx["records"], "w", buffering=1 << 16)
    stats = {"due": 0, "done": 0, "unexpected": 0, "late_max_ms": 0.0, "by_kind": collections.Counter(),
             "bad_by_kind": collections.Counter()}
    slock = threading.Lock()
    t_start = time.time()

    def worker():
        conn = Conn(ctx["gw_port"], ctx["timeout"])
        while True:
            item = q.get()
            if item is None:
                return
            due, kind = item
            late = time.time() - due
            if late > LATE_LIMIT:
                rec = (kind, "-", NOT_SENT, 0.0, "-", "-", f"not sent: due {late:.1f} s ago")
            else:
                rec = soak.execute(conn, kind)
            bad = bool(rec[6])
            with slock:
                stats["done"] += 1
                stats["by_kind"][rec[0]] += 1
                stats["late_max_ms"] = max(stats["late_max_ms"], late * 1000)
                if bad:
                    stats["unexpected"] += 1
                    stats["bad_by_kind"][rec[0]] += 1
                out.write("%.3f\t%.1f\t%s\t%s\t%d\t%.2f\t%s\t%s\t%s\n" % (
                    due - t_start, late * 1000, rec[0], rec[1], rec[2], rec[3], rec[4], rec[5],
                    rec[6].replace("\t", " ").replace("\n", " ")))

    def progress():
        with slock:
            p = {"t": time.time() - t_start, "due": stats["due"], "done": stats["done"],
                 "unexpected": stats["unexpected"], "late_max_ms": round(stats["late_max_ms"], 1),
                 "queued": q.qsize(), "token_fetches": tokens.fetches, "token_failures": tokens.failures,
                 "kids": dict(tokens.kids), "by_kind": dict(stats["by_kind"]),
                 "bad_by_kind": dict(stats["bad_by_kind"])}
        with open(ctx["progress"] + ".tmp", "w") as f:
            json.dump(p, f)
        os.replace(ctx["progress"] + ".tmp", ctx["progress"])

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(conns)]
    for w in workers:
        w.start()
    rng = random.Random(ctx.get("seed", 1) + 7)
    interval, nxt, last_progress = 1.0 / rate, t_start, 0.0
    while not stop.is_set() and nxt < t_start + dur:
        now = time.time()
        if nxt > now:
            time.sleep(min(nxt - now, 0.5))
            continue
        q.put((nxt, rng.choices(names, weights)[0]))
        with slock:
            stats["due"] += 1
        nxt += interval
        if now - last_progress >= 1:
            progress()
            last_progress = now
    for _ in workers:
        q.put(None)
    for w in workers:
        w.join(ctx["timeout"] + 5)
    tokens.stop.set()
    out.close()
    progress()


# ---------------------------------------------------------------------------- sample
def proc_figures(pid, listen_port):
    st = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            st[k] = v.split()[0] if v.split() else ""
    fds = sockets = 0
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            t = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed while we looked
        fds += 1
        if t.startswith("socket:["):
            sockets += 1
            inodes.add(t[8:-1])
    # established TCP connections of this process: its socket inodes in its network namespace's
    # tables (no ss -p, which needs privileges); inbound = the gateway's listening port is local
    conns_in = conns_out = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = open(f"/proc/{pid}/net/{table}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "01" and f[9] in inodes:
                if int(f[1].rsplit(":", 1)[1], 16) == listen_port:
                    conns_in += 1
                else:
                    conns_out += 1
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return {"rss_kib": int(st["VmRSS"]), "rss_anon_kib": int(st.get("RssAnon", 0)), "hwm_kib": int(st["VmHWM"]),
            "threads": int(st["Threads"]), "fds": fds, "fds_socket": sockets, "conns_in": conns_in,
            "conns_out": conns_out, "cpu_s": round(cpu, 2)}


def scrape(port):
    """The gateway's metrics: requests by status class, events by stage, spool depth."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    m = collections.Counter()
    for line in text.splitlines():
        if line.startswith("fhirgw_requests_total{"):
            status = re.search(r'status="([^"]*)"', line).group(1)
            cls = status[0] + "xx" if status[:1] in "12345" and status.isdigit() else "aborted"
            m["gw_requests"] += int(float(line.split()[-1]))
            m["gw_" + cls] += int(float(line.split()[-1]))
        elif line.startswith("fhirgw_events_total{"):
            stage = re.search(r'stage="([^"]*)"', line).group(1)
            v = int(float(line.split()[-1]))
            m["ev_" + stage] += v
            if stage.startswith("dropped_"):
                m["ev_dropped"] += v
        elif line.startswith("fhirgw_events_spool_depth "):
            m["ev_spool_depth"] = int(float(line.split()[-1]))
    return m


CSV_COLS = ["utc", "elapsed_s", "phase", "rss_kib", "rss_anon_kib", "hwm_kib", "threads", "fds", "fds_socket",
            "conns_in", "conns_out", "cpu_s", "gw_requests", "gw_2xx", "gw_3xx", "gw_4xx", "gw_5xx",
            "gw_aborted", "client_due", "client_done", "client_unexpected", "client_queued",
            "ev_produced", "ev_spooled", "ev_delivered", "ev_spool_depth", "ev_dropped", "ev_failed"]


def sample(ctx, phase):
    row = {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "elapsed_s": round(time.time() - ctx["load_t0"], 1) if ctx.get("load_t0") else 0, "phase": phase}
    row.update(proc_figures(ctx["gw_pid"], ctx["gw_port"]))
    m = scrape(ctx["metrics_port"])
    for c in CSV_COLS:
        if c.startswith(("gw_", "ev_")):
            row[c] = m.get(c, 0)
    p = {}
    if os.path.exists(ctx["progress"]):
        with open(ctx["progress"]) as f:
            p = json.load(f)
    row.update({"client_due": p.get("due", 0), "client_done": p.get("done", 0),
                "client_unexpected": p.get("unexpected", 0), "client_queued": p.get("queued", 0)})
    new = not os.path.exists(ctx["csv"])
    with open(ctx["csv"], "a", newline="") as f:
        w = csv.DictWriter(f, CSV_COLS)
        if new:
            w.writeheader()
        w.writerow(row)
    print(f"{phase} t={row['elapsed_s']}s rss={row['rss_kib'] / 1024:.1f}MiB fds={row['fds']} "
          f"threads={row['threads']} conns={row['conns_in']}+{row['conns_out']} "
          f"done={row['client_done']} unexpected={row['client_unexpected']} queued={row['client_queued']} "
          f"events {row['ev_produced']}/{row['ev_delivered']} depth={row['ev_spool_depth']}")


# ---------------------------------------------------------------------------- topic
def topic(ctx, expected):
    """Every message of the topic (partitions assigned from the beginning, no group join), until
    `expected` were read or nothing came for 10 s; writes one correlation id a line."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": f"127.0.0.1:{ctx['kafka_port']}", "group.id": "soak-count",
                  "enable.auto.commit": False})
    parts = c.list_topics(ctx["topic"], timeout=10).topics[ctx["topic"]].partitions
    c.assign([TopicPartition(ctx["topic"], p, OFFSET_BEGINNING) for p in parts])
    n, last = 0, time.time()
    with open(ctx["topic_cids"], "w") as f:
        while n < expected and time.time() - last < 10:
            for m in c.consume(1000, 0.5):
                if m.error():
                    continue
                n += 1
                last = time.time()
                cid = dict(m.headers() or []).get("correlationid", b"").decode()
                f.write(cid + "\n")
    c.close()
    print(n)


# ---------------------------------------------------------------------------- report
def log_summary(path, top=15):
    """The gateway log's WARN/ERROR lines, grouped once timestamps, numbers and ids are masked."""
    if not os.path.exists(path):
        return []
    seen = collections.Counter()
    for line in open(path, errors="replace"):
        if not re.search(r"\b(WARN|ERROR)\b", line):
            continue
        line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
        line = re.sub(r"^\S*\d{4}-\d\d-\d\dT\S+\s*", "", line)
        line = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}|soak[\w-]+|\d+", "#", line)
        seen[line[:200]] += 1
    return seen.most_common(top)


def report(ctx):
    rows = list(csv.DictReader(open(ctx["csv"])))
    load = [r for r in rows if r["phase"] == "load"]
    recs = [line.rstrip("\n").split("\t") for line in open(ctx["records"])]
    prog = json.load(open(ctx["progress"]))
    dur = float(ctx["duration"])

    # requests: per kind, count, unexpected, p50/p99 (answered ones)
    per = collections.defaultdict(lambda: {"n": 0, "bad": 0, "status": collections.Counter(), "ms": []})
    problems = collections.Counter()
    write_ok = set()
    for r in recs:
        kind, status, ms, cid, problem = r[2], int(r[4]), float(r[5]), r[6], r[8] if len(r) > 8 else ""
        k = per[kind]
        k["n"] += 1
        k["status"][status] += 1
        if status > 0:
            k["ms"].append(ms)
        if problem:
            k["bad"] += 1
            problems[(kind, re.sub(r"[0-9a-f-]{36}|soak-[\w-]+|\d+", "#", problem)[:140])] += 1
        if kind in WRITES and status in KINDS[kind][1]:
            write_ok.add(cid)  # the write happened: its event is due, whatever else was wrong
    total = sum(k["n"] for k in per.values())
    bad = sum(k["bad"] for k in per.values())

    def pct(v, q):
        v = sorted(v)
        return v[min(len(v) - 1, int(len(v) * q))] if v else float("nan")

    # memory: the sample at the baseline mark vs the last one under load
    base_s = float(ctx["rss_baseline_s"])
    base = next((r for r in load if float(r["elapsed_s"]) >= base_s), load[-1])
    last = load[-1]
    first_fd = next((r for r in load if float(r["elapsed_s"]) > 0), load[0])
    growth = (int(last["rss_kib"]) / int(base["rss_kib"]) - 1) * 100
    anon_growth = (int(last["rss_anon_kib"]) / max(1, int(base["rss_anon_kib"])) - 1) * 100
    # Established connections come and go with the momentary concurrency (the upstream pool grows
    # in a burst and keeps its idle connections), so raw fds swing by tens at a steady rate. What
    # must stay flat is everything else: files, listeners, the event pipeline, sockets left
    # half-closed. Raw fds and the connections are reported next to it.
    def other(r):
        return int(r["fds"]) - int(r["conns_in"]) - int(r["conns_out"])

    fd_delta = other(last) - other(first_fd)

    # events: the load's writes vs the metrics (delta over the load) vs the topic
    end = rows[-1]
    ev0 = ctx["events_before"]
    produced = int(end["ev_produced"]) - ev0["produced"]
    delivered = int(end["ev_delivered"]) - ev0["delivered"]
    dropped = int(end["ev_dropped"]) - ev0["dropped"]
    failed = int(end["ev_failed"]) - ev0["failed"]
    topic_cids = collections.Counter(line.strip() for line in open(ctx["topic_cids"])) if os.path.exists(ctx["topic_cids"]) else collections.Counter()
    on_topic = {c for c in topic_cids if c.startswith(ctx["prefix"] + "-")}
    lost = sorted(write_ok - on_topic)
    dup = sum(1 for c in on_topic if topic_cids[c] > 1)
    unexplained = sorted(on_topic - write_ok)

    goals = [
        ("0 unexpected results", bad == 0, f"{bad} of {total} requests"),
        (f"RSS growth < {ctx['rss_growth_max']} % ({base['elapsed_s']} s → end)",
         growth < float(ctx["rss_growth_max"]),
         f"{int(base['rss_kib']) / 1024:.1f} → {int(last['rss_kib']) / 1024:.1f} MiB ({growth:+.1f} %); "
         f"anonymous {int(base['rss_anon_kib']) / 1024:.1f} → {int(last['rss_anon_kib']) / 1024:.1f} MiB ({anon_growth:+.1f} %)"),
        (f"fds flat (not counting established connections; last − first ≤ {ctx['fd_tolerance']})",
         fd_delta <= int(ctx["fd_tolerance"]),
         f"{other(first_fd)} at {first_fd['elapsed_s']} s → {other(last)} at {last['elapsed_s']} s ({fd_delta:+d}), "
         f"min {min(other(r) for r in load)}, max {max(other(r) for r in load)}; all fds {first_fd['fds']} → {last['fds']} "
         f"(min {min(int(r['fds']) for r in load)}, max {max(int(r['fds']) for r in load)}), "
         f"established connections {int(first_fd['conns_in']) + int(first_fd['conns_out'])} → "
         f"{int(last['conns_in']) + int(last['conns_out'])}"),
        ("0 events lost", not lost and produced == len(write_ok) and delivered == produced and dropped == 0
         and int(end["ev_spool_depth"]) == 0,
         f"{len(write_ok)} successful writes; metrics: produced {produced}, delivered {delivered}, dropped {dropped}, "
         f"spool depth {end['ev_spool_depth']} at the end; topic: {len(on_topic)} of them found, {len(lost)} missing, "
         f"{dup} more than once"),
    ]
    passed = all(g[1] for g in goals)

    def mib(v):
        return f"{int(v) / 1024:.1f}"

    o = []
    w = o.append
    w(f"# Soak: {ctx['duration_text']} of mixed load — {'PASS' if passed else 'FAIL'}")
    w("")
    w(f"- Date: {ctx['date']}; ended {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    w(f"- Machine: {ctx['machine']}; load average at the end: {' '.join(open('/proc/loadavg').read().split()[:3])}")
    w(f"- Git commit: {ctx['commit']}; binary built {ctx['bin_date']} (release)")
    w(f"- Command: `{ctx['command']}`")
    w(f"- Samples: `{ctx['csv_rel']}` (every {ctx['sample']} s)")
    w("")
    w("## Goals")
    w("")
    w("| goal | result | figures |")
    w("|---|---|---|")
    for name, ok, fig in goals:
        w(f"| {name} | **{'PASS' if ok else 'FAIL'}** | {fig} |")
    w("")
    w("## Set-up")
    w("")
    for line in ctx["setup"]:
        w(f"- {line}")
    w("")
    w("## Requests")
    w("")
    ach = prog["done"] / dur if dur else 0
    w(f"Target {ctx['rate']} req/s for {dur:.0f} s over {ctx['conns']} keep-alive connections: {prog['due']} due, "
      f"{prog['done']} recorded (**{ach:.1f} req/s**); the latest a request started after it was due: "
      f"{prog['late_max_ms'] / 1000:.2f} s. Tokens: {prog['token_fetches']} fetched "
      f"({prog['token_failures']} fetch attempts failed and were retried), signing keys seen: "
      + ", ".join(f"`{k}` ({v} tokens)" for k, v in prog["kids"].items()) + ".")
    w("")
    w("| kind | what | expected | requests | statuses | unexpected | p50 ms | p99 ms |")
    w("|---|---|---|---:|---|---:|---:|---:|")
    for kind, (weight, exp, what) in KINDS.items():
        k = per.get(kind)
        if not k:
            continue
        sts = ", ".join(f"{s if s > 0 else ('no answer' if s == NO_ANSWER else 'not sent')}: {n}"
                        for s, n in sorted(k["status"].items()))
        w(f"| {kind} | {what} | {'/'.join(map(str, sorted(exp)))} | {k['n']} | {sts} | {k['bad']} | "
          f"{pct(k['ms'], 0.5):.1f} | {pct(k['ms'], 0.99):.1f} |")
    w(f"| **all** | | | {total} | | **{bad}** | {pct([m for k in per.values() for m in k['ms']], 0.5):.1f} | "
      f"{pct([m for k in per.values() for m in k['ms']], 0.99):.1f} |")
    w("")
    w("A kind whose precondition is not met yet falls back (update/delete with no live id → create, "
      "read_deleted with nothing deleted → read_missing, page with no next link → search, expired "
      "before a token has expired → read_admin) and is counted under what was sent.")
    if problems:
        w("")
        w("Unexpected results (ids and numbers replaced by #):")
        w("")
        for (kind, p), n in problems.most_common(20):
            w(f"- {kind}: {n} × {p}")
    w("")
    w("Gateway metrics (`fhirgw_requests_total` by status class, whole run incl. the checks): "
      + ", ".join(f"{c[3:]} {end[c]}" for c in ("gw_2xx", "gw_3xx", "gw_4xx", "gw_5xx", "gw_aborted")) + ".")
    w("")
    w("## Process (gateway)")
    w("")
    w("| | idle, before the load | first under load | baseline | last under load | after the drain | min under load | max under load |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        r["other_fds"] = other(r)
    for col, name, f in (("rss_kib", "VmRSS MiB", mib), ("rss_anon_kib", "RssAnon MiB", mib),
                         ("fds", "open fds", str), ("other_fds", "fds other than established connections", str),
                         ("fds_socket", "sockets", str), ("threads", "threads", str),
                         ("conns_in", "established, clients", str),
                         ("conns_out", "established, outbound (SEKMET, IdP, broker)", str)):
        vals = [int(r[col]) for r in load]
        w(f"| {name} | {f(rows[0][col])} | {f(first_fd[col])} | {f(base[col])} | {f(last[col])} | {f(end[col])} | "
          f"{f(min(vals))} | {f(max(vals))} |")
    w("")
    cpu = float(last["cpu_s"]) - float(first_fd["cpu_s"])
    span = float(last["elapsed_s"]) - float(first_fd["elapsed_s"])
    w(f"VmHWM (peak RSS) {mib(end['hwm_kib'])} MiB. CPU: {cpu:.1f} s over {span:.0f} s under load "
      f"({cpu / span * 100 if span else 0:.1f} % of one core). Baseline for RSS = the first sample at or after "
      f"{base_s:.0f} s (5 minutes, or half the run when shorter). RssAnon excludes the binary's file-backed pages, "
      "which are paged in as code paths are first used.")
    w("")
    w("## Events")
    w("")
    w(f"- Writes answered 2xx during the load: **{len(write_ok)}**; `fhirgw_events_total` during the load: produced "
      f"**{produced}**, delivered **{delivered}**, dropped {dropped}, failed delivery attempts {failed}; spool depth "
      f"after the drain: **{end['ev_spool_depth']}** (drained {ctx.get('drain_s', '?')} s after the load).")
    w(f"- Topic `{ctx['topic']}` read back: {sum(topic_cids.values())} messages in all, {len(on_topic)} distinct "
      f"correlation ids of this load's requests; successful writes missing from it: **{len(lost)}**"
      + (f" (e.g. {', '.join(lost[:5])})" if lost else "") + f"; ids on it more than once: {dup}"
      + (f"; ids on it with no successful write: {len(unexplained)} (e.g. {', '.join(unexplained[:3])})" if unexplained else "") + ".")
    w("")
    w("## Timeline")
    w("")
    w("| t s | phase | VmRSS MiB | RssAnon MiB | fds (other) | threads | conns in/out | requests done | unexpected | gw 2xx/4xx/5xx | events produced/delivered | spool depth |")
    w("|---:|---|---:|---:|---:|---:|---|---:|---:|---|---|---:|")
    for r in rows:
        w(f"| {r['elapsed_s']} | {r['phase']} | {mib(r['rss_kib'])} | {mib(r['rss_anon_kib'])} | {r['fds']} ({other(r)}) | {r['threads']} | "
          f"{r['conns_in']}/{r['conns_out']} | {r['client_done']} | {r['client_unexpected']} | "
          f"{r['gw_2xx']}/{r['gw_4xx']}/{r['gw_5xx']} | {r['ev_produced']}/{r['ev_delivered']} | {r['ev_spool_depth']} |")
    w("")
    w("## Gateway log")
    w("")
    lines = log_summary(ctx["gw_log"])
    if lines:
        w("WARN and ERROR lines, most frequent first (numbers and ids replaced by #):")
        w("")
        for text, n in lines:
            w(f"- {n} × `{text}`")
    else:
        w("No WARN or ERROR line.")
    with open(ctx["md"], "w") as f:
        f.write("\n".join(o) + "\n")
    for name, ok, fig in goals:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {fig}")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    cmd, c = sys.argv[1], load_ctx(sys.argv[2])
    if cmd == "seed":
        seed(c)
    elif cmd == "check":
        check(c)
    elif cmd == "run":
        run(c)
    elif cmd == "sample":
        sample(c, sys.argv[3])
    elif cmd == "topic":
        topic(c, int(sys.argv[3]))
    elif cmd == "report":
        report(c)
    elif cmd == "set":
        set_keys(sys.argv[2], sys.argv[3:])
    elif cmd == "mark":
        # just before the load: its start time and the event counters it is measured from,
        # once the set-up's own events are delivered (else they count as the load's deliveries)
        deadline = time.time() + 30
        m = scrape(c["metrics_port"])
        while time.time() < deadline and (m.get("ev_spool_depth", 0) != 0 or m.get("ev_delivered", 0) < m.get("ev_produced", 0) - m.get("ev_dropped", 0)):
            time.sleep(0.2)
            m = scrape(c["metrics_port"])
        set_keys(sys.argv[2], ["load_t0:=%f" % time.time(), "events_before:=" + json.dumps(
            {k: m.get("ev_" + k, 0) for k in ("produced", "delivered", "dropped", "failed")})])
    elif cmd == "events":
        # "<spool depth> <produced> <delivered> <dropped>" now, for soak.sh's drain wait
        m = scrape(c["metrics_port"])
        print(m.get("ev_spool_depth", 0), m.get("ev_produced", 0), m.get("ev_delivered", 0), m.get("ev_dropped", 0))
    else:
        sys.exit(f"unknown command {cmd}")
