//! Replaces the FHIR server's base URL with the gateway's public base URL, in headers and in
//! bodies, streaming: a chunk is passed on as soon as it is scanned, holding back only the few
//! bytes at its end that could begin a URL split across chunks.
//!
//! Each base spelling is matched in its plain form, its JSON-escaped form (`http:\/\/...`)
//! and its percent-encoded forms (a base inside a query parameter), and replaced by the public
//! base in the same form.

use bytes::Bytes;
use memchr::memmem::Finder;

/// The fixed half: what to look for. Built once from the upstream base URL.
pub struct Rewriter {
    finders: Vec<Finder<'static>>,
    /// For each finder, how to encode the public base the same way.
    forms: Vec<Form>,
    max_len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    Plain,
    JsonEscaped,
    PercentUpper,
    PercentLower,
}

impl Form {
    fn encode(self, s: &str) -> Vec<u8> {
        match self {
            Form::Plain => s.as_bytes().to_vec(),
            Form::JsonEscaped => s.replace('/', "\\/").into_bytes(),
            Form::PercentUpper => s.replace(':', "%3A").replace('/', "%2F").into_bytes(),
            Form::PercentLower => s.replace(':', "%3a").replace('/', "%2f").into_bytes(),
        }
    }
}

/// The per-request half: what to write instead (the public base in every form). Shared, so
/// the body filter can hold it per chunk without copying.
#[derive(Clone, Debug)]
pub struct Replacements(std::sync::Arc<[Vec<u8>]>);

impl Rewriter {
    /// `spellings`: every way the server may write its base (see `BaseUrl::spellings`).
    pub fn new(spellings: &[String]) -> Rewriter {
        let mut finders = Vec::new();
        let mut forms = Vec::new();
        for s in spellings {
            for form in [
                Form::Plain,
                Form::JsonEscaped,
                Form::PercentUpper,
                Form::PercentLower,
            ] {
                let pat = form.encode(s);
                if finders
                    .iter()
                    .any(|f: &Finder<'static>| f.needle() == pat.as_slice())
                {
                    continue; // a base without '/' or ':' looks the same in several forms
                }
                finders.push(Finder::new(&pat).into_owned());
                forms.push(form);
            }
        }
        let max_len = finders.iter().map(|f| f.needle().len()).max().unwrap_or(1);
        Rewriter {
            finders,
            forms,
            max_len,
        }
    }

    pub fn replacements(&self, public_base: &str) -> Replacements {
        Replacements(
            self.forms
                .iter()
                .map(|f| f.encode(public_base))
                .collect::<Vec<_>>()
                .into(),
        )
    }

    /// Every match in `data`, left to right, without overlaps.
    fn matches<'a>(&'a self, data: &'a [u8]) -> Matches<'a> {
        Matches {
            rw: self,
            data,
            pos: 0,
            next: self
                .finders
                .iter()
                .map(|f| f.find(data).unwrap_or(NONE))
                .collect(),
        }
    }

    /// Whether `tail` (the rest of the data from a match) is a proper prefix of a longer
    /// pattern, so more data could turn the match into a longer one.
    fn could_grow(&self, tail: &[u8]) -> bool {
        self.finders
            .iter()
            .any(|f| f.needle().len() > tail.len() && f.needle().starts_with(tail))
    }

    /// Index from which `data` must be held back: the earliest position in its last
    /// `max_len - 1` bytes where the rest of `data` is a proper prefix of some pattern.
    fn hold_from(&self, data: &[u8], not_before: usize) -> usize {
        let start = data.len().saturating_sub(self.max_len - 1).max(not_before);
        for i in start..data.len() {
            let tail = &data[i..];
            if self
                .finders
                .iter()
                .any(|f| f.needle().len() > tail.len() && f.needle().starts_with(tail))
            {
                return i;
            }
        }
        data.len()
    }

    /// Rewrites a complete value (a header, a small body). `None` when nothing matched.
    pub fn rewrite_all(&self, data: &[u8], to: &Replacements) -> Option<Vec<u8>> {
        // Most values (headers) hold no base: answer that without allocating.
        if !self.finders.iter().any(|f| f.find(data).is_some()) {
            return None;
        }
        let mut out: Option<Vec<u8>> = None;
        let mut pos = 0;
        for (m, i) in self.matches(data) {
            let o = out.get_or_insert_with(|| Vec::with_capacity(data.len() + 64));
            o.extend_from_slice(&data[pos..m]);
            o.extend_from_slice(&to.0[i]);
            pos = m + self.finders[i].needle().len();
        }
        if let Some(o) = out.as_mut() {
            o.extend_from_slice(&data[pos..]);
        }
        out
    }
}

const NONE: usize = usize::MAX;

/// Iterator over matches. Each pattern's next position is remembered and searched again only
/// when an earlier, overlapping match has passed it: the body is scanned once per pattern,
/// not once per pattern per match.
struct Matches<'a> {
    rw: &'a Rewriter,
    data: &'a [u8],
    pos: usize,
    /// Per pattern: its next match at or after some earlier `pos`, or `NONE`.
    next: Next,
}

