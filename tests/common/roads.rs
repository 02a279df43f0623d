//! The two roads a request takes to the FHIR server (issue 13): `/fhir` streams through
//! Pingora; `/chain` has a post chain, so the gateway reads the request, calls the server
//! through its own client and answers itself. Both roads must refuse the same requests the
//! same way and let the same things through: a test runs its cases on each `Road` and compares
//! their `Answer`s.

use super::*;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Road {
    /// `/fhir`, the main route: no modules, Pingora streams.
    Streaming,
    /// `/chain`: its post chain buffers (see `two_roads_yaml`).
    Buffered,
}

impl Road {
    pub const BOTH: [Road; 2] = [Road::Streaming, Road::Buffered];

    pub fn prefix(self) -> &'static str {
        match self {
            Road::Streaming => "/fhir",
            Road::Buffered => "/chain",
        }
    }

    /// The `road=` the gateway's access log names for it.
    pub fn logged(self) -> &'static str {
        match self {
            Road::Streaming => "stream",
            Road::Buffered => "buffered",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Road::Streaming => "streaming",
            Road::Buffered => "buffered",
        }
    }

    /// One letter for names and markers (the same length on both roads, so bodies that carry
    /// one have the same length too).
    pub fn letter(self) -> char {
        match self {
            Road::Streaming => 's',
            Road::Buffered => 'b',
        }
    }

    /// A request target written for `/fhir`, on this road: its first `/fhir` becomes the
    /// road's prefix (`http://h/fhir/x` → `http://h/chain/x`; `/manage` stays).
    pub fn target(self, fhir_target: &str) -> String {
        fhir_target.replacen("/fhir", self.prefix(), 1)
    }

    /// The road's base on a gateway (`http://127.0.0.1:port/chain`).
    pub fn base(self, gw: &Gateway) -> String {
        gw.url(self.prefix())
    }

    /// Whether an upstream request under a caller's correlation id is ParticipantFilter
    /// looking the caller up before the caller's own request (a search by the gateway's
    /// identity-link identifier): the buffered road makes such lookups, the streaming road
    /// none.
    pub fn identity_lookup(self, method: &str, url: &str) -> bool {
        self == Road::Buffered
            && method == "GET"
            && url.contains("identifier=urn%3Afhir-gateway%3Aidentity-link|")
    }

    /// Text this road wrote about a request, in the words the streaming road would use for
    /// the same request (its prefix back to `/fhir`): what must then be equal.
    pub fn as_streaming(self, text: &str) -> String {
        match self {
            Road::Streaming => text.to_string(),
            Road::Buffered => text.replace(self.prefix(), Road::Streaming.prefix()),
        }
    }
}

/// Which post chain makes `/chain` buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chain {
    /// PublishFHIREvent + ParticipantFilter: every write buffers; a read buffers unless the
    /// caller is one the filter bypasses (Administrator, DataScientist).
    Filters,
    /// The same, then SamplePostProcess (GET and POST, every caller): reads buffer for
    /// Administrators too, so a case keeps its caller on both roads.
    FiltersAndTag,
}

/// The `events:` and `routes:` sections that add `/chain` next to the main route `/fhir`;
/// PublishFHIREvent writes to `events.jsonl` in `dir`. Goes after `upstream:` and `auth:`.
pub fn two_roads_yaml(dir: &Path, chain: Chain) -> String {
    let tag = match chain {
        Chain::Filters => "",
        Chain::FiltersAndTag => {
            "      - name: SamplePostProcess\n        settings: {system: \"urn:test\", code: t}\n"
        }
    };
    format!(
        "events:\n  file: {}\nroutes:\n  - prefix: /chain\n    post:\n      - name: PublishFHIREvent\n      - name: ParticipantFilter\n{tag}",
        dir.join("events.jsonl").display()
    )
}

/// A directory for a two-road gateway's events file; removed on drop.
pub struct EventsDir {
    pub path: PathBuf,
}

