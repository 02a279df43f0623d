//! Typed references (`modules/src/reference.rs`): `parse(s, bases)` and `Resolver`.
//!
//! Input: lines. Line 0 is a reference string, lines 1 and 2 extra bases, the rest a JSON body
//! the `Resolver` learns `fullUrl`s from. Every string is also tried against fixed, realistic
//! bases, and line 0 is used as an id inside well-formed references.
//!
//! Invariants: no panic; `parse` is deterministic; a `Local` reference has a `valid_type`
//! and a valid id, and the text is exactly `[base/]Type/id[/_history/v]` for one of the bases
//! (so `Patient/12` can never come out of `Patient/123`, nor a foreign host out of a base
//! that is only its prefix); `Patient/<id>` with a valid id parses to that id exactly;
//! `Contained`/`Urn` keep the text; `Other(Some(t))` shows a valid type; the `Resolver`
//! changes only what `parse` calls a `Urn`, and only into a reference it learned.
#![no_main]

use fhir_gateway_modules::identity::valid_id;
use fhir_gateway_modules::reference::{parse, valid_type, Ref, Resolver, Target};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const FIXED: [&str; 3] = [
    "https://gw.example/fhir",
    "http://10.0.0.5:8080/fhir/",
    "https://fhir.internal",
];

/// `Type/id` or `Type/id/_history/v` with a valid version.
fn is_ref_text(rest: &str, r: &Ref) -> bool {
    let plain = r.to_string();
    rest == plain
        || rest
            .strip_prefix(&plain)
            .and_then(|x| x.strip_prefix("/_history/"))
            .is_some_and(valid_id)
}

fn check(s: &str, bases: &[String]) -> Target {
    let t = parse(s, bases);
    assert_eq!(parse(s, bases), t, "not deterministic: {s:?}");
    let trimmed = s.trim();
    match &t {
        Target::Local(r) => {
            assert!(valid_type(&r.rtype), "{s:?}: type {:?}", r.rtype);
            assert!(valid_id(&r.id), "{s:?}: id {:?}", r.id);
            let relative = is_ref_text(trimmed, r);
            let absolute = bases.iter().any(|b| {
                let b = b.trim_end_matches('/');
                !b.is_empty()
                    && trimmed
                        .strip_prefix(b)
                        .and_then(|x| x.strip_prefix('/'))
                        .is_some_and(|rest| is_ref_text(rest, r))
            });
            assert!(
                (relative && !trimmed.contains("://")) || absolute,
                "{s:?} parsed as {r} with bases {bases:?}"
            );
        }
        Target::Contained(c) => assert_eq!(format!("#{c}"), trimmed),
        Target::Urn(u) => {
            assert_eq!(u, trimmed);
            assert!(u.starts_with("urn:uuid:") || u.starts_with("urn:oid:"));
        }
        Target::Other(Some(ty)) => {
            assert!(valid_type(ty), "{s:?}: shown type {ty:?}");
            assert!(trimmed.contains(ty.as_str()));
        }
        Target::Other(None) => {}
    }
    t
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(4, '\n');
    let s = lines.next().unwrap_or("");
    let mut bases: Vec<String> = FIXED.iter().map(|b| b.to_string()).collect();
    for b in lines.by_ref().take(2) {
        bases.push(b.to_string());
    }
    let body = lines.next().unwrap_or("");

    let t = check(s, &bases);
    check(s, &FIXED.map(String::from));
    check(s, &[] as &[String]);

    // The input as an id in well-formed references: exact ids only, nothing longer or shorter.
    let id = s;
    let wanted = valid_id(id).then(|| Target::Local(Ref::new("Patient", id)));
    for form in [
        format!("Patient/{id}"),
        format!("Patient/{id}/_history/1"),
        format!("https://gw.example/fhir/Patient/{id}"),
        format!("http://10.0.0.5:8080/fhir/Patient/{id}/_history/3"),
        format!("https://fhir.internal/Patient/{id}"),
    ] {
        let got = check(&form, &bases);
        match &wanted {
            Some(w) => assert_eq!(&got, w, "{form:?}"),
            // An invalid id never becomes a local reference (it may show its type).
            None if !id.contains('/') => assert!(
                !matches!(got, Target::Local(_)) || id.trim() != id,
                "{form:?}: {got:?}"
            ),
            None => {}
        }
    }
    // A base that is only a prefix of the host or path is not ours.
    for form in [
        format!("https://gw.example/fhirx/Patient/{id}"),
        format!("https://gw.example.evil/fhir/Patient/{id}"),
        format!("https://fhir.internal.evil/Patient/{id}"),
    ] {
        assert!(
            !matches!(check(&form, &FIXED.map(String::from)), Target::Local(_)),
            "{form:?}"
        );
    }

    // Resolver: learn from arbitrary JSON, then parse the reference and every fullUrl.
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        let mut r = Resolver::new(&FIXED);
        r.bases.extend(bases[FIXED.len()..].iter().cloned());
        r.learn(&v);
        for (k, v) in &r.full_urls {
            assert!(k.starts_with("urn:"), "learned {k:?}");
            assert!(valid_type(&v.rtype) && valid_id(&v.id), "learned {v:?}");
        }
        let mut probes = vec![s.to_string()];
        probes.extend(r.full_urls.keys().cloned());
        for p in &probes {
            let plain = check(p, &r.bases);
            let resolved = r.parse(p);
            assert_eq!(r.parse(p), resolved);
            match (&plain, &resolved) {
                (Target::Urn(u), Target::Local(l)) => assert_eq!(r.full_urls.get(u), Some(l)),
                (a, b) => assert_eq!(a, b, "{p:?}"),
            }
        }
        if let Target::Urn(u) = &t {
            assert_eq!(
                r.parse(s),
                r.full_urls
                    .get(u)
                    .map_or(Target::Urn(u.clone()), |l| Target::Local(l.clone()))
            );
        }
    }
});
