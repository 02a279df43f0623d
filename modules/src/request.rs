//! What a FHIR REST request does: its interaction, the resource types it touches and the
//! permissions it needs — the input of role and SMART scope checks.
//!
//! Classification errs on the side of "touches more": an `_include` whose target type is not
//! spelt, a chained parameter without a type, a system-level search — all count as touching
//! every type.

use crate::compartment::patient_compartment_types;
use crate::smart::Perm;
use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Interaction {
    Capabilities,
    Read,
    VRead,
    History,
    Search,
    Create,
    Update,
    Patch,
    Delete,
    /// `$name`.
    Operation(String),
    /// POST of a Bundle to the base: authorised entry by entry.
    Bundle,
}

/// Which types a permission is needed on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Types {
    Some(Vec<String>),
    All,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Need {
    pub perm: Perm,
    pub types: Types,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FhirRequest {
    pub method: String,
    pub interaction: Interaction,
    pub resource_type: Option<String>,
    pub id: Option<String>,
    /// `Patient/123/Observation` → (`Patient`, `123`).
    pub compartment: Option<(String, String)>,
    /// Decoded query parameters, in order.
    pub params: Vec<(String, String)>,
    /// A read for the role policy: GET/HEAD, or POST `_search`.
    pub is_read: bool,
    pub needs: Vec<Need>,
}

impl FhirRequest {
    pub fn param<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.params
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Operations that only read, whatever the method.
const READ_ONLY_OPS: &[&str] = &[
    "$everything",
    "$validate",
    "$expand",
    "$lookup",
    "$validate-code",
    "$translate",
    "$subsumes",
    "$meta",
    "$export",
    "$document",
    "$summary",
];

fn is_type(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|c| c.is_ascii_uppercase()) && c.all(|c| c.is_ascii_alphanumeric())
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

/// Types a search's parameters pull in besides its own: includes, reverse includes, `_has`,
/// chains. `None` = cannot tell, so every type.
fn search_extra_types(params: &[(String, String)]) -> Option<Vec<String>> {
    let mut types = Vec::new();
    for (k, v) in params {
        let base = k.split(':').next().unwrap_or("");
        match base {
            "_include" => {
                // Source:param[:Target]; the target type is unknown unless spelt.
                let parts: Vec<&str> = v.split(':').collect();
                match parts.as_slice() {
                    [_, _, target] if is_type(target) => types.push(target.to_string()),
                    _ => return None,
                }
            }
            "_revinclude" => {
                let src = v.split(':').next().unwrap_or("");
                if !is_type(src) {
                    return None;
                }
                types.push(src.to_string());
            }
            "_has" => {
                // _has:Type:param:... = value
                let t = k.split(':').nth(1).unwrap_or("");
                if !is_type(t) {
                    return None;
                }
                types.push(t.to_string());
            }
            _ if k.contains('.') => {
                // Chained: param:Type.field or param.field (type unknown).
                let head = k.split('.').next().unwrap_or("");
                match head.split_once(':') {
                    Some((_, t)) if is_type(t) => types.push(t.to_string()),
                    _ => return None,
                }
            }
            _ => {}
        }
    }
    Some(types)
}

fn search_needs(own: Types, params: &[(String, String)]) -> Vec<Need> {
    let mut needs = vec![Need {
        perm: Perm::Search,
        types: own,
    }];
    match search_extra_types(params) {
        None => needs.push(Need {
            perm: Perm::Read,
            types: Types::All,
        }),
        Some(t) if !t.is_empty() => needs.push(Need {
            perm: Perm::Read,
            types: Types::Some(t),
        }),
        Some(_) => {}
    }
    needs
}

/// What a Bulk Data `$export` reads: the types named by `_type` (all of them, however many
/// `_type` parameters), or every type when there is none or one is not a type name. Never
/// narrowed to what the caller may see: a scope ceiling refuses the export instead (spec §9).
/// A Group export also reads the Group.
fn export_needs(params: &[(String, String)], group: Option<&str>) -> Vec<Need> {
    let named: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "_type")
        .flat_map(|(_, v)| v.split(','))
        .map(|t| t.trim().to_string())
        .collect();
    let types = if !named.is_empty() && named.iter().all(|t| is_type(t)) {
        Types::Some(named)
    } else {
        Types::All
    };
    let mut needs = vec![Need {
        perm: Perm::Read,
        types,
    }];
    if let Some(g) = group {
        needs.extend(one(Perm::Read, g));
    }
    needs
}

fn one(perm: Perm, t: &str) -> Vec<Need> {
    vec![Need {
        perm,
        types: Types::Some(vec![t.to_string()]),
    }]
}

/// Classifies a request. `path` is below the FHIR base (`/Patient/1`, `""` for the base),
/// `query` the raw query string without `?`.
pub fn classify(method: &str, path: &str, query: &str) -> Result<FhirRequest, String> {
    let params = parse_query(query);
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let m = method.to_ascii_uppercase();
    let get = m == "GET" || m == "HEAD";
    let unsupported = || {
        Err(format!(
            "{m} is not a FHIR interaction on /{}",
            segs.join("/")
        ))
    };
    let mut r = FhirRequest {
        method: m.clone(),
        interaction: Interaction::Search,
        resource_type: None,
        id: None,
        compartment: None,
        params: params.clone(),
        is_read: get,
        needs: Vec::new(),
    };
    let system_types = || -> Types {
        match params.iter().find(|(k, _)| k == "_type") {
            Some((_, v)) if v.split(',').all(is_type) => {
                Types::Some(v.split(',').map(str::to_string).collect())
            }
            _ => Types::All,
        }
    };
    let op = |name: &str, types: Types, r: &mut FhirRequest| {
        r.interaction = Interaction::Operation(name.to_string());
        let read_only = READ_ONLY_OPS.contains(&name);
        r.is_read = get;
        r.needs = vec![Need {
            perm: if get || read_only {
                Perm::Read
            } else {
                Perm::Create
            },
            types,
        }];
    };
    match segs.as_slice() {
        [] => match m.as_str() {
            "GET" | "HEAD" => r.needs = search_needs(system_types(), &params),
            "POST" => {
                r.interaction = Interaction::Bundle;
                r.is_read = false;
            }
            _ => return unsupported(),
        },
        ["metadata"] if get => {
            r.interaction = Interaction::Capabilities;
        }
        ["_search"] if m == "POST" => {
            r.is_read = true;
            r.needs = search_needs(system_types(), &params);
        }
        ["_history"] if get => {
            r.interaction = Interaction::History;
            r.needs = vec![Need {
                perm: Perm::Search,
                types: Types::All,
            }];
        }
        [o] if o.starts_with('$') => {
            op(o, Types::All, &mut r);
            if *o == "$export" {
                r.needs = export_needs(&params, None);
            }
        }
        [t] if is_type(t) => {
            r.resource_type = Some(t.to_string());
            match m.as_str() {
                "GET" | "HEAD" => r.needs = search_needs(Types::Some(vec![t.to_string()]), &params),
                "POST" => {
                    r.interaction = Interaction::Create;
                    r.needs = one(Perm::Create, t);
                }
                // Conditional forms: the criteria select existing resources.
                "PUT" | "PATCH" | "DELETE" if !params.is_empty() => {
                    r.interaction = match m.as_str() {
                        "PUT" => Interaction::Update,
                        "PATCH" => Interaction::Patch,
                        _ => Interaction::Delete,
                    };
                    let perm = if m == "DELETE" {
                        Perm::Delete
                    } else {
                        Perm::Update
                    };
                    r.needs = one(perm, t);
                    r.needs.push(Need {
                        perm: Perm::Search,
                        types: Types::Some(vec![t.to_string()]),
                    });
                }
                _ => return unsupported(),
            }
        }
        [t, "_search"] if is_type(t) && m == "POST" => {
            r.resource_type = Some(t.to_string());
            r.is_read = true;
            r.needs = search_needs(Types::Some(vec![t.to_string()]), &params);
        }
        [t, "_history"] if is_type(t) && get => {
            r.resource_type = Some(t.to_string());
            r.interaction = Interaction::History;
            r.needs = one(Perm::Search, t);
        }
        [t, o] if is_type(t) && o.starts_with('$') => {
            r.resource_type = Some(t.to_string());
            op(o, Types::Some(vec![t.to_string()]), &mut r);
            if *o == "$export" {
                r.needs = export_needs(&params, None);
            }
        }
        [t, id] if is_type(t) => {
            r.resource_type = Some(t.to_string());
            r.id = Some(id.to_string());
            let (i, perm) = match m.as_str() {
                "GET" | "HEAD" => (Interaction::Read, Perm::Read),
                "PUT" => (Interaction::Update, Perm::Update),
                "PATCH" => (Interaction::Patch, Perm::Update),
                "DELETE" => (Interaction::Delete, Perm::Delete),
                _ => return unsupported(),
            };
            r.interaction = i;
            r.needs = one(perm, t);
        }
        [t, id, "_history"] if is_type(t) && get => {
            r.resource_type = Some(t.to_string());
            r.id = Some(id.to_string());
            r.interaction = Interaction::History;
            r.needs = one(Perm::Read, t);
        }
        [t, id, "_history", _vid] if is_type(t) && get => {
            r.resource_type = Some(t.to_string());
            r.id = Some(id.to_string());
            r.interaction = Interaction::VRead;
            r.needs = one(Perm::Read, t);
        }
        [t, id, o] if is_type(t) && o.starts_with('$') => {
            r.resource_type = Some(t.to_string());
            r.id = Some(id.to_string());
            let types = if *t == "Patient" && *o == "$everything" {
                // Everything in the compartment comes back: every type is checked.
                let mut v: Vec<String> = patient_compartment_types().map(str::to_string).collect();
                v.sort();
                Types::Some(v)
            } else {
                Types::Some(vec![t.to_string()])
            };
            op(o, types, &mut r);
            if *o == "$export" {
                r.needs = export_needs(&params, Some(t));
            }
            if *o == "$everything" {
                r.compartment = Some((t.to_string(), id.to_string()));
            }
        }
        [t, id, c] | [t, id, c, "_search"] if is_type(t) && (is_type(c) || *c == "*") => {
            if !(get || (m == "POST" && segs.len() == 4)) {
                return unsupported();
            }
            r.is_read = true;
            r.compartment = Some((t.to_string(), id.to_string()));
            let own = if *c == "*" {
                Types::All
            } else {
                r.resource_type = Some(c.to_string());
                Types::Some(vec![c.to_string()])
            };
            r.needs = search_needs(own, &params);
        }
        _ => return Err(format!("unrecognised FHIR path /{}", segs.join("/"))),
    }
    Ok(r)
}

/// Classifies every entry of a batch/transaction Bundle by its own `request`.
/// `base` is the public FHIR base, for absolute entry URLs.
pub fn classify_bundle(bundle: &Value, base: &str) -> Result<Vec<FhirRequest>, String> {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err("POST to the base must carry a Bundle".into());
    }
    match bundle.get("type").and_then(Value::as_str) {
        Some("batch") | Some("transaction") => {}
        other => {
            return Err(format!(
                "Bundle.type must be batch or transaction, not {other:?}"
            ))
        }
    }
    let entries = match bundle.get("entry") {
        None => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err("Bundle.entry must be an array".into()),
    };
    let base = base.trim_end_matches('/');
    entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let req = e
                .get("request")
                .ok_or_else(|| format!("entry {i} has no request"))?;
            let method = req
                .get("method")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("entry {i}: request.method missing"))?;
            let url = req
                .get("url")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("entry {i}: request.url missing"))?;
            let rel = if url.contains("://") {
                url.strip_prefix(base)
                    .ok_or_else(|| format!("entry {i}: absolute url outside this server"))?
            } else {
                url
            };
            let (path, query) = rel.split_once('?').unwrap_or((rel, ""));
            let path = format!("/{}", path.trim_start_matches('/'));
            let r = classify(method, &path, query).map_err(|e| format!("entry {i}: {e}"))?;
            if r.interaction == Interaction::Bundle {
                return Err(format!("entry {i}: nested batch"));
            }
            Ok(r)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_needs_the_types_it_exports() {
        let r = classify("GET", "/Patient/$export", "_type=Patient,Observation").unwrap();
        assert_eq!(r.interaction, Interaction::Operation("$export".into()));
        assert!(r.is_read);
        assert_eq!(
            r.needs,
            vec![Need {
                perm: Perm::Read,
                types: Types::Some(vec!["Patient".into(), "Observation".into()])
            }]
        );
        // No `_type`, or one that is not a type: every type.
        let all = vec![Need {
            perm: Perm::Read,
            types: Types::All,
        }];
        assert_eq!(classify("GET", "/$export", "").unwrap().needs, all);
        assert_eq!(
            classify("GET", "/Patient/$export", "_type=x")
                .unwrap()
                .needs,
            all
        );
        let g = classify("GET", "/Group/g1/$export", "_type=Condition&_type=Patient").unwrap();
        assert_eq!(
            g.needs,
            vec![
                Need {
                    perm: Perm::Read,
                    types: Types::Some(vec!["Condition".into(), "Patient".into()])
                },
                Need {
                    perm: Perm::Read,
                    types: Types::Some(vec!["Group".into()])
                }
            ]
        );
    }

    fn c(m: &str, p: &str, q: &str) -> FhirRequest {
        classify(m, p, q).unwrap()
    }

    #[test]
    fn reads_and_writes() {
        let r = c("GET", "/Patient/123", "");
        assert_eq!(r.interaction, Interaction::Read);
        assert!(r.is_read);
        assert_eq!(r.needs, one(Perm::Read, "Patient"));
        assert!(c("POST", "/Observation/_search", "").is_read);
        assert!(c("POST", "/_search", "").is_read);
        let w = c("POST", "/Patient", "");
        assert!(!w.is_read);
        assert_eq!(w.needs, one(Perm::Create, "Patient"));
        assert_eq!(
            c("PATCH", "/Patient/1", "").needs,
            one(Perm::Update, "Patient")
        );
        assert_eq!(
            c("DELETE", "/Patient/1", "").needs,
            one(Perm::Delete, "Patient")
        );
        assert_eq!(
            c("GET", "/Patient/1/_history/2", "").interaction,
            Interaction::VRead
        );
        assert!(
            classify("PUT", "/Patient", "").is_err(),
            "unconditional PUT on a type"
        );
        assert!(classify("OPTIONS", "/Patient/1", "").is_err());
        assert!(classify("GET", "/patient/1", "").is_err());
    }

    #[test]
    fn searches_count_what_they_pull_in() {
        let r = c(
            "GET",
            "/Observation",
            "code=x&_revinclude=Provenance:target",
        );
        assert_eq!(r.needs[1].types, Types::Some(vec!["Provenance".into()]));
        let r = c("GET", "/Observation", "_include=Observation:subject");
        assert_eq!(r.needs[1].types, Types::All, "target type unknown");
        let r = c(
            "GET",
            "/Observation",
            "_include=Observation:subject:Patient",
        );
        assert_eq!(r.needs[1].types, Types::Some(vec!["Patient".into()]));
        let r = c("GET", "/Patient", "_has:Observation:patient:code=1234");
        assert_eq!(r.needs[1].types, Types::Some(vec!["Observation".into()]));
        let r = c("GET", "/Observation", "subject.name=peter");
        assert_eq!(r.needs[1].types, Types::All);
        let r = c("GET", "/Observation", "subject:Patient.name=peter");
        assert_eq!(r.needs[1].types, Types::Some(vec!["Patient".into()]));
        let r = c("GET", "", "_type=Patient,Observation");
        assert_eq!(
            r.needs[0].types,
            Types::Some(vec!["Patient".into(), "Observation".into()])
        );
        assert_eq!(c("GET", "", "name=x").needs[0].types, Types::All);
    }

    #[test]
    fn compartments_and_everything() {
        let r = c("GET", "/Patient/p1/Observation", "code=x");
        assert_eq!(r.compartment, Some(("Patient".into(), "p1".into())));
        assert_eq!(
            r.needs[0],
            Need {
                perm: Perm::Search,
                types: Types::Some(vec!["Observation".into()])
            }
        );
        let e = c("GET", "/Patient/p1/$everything", "");
        assert_eq!(e.interaction, Interaction::Operation("$everything".into()));
        match &e.needs[0].types {
            Types::Some(t) => {
                assert!(
                    t.contains(&"Observation".to_string()) && t.contains(&"Patient".to_string())
                );
                assert_eq!(t.len(), 66);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c("GET", "/Patient/p1/*", "").needs[0].types, Types::All);
    }

    #[test]
    fn bundles_entry_by_entry() {
        let b = serde_json::json!({"resourceType":"Bundle","type":"batch","entry":[
            {"request":{"method":"GET","url":"Patient/1"}},
            {"request":{"method":"POST","url":"Observation"},"resource":{"resourceType":"Observation"}},
            {"request":{"method":"GET","url":"https://gw.example/fhir/Encounter?patient=1"}}
        ]});
        let rs = classify_bundle(&b, "https://gw.example/fhir/").unwrap();
        assert_eq!(rs.len(), 3);
        assert!(rs[0].is_read && !rs[1].is_read && rs[2].is_read);
        assert_eq!(rs[2].resource_type.as_deref(), Some("Encounter"));
        let bad =
            serde_json::json!({"resourceType":"Bundle","type":"batch","entry":[{"resource":{}}]});
        assert!(classify_bundle(&bad, "x")
            .unwrap_err()
            .contains("entry 0 has no request"));
        let other = serde_json::json!({"resourceType":"Bundle","type":"batch","entry":[
            {"request":{"method":"GET","url":"https://evil.example/fhir/Patient"}}]});
        assert!(classify_bundle(&other, "https://gw.example/fhir").is_err());
        let coll = serde_json::json!({"resourceType":"Bundle","type":"collection"});
        assert!(classify_bundle(&coll, "x").is_err());
    }

    #[test]
    fn query_decoding() {
        assert_eq!(
            parse_query("a=1&b=x%20y&c&_include%3Aiterate=A:b"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x y".into()),
                ("c".into(), "".into()),
                ("_include:iterate".into(), "A:b".into())
            ]
        );
        assert_eq!(parse_query("a=%zz%"), vec![("a".into(), "%zz%".into())]);
    }
}