/// `Matches::next`: inline for the usual handful of patterns (no allocation per rewritten
/// value or chunk), on the heap past that.
enum Next {
    Inline([usize; INLINE], usize),
    Heap(Vec<usize>),
}

const INLINE: usize = 16;

impl std::ops::Deref for Next {
    type Target = [usize];
    fn deref(&self) -> &[usize] {
        match self {
            Next::Inline(a, n) => &a[..*n],
            Next::Heap(v) => v,
        }
    }
}

impl std::ops::DerefMut for Next {
    fn deref_mut(&mut self) -> &mut [usize] {
        match self {
            Next::Inline(a, n) => &mut a[..*n],
            Next::Heap(v) => v,
        }
    }
}

impl FromIterator<usize> for Next {
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Next {
        let mut a = [NONE; INLINE];
        let mut n = 0;
        let mut it = iter.into_iter();
        for x in it.by_ref() {
            if n == INLINE {
                let mut v = a.to_vec();
                v.push(x);
                v.extend(it);
                return Next::Heap(v);
            }
            a[n] = x;
            n += 1;
        }
        Next::Inline(a, n)
    }
}

impl Iterator for Matches<'_> {
    /// (start, pattern index): the earliest match, the longest pattern on a tie.
    type Item = (usize, usize);

    fn next(&mut self) -> Option<(usize, usize)> {
        let finders = &self.rw.finders;
        let mut best: Option<(usize, usize)> = None;
        for (i, f) in finders.iter().enumerate() {
            if self.next[i] != NONE && self.next[i] < self.pos {
                self.next[i] = f
                    .find(&self.data[self.pos..])
                    .map_or(NONE, |p| p + self.pos);
            }
            let p = self.next[i];
            if p == NONE {
                continue;
            }
            let better = match best {
                None => true,
                Some((bp, bi)) => {
                    p < bp || (p == bp && f.needle().len() > finders[bi].needle().len())
                }
            };
            if better {
                best = Some((p, i));
            }
        }
        let (m, i) = best?;
        self.pos = m + finders[i].needle().len();
        Some((m, i))
    }
}

/// State of one streamed body.
#[derive(Default)]
pub struct StreamRewrite {
    carry: Vec<u8>,
}

impl StreamRewrite {
    /// Rewrites one chunk; returns what can be sent now (possibly empty).
    pub fn push(&mut self, rw: &Rewriter, to: &Replacements, chunk: Bytes) -> Bytes {
        if self.carry.is_empty() {
            // Fast path: nothing held back, so the chunk itself may go out untouched.
            let mut found = rw.matches(&chunk).peekable();
            if found.peek().is_none() {
                let hold = rw.hold_from(&chunk, 0);
                if hold < chunk.len() {
                    self.carry.extend_from_slice(&chunk[hold..]);
                }
                return chunk.slice(..hold);
            }
            return self.rewrite(rw, to, &chunk, found);
        }
        let mut data = std::mem::take(&mut self.carry);
        data.extend_from_slice(&chunk);
        self.rewrite(rw, to, &data, rw.matches(&data))
    }

