//! Shared test harness: spawn the real gateway binary with a generated config, reach the real
//! peers (SEKMET, the OIDC provider) started by `scripts/test.sh`, read what SEKMET received from
//! its traffic log, and run small scripted upstreams for the faults a real server will not
//! produce on demand (slow headers, 503 storms, 50 MB bodies). Helpers every test file shares
//! live here once: the gateway's metrics and SEKMET's log (below, one id at a time or a batch
//! at once), `raw` (raw HTTP/1.1 exchanges), `broker` (tansu, topics, consumers, writes), `idp`
//! (tokens from the real OIDC provider, a private provider), `bulk` (Bulk Data export: kick-off,
//! polling, handed-out URLs) and `roads` (the streaming and the buffered road to the FHIR
//! server, and comparing their answers).
#![allow(dead_code)]

use serde_json::Value;
use std::io::Write;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub mod broker;
pub mod bulk;
pub mod idp;
pub mod raw;
pub mod roads;
pub mod tls;

pub const SEKMET: &str = "http://127.0.0.1:8090/fhir";
pub const SEKMET_AUTH: &str = "http://127.0.0.1:8091/fhir";
pub const SEKMET_AUTH_TOKEN: &str = "upstream-static-token-123";
pub const IDP: &str = "http://127.0.0.1:9400";

/// A short random mark for ids and names that must not meet other runs' data in the shared
/// server.
pub fn uniq() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_string()
}

