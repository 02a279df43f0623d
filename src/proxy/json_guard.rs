//! A streaming check of JSON request bodies on the pass-through path: valid UTF-8 and a bounded
//! nesting depth. Bodies the FHIR server would choke on (a stack overflow, a decoding crash → 500)
//! are refused with a 400 before their end reaches it; nothing is parsed or copied otherwise.

/// Deeper than any FHIR resource (contained resources and extensions included).
pub const MAX_DEPTH: u32 = 100;

#[derive(Default)]
pub struct JsonGuard {
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// The start of a UTF-8 sequence cut by a chunk boundary.
    carry: Vec<u8>,
}

impl JsonGuard {
    /// Checks one chunk; `end` on the last.
    pub fn feed(&mut self, chunk: &[u8], end: bool) -> Result<(), &'static str> {
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
