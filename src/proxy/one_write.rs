//! One write for a small rewritten answer.
//!
//! A body the gateway rewrites changes length, so `response_head` frames it chunked. Pingora
//! flushes a head without `Content-Length` at once and flushes every chunk: head, chunk and
//! last chunk go out as three writes, where a plain proxy makes one. But Pingora filters a
//! whole batch of upstream tasks (the head and, for a small answer, its complete body, read
//! together) before it writes any of them, and runs the downstream modules' filters last,
//! just before writing. So when `response_body` has seen the end of the body by the time this
//! module sees the head, the final length is known: the head gets it as `Content-Length`, and
//! Pingora writes head and body with one flush. A body still arriving keeps its chunked
//! framing: nothing waits for it.

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora_core::modules::http::{HttpModule, HttpModuleBuilder, HttpModules, Module};
use pingora_core::Result;
use pingora_proxy::Session;
use std::any::Any;

/// The per-request state: the whole body's length, once `response_body` has emitted all of
/// it.
#[derive(Default)]
pub(super) struct OneWrite {
    length: Option<usize>,
}

#[async_trait]
impl HttpModule for OneWrite {
    async fn response_header_filter(
        &mut self,
        resp: &mut ResponseHeader,
        _end_of_stream: bool,
    ) -> Result<()> {
        match self.length {
            Some(n) => set_length(resp, n),
            None => Ok(()),
        }
    }

    fn response_body_filter(&mut self, _body: &mut Option<Bytes>, _end: bool) -> Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

struct Builder;

impl HttpModuleBuilder for Builder {
    fn init(&self) -> Module {
        Box::new(OneWrite::default())
    }
}

/// The gateway's downstream modules: only this one. Pingora's default compression module is
/// not added: the gateway never compresses (and refuses compressed upstream bodies it must
/// rewrite).
pub(super) fn install(modules: &mut HttpModules) {
    modules.add_module(Box::new(Builder));
}

/// Frames a head with the whole body's length instead of chunked.
pub(super) fn set_length(resp: &mut ResponseHeader, n: usize) -> Result<()> {
    resp.remove_header(&http::header::TRANSFER_ENCODING);
    resp.insert_header(http::header::CONTENT_LENGTH, n)
}

/// Called by `response_body` when the rewritten body is complete: `length` bytes in all. If
/// the head has not been written yet (same batch), it will carry this length.
pub(super) fn body_complete(session: &mut Session, length: usize) {
    if let Some(m) = session.downstream_modules_ctx.get_mut::<OneWrite>() {
        m.length = Some(length);
    }
}
