//! Headers-only post modules (`BodyAccess::Headers`) on the streaming road: when no module of
//! the chain needs the body, the answer streams and the chain runs on the response head,
//! before the one cleaner (so what a module adds is cleaned and rewritten like the server's
//! own headers, as on the buffered road).

use super::*;
use fhir_gateway_modules::processor::{BodyAccess, PostProcess};

/// Headers a headers-only module never changes: the framing is Pingora's and the gateway's.
const FRAMING: &[&str] = &["content-length", "transfer-encoding", "connection"];

impl FhirProxy {
    /// Runs the route's post chain on the response head. A module may change headers only: a
    /// changed status or a body is a module error (500), never half-applied.
    pub(super) async fn run_head_chain(
        &self,
        ctx: &mut Ctx,
        resp: &mut ResponseHeader,
    ) -> std::result::Result<(), GatewayError> {
        let Some(req) = ctx.head_chain.take() else {
            return Ok(());
        };
        let route = &self.gw.routes[ctx.route];
        let before: Vec<(String, String)> = resp
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        let status = resp.status.as_u16();
        let mut r = ModResponse {
            status,
            headers: before.clone(),
            body: ModBody::None,
        };
        let client = Arc::new(self.client_for(ctx));
        let cx = self.module_context(ctx, client);
        // Only the headers-only modules: on a handed-out Bulk Data file the others may apply
        // too, but nothing runs them on a streamed body.
        let heads: Vec<Arc<dyn PostProcess>> = route
            .post
            .iter()
            .filter(|m| m.reads() == BodyAccess::Headers)
            .cloned()
            .collect();
        chain::run_post(&route.prefix, &heads, &req, &mut r, &cx).await?;
        if r.status != status || !matches!(r.body, ModBody::None) {
            return Err(GatewayError::Module {
                module: heads.iter().map(|m| m.name()).collect::<Vec<_>>().join(","),
                message: "a headers-only post module changed the status or the body".into(),
                unavailable: false,
            });
        }
        if r.headers == before {
            return Ok(());
        }
        let values = |list: &[(String, String)], name: &str| -> Vec<String> {
            list.iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
                .collect()
        };
        let mut names: Vec<String> = before
            .iter()
            .chain(r.headers.iter())
            .map(|(k, _)| k.to_ascii_lowercase())
            .filter(|k| !FRAMING.contains(&k.as_str()))
            .collect();
        names.sort();
        names.dedup();
        let invalid = |k: &str| GatewayError::Module {
            module: "post chain".into(),
            message: format!("header {k} is not valid"),
            unavailable: false,
        };
        for name in names {
            let now = values(&r.headers, &name);
            if values(&before, &name) == now {
                continue;
            }
            resp.remove_header(name.as_str());
            for v in now {
                let v = HeaderValue::from_str(&v).map_err(|_| invalid(&name))?;
                resp.append_header(name.clone(), v)
                    .map_err(|_| invalid(&name))?;
            }
        }
        Ok(())
    }
}