    fn rewrite(
        &mut self,
        rw: &Rewriter,
        to: &Replacements,
        data: &[u8],
        found: impl Iterator<Item = (usize, usize)>,
    ) -> Bytes {
        let mut out = Vec::with_capacity(data.len() + 64);
        let mut pos = 0;
        let mut held = None;
        for (m, i) in found {
            if rw.could_grow(&data[m..]) {
                // A spelling that is a prefix of a longer one (`https://h` of `https://h:443`)
                // matched at the very end: the next chunk decides which one it is.
                held = Some(m);
                break;
            }
            out.extend_from_slice(&data[pos..m]);
            out.extend_from_slice(&to.0[i]);
            pos = m + rw.finders[i].needle().len();
        }
        let hold = held.unwrap_or_else(|| rw.hold_from(data, pos));
        out.extend_from_slice(&data[pos..hold]);
        self.carry.clear();
        self.carry.extend_from_slice(&data[hold..]);
        Bytes::from(out)
    }

    /// End of body: what was held back is final now (a held prefix is text, a held short
    /// spelling is a match).
    pub fn finish(&mut self, rw: &Rewriter, to: &Replacements) -> Bytes {
        let carry = std::mem::take(&mut self.carry);
        match rw.rewrite_all(&carry, to) {
            Some(v) => Bytes::from(v),
            None => Bytes::from(carry),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP: &str = "http://10.0.0.5:8090/fhir";
    const PUB: &str = "https://fhir.example.org/api/fhir";

    fn rw() -> (Rewriter, Replacements) {
        let r = Rewriter::new(&[UP.to_string()]);
        let to = r.replacements(PUB);
        (r, to)
    }

    fn stream(chunks: &[&[u8]]) -> Vec<u8> {
        let (r, to) = rw();
        let mut s = StreamRewrite::default();
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&s.push(&r, &to, Bytes::copy_from_slice(c)));
        }
        out.extend_from_slice(&s.finish(&r, &to));
        out
    }

    #[test]
    fn rewrites_every_form() {
        let (r, to) = rw();
        let body = format!(
            r#"{{"a":"{UP}/Patient/1","b":"http:\/\/10.0.0.5:8090\/fhir\/X","c":"?u=http%3A%2F%2F10.0.0.5%3A8090%2Ffhir%2FY","d":"http%3a%2f%2f10.0.0.5%3a8090%2ffhir"}}"#
        );
        let out = String::from_utf8(r.rewrite_all(body.as_bytes(), &to).unwrap()).unwrap();
        assert!(!out.contains("10.0.0.5"), "{out}");
        assert!(out.contains(&format!("{PUB}/Patient/1")));
        assert!(out.contains(r"https:\/\/fhir.example.org\/api\/fhir\/X"));
        assert!(out.contains("https%3A%2F%2Ffhir.example.org%2Fapi%2Ffhir%2FY"));
        assert!(out.contains("https%3a%2f%2ffhir.example.org%2fapi%2ffhir"));
        assert!(r.rewrite_all(b"nothing here", &to).is_none());
    }

