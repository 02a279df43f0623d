//! The buffered road's upstream exchange: the request as the pre chain left it goes to the
//! FHIR server through the gateway's client, and the answer comes back parsed for the modules
//! that run on it, with the server's bytes kept for the faithful writer.

use super::plan::Plan;
use super::*;
use crate::faithful;
use fhir_gateway_modules::compartment::decides_owner;

/// The FHIR server's answer as it came: the tree the post chain starts from, and its bytes.
pub(super) struct Origin {
    pub tree: Parsed,
    pub raw: Bytes,
}

/// How the server's JSON was parsed for the post chain.
pub(super) enum Parsed {
    Whole(Value),
    /// For filters only: resources cut down to what decides their owner.
    Cut(faithful::CutBundle),
    /// Every module only reads (`BodyAccess::Read`, `ReadOwners`): the answer is the server's
    /// bytes.
    Untouched,
}

impl Parsed {
    /// Whether the post chain left the answer as the server sent it.
    pub(super) fn unchanged(&self, out: &Value) -> bool {
        match self {
            Parsed::Whole(v) => faithful::same(v, out),
            Parsed::Cut(c) => faithful::same(&c.tree, out),
            Parsed::Untouched => true,
        }
    }

    /// `out`, the post chain's edit of this tree, as bytes: the server's wherever unchanged.
    pub(super) fn to_vec(&self, out: &Value, raw: &[u8]) -> Vec<u8> {
        match self {
            _ if self.unchanged(out) => raw.to_vec(),
            Parsed::Whole(orig) => faithful::to_vec(out, orig, raw),
            Parsed::Cut(c) => c.to_vec(out, raw),
            Parsed::Untouched => raw.to_vec(),
        }
    }
}

/// What the exchange brings back.
pub(super) enum Exchanged {
    /// Nothing runs on the answer (no post module applies, no pre module finishes): its
    /// bytes go out as they came, only rewritten.
    AsIs(Fetched),
    /// The answer parsed for the modules that run on it, with the server's bytes.
    Parsed(ModResponse, Option<Origin>),
}

impl FhirProxy {
    /// Sends `req` (as the pre chain left it) through `client` and records the call in `ctx`
    /// (attempts, status, length, time); a successful write drops the written types' caches.
    /// The answer is parsed as `plan` says its modules read it.
    pub(super) async fn exchange(
        &self,
        ctx: &mut Ctx,
        client: &GatewayFhirClient,
        req: &ModRequest,
        plan: &Plan<'_>,
    ) -> std::result::Result<Exchanged, GatewayError> {
        let mut target = req.path.clone();
        if !req.query.is_empty() {
            target.push('?');
            target.push_str(&req.query);
        }
        ctx.attempts += 1;
        ctx.road = "buffered";
        let sent = Instant::now();
        let fetched = client
            .call(ClientRequest {
                method: req.method.clone(),
                path_and_query: target,
                headers: req.headers.clone(),
                body: req.body.clone(),
            })
            .await?;
        ctx.upstream_status = Some(fetched.status);
        ctx.attempts += fetched.attempts - 1;
        ctx.upstream_length = fetched.length;
        ctx.upstream_ms = Some(sent.elapsed().as_millis());
        if (200..300).contains(&fetched.status) {
            ctx.written.iter().for_each(|t| self.gw.invalidate(t));
        }
        // A pre module that finishes runs on the answer too: then it is parsed whole.
        let finishes = plan.pre_finishes;
        if !plan.post_applies && !finishes {
            return Ok(Exchanged::AsIs(fetched));
        }
        // Modules edit the parsed tree; the faithful writer reuses the server's bytes
        // for whatever they left unchanged. Filters that judge only whose data a
        // resource is get a Bundle's resources cut down to what decides that.
        let raw = fetched.body.clone();
        let cut = plan.filters_only && !finishes && fetched.is_json();
        let read_only = plan.read_only && !finishes;
        let (r, origin) = if cut && read_only {
            // Observers of owners only (PublishFHIREvent): one resource is cut down too, and
            // nothing is kept to compare with (the answer goes out as the server's bytes).
            let tree = match faithful::cut_document(&raw, decides_owner) {
                Some(t) if t.get("resourceType").and_then(Value::as_str) != Some("Bundle") => {
                    Some(t)
                }
                // A Bundle keeps its own members: cut as the filters get it.
                Some(_) => faithful::parse_cut(&raw, decides_owner).map(|c| c.tree),
                None => None,
            };
            match tree {
                Some(t) => (fetched.into_parsed(t), Some(Parsed::Untouched)),
                None => parse_whole(fetched, read_only),
            }
        } else {
            match cut.then(|| faithful::parse_cut(&raw, decides_owner)) {
                Some(Some(c)) => {
                    let r = fetched.into_parsed(c.tree.clone());
                    (r, Some(Parsed::Cut(c)))
                }
                _ => parse_whole(fetched, read_only),
            }
        };
        let origin = origin.map(|tree| Origin { tree, raw });
        Ok(Exchanged::Parsed(r, origin))
    }
}

/// The answer parsed whole; a copy kept to compare with unless every module only reads.
fn parse_whole(fetched: Fetched, read_only: bool) -> (ModResponse, Option<Parsed>) {
    let r = fetched.into_response();
    let tree = match r.json_body() {
        Some(_) if read_only => Some(Parsed::Untouched),
        t => t.cloned().map(Parsed::Whole),
    };
    (r, tree)
}
