//! Typed FHIR references. Filters compare parsed `(type, id)` pairs, never substrings:
//! `Patient/12` is not `Patient/123`, and `https://gw/fhir/Patient/123/_history/2` is
//! `Patient/123` when the base is ours or the server's.

use crate::identity::valid_id;
use serde_json::Value;
use std::collections::HashMap;

/// A reference to a resource on our FHIR server.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ref {
    pub rtype: String,
    pub id: String,
}

impl Ref {
    pub fn new(rtype: &str, id: &str) -> Ref {
        Ref {
            rtype: rtype.to_string(),
            id: id.to_string(),
        }
    }

    pub fn is(&self, rtype: &str) -> bool {
        self.rtype == rtype
    }
}

impl std::fmt::Display for Ref {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.rtype, self.id)
    }
}

/// What a reference string points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A resource on our server (relative, or absolute with a known base; version dropped).
    Local(Ref),
    /// `urn:uuid:` / `urn:oid:` (resolved against a Bundle's `fullUrl`s).
    Urn(String),
    /// `#id`: a contained resource.
    Contained(String),
    /// Another server, a conditional reference, or something unparsable. The type is known
    /// when the text shows it.
    Other(Option<String>),
}

/// A FHIR resource type name: `[A-Z][A-Za-z]*`.
pub fn valid_type(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty() && b[0].is_ascii_uppercase() && b.iter().all(|c| c.is_ascii_alphabetic())
}

/// `Type/id` or `Type/id/_history/v` (nothing else).
fn relative(s: &str) -> Option<Ref> {
    let mut parts = s.split('/');
    let t = parts.next()?;
    let id = parts.next()?;
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => {}
        (Some("_history"), Some(v), None) if valid_id(v) => {}
        _ => return None,
    }
    (valid_type(t) && valid_id(id)).then(|| Ref::new(t, id))
}

/// The type a reference text shows, for references we cannot resolve (`https://other/fhir/
/// Patient/1`, `Patient?identifier=x`).
fn shown_type(s: &str) -> Option<String> {
    let path = s.split(['?', '#']).next().unwrap_or("");
    let segs: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    // Conditional reference: `Patient?identifier=...`.
    if segs.len() == 1 && s.contains('?') && valid_type(segs[0]) {
        return Some(segs[0].to_string());
    }
    // `.../Type/id` or `.../Type/id/_history/v`.
    let n = segs.len();
    let idx = if n >= 4 && segs[n - 2] == "_history" {
        n - 4
    } else {
        n.checked_sub(2)?
    };
    valid_type(segs[idx]).then(|| segs[idx].to_string())
}

/// Parses a reference string. `bases` are the absolute bases that mean "our server" (the
/// public base and the upstream base), with or without a trailing slash.
pub fn parse<B: AsRef<str>>(s: &str, bases: &[B]) -> Target {
    let s = s.trim();
    if let Some(c) = s.strip_prefix('#') {
        return Target::Contained(c.to_string());
    }
    if s.starts_with("urn:uuid:") || s.starts_with("urn:oid:") {
        return Target::Urn(s.to_string());
    }
    if s.contains("://") {
        for b in bases {
            let b = b.as_ref().trim_end_matches('/');
            if b.is_empty() {
                continue;
            }
            if let Some(rest) = s.strip_prefix(b).and_then(|r| r.strip_prefix('/')) {
                if let Some(r) = relative(rest) {
                    return Target::Local(r);
                }
            }
        }
        return Target::Other(shown_type(s));
    }
    match relative(s) {
        Some(r) => Target::Local(r),
        None => Target::Other(shown_type(s)),
    }
}

/// Everything needed to resolve references inside one response: our bases, the `fullUrl`s of
/// the Bundle(s) it holds.
#[derive(Clone, Debug, Default)]
pub struct Resolver {
    pub bases: Vec<String>,
    /// `urn:uuid:...` (and absolute fullUrls) → the entry's resource.
    pub full_urls: HashMap<String, Ref>,
}

impl Resolver {
    pub fn new(bases: &[&str]) -> Resolver {
        Resolver {
            bases: bases.iter().map(|b| b.to_string()).collect(),
            full_urls: HashMap::new(),
        }
    }