    /// Position by position, longest pattern first: slow and obviously right.
    fn naive(r: &Rewriter, to: &Replacements, data: &[u8]) -> Vec<u8> {
        let mut by_len: Vec<usize> = (0..r.finders.len()).collect();
        by_len.sort_by_key(|&i| std::cmp::Reverse(r.finders[i].needle().len()));
        let mut out = Vec::new();
        let mut pos = 0;
        'scan: while pos < data.len() {
            for &i in &by_len {
                if data[pos..].starts_with(r.finders[i].needle()) {
                    out.extend_from_slice(&to.0[i]);
                    pos += r.finders[i].needle().len();
                    continue 'scan;
                }
            }
            out.push(data[pos]);
            pos += 1;
        }
        out
    }

    #[test]
    fn many_mixed_matches_equal_the_naive_rewrite() {
        let (r, to) = rw();
        let forms = [
            UP.to_string(),
            UP.replace('/', "\\/"),
            UP.replace(':', "%3A").replace('/', "%2F"),
            UP.replace(':', "%3a").replace('/', "%2f"),
            "http://10.0.0.5:80".to_string(), // a prefix that never completes
        ];
        // A deterministic mix: forms interleaved with filler of varying length.
        let mut body = Vec::new();
        let mut x: u32 = 7;
        for _ in 0..20_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            body.extend_from_slice(forms[(x >> 8) as usize % forms.len()].as_bytes());
            body.extend(std::iter::repeat_n(
                b'a' + (x >> 20) as u8 % 26,
                (x >> 12) as usize % 40,
            ));
        }
        let want = naive(&r, &to, &body);
        assert_eq!(r.rewrite_all(&body, &to).unwrap(), want);
        for size in [1000, 4096, 65_536] {
            let chunks: Vec<&[u8]> = body.chunks(size).collect();
            assert_eq!(stream(&chunks), want, "chunks of {size}");
        }
        assert!(!String::from_utf8_lossy(&want).contains("10.0.0.5:8090"));
    }

    #[test]
    fn url_split_at_every_byte_boundary() {
        let body = format!("xx {UP}/Patient/1 yy {UP}/Observation?_count=1 zz");
        let expected = body.replace(UP, PUB);
        let b = body.as_bytes();
        for cut in 0..=b.len() {
            assert_eq!(
                String::from_utf8(stream(&[&b[..cut], &b[cut..]])).unwrap(),
                expected,
                "cut at {cut}"
            );
        }
        // One byte at a time.
        let singles: Vec<&[u8]> = b.chunks(1).collect();
        assert_eq!(String::from_utf8(stream(&singles)).unwrap(), expected);
    }

    #[test]
    fn partial_prefix_at_end_is_flushed_verbatim() {
        assert_eq!(
            stream(&[b"abc http://10.0.0.5:80"]),
            b"abc http://10.0.0.5:80"
        );
        assert_eq!(stream(&[b"abc http", b"://other/"]), b"abc http://other/");
    }

    #[test]
    fn untouched_chunks_are_not_copied() {
        let (r, to) = rw();
        let mut s = StreamRewrite::default();
        let chunk = Bytes::from_static(b"{\"resourceType\":\"Patient\"}");
        let out = s.push(&r, &to, chunk.clone());
        assert_eq!(out.as_ptr(), chunk.as_ptr());
        assert_eq!(out.len(), chunk.len());
    }

    #[test]
    fn default_port_spellings() {
        let r = Rewriter::new(&[
            "https://up.example".to_string(),
            "https://up.example:443".to_string(),
        ]);
        let to = r.replacements("https://gw.example/fhir");
        let out = r
            .rewrite_all(
                b"https://up.example:443/Patient/1 https://up.example/Patient/2",
                &to,
            )
            .unwrap();
        assert_eq!(
            out,
            b"https://gw.example/fhir/Patient/1 https://gw.example/fhir/Patient/2"
        );
        // Streamed, cut anywhere (found by the rewrite_stream fuzz target: a cut right after
        // the short spelling gave `https://gw.example/fhir:443/...`), JSON-escaped too.
        for body in [
            &b"{\"url\":\"https://up.example:443/Patient/1\"} https://up.example"[..],
            b"https:\\/\\/up.example:443\\/Patient https:\\/\\/up.example",
        ] {
            let want = r.rewrite_all(body, &to).unwrap();
            for cut in 0..=body.len() {
                let mut s = StreamRewrite::default();
                let mut got = s
                    .push(&r, &to, Bytes::copy_from_slice(&body[..cut]))
                    .to_vec();
                got.extend_from_slice(&s.push(&r, &to, Bytes::copy_from_slice(&body[cut..])));
                got.extend_from_slice(&s.finish(&r, &to));
                assert_eq!(got, want, "cut at {cut}");
            }
        }
    }

    #[test]
    fn replacement_containing_the_pattern_terminates() {
        let r = Rewriter::new(&["http://a".to_string()]);
        let to = r.replacements("http://a/b");
        assert_eq!(r.rewrite_all(b"http://a/x", &to).unwrap(), b"http://a/b/x");
    }
}