impl EventsDir {
    pub fn new() -> EventsDir {
        let path = std::env::temp_dir().join(format!(
            "fgw-roads-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&path).unwrap();
        EventsDir { path }
    }

    /// `two_roads_yaml` for this directory.
    pub fn yaml(&self, chain: Chain) -> String {
        two_roads_yaml(&self.path, chain)
    }

    /// What PublishFHIREvent wrote so far.
    pub fn events(&self) -> String {
        std::fs::read_to_string(self.path.join("events.jsonl")).unwrap_or_default()
    }

    /// The correlation ids of the events written so far.
    pub fn correlation_ids(&self) -> std::collections::BTreeSet<String> {
        self.events()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|e| e["correlationid"].as_str().map(str::to_string))
            .collect()
    }

    /// The correlation ids of the events written, once every one of `expected` is among them
    /// or `within` has passed (a background thread writes the file after the answer).
    pub async fn correlation_ids_with(
        &self,
        expected: &std::collections::BTreeSet<String>,
        within: Duration,
    ) -> std::collections::BTreeSet<String> {
        let deadline = Instant::now() + within;
        loop {
            let ids = self.correlation_ids();
            if expected.is_subset(&ids) || Instant::now() > deadline {
                return ids;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Default for EventsDir {
    fn default() -> Self {
        EventsDir::new()
    }
}

impl Drop for EventsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// One road's answer to a case, reduced to what must be the same on both roads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The status of the first response; `None`: the connection ended without one.
    pub status: Option<u16>,
    /// An OperationOutcome's first issue code (whoever made it).
    pub code: Option<String>,
    /// Its diagnostics, the correlation id replaced by `<id>`, in the streaming road's words.
    pub diagnostics: Option<String>,
    /// The FHIR server received the request.
    pub reached: bool,
    /// Statuses of the responses after the first on the same connection (pipelined or
    /// smuggled requests), in order.
    pub later: Vec<u16>,
    /// Anything else the test holds must be equal on both roads, as (what, value): a
    /// challenge header, the request head the upstream received.
    pub headers: Vec<(String, String)>,
}

impl Answer {
    /// From a response's status and body; `correlation_id` is the one the request carried.
    pub fn new(
        road: Road,
        status: Option<u16>,
        body: &[u8],
        correlation_id: &str,
        reached: bool,
    ) -> Answer {
        let v: Option<Value> = serde_json::from_slice(body).ok();
        let outcome = v.filter(|v| v["resourceType"] == "OperationOutcome");
        let issue = |k: &str| {
            outcome
                .as_ref()
                .and_then(|v| v["issue"][0][k].as_str().map(str::to_string))
        };
        let diagnostics = issue("diagnostics").map(|d| {
            let d = if correlation_id.is_empty() {
                d
            } else {
                d.replace(correlation_id, "<id>")
            };
            road.as_streaming(&d)
        });
        Answer {
            status,
            code: issue("code"),
            diagnostics,
            reached,
            later: Vec::new(),
            headers: Vec::new(),
        }
    }

    pub fn describe(&self) -> String {
        let mut s = match self.status {
            Some(st) => st.to_string(),
            None => "no answer".to_string(),
        };
        if let Some(c) = &self.code {
            s.push_str(&format!(" {c}"));
        }
        if let Some(d) = &self.diagnostics {
            let d: String = d.chars().take(160).collect();
            s.push_str(&format!(" {d:?}"));
        }
        for st in &self.later {
            s.push_str(&format!(", then {st}"));
        }
        s.push_str(if self.reached {
            ", reached the server"
        } else {
            ", never reached the server"
        });
        s
    }
}

/// How the two roads' answers to one case differ (`None`: alike): status, issue code,
/// diagnostics, and above all whether the server received it.
pub fn road_difference(case: &str, streaming: &Answer, buffered: &Answer) -> Option<String> {
    let mut what = Vec::new();
    if streaming.reached != buffered.reached {
        what.push(if streaming.reached {
            "the server received it on the streaming road only"
        } else {
            "the server received it on the buffered road only"
        });
    }
    if streaming.status != buffered.status {
        what.push("status");
    }
    if streaming.code != buffered.code {
        what.push("issue code");
    }
    if streaming.diagnostics != buffered.diagnostics {
        what.push("diagnostics");
    }
    if streaming.later != buffered.later {
        what.push("the responses after the first");
    }
    let mut extra = String::new();
    for k in streaming
        .headers
        .iter()
        .chain(&buffered.headers)
        .map(|(k, _)| k)
        .collect::<std::collections::BTreeSet<_>>()
    {
        let (s, b) = (values(streaming, k), values(buffered, k));
        if s != b {
            what.push("headers");
            extra.push_str(&format!("\n    {k}: streaming {s:?}, buffered {b:?}"));
        }
    }
    what.dedup();
    (!what.is_empty()).then(|| {
        format!(
            "{case}: the roads differ ({})\n    streaming: {}\n    buffered:  {}{extra}",
            what.join(", "),
            streaming.describe(),
            buffered.describe()
        )
    })
}

/// The values of one of an answer's `headers` entries (all its lines).
fn values(a: &Answer, key: &str) -> Vec<String> {
    a.headers
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .collect()
}

/// Drops from a case's two answers every `headers` entry on which the roads differ exactly as
/// they do for a control case (`control`: its streaming and buffered answers): that difference
/// is the roads' baseline, to be reported once (by a test that pins it), not again for every
/// case. A case that changes either side still differs. Returns the entries dropped.
pub fn drop_baseline(
    control: (&Answer, &Answer),
    streaming: &mut Answer,
    buffered: &mut Answer,
) -> Vec<String> {
    let keys: std::collections::BTreeSet<String> = control
        .0
        .headers
        .iter()
        .chain(&control.1.headers)
        .map(|(k, _)| k.clone())
        .filter(|k| values(control.0, k) != values(control.1, k))
        .collect();
    let mut dropped = Vec::new();
    for k in keys {
        let same_as_control = values(streaming, &k) == values(control.0, &k)
            && values(buffered, &k) == values(control.1, &k);
        if same_as_control {
            streaming.headers.retain(|(n, _)| *n != k);
            buffered.headers.retain(|(n, _)| *n != k);
            dropped.push(k);
        }
    }
    dropped
}