    /// Learns the `fullUrl`s of every entry of `body` (nested Bundles included).
    pub fn learn(&mut self, body: &Value) {
        let Some(entries) = body.get("entry").and_then(Value::as_array) else {
            return;
        };
        for e in entries {
            let Some(r) = e.get("resource") else { continue };
            // Absolute fullUrls resolve through the bases already; only `urn:` ones need a
            // table (and most answers have none: nothing to allocate).
            let urn = e
                .get("fullUrl")
                .and_then(Value::as_str)
                .is_some_and(|f| f.starts_with("urn:"));
            if let (true, Some(fu), Some(t), Some(id)) = (
                urn,
                e.get("fullUrl").and_then(Value::as_str),
                r.get("resourceType").and_then(Value::as_str),
                r.get("id").and_then(Value::as_str),
            ) {
                if valid_type(t) && valid_id(id) {
                    self.full_urls.insert(fu.to_string(), Ref::new(t, id));
                }
            }
            if r.get("resourceType").and_then(Value::as_str) == Some("Bundle") {
                self.learn(r);
            }
        }
    }

    pub fn parse(&self, s: &str) -> Target {
        match parse(s, &self.bases) {
            Target::Urn(u) => match self.full_urls.get(&u) {
                Some(r) => Target::Local(r.clone()),
                None => Target::Urn(u),
            },
            t => t,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASES: [&str; 2] = ["https://gw.example/fhir", "http://10.0.0.5:8080/fhir/"];

    fn local(t: &str, id: &str) -> Target {
        Target::Local(Ref::new(t, id))
    }

    #[test]
    fn relative_absolute_versioned() {
        assert_eq!(parse("Patient/123", &BASES), local("Patient", "123"));
        assert_eq!(
            parse("Patient/123/_history/2", &BASES),
            local("Patient", "123")
        );
        assert_eq!(
            parse("https://gw.example/fhir/Patient/123/_history/2", &BASES),
            local("Patient", "123")
        );
        assert_eq!(
            parse("http://10.0.0.5:8080/fhir/Patient/123", &BASES),
            local("Patient", "123")
        );
    }

    #[test]
    fn prefixes_never_match() {
        assert_ne!(parse("Patient/12", &BASES), parse("Patient/123", &BASES));
        assert_ne!(parse("Patient/123", &BASES), parse("Patient/1234", &BASES));
        // A base that is a prefix of another host is not ours.
        assert_eq!(
            parse("https://gw.example/fhirx/Patient/1", &BASES),
            Target::Other(Some("Patient".into()))
        );
        assert_eq!(
            parse("https://gw.example.evil/fhir/Patient/1", &BASES),
            Target::Other(Some("Patient".into()))
        );
    }

    #[test]
    fn other_forms() {
        assert_eq!(parse("#p1", &BASES), Target::Contained("p1".into()));
        assert_eq!(
            parse("urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0", &BASES),
            Target::Urn("urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0".into())
        );
        assert_eq!(
            parse("https://other.example/fhir/Patient/9/_history/1", &BASES),
            Target::Other(Some("Patient".into()))
        );
        assert_eq!(
            parse("Patient?identifier=x|1", &BASES),
            Target::Other(Some("Patient".into()))
        );
        assert_eq!(parse("Patient/1/extra", &BASES), Target::Other(None));
        assert_eq!(
            parse("Patient/bad id", &BASES),
            Target::Other(Some("Patient".into()))
        );
        assert_eq!(parse("patient/1", &BASES), Target::Other(None));
        assert_eq!(parse("", &BASES), Target::Other(None));
    }

    #[test]
    fn urns_resolve_inside_the_bundle() {
        let mut r = Resolver::new(&BASES);
        r.learn(&serde_json::json!({"resourceType": "Bundle", "entry": [
            {"fullUrl": "urn:uuid:a", "resource": {"resourceType": "Patient", "id": "p9"}}
        ]}));
        assert_eq!(r.parse("urn:uuid:a"), local("Patient", "p9"));
        assert_eq!(r.parse("urn:uuid:b"), Target::Urn("urn:uuid:b".into()));
    }
}
