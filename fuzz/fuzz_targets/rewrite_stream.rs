//! Base-URL rewriting (`src/rewrite.rs`): `Rewriter`, `StreamRewrite`, `rewrite_all`, with the
//! patterns the gateway really builds (`BaseUrl::parse(upstream.url).spellings()`).
//!
//! Input: byte 0 picks the upstream base, byte 1 the public base (a fixed, realistic list, or
//! for 0xff a line taken from the input), byte 2 the number n of chunk lengths that follow;
//! the rest is the body, cut into chunks of those lengths in turn (0 = an empty chunk).
//!
//! Invariants: no panic; streaming over any chunking gives exactly `rewrite_all`'s output (the
//! input when it returns `None`); both equal a naive leftmost-longest rewrite; and, when no
//! replacement can combine with neighbouring bytes into a pattern, no spelling of the
//! upstream base (in any form) is left in the output.
//!
//! Regressions: fuzz/regressions/rewrite_stream/ (a spelling that is a proper prefix of
//! another, `https://h` of `https://h:443`, matched at a chunk's end; fixed in ca2be89).
#![no_main]

use bytes::Bytes;
use fhir_gateway::rewrite::{Rewriter, StreamRewrite};
use fhir_gateway::upstream::BaseUrl;
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use std::collections::HashMap;

const UPSTREAMS: [&str; 6] = [
    "http://127.0.0.1:8090/fhir",
    "https://fhir.internal",
    "http://fhir.internal:80/fhir",
    "http://[::1]:8090/fhir",
    "https://fhir.internal/r4/",
    "http://10.0.0.5:8080",
];
const PUBLICS: [&str; 5] = [
    "https://gw.example/fhir",
    "https://fhir.example.org/api/fhir",
    "http://localhost:8080",
    "https://fhir.internal/gw",
    "http://127.0.0.1:8090/fhir/public",
];

/// The four forms `rewrite.rs` matches, mirrored: plain, JSON-escaped, percent upper/lower.
fn forms(s: &str) -> [String; 4] {
    [
        s.to_string(),
        s.replace('/', "\\/"),
        s.replace(':', "%3A").replace('/', "%2F"),
        s.replace(':', "%3a").replace('/', "%2f"),
    ]
}

/// Position by position, longest pattern first.
fn naive(pats: &[(Vec<u8>, Vec<u8>)], data: &[u8]) -> Vec<u8> {
    let mut by_len: Vec<&(Vec<u8>, Vec<u8>)> = pats.iter().collect();
    by_len.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    let mut out = Vec::with_capacity(data.len());
    let mut pos = 0;
    'scan: while pos < data.len() {
        for (p, r) in &by_len {
            if data[pos..].starts_with(p) {
                out.extend_from_slice(r);
                pos += p.len();
                continue 'scan;
            }
        }
        out.push(data[pos]);
        pos += 1;
    }
    out
}

/// Whether `p` and `r` agree on some overlap (p placed at any offset that overlaps r): only
/// then can a replacement, alone or with its neighbours, spell a pattern again.
fn can_meet(p: &[u8], r: &[u8]) -> bool {
    let (pl, rl) = (p.len() as isize, r.len() as isize);
    (1 - pl..rl).any(|d| {
        (0..pl).all(|i| {
            let j = d + i;
            j < 0 || j >= rl || p[i as usize] == r[j as usize]
        })
    })
}

/// Whether no replacement can meet any pattern; remembered per (upstream, public) pair, as
/// the check costs more than a rewrite.
fn clean(upstream: &str, public: &str, pats: &[(Vec<u8>, Vec<u8>)]) -> bool {
    thread_local! {
        static SEEN: RefCell<HashMap<(String, String), bool>> = RefCell::new(HashMap::new());
    }
    let key = (upstream.to_string(), public.to_string());
    if let Some(c) = SEEN.with(|m| m.borrow().get(&key).copied()) {
        return c;
    }
    let c = pats
        .iter()
        .all(|(p, _)| pats.iter().all(|(_, r)| !can_meet(p, r)));
    SEEN.with(|m| {
        let mut m = m.borrow_mut();
        if m.len() > 10_000 {
            m.clear(); // fuzzed bases: keep memory bounded
        }
        m.insert(key, c);
    });
    c
}

fn take_line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (ub, pb, n) = (data[0], data[1], data[2] as usize % 16);
    let mut rest = &data[3..];
    let upstream = if ub == 0xff {
        let (l, r) = take_line(rest);
        rest = r;
        String::from_utf8_lossy(l).into_owned()
    } else {
        UPSTREAMS[ub as usize % UPSTREAMS.len()].to_string()
    };
    let public = if pb == 0xff {
        let (l, r) = take_line(rest);
        rest = r;
        String::from_utf8_lossy(l).into_owned()
    } else {
        PUBLICS[pb as usize % PUBLICS.len()].to_string()
    };
    let Ok(base) = BaseUrl::parse(&upstream) else {
        return;
    };
    let spellings = base.spellings();
    let rw = Rewriter::new(&spellings);
    let to = rw.replacements(&public);

    let lens: Vec<usize> = rest.iter().take(n).map(|&b| b as usize).collect();
    let body = &rest[lens.len()..];

    // What the rewriter matches, with what it writes instead (first form wins on duplicates).
    let pub_forms = forms(&public);
    let mut pats: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for s in &spellings {
        for (f, r) in forms(s).iter().zip(&pub_forms) {
            if !pats.iter().any(|(p, _)| p == f.as_bytes()) {
                pats.push((f.clone().into_bytes(), r.clone().into_bytes()));
            }
        }
    }
    let all = rw.rewrite_all(body, &to);
    let whole = all.clone().unwrap_or_else(|| body.to_vec());
    if all.is_some() {
        assert!(!pats.is_empty());
    }
    assert_eq!(whole, naive(&pats, body), "rewrite_all vs naive");

    // Streamed over the chunking the input asks for.
    let mut chunks: Vec<&[u8]> = Vec::new();
    let mut left = body;
    let mut i = 0;
    while !left.is_empty() && !lens.is_empty() && i < 4096 {
        let l = lens[i % lens.len()].min(left.len());
        chunks.push(&left[..l]);
        left = &left[l..];
        i += 1;
        if i % lens.len() == 0 && lens.iter().all(|&l| l == 0) {
            break;
        }
    }
    chunks.push(left);
    let mut s = StreamRewrite::default();
    let mut streamed = Vec::with_capacity(body.len());
    for c in &chunks {
        streamed.extend_from_slice(&s.push(&rw, &to, Bytes::copy_from_slice(c)));
    }
    streamed.extend_from_slice(&s.finish(&rw, &to));
    assert!(s.finish(&rw, &to).is_empty(), "finish twice");
    assert_eq!(
        String::from_utf8_lossy(&streamed),
        String::from_utf8_lossy(&whole),
        "streaming over {:?} differs from rewrite_all (upstream {upstream:?}, public {public:?})",
        chunks.iter().map(|c| c.len()).collect::<Vec<_>>()
    );

    // The upstream base is gone, unless the public base can spell it again with its
    // neighbours (a public base containing or overlapping the upstream's).
    let clean = clean(&upstream, &public, &pats);
    if clean {
        for (p, _) in &pats {
            assert!(
                !whole.windows(p.len()).any(|w| w == p.as_slice()),
                "{:?} left in the output",
                String::from_utf8_lossy(p)
            );
        }
    }
});