/// A fresh directory `fgw-<prefix>-<uniq>` for an audit trail: its checkpoint key (mode 600,
/// as the gateway demands) and where the trail file goes. Returns (dir, file, key).
pub fn audit_trail_dir(prefix: &str) -> (PathBuf, PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("fgw-{prefix}-{}", uniq()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("audit.key");
    std::fs::write(&key, "audit-test-key-0123456789abcdef-0123456789").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (dir.clone(), dir.join("audit.jsonl"), key)
}

/// Test setup: a PUT straight into SEKMET, answered 2xx.
pub async fn put_direct(path: &str, body: impl std::borrow::Borrow<Value>) {
    let r = client()
        .put(format!("{}/{path}", sekmet_url()))
        .header("Content-Type", "application/fhir+json")
        .body(body.borrow().to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "setup PUT {path}: {}", r.status());
}

/// What SEKMET itself answers to a GET: status and JSON body (`Null` when none).
pub async fn get_direct(path: &str) -> (u16, Value) {
    let r = client()
        .get(format!("{}/{path}", sekmet_url()))
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

pub fn sekmet_url() -> String {
    std::env::var("SEKMET_URL").unwrap_or_else(|_| SEKMET.to_string())
}

/// Where `scripts/peers.sh` installed the peers (`$PEERS`, default `.cache/peers`).
pub fn peers_dir() -> PathBuf {
    std::env::var("PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/peers"))
}

/// Fails loudly when a peer is missing: these tests are about the real thing.
pub async fn require_peer(url: &str) {
    let ok = client()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .is_ok();
    assert!(
        ok,
        "peer {url} is not running: start the peers with `scripts/peers.sh start` or run `scripts/test.sh`"
    );
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// The body of a plain GET, whatever its status.
pub async fn get_text(url: &str) -> String {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running gateway process; killed on drop.
pub struct Gateway {
    pub port: u16,
    pub child: Child,
    pub dir: PathBuf,
}

impl Gateway {
    /// `body` is the YAML after the `listen:` section (upstream, auth, limits...).
    pub async fn start(body: &str) -> Gateway {
        Gateway::start_env(body, &[]).await
    }

    /// Like `start`, with extra environment variables for the gateway process.
    pub async fn start_env(body: &str, envs: &[(&str, &str)]) -> Gateway {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("fgw-test-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("gw.yaml");
        let yaml = format!(
            "pingora:\n  threads: 2\n  grace_period_seconds: 0\n  graceful_shutdown_timeout_seconds: 1\n  pid_file: {d}/gw.pid\n  upgrade_sock: {d}/upgrade.sock\nlisten:\n  - addr: 127.0.0.1:{port}\n{body}",
            d = dir.display()
        );
        std::fs::write(&conf, yaml).unwrap();
        let log = std::fs::File::create(dir.join("gw.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_fhir-gateway"))
            .arg("-c")
            .arg(&conf)
            .env("RUST_LOG", "info")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn gateway");
        let gw = Gateway { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = client().get(gw.url("/healthz")).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not start:\n{}",
                gw.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        gw
    }

    /// Config for the common case: SEKMET behind the gateway, insecure_dev auth.
    pub async fn in_front_of_sekmet() -> Gateway {
        require_peer(&format!("{}/metadata", sekmet_url())).await;
        Gateway::start(&format!(
            "upstream:\n  url: {}\nauth:\n  mode: insecure_dev\n",
            sekmet_url()
        ))
        .await
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}/fhir", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("gw.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gw.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first line of the gateway's log containing `needle`, waiting up to `within` for it
    /// (the access log is written by a background thread, after the answer). Panics with the
    /// log when it never appears.
    pub async fn log_line(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.log().lines().find(|l| l.contains(needle)) {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} within {within:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The road the access log names for a correlation id (`stream`, `buffered` or `-`).
pub async fn road_of(gw: &Gateway, id: &str) -> String {
    roads_taken(gw, &[id.to_string()])
        .await
        .remove(id)
        .unwrap_or_else(|| panic!("no access-log line for id={id}:\n{}", gw.log()))
}

/// Correlation id -> the road its access-log line names, once every id in `ids` has a line
/// (or after 10 s: the access log is written by a background thread, after the answer).
pub async fn roads_taken(
    gw: &Gateway,
    ids: &[String],
) -> std::collections::HashMap<String, String> {
    let field = |line: &str, name: &str| {
        let key = format!(" {name}=");
        let at = line.find(&key)? + key.len();
        line[at..].split(' ').next().map(str::to_string)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut taken = std::collections::HashMap::new();
        for l in gw.log().lines() {
            if let (Some(id), Some(road)) = (field(l, "id"), field(l, "road")) {
                taken.insert(id, road);
            }
        }
        if ids.iter().all(|i| taken.contains_key(i)) || Instant::now() > deadline {
            return taken;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The gateway's `/metrics` text. A refused connection is retried briefly; if the listener
/// stays away, the gateway's log says why.
pub async fn metrics_text(metrics_port: u16, gw: &Gateway) -> String {
    let mut last = None;
    for _ in 0..10 {
        match client()
            .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
            .send()
            .await
        {
            Ok(r) => return r.text().await.unwrap(),
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    panic!("metrics listener: {last:?}\n{}", gw.log())
}

/// The value of the series `name` (with its labels, e.g. `fhirgw_events_total{stage="spooled"}`)
/// in a metrics text; 0 when absent.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// `VmRSS` / `VmHWM` of a process, in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Asserts a gateway-made error: status, OperationOutcome body, FHIR content type, issue code.
pub async fn assert_outcome(resp: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status, "status");
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    assert!(ct.starts_with("application/fhir+json"), "content-type {ct}");
    let rid = resp
        .headers()
        .get("x-request-id")
        .expect("x-request-id on errors")
        .to_str()
        .unwrap()
        .to_string();
    let v: Value = resp.json().await.expect("OperationOutcome JSON");
    assert_eq!(v["resourceType"], "OperationOutcome", "{v}");
    assert_eq!(v["issue"][0]["code"], code, "{v}");
    let diag = v["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(
        diag.contains(&rid),
        "diagnostics carry the correlation id: {diag}"
    );
    v
}

/// How long a lookup waits for SEKMET's traffic log to show a request. SEKMET writes the log
/// after it has answered, and each lookup scans the whole traffic table (it has no index on the
/// correlation id, and it grows with every request of every test run since SEKMET started): on
/// a busy 2-core machine one scan takes seconds. A deadline, not a delay: lookups return as
/// soon as the record is there.
pub const TRAFFIC_WAIT: Duration = Duration::from_secs(20);

/// The request headers SEKMET recorded for a correlation id (its traffic log), lower-case
/// names. Waits (up to `TRAFFIC_WAIT`) until at least one record is there: for requests known
/// to have reached SEKMET.
pub fn sekmet_received(correlation_id: &str) -> Vec<Value> {
    read_traffic(correlation_id, TRAFFIC_WAIT)
}

/// Every record SEKMET has for a correlation id, none included, once a marker request sent
/// now shows up in its log: for requests that may or may not have reached SEKMET.
pub async fn sekmet_received_settled(correlation_id: &str) -> Vec<Value> {
    if let Err(e) = sekmet_log_marker().await {
        panic!("{e}");
    }
    sekmet_received_now(correlation_id)
}

fn sekmet_received_now(correlation_id: &str) -> Vec<Value> {
    read_traffic(correlation_id, Duration::ZERO)
}

fn read_traffic(correlation_id: &str, wait: Duration) -> Vec<Value> {
    let db = std::env::var("SEKMET_DB")
        .map(PathBuf::from)
        .unwrap_or_else(|_| peers_dir().join("sekmet/data/sekmet.db"));
    read_traffic_in(&db, correlation_id, wait)
}

/// What the SEKMET whose traffic log is `db` recorded for a correlation id (see
/// `sekmet_received`), waiting up to `wait` for a first entry.
pub fn read_traffic_in(db: &std::path::Path, correlation_id: &str, wait: Duration) -> Vec<Value> {
    traffic_where(db, "correlation_id=?", correlation_id, wait)
}

/// What the SEKMET whose traffic log is `db` recorded for every correlation id that starts
/// with `prefix` (the gateway's own calls, e.g. `audit-fhir-`), with each record's
/// `correlation_id`; waits up to `wait` for a first one.
pub fn traffic_with_prefix(db: &std::path::Path, prefix: &str, wait: Duration) -> Vec<Value> {
    traffic_where(db, "substr(correlation_id,1,length(?))=?", prefix, wait)
}

fn traffic_where(db: &std::path::Path, clause: &str, arg: &str, wait: Duration) -> Vec<Value> {
    let script = format!(
        "import sqlite3,sys,json\n\
db=sqlite3.connect('file:'+sys.argv[1]+'?mode=ro',uri=True)\n\
rows=db.execute('select method,url,req_headers,req_body,correlation_id from traffic where {clause} order by id',(sys.argv[2],)*{n}).fetchall()\n\
print(json.dumps([{{'method':m,'url':u,'headers':json.loads(h or '{{}}'),'body':b,'correlation_id':c}} for m,u,h,b,c in rows]))\n",
        n = clause.matches('?').count()
    );
    let deadline = Instant::now() + wait;
    loop {
        let out = Command::new("python3")
            .arg("-c")
            .arg(&script)
            .arg(db)
            .arg(arg)
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "reading SEKMET traffic log {}: {}",
            db.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        if !v.is_empty() || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends a marker request to SEKMET and waits until its traffic log shows it. SEKMET logs
/// requests in order, so every request answered before the marker is in the log by then.
async fn sekmet_log_marker() -> Result<(), String> {
    let marker = format!("marker-{}", uuid::Uuid::new_v4());
    let r = client()
        .get(format!("{}/metadata", sekmet_url()))
        .header("X-Request-Id", &marker)
        .send()
        .await
        .map_err(|e| format!("marker request to SEKMET: {e}"))?;
    if r.status() != 200 {
        return Err(format!("marker request to SEKMET: status {}", r.status()));
    }
    let n = sekmet_received(&marker).len();
    if n != 1 {
        return Err(format!(
            "marker not logged: {n} records of the marker request in SEKMET's traffic log after \
             {TRAFFIC_WAIT:?}, so the log cannot tell what SEKMET received"
        ));
    }
    Ok(())
}

/// Waits until SEKMET has logged everything answered so far (see `sekmet_log_marker`).
pub async fn sekmet_settle() {
    if let Err(e) = sekmet_log_marker().await {
        panic!("{e}");
    }
}

/// Whether SEKMET never received a request with this correlation id (checked once a later
/// marker request shows up in its log). `Err` says what it received, or why the log could
/// not tell.
pub async fn sekmet_never_received(correlation_id: &str) -> Result<(), String> {
    sekmet_log_marker().await?;
    let got = sekmet_received_now(correlation_id);
    if got.is_empty() {
        Ok(())
    } else {
        Err(format!("SEKMET received {correlation_id}: {got:?}"))
    }
}

/// Asserts SEKMET never received a request with this correlation id.
pub async fn assert_sekmet_never_received(correlation_id: &str) {
    if let Err(e) = sekmet_never_received(correlation_id).await {
        panic!("{e}");
    }
}

/// Everything SEKMET logged for many correlation ids, read at once (one query, not one per
/// id): per id, in order, `{method, url, status, headers}` (header names lower-case, one value
/// per name). Ids SEKMET never saw are absent. Call `sekmet_settle` first.
pub fn sekmet_log(ids: &[String]) -> std::collections::HashMap<String, Vec<Value>> {
    let db = std::env::var("SEKMET_DB")
        .map(PathBuf::from)
        .unwrap_or_else(|_| peers_dir().join("sekmet/data/sekmet.db"));
    // A raw string: Python needs its indentation.
    let script = r#"import sqlite3,sys,json
db=sqlite3.connect('file:'+sys.argv[1]+'?mode=ro',uri=True)
ids=json.loads(sys.stdin.read())
out={}
for i in range(0,len(ids),400):
    c=ids[i:i+400]
    q='select correlation_id,method,url,status,req_headers from traffic where correlation_id in (%s) order by id'%','.join('?'*len(c))
    for k,m,u,s,h in db.execute(q,c):
        out.setdefault(k,[]).append({'method':m,'url':u,'status':s,'headers':json.loads(h or '{}')})
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(ids).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "reading SEKMET traffic log {}: {}",
        db.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Fails if the upstream's address appears anywhere in a response (headers or body bytes).
pub fn assert_no_upstream_address(
    headers: &reqwest::header::HeaderMap,
    body: &[u8],
    upstream: &str,
) {
    let up = upstream.trim_end_matches('/');
    let authority = up
        .split("//")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    for (k, v) in headers {
        let v = String::from_utf8_lossy(v.as_bytes());
        assert!(
            !v.contains(&authority),
            "header {k}: {v} names the upstream"
        );
    }
    let text = String::from_utf8_lossy(body);
    assert!(
        !text.contains(&authority),
        "body names the upstream {authority}"
    );
    let escaped = authority.replace(':', "%3A");
    assert!(
        !text.contains(&escaped),
        "body names the upstream (percent-encoded)"
    );
}

// ---------------------------------------------------------------------------------------------
// Scripted upstream

/// One request as the scripted upstream received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Which connection it came on: 0 for the first the upstream accepted, and so on.
    pub conn: usize,
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_in(&self.headers, name)
    }
}

/// Parsed header fields as (lower-case name, value) pairs.
pub fn lowercased(headers: &[httparse::Header]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

/// The first value of a header in a recorded list (name case-insensitive).
pub fn header_in<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

pub enum Reply {
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Waits before sending anything.
    Delay(Duration, Box<Reply>),
    /// A chunked body of `count` copies of `chunk`.
    Stream {
        status: u16,
        content_type: String,
        chunk: Vec<u8>,
        count: usize,
    },
    /// A `Full` answer whose body arrives in two parts, `gap` apart (a slow server).
    Trickle {
        status: u16,
        content_type: String,
        body: Vec<u8>,
        gap: Duration,
    },
    /// Closes the connection without answering.
    Close,
}

impl Reply {
    pub fn json(status: u16, body: &str) -> Reply {
        Reply::Full {
            status,
            headers: vec![("Content-Type".into(), "application/fhir+json".into())],
            body: body.as_bytes().to_vec(),
        }
    }
}

type Handler = Arc<dyn Fn(&Recorded, usize) -> Reply + Send + Sync>;

pub struct ScriptedUpstream {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    /// Connections accepted so far.
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
}

impl ScriptedUpstream {
    /// `handler(request, n)` answers the n-th request (0-based).
    pub async fn start(
        handler: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static,
    ) -> ScriptedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(handler);
        let reqs = requests.clone();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let conn = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (h, r) = (handler.clone(), reqs.clone());
                tokio::spawn(async move {
                    let _ = serve(sock, conn, h, r).await;
                });
            }
        });
        ScriptedUpstream {
            addr,
            requests,
            accepted,
        }
    }

    pub fn base(&self) -> String {
        format!("http://{}/fhir", self.addr)
    }

    pub fn received(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn serve(
    mut sock: TcpStream,
    conn: usize,
    handler: Handler,
    reqs: Arc<Mutex<Vec<Recorded>>>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        // Read one request head.
        let head_end = loop {
            if let Some(p) = raw::find(&buf, b"\r\n\r\n") {
                break p + 4;
            }
            let mut tmp = [0u8; 8192];
            let n = sock.read(&mut tmp).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&tmp[..n]);
        };
        let mut hdrs = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut hdrs);
        req.parse(&buf[..head_end]).expect("parse request");
        let method = req.method.unwrap().to_string();
        let target = req.path.unwrap().to_string();
        let headers = lowercased(req.headers);
        buf.drain(..head_end);
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let mut body = Vec::new();
        if let Some(cl) = get("content-length") {
            let n: usize = cl.trim().parse().unwrap();
            while buf.len() < n {
                let mut tmp = [0u8; 65536];
                let r = sock.read(&mut tmp).await?;
                if r == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&tmp[..r]);
            }
            body = buf.drain(..n).collect();
        } else if get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
            loop {
                let line_end = loop {
                    if let Some(p) = raw::find(&buf, b"\r\n") {
                        break p;
                    }
                    let mut tmp = [0u8; 65536];
                    let r = sock.read(&mut tmp).await?;
                    if r == 0 {
                        return Ok(());
                    }
                    buf.extend_from_slice(&tmp[..r]);
                };
                let size = usize::from_str_radix(
                    std::str::from_utf8(&buf[..line_end])
                        .unwrap()
                        .split(';')
                        .next()
                        .unwrap()
                        .trim(),
                    16,
                )
                .unwrap();
                buf.drain(..line_end + 2);
                while buf.len() < size + 2 {
                    let mut tmp = [0u8; 65536];
                    let r = sock.read(&mut tmp).await?;
                    if r == 0 {
                        return Ok(());
                    }
                    buf.extend_from_slice(&tmp[..r]);
                }
                body.extend_from_slice(&buf[..size]);
                buf.drain(..size + 2);
                if size == 0 {
                    break;
                }
            }
        }
        let rec = Recorded {
            conn,
            method,
            target,
            headers,
            body,
        };
        let n = {
            let mut g = reqs.lock().unwrap();
            g.push(rec.clone());
            g.len() - 1
        };
        let mut reply = handler(&rec, n);
        loop {
            match reply {
                Reply::Delay(d, next) => {
                    tokio::time::sleep(d).await;
                    reply = *next;
                }
                Reply::Close => return Ok(()),
                Reply::Full {
                    status,
                    headers,
                    body,
                } => {
                    let mut head =
                        format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n", body.len());
                    for (k, v) in headers {
                        head.push_str(&format!("{k}: {v}\r\n"));
                    }
                    head.push_str("\r\n");
                    // One write, as a server answers a small request.
                    sock.write_all(&[head.as_bytes(), &body].concat()).await?;
                    break;
                }
                Reply::Trickle {
                    status,
                    content_type,
                    body,
                    gap,
                } => {
                    let head = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    );
                    let half = body.len() / 2;
                    sock.write_all(&[head.as_bytes(), &body[..half]].concat())
                        .await?;
                    tokio::time::sleep(gap).await;
                    sock.write_all(&body[half..]).await?;
                    break;
                }
                Reply::Stream {
                    status,
                    content_type,
                    chunk,
                    count,
                } => {
                    let head = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
                    );
                    sock.write_all(head.as_bytes()).await?;
                    let framed =
                        [format!("{:X}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
                    for _ in 0..count {
                        sock.write_all(&framed).await?;
                    }
                    sock.write_all(b"0\r\n\r\n").await?;
                    break;
                }
            }
        }
    }
}

/// Writes a config file and runs `fhir-gateway -t -c` on it.
pub fn check_config(yaml: &str, envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut f = tempfile_in_tmp();
    f.1.write_all(yaml.as_bytes()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fhir-gateway"));
    cmd.arg("-t").arg("-c").arg(&f.0);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let _ = std::fs::remove_file(&f.0);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tempfile_in_tmp() -> (PathBuf, std::fs::File) {
    let p = std::env::temp_dir().join(format!(
        "fgw-conf-{}-{}.yaml",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    let f = std::fs::File::create(&p).unwrap();
    (p, f)
}

/// An upstream that accepts connections and then neither reads nor answers: a request body
/// larger than the socket buffers stalls whoever writes it. Connections stay open until it is
/// dropped.
pub struct SilentUpstream {
    pub addr: SocketAddr,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl SilentUpstream {
    pub async fn start() -> SilentUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(sock);
            }
        });
        SilentUpstream {
            addr,
            accepted,
            task,
        }
    }

    pub fn base(&self) -> String {
        format!("http://{}/fhir", self.addr)
    }

    pub fn connections(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for SilentUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
