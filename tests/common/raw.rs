//! Raw HTTP/1.1 on a plain TCP connection: for request lines, heads and framing an HTTP client
//! would normalise or refuse to send, and for reading exactly what came back.

use super::*;

/// One response as it came over the wire; header names lower-cased.
#[derive(Clone, Debug)]
pub struct RawResp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResp {
    /// The first value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        super::header_in(&self.headers, name)
    }
}

/// Where `n` first occurs in `h`.
pub fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// A complete chunked body at the start of `b` (through the empty line after the last chunk):
/// (body, bytes used).
pub fn dechunk(b: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut p = 0;
    loop {
        let line_end = p + find(&b[p..], b"\r\n")?;
        let size_txt = std::str::from_utf8(&b[p..line_end]).ok()?;
        let size = usize::from_str_radix(size_txt.split(';').next()?.trim(), 16).ok()?;
        p = line_end + 2;
        if size == 0 {
            // Trailers (none expected) end with an empty line.
            let end = p + find(&b[p..], b"\r\n")?;
            return Some((body, end + 2));
        }
        if b.len() < p + size + 2 {
            return None;
        }
        body.extend_from_slice(&b[p..p + size]);
        p += size + 2;
    }
}

/// The complete responses in `buf`, in order (Content-Length, chunked, or up to the close when
/// `eof`: the peer closed, so a close-delimited body ends here); interim 1xx responses skipped.
pub fn parse_responses(buf: &[u8], eof: bool) -> Vec<RawResp> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Response::new(&mut hs);
        let n = match r.parse(&buf[pos..]) {
            Ok(httparse::Status::Complete(n)) => n,
            _ => break,
        };
        let status = r.code.unwrap_or(0);
        let headers = super::lowercased(r.headers);
        let start = pos + n;
        if (100..200).contains(&status) {
            pos = start;
            continue;
        }
        let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let (body, end) = if status == 204 || status == 304 {
            (Vec::new(), start)
        } else if get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
            match dechunk(&buf[start..]) {
                Some((b, used)) => (b, start + used),
                None => break,
            }
        } else if let Some(cl) = get("content-length").and_then(|v| v.trim().parse().ok()) {
            let cl: usize = cl;
            if buf.len() < start + cl {
                break;
            }
            (buf[start..start + cl].to_vec(), start + cl)
        } else if eof {
            (buf[start..].to_vec(), buf.len())
        } else {
            break;
        };
        out.push(RawResp {
            status,
            headers,
            body,
        });
        pos = end;
    }
    out
}

/// The first complete response in `buf`.
pub fn parse_response(buf: &[u8], eof: bool) -> Option<RawResp> {
    parse_responses(buf, eof).into_iter().next()
}

/// Reads one response from an open connection (kept open for the next request). `None`: the
/// connection ended (or was reset) before a complete response.
pub async fn read_response(sock: &mut TcpStream) -> Option<RawResp> {
    let mut buf = Vec::new();
    loop {
        if let Some(r) = parse_response(&buf, false) {
            return Some(r);
        }
        let mut tmp = [0u8; 16384];
        match sock.read(&mut tmp).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

/// Sends raw bytes on a fresh connection and reads one response (20 s for each). `None`: the
/// connection closed (or was reset) without a complete response.
pub async fn raw_exchange(port: u16, req: &[u8]) -> Option<RawResp> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // The server may stop reading an oversized head and close: a write error is an outcome.
    let _ = tokio::time::timeout(Duration::from_secs(20), s.write_all(req)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut buf = Vec::new();
    loop {
        if let Some(r) = parse_response(&buf, false) {
            return Some(r);
        }
        let mut tmp = [0u8; 16384];
        match tokio::time::timeout_at(deadline, s.read(&mut tmp)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&tmp[..n]),
            _ => return parse_response(&buf, true),
        }
    }
}

/// Sends raw bytes and returns the status line's code and the whole response text, read up to
/// the close (10 s at most). The request should carry `Connection: close`.
pub async fn raw_request(port: u16, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}
