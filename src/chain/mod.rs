//! Runs a route's pre- and post-processor chains with the predecessor's semantics, timing and
//! counting every module; a module that fails or stops without a response becomes an error
//! naming it (fail closed).

pub mod shadow;
#[cfg(test)]
mod tests;

use crate::error::GatewayError;
use crate::metrics;
use fhir_gateway_modules::processor::{
    Context, ModuleError, PostOutcome, PostProcess, PreOutcome, PreProcess, Request, Response,
};
use std::sync::Arc;
use std::time::Instant;

/// How the pre chain ended.
#[derive(Debug)]
pub enum PreResult {
    /// Every module continued: call the FHIR server with the (possibly changed) request.
    Continue,
    /// A module answered; the post chain still runs.
    Stop(Response),
    /// A module answered directly; no post chain.
    Reply(Response),
}

fn module_error(name: &str, e: ModuleError) -> GatewayError {
    match e {
        ModuleError::Failed(m) => GatewayError::Module {
            module: name.to_string(),
            message: m,
            unavailable: false,
        },
        ModuleError::Unavailable(m) => GatewayError::Module {
            module: name.to_string(),
            message: m,
            unavailable: true,
        },
    }
}

fn no_response(name: &str) -> GatewayError {
    GatewayError::Module {
        module: name.to_string(),
        message: "stopped the chain without a response".into(),
        unavailable: false,
    }
}

pub async fn run_pre(
    route: &str,
    modules: &[Arc<dyn PreProcess>],
    req: &mut Request,
    cx: &Context,
) -> Result<PreResult, GatewayError> {
    for m in modules {
        if !m.applies(req, cx.identity.as_ref()) {
            continue;
        }
        let t = Instant::now();
        let out = m.process(req, cx).await;
        let outcome = match &out {
            Ok(PreOutcome::Continue) => "continue",
            Ok(PreOutcome::Stop(_)) | Ok(PreOutcome::Reply(_)) => "stop",
            Ok(PreOutcome::StopWithoutResponse) | Err(_) => "error",
        };
        metrics::module_call(route, m.name(), "pre", outcome, t.elapsed());
        match out.map_err(|e| module_error(m.name(), e))? {
            PreOutcome::Continue => {}
            PreOutcome::Stop(r) => return Ok(PreResult::Stop(r)),
            PreOutcome::Reply(r) => return Ok(PreResult::Reply(r)),
            PreOutcome::StopWithoutResponse => return Err(no_response(m.name())),
        }
    }
    Ok(PreResult::Continue)
}

/// Lets the pre modules that applied finish on the server's answer (`PreProcess::finish`),
/// last module first: each undoes its own change in the reverse order it was made.
pub async fn run_finish(
    route: &str,
    modules: &[Arc<dyn PreProcess>],
    original: &Request,
    sent: &Request,
    resp: &mut Response,
    cx: &Context,
) -> Result<(), GatewayError> {
    for m in modules.iter().rev() {
        if !m.finishes() || !m.applies(original, cx.identity.as_ref()) {
            continue;
        }
        let t = Instant::now();
        let out = m.finish(original, sent, resp, cx).await;
        let outcome = if out.is_ok() { "continue" } else { "error" };
        metrics::module_call(route, m.name(), "finish", outcome, t.elapsed());
        out.map_err(|e| module_error(m.name(), e))?;
    }
    Ok(())
}

/// Runs every applicable post module over the one parsed response.
pub async fn run_post(
    route: &str,
    modules: &[Arc<dyn PostProcess>],
    req: &Request,
    resp: &mut Response,
    cx: &Context,
) -> Result<(), GatewayError> {
    for m in modules {
        if !m.applies(req, cx.identity.as_ref()) {
            continue;
        }
        let t = Instant::now();
        let out = m.process(req, resp, cx).await;
        let outcome = match &out {
            Ok(PostOutcome::Continue) => "continue",
            Ok(PostOutcome::Stop) => "stop",
            Ok(PostOutcome::StopWithoutResponse) | Err(_) => "error",
        };
        metrics::module_call(route, m.name(), "post", outcome, t.elapsed());
        match out.map_err(|e| module_error(m.name(), e))? {
            PostOutcome::Continue => {}
            PostOutcome::Stop => return Ok(()),
            PostOutcome::StopWithoutResponse => return Err(no_response(m.name())),
        }
    }
    Ok(())
}

/// Resolves a filtered caller's conditional write over what they may see (`conditional.rs`),
/// before the pre chain: `Some` is the answer and nothing is sent.
pub async fn resolve_conditionals(
    route: &str,
    modules: &[Arc<dyn PostProcess>],
    req: &mut Request,
    cx: &Context,
) -> Result<Option<Response>, GatewayError> {
    const NAME: &str = "ConditionalWrites";
    let t = Instant::now();
    let out = fhir_gateway_modules::conditional::resolve(modules, req, cx).await;
    let outcome = match &out {
        Ok(None) => "continue",
        Ok(Some(_)) => "stop",
        Err(_) => "error",
    };
    metrics::module_call(route, NAME, "write", outcome, t.elapsed());
    out.map_err(|e| module_error(NAME, e))
}

/// Asks every post module that judges this write (`check_write`) before the upstream call;
/// the first refusal is the answer.
pub async fn check_writes(
    route: &str,
    modules: &[Arc<dyn PostProcess>],
    req: &Request,
    cx: &Context,
) -> Result<Option<Response>, GatewayError> {
    for m in modules {
        if !m.checks_write(req, cx.identity.as_ref()) {
            continue;
        }
        let t = Instant::now();
        let out = m.check_write(req, cx).await;
        let outcome = match &out {
            Ok(None) => "continue",
            Ok(Some(_)) => "stop",
            Err(_) => "error",
        };
        metrics::module_call(route, m.name(), "write", outcome, t.elapsed());
        if let Some(refused) = out.map_err(|e| module_error(m.name(), e))? {
            return Ok(Some(refused));
        }
    }
    Ok(None)
}
