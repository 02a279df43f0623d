//! SMART scopes (`modules/src/smart.rs`): `parse_scope`, `ScopeSet::from_strings`,
//! `granting_contexts`. The input is a token's `scope` claim: scopes separated by spaces.
//!
//! Invariants: no panic; a scope grants nothing on a type it does not name unless its type is
//! a wildcard (and a v2 scope whose query is unsupported grants nothing at all); a parsed scope written back in
//! canonical form (`ctx/Type.cruds`, and the Entra dotted form) parses to the same scope;
//! `granting_contexts` is exactly the set of contexts of the granting scopes, and is
//! `[Patient]` exactly when only patient/ scopes grant (what `auth/policy.rs` relies on).
#![no_main]

use fhir_gateway_modules::smart::{
    parse_scope, ClinicalScope, Perm, ScopeContext, ScopeQuery, ScopeSet,
};
use libfuzzer_sys::fuzz_target;

const PERMS: [Perm; 5] = [
    Perm::Create,
    Perm::Read,
    Perm::Update,
    Perm::Delete,
    Perm::Search,
];

fn ctx_name(c: ScopeContext) -> &'static str {
    match c {
        ScopeContext::Patient => "patient",
        ScopeContext::User => "user",
        ScopeContext::System => "system",
    }
}

/// The v2 letters of a scope's permissions, in the mandated order.
fn letters(s: &ClinicalScope) -> String {
    let p = s.perms;
    [
        (p.create, 'c'),
        (p.read, 'r'),
        (p.update, 'u'),
        (p.delete, 'd'),
        (p.search, 's'),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, c)| *c)
    .collect()
}

/// A spec-shaped type name: `[A-Z][A-Za-z0-9]*`, at most 64 bytes.
fn type_name_ok(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_uppercase()
        && b.iter().all(|c| c.is_ascii_alphanumeric())
}

fn check_one(raw: &str) {
    let Some(sc) = parse_scope(raw) else { return };
    assert_eq!(parse_scope(raw).as_ref(), Some(&sc), "not deterministic");

    // What the text says must be what was parsed.
    let (base, query) = match raw.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (raw, None),
    };
    assert_eq!(
        sc.restricted,
        query.is_some_and(|q| !q.is_empty()),
        "{raw:?}: restricted flag"
    );
    let ctx = ctx_name(sc.context);
    assert!(
        base.starts_with(&format!("{ctx}/")) || base.starts_with(&format!("{ctx}.")),
        "{raw:?} parsed as context {ctx}"
    );
    match &sc.resource_type {
        Some(t) => {
            assert!(type_name_ok(t), "{raw:?}: type {t:?}");
            assert!(
                base.contains(t.as_str()),
                "{raw:?}: type {t:?} not in the text"
            );
        }
        None => assert!(
            base.contains("/*.")
                || base.contains(".*.")
                || base.contains("/all.")
                || base.contains(".all."),
            "{raw:?}: wildcard without * or all"
        ),
    }
    assert!(
        !letters(&sc).is_empty(),
        "{raw:?}: a scope with no permission"
    );

    // Grants: only the named type (or every type for a wildcard), never with an unsupported
    // query.
    let named = sc.resource_type.clone().unwrap_or_default();
    let mut probes: Vec<String> = [
        "Patient",
        "Observation",
        "Encounter",
        "Practitioner",
        "Consent",
        "X",
        "",
        "*",
        "all",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if !named.is_empty() {
        probes.push(named.clone());
        probes.push(format!("{named}x"));
        probes.push(named.to_ascii_lowercase());
        probes.push(named[..named.len() - 1].to_string());
    }
    for t in &probes {
        for p in PERMS {
            if sc.grants(t, p) {
                assert!(
                    sc.query.as_ref().is_none_or(ScopeQuery::is_supported),
                    "{raw:?}: a scope with an unsupported query grants {p:?} on {t}"
                );
                assert!(sc.perms.allows(p));
                if let Some(n) = &sc.resource_type {
                    assert_eq!(n, t, "{raw:?} grants {p:?} on a type it does not name");
                }
            } else if sc.query.as_ref().is_none_or(ScopeQuery::is_supported) && sc.perms.allows(p) {
                // Not granting must mean: a type other than the one named.
                assert!(
                    sc.resource_type.as_deref().is_some_and(|n| n != t),
                    "{raw:?} refuses {p:?} on {t}"
                );
            }
        }
    }

    // Canonical forms round-trip (smart.rs has no Display: this is the harness's rendering).
    let ty = sc.resource_type.as_deref().unwrap_or("*");
    let q = query.map(|q| format!("?{q}")).unwrap_or_default();
    for text in [
        format!("{ctx}/{ty}.{}{q}", letters(&sc)),
        format!("{ctx}.{ty}.{}{q}", letters(&sc)),
    ] {
        assert_eq!(
            parse_scope(&text),
            Some(sc.clone()),
            "canonical {text:?} of {raw:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    check_one(&text);
    let raw: Vec<&str> = text.split(' ').collect();
    let mut distinct = raw.clone();
    distinct.sort_unstable();
    distinct.dedup();
    for s in &distinct {
        check_one(s);
    }

    let set = ScopeSet::from_strings(&raw);
    let parsed: Vec<ClinicalScope> = raw.iter().filter_map(|s| parse_scope(s)).collect();
    assert_eq!(set.scopes, parsed);
    assert_eq!(set.is_empty(), parsed.is_empty());

    let mut types: Vec<String> = vec!["Patient".into(), "Observation".into(), "Zz".into()];
    types.extend(parsed.iter().filter_map(|s| s.resource_type.clone()));
    types.sort_unstable();
    types.dedup();
    for t in &types {
        for p in PERMS {
            let got = set.granting_contexts(t, p);
            let want: Vec<ScopeContext> = parsed
                .iter()
                .filter(|s| s.grants(t, p))
                .map(|s| s.context)
                .collect();
            for c in &got {
                assert!(want.contains(c), "{t} {p:?}: {c:?} granted by no scope");
            }
            for c in &want {
                assert!(got.contains(c), "{t} {p:?}: {c:?} missing");
            }
            let only_patient = !want.is_empty() && want.iter().all(|c| *c == ScopeContext::Patient);
            assert_eq!(
                got == [ScopeContext::Patient],
                only_patient,
                "{t} {p:?}: {got:?}"
            );
        }
    }
    for p in PERMS {
        let got = set.granting_contexts_all_types(p);
        for c in &got {
            assert!(
                parsed.iter().any(|s| s.context == *c
                    && s.resource_type.is_none()
                    && !s.restricted
                    && s.perms.allows(p)),
                "all types {p:?}: {c:?}"
            );
        }
    }
});
