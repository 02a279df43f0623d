//! Bulk Data export through the gateway (spec §9, docs/architecture.md "Bulk Data"): the
//! kick-off's rules, the status URL bound to its caller in the kick-off's answer, and the
//! handed-out status and file URLs (`src/bulk.rs`) served through the one upstream road.

use super::*;
use crate::bulk::{path_of_url, rewrite_manifest, Kind};

/// Where a request stands in a Bulk Data export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(super) enum BulkStep {
    #[default]
    None,
    /// `$export`: a 202's `Content-Location` becomes a handed-out status URL.
    Kickoff,
    /// A handed-out status URL: polled or cancelled on the buffered road (the manifest is
    /// rewritten whole).
    Status,
    /// A handed-out file URL: streamed, rewritten chunk by chunk.
    File,
}

/// The first path segments a client may send: a resource type, an operation, or the FHIR
/// base-level names. The server's other paths (`bulk-status/…`, `bulk-files/…`,
/// `_operations/…`) are reached only through URLs the gateway handed out.
pub(super) fn check_server_path(rest: &str) -> std::result::Result<(), GatewayError> {
    let first = rest.trim_start_matches('/').split('/').next().unwrap_or("");
    let ok = first.is_empty()
        || first.starts_with('$')
        || matches!(first, "metadata" | "_search" | "_history")
        || (first.starts_with(|c: char| c.is_ascii_uppercase())
            && first.chars().all(|c| c.is_ascii_alphanumeric()));
    if ok {
        Ok(())
    } else {
        Err(GatewayError::BadRequest(format!(
            "not a FHIR request: /{first} is not a resource type; the FHIR server's own paths \
             are reached only through URLs the gateway handed out"
        )))
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whom a handed-out URL belongs to: the route, and the issuer, tenant and user of the
/// verified token (`-` without authentication, `insecure_dev`).
fn owner(prefix: &str, identity: Option<&Identity>) -> String {
    match identity {
        Some(id) => format!(
            "{prefix}\n{}\n{}\n{}",
            id.issuer,
            id.tenant.as_deref().unwrap_or(""),
            id.user_id
        ),
        None => format!("{prefix}\n-"),
    }
}

impl FhirProxy {
    fn export_roles_rule(&self) -> GatewayError {
        let roles = &self.gw.bulk.export_roles;
        let names = if roles.is_empty() {
            "a role in bulk.export_roles (empty: exports are off)".to_string()
        } else {
            roles
                .iter()
                .map(|r| r.name())
                .collect::<Vec<_>>()
                .join(" or ")
        };
        GatewayError::Forbidden(format!("role: Bulk Data export needs {names}"))
    }

    /// The kick-off's own rules, after the route's role and scope policy (which checked
    /// `_type` against the caller's scopes): GET only, an export role, and no caller whom the
    /// route's post modules would filter (exported files are not filtered per caller).
    pub(super) fn admit_export(
        &self,
        req: &RequestHeader,
        ctx: &mut Ctx,
        identity: Option<&Identity>,
    ) -> std::result::Result<(), GatewayError> {
        if req.method != Method::GET {
            return Err(GatewayError::MethodNotAllowed(
                "$export: only the GET kick-off is accepted (its _type is checked against the \
                 caller's scopes)"
                    .into(),
            ));
        }
        if let Some(id) = identity {
            if !self.gw.bulk.export_roles.iter().any(|r| id.has(*r)) {
                return Err(self.export_roles_rule());
            }
        }
        let probe = module_request("GET", ctx, Vec::new());
        let route = &self.gw.routes[ctx.route];
        // Headers-only modules (ResponseHeaders) change no data: they do not bar an export.
        if let Some(m) = route.post.iter().find(|m| {
            m.applies(&probe, identity)
                && m.reads() != fhir_gateway_modules::processor::BodyAccess::Headers
        }) {
            return Err(GatewayError::Forbidden(format!(
                "bulk export: module {} filters this caller's data, and exported files are not \
                 filtered",
                m.name()
            )));
        }
        ctx.bulk = BulkStep::Kickoff;
        Ok(())
    }

    /// A handed-out status or file URL: the caller authenticated, the token verified for them
    /// (any failure: 404, the same for a foreign, tampered or expired URL), then the request
    /// continues to the server path the token carries.
    pub(super) async fn admit_handed_out(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        kind: Kind,
        token: &str,
    ) -> std::result::Result<Admit, GatewayError> {
        let gw = &self.gw;
        let method = session.req_header().method.clone();
        let allowed = match kind {
            Kind::Status => method == Method::GET || method == Method::DELETE,
            Kind::File => method == Method::GET,
        };
        if !allowed {
            return Err(GatewayError::MethodNotAllowed(format!(
                "{method} is not allowed on a Bulk Data {} URL",
                if kind == Kind::Status {
                    "status"
                } else {
                    "file"
                }
            )));
        }
        // Nothing would read a body here (the status call sends none): refused, so no unread
        // bytes are left on a kept-alive connection.
        let h = &session.req_header().headers;
        let declared = h
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
        if declared || h.contains_key(http::header::TRANSFER_ENCODING) {
            return Err(GatewayError::BadRequest(
                "a Bulk Data status or file URL takes no request body".into(),
            ));
        }
        let identity = if gw.auth_mode == AuthMode::Jwt {
            let id = gw
                .auth
                .authenticate(&session.req_header().headers, ctx.query.as_deref())
                .await
                .map_err(GatewayError::from)?;
            // The same for every token, so it tells nothing about this one.
            if !gw.bulk.export_roles.iter().any(|r| id.has(*r)) {
                return Err(self.export_roles_rule());
            }
            Some(id)
        } else {
            None
        };
        let prefix = &gw.routes[ctx.route].prefix;
        let not_found = || GatewayError::NotFound("no such Bulk Data export URL".into());
        let target = gw
            .bulk
            .key
            .verify(kind, &owner(prefix, identity.as_deref()), token, now_secs())
            .ok_or_else(not_found)?;
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.as_bytes().to_vec())),
            None => (target, None),
        };
        // Signed by us from the server's own answer; checked like any path all the same.
        check_path(path.as_bytes()).map_err(|_| not_found())?;
        ctx.rest = path;
        ctx.query = query;
        ctx.identity = identity;
        ctx.bulk = match kind {
            Kind::Status => BulkStep::Status,
            Kind::File => BulkStep::File,
        };
        if kind == Kind::File {
            // A file streams past the module chains; the route's headers-only modules
            // (e.g. `Cache-Control: no-store`) still run on its head.
            let req = module_request("GET", ctx, self.forwarded_headers(session.req_header()));
            let caller = ctx.identity.as_deref();
            if gw.routes[ctx.route].post.iter().any(|m| {
                m.reads() == fhir_gateway_modules::processor::BodyAccess::Headers
                    && m.applies(&req, caller)
            }) {
                ctx.head_chain = Some(req);
            }
        }
        ctx.service_auth = gw.identity.authorization().await?;
        ctx.call = Some(self.call_identity(ctx));
        Ok(Admit::Proxy)
    }

    /// `{public_base}/$bulk-…/<token>` for a server URL, if it is the server's (a URL
    /// elsewhere, e.g. a storage account, is not ours to bind).
    fn handed_out_url(&self, ctx: &Ctx, kind: Kind, server_url: &str) -> Option<String> {
        let path = self.gw.upstream.base.path_below(server_url)?;
        let path = if path.is_empty() { "/".into() } else { path };
        let expires = now_secs() + self.gw.bulk.url_lifetime_secs;
        let owner = owner(&self.gw.routes[ctx.route].prefix, ctx.identity.as_deref());
        let token = self.gw.bulk.key.sign(kind, &owner, &path, expires)?;
        let base = self.public_base_of(ctx);
        Some(format!(
            "{}/{}/{token}",
            base.trim_end_matches('/'),
            kind.segment()
        ))
    }

    /// The kick-off's 202: its `Content-Location` (the server's status URL) becomes a status
    /// URL bound to this caller. A status URL that is not the server's cannot be served
    /// through the gateway, so the answer is refused rather than passed on.
    pub(super) fn bind_status_url(
        &self,
        ctx: &Ctx,
        resp: &mut ResponseHeader,
    ) -> std::result::Result<(), GatewayError> {
        if ctx.bulk != BulkStep::Kickoff || resp.status.as_u16() != 202 {
            return Ok(());
        }
        let Some(loc) = resp.headers.get(http::header::CONTENT_LOCATION) else {
            return Ok(());
        };
        let loc = String::from_utf8_lossy(loc.as_bytes()).into_owned();
        let url = self
            .handed_out_url(ctx, Kind::Status, loc.trim())
            .ok_or_else(|| {
                GatewayError::UpstreamUnavailable(
                    "the export's status URL is not on the FHIR server".into(),
                )
            })?;
        let v = HeaderValue::from_str(&url)
            .map_err(|_| GatewayError::Internal("status URL is not a header value".into()))?;
        resp.insert_header(http::header::CONTENT_LOCATION, v)
            .map_err(|_| GatewayError::Internal("status URL is not a header value".into()))?;
        Ok(())
    }

    /// A handed-out status URL: GET polls, DELETE cancels, through the gateway's upstream
    /// client (the same head builder, service credential, audit headers and retries as
    /// every request). A 200 manifest is rewritten: its file URLs become handed-out file URLs
    /// of this caller, and `request` the gateway's kick-off URL. Anything else (202 with
    /// `Retry-After`/`X-Progress`, the server's 4xx/5xx) passes on as the server sent it.
    pub(super) async fn serve_status(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> std::result::Result<(), GatewayError> {
        let down = session.req_header();
        let method = down.method.clone();
        let headers = self.forwarded_headers(down);
        let mut target = ctx.rest.clone();
        if let Some(q) = &ctx.query {
            target.push('?');
            target.push_str(&String::from_utf8_lossy(q));
        }
        let client = self.client_for(ctx);
        ctx.attempts += 1;
        ctx.road = "buffered";
        let sent = Instant::now();
        let fetched = client
            .call(ClientRequest {
                method: method.as_str().to_string(),
                path_and_query: target,
                headers,
                body: None,
            })
            .await?;
        ctx.upstream_status = Some(fetched.status);
        ctx.attempts += fetched.attempts - 1;
        ctx.upstream_ms = Some(sent.elapsed().as_millis());
        let mut body = fetched.body.clone();
        if method == Method::GET && fetched.status == 200 {
            let mut manifest: Value = serde_json::from_slice(&body).map_err(|e| {
                GatewayError::UpstreamUnavailable(format!("the export manifest is not JSON: {e}"))
            })?;
            let request = manifest
                .get("request")
                .and_then(Value::as_str)
                .map(|r| self.kickoff_url(ctx, r))
                .unwrap_or_else(|| self.public_base_of(ctx).to_string());
            let jwt = self.gw.auth_mode == AuthMode::Jwt;
            rewrite_manifest(
                &mut manifest,
                |u| self.handed_out_url(ctx, Kind::File, u),
                request,
                jwt,
            )
            .map_err(GatewayError::UpstreamUnavailable)?;
            body = Bytes::from(
                serde_json::to_vec(&manifest).map_err(|e| GatewayError::Internal(e.to_string()))?,
            );
        }
        self.write_answer(session, ctx, fetched.status, &fetched.headers, body)
            .await
    }

    /// The manifest's `request` as the gateway's URL: the server's path below its base (in
    /// whatever spelling of its address it wrote) on the public base.
    fn kickoff_url(&self, ctx: &Ctx, server_request: &str) -> String {
        let base = &self.gw.upstream.base;
        let rest = base.path_below(server_request).or_else(|| {
            path_of_url(server_request)?
                .strip_prefix(base.path.as_str())
                .filter(|r| r.starts_with('/') || r.starts_with('?'))
                .map(str::to_string)
        });
        let public = self.public_base_of(ctx);
        format!(
            "{}{}",
            public.trim_end_matches('/'),
            rest.unwrap_or_default()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fhir_paths_may_be_named() {
        for ok in [
            "",
            "/",
            "/Patient",
            "/Patient/1/_history/2",
            "/$export",
            "/metadata",
            "/_search",
            "/_history",
            "/Group/g/$export",
        ] {
            assert!(check_server_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "/bulk-status/1",
            "/bulk-files/1/Patient.ndjson",
            "/_operations/export/1",
            "/patient/1",
            "/Pa-tient",
            "/.well-known/x",
        ] {
            assert_eq!(check_server_path(bad).unwrap_err().status(), 400, "{bad}");
        }
    }

    #[test]
    fn owners_differ_by_route_issuer_tenant_and_user() {
        let id = |iss: &str, tid: &str, oid: &str| Identity {
            issuer: iss.into(),
            user_id: oid.into(),
            tenant: Some(tid.into()),
            ..Identity::default()
        };
        let a = owner("/fhir", Some(&id("h", "t", "u")));
        assert_ne!(a, owner("/research", Some(&id("h", "t", "u"))));
        assert_ne!(a, owner("/fhir", Some(&id("h2", "t", "u"))));
        assert_ne!(a, owner("/fhir", Some(&id("h", "t2", "u"))));
        assert_ne!(a, owner("/fhir", Some(&id("h", "t", "u2"))));
        assert_ne!(a, owner("/fhir", None));
    }
}
