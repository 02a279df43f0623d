//! One guard for every request body, on both roads (streamed through Pingora, or read whole
//! for the modules): at admission the declared length, the media type and the encoding; then,
//! as the bytes arrive, the size, and for JSON valid UTF-8 and a bounded nesting depth. Bodies
//! the FHIR server would choke on (a stack overflow, a decoding crash → 500) are refused with
//! a 4xx before their end reaches it; nothing is parsed or copied.

use crate::error::GatewayError;
use http::Method;
use pingora::http::RequestHeader;

/// Checks the body of one request.
pub struct BodyGuard {
    max: u64,
    seen: u64,
    json: Option<JsonGuard>,
}

impl BodyGuard {
    pub fn new(max: u64) -> BodyGuard {
        BodyGuard {
            max,
            seen: 0,
            json: None,
        }
    }

    /// The head's part: `Content-Length` valid and within the limit, no compressed body, and a
    /// FHIR media type for a POST/PUT/PATCH with a body (`rest` is the path below the prefix:
    /// only `Binary` takes raw content). A JSON body is then checked as it arrives.
    pub fn admit(&mut self, req: &RequestHeader, rest: &[u8]) -> Result<(), GatewayError> {
        if let Some(cl) = req.headers.get(http::header::CONTENT_LENGTH) {
            let n = cl
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| GatewayError::BadRequest("invalid Content-Length".into()))?;
            if n > self.max {
                return Err(GatewayError::RequestTooLarge(self.max));
            }
        }
        let has_body = req.headers.contains_key(http::header::TRANSFER_ENCODING)
            || req
                .headers
                .get(http::header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() != b"0");
        if has_body && matches!(req.method, Method::POST | Method::PUT | Method::PATCH) {
            let binary = rest.split(|&b| b == b'/').nth(1) == Some(b"Binary");
            let media = req
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| {
                    v.split(';')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_ascii_lowercase()
                });
            if !binary && !media.as_deref().is_some_and(fhir_media_type) {
                return Err(GatewayError::UnsupportedMediaType(format!(
                    "Content-Type {} is not a FHIR format (application/fhir+json, application/fhir+xml, JSON Patch, or a form for _search)",
                    media.as_deref().unwrap_or("(none)")
                )));
            }
            if !binary && media.as_deref().is_some_and(|m| m.contains("json")) {
                self.json = Some(JsonGuard::default());
            }
        }
        if let Some(ce) = req.headers.get(http::header::CONTENT_ENCODING) {
            if !ce.as_bytes().eq_ignore_ascii_case(b"identity") {
                return Err(GatewayError::UnsupportedMediaType(
                    "compressed request bodies are not accepted".into(),
                ));
            }
        }
        Ok(())
    }

    /// The bytes' part, chunk by chunk (`end` on the last, which may be empty).
    pub fn feed(&mut self, chunk: &[u8], end: bool) -> Result<(), GatewayError> {
        self.seen += chunk.len() as u64;
        if self.seen > self.max {
            return Err(GatewayError::RequestTooLarge(self.max));
        }
        if let Some(g) = self.json.as_mut() {
            g.feed(chunk, end)
                .map_err(|why| GatewayError::BadRequest(why.into()))?;
        }
        Ok(())
    }

    /// Whether the body is JSON the guard checks (then it is read whole before going upstream).
    pub fn checks_json(&self) -> bool {
        self.json.is_some()
    }

    /// Request body bytes seen so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }
}

/// Request body media types the FHIR REST API takes (besides raw content for Binary).
fn fhir_media_type(m: &str) -> bool {
    matches!(
        m,
        "application/fhir+json"
            | "application/json"
            | "application/json+fhir"
            | "application/fhir+xml"
            | "application/xml"
            | "application/xml+fhir"
            | "text/xml"
            | "application/json-patch+json"
            | "application/x-www-form-urlencoded"
            | "application/fhir+ndjson"
            | "application/x-ndjson"
    )
}

/// Deeper than any FHIR resource (contained resources and extensions included).
pub const MAX_DEPTH: u32 = 100;

/// Valid UTF-8 and a bounded nesting depth, on a JSON body cut anywhere.
#[derive(Default)]
struct JsonGuard {
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// The start of a UTF-8 sequence cut by a chunk boundary.
    carry: Vec<u8>,
}

impl JsonGuard {
    /// Checks one chunk; `end` on the last.
    fn feed(&mut self, chunk: &[u8], end: bool) -> Result<(), &'static str> {
        self.utf8(chunk)?;
        if end && !self.carry.is_empty() {
            return Err("the request body is not valid UTF-8");
        }
        for &b in chunk {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'[' | b'{' => {
                    self.depth += 1;
                    if self.depth > MAX_DEPTH {
                        return Err("the request body's JSON is nested too deeply");
                    }
                }
                b']' | b'}' => self.depth = self.depth.saturating_sub(1),
                _ => {}
            }
        }
        Ok(())
    }

    fn utf8(&mut self, chunk: &[u8]) -> Result<(), &'static str> {
        let joined;
        let data = if self.carry.is_empty() {
            chunk
        } else {
            joined = [std::mem::take(&mut self.carry).as_slice(), chunk].concat();
            &joined
        };
        match std::str::from_utf8(data) {
            Ok(_) => Ok(()),
            // Incomplete at the end: wait for the next chunk.
            Err(e) if e.error_len().is_none() => {
                self.carry = data[e.valid_up_to()..].to_vec();
                Ok(())
            }
            Err(_) => Err("the request body is not valid UTF-8"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(chunks: &[&[u8]]) -> Result<(), &'static str> {
        let mut g = JsonGuard::default();
        for (i, c) in chunks.iter().enumerate() {
            g.feed(c, i + 1 == chunks.len())?;
        }
        Ok(())
    }

    #[test]
    fn fhir_bodies_pass_at_any_split() {
        let body = r#"{"resourceType":"Patient","name":[{"given":["Zoë","\"[[[["]}],"text":{"div":"<div>é 😀 {{{</div>"}}"#.as_bytes();
        for cut in 0..=body.len() {
            assert_eq!(check(&[&body[..cut], &body[cut..]]), Ok(()), "cut {cut}");
        }
    }

    #[test]
    fn invalid_utf8_and_deep_nesting_are_refused() {
        assert!(check(&[b"{\"a\":\"\xff\"}"]).is_err());
        assert!(check(&[b"{\"a\":\"\xc3"]).is_err()); // cut sequence at the very end
        assert!(check(&[b"{\"a\":\"\xc0\xae\"}"]).is_err()); // overlong
        let deep = "[".repeat(MAX_DEPTH as usize + 1);
        assert!(check(&[deep.as_bytes()]).is_err());
        let ok = format!(
            "{}{}",
            "[".repeat(MAX_DEPTH as usize),
            "]".repeat(MAX_DEPTH as usize)
        );
        assert!(check(&[ok.as_bytes()]).is_ok());
        // Brackets inside strings do not count.
        let s = format!("{{\"a\":\"{}\"}}", "[".repeat(1000));
        assert!(check(&[s.as_bytes()]).is_ok());
    }
}
