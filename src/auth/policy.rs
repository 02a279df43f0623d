//! Authorization: roles decide what a caller may do; SMART clinical scopes, when the token
//! carries any, are a ceiling on that (or decide alone when `scopes_alone_suffice`).
//!
//! Scopes that narrow — `patient/` (the patient's compartment) and v2 granular scopes
//! (`Observation.rs?category=laboratory`) — grant here, and the gateway's scope filter
//! (`fhir_gateway_modules::smart::filter`, attached for every such token) keeps what comes
//! back, and what is written, inside them. `patient/` scopes need a patient context. A
//! narrowed request may not use parameters that match on other resources (`_has`, chains),
//! export, or run operations that write.

use fhir_gateway_modules::request::{FhirRequest, Interaction, Types};
use fhir_gateway_modules::smart::{ClinicalScope, Perm, ScopeContext, ScopeSet};
use fhir_gateway_modules::{Identity, Role};

/// Why a request was refused: the rule that failed, for the 403 diagnostics.
pub type Denied = String;

/// Which roles may read and which may write (per route).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolePolicy {
    pub read: Vec<Role>,
    pub write: Vec<Role>,
}

impl Default for RolePolicy {
    fn default() -> Self {
        RolePolicy {
            read: vec![Role::Reader, Role::Administrator],
            write: vec![Role::Writer, Role::Administrator],
        }
    }
}

pub fn role_by_name(name: &str) -> Option<Role> {
    Role::ALL.into_iter().find(|r| r.name() == name)
}

fn names(roles: &[Role]) -> String {
    if roles.is_empty() {
        return "a role this route does not grant".into();
    }
    roles
        .iter()
        .map(|r| r.name())
        .collect::<Vec<_>>()
        .join(" or ")
}

/// The default policy (Reader/Writer/Administrator).
pub fn authorize(
    id: &Identity,
    req: &FhirRequest,
    scopes_alone_suffice: bool,
) -> Result<(), Denied> {
    authorize_with(id, req, scopes_alone_suffice, &RolePolicy::default())
}

pub fn authorize_with(
    id: &Identity,
    req: &FhirRequest,
    scopes_alone_suffice: bool,
    policy: &RolePolicy,
) -> Result<(), Denied> {
    let allowed = if req.is_read {
        &policy.read
    } else {
        &policy.write
    };
    let role_ok = allowed.iter().any(|r| id.has(*r));
    let role_rule = || {
        if req.is_read {
            format!("role: reading ({}) needs {}", describe(req), names(allowed))
        } else {
            format!("role: {} needs {}", describe(req), names(allowed))
        }
    };
    let scopes = ScopeSet::from_strings(&id.scopes);
    if scopes.is_empty() {
        return if role_ok { Ok(()) } else { Err(role_rule()) };
    }
    if !role_ok && !scopes_alone_suffice {
        return Err(role_rule());
    }
    // Narrowed: some need is granted only by scopes the gateway's scope filter narrows
    // (`patient/`, or a v2 query); patient: only by `patient/` scopes.
    let (mut narrowed, mut patient_only) = (false, false);
    for need in &req.needs {
        let types: Vec<Option<&str>> = match &need.types {
            Types::All => vec![None],
            Types::Some(types) => types.iter().map(|t| Some(t.as_str())).collect(),
        };
        for t in types {
            let grants: Vec<&ClinicalScope> = scopes.granting(t, need.perm).collect();
            if grants.is_empty() {
                return Err(format!(
                    "scope: no scope grants '{}' on {} (needed by {})",
                    need.perm.letter(),
                    t.unwrap_or("every resource type"),
                    describe(req)
                ));
            }
            narrowed |= grants.iter().all(|s| s.narrows());
            patient_only |= grants.iter().all(|s| s.context == ScopeContext::Patient);
        }
    }
    if patient_only && id.patient_context().is_none() {
        return Err("scope: patient/ scopes need a patient context (fhirUser or patient claim); none in the token".into());
    }
    if narrowed {
        narrowed_shape(req)?;
    }
    Ok(())
}

fn describe(req: &FhirRequest) -> String {
    let what = match &req.interaction {
        Interaction::Operation(o) => o.clone(),
        other => format!("{other:?}").to_lowercase(),
    };
    match &req.resource_type {
        Some(t) => format!("{what} on {t}"),
        None => what,
    }
}

/// What a caller whose scopes narrow may not ask, whatever comes back: the scope filter
/// judges the resources returned, not the server's matching, so parameters that match on
/// other resources are existence oracles (pitfall 9); exported files and the results of
/// operations that write are not filtered.
fn narrowed_shape(req: &FhirRequest) -> Result<(), Denied> {
    let oracle = req.params.iter().any(|(k, _)| {
        let k = k.split(':').next().unwrap_or("");
        matches!(k, "_has" | "_query" | "_filter") || k.contains('.')
    });
    if oracle {
        return Err("scope: _has, _query, _filter and chained parameters are not allowed with patient/ or granular scopes".into());
    }
    match &req.interaction {
        Interaction::Operation(op) if op == "$export" => Err(
            "scope: patient/ and granular scopes never export (exported files are not filtered)"
                .into(),
        ),
        Interaction::Operation(op) if req.needs.iter().any(|n| n.perm == Perm::Create) => Err(
            format!("scope: {op} may change data; it is not run for patient/ or granular scopes"),
        ),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fhir_gateway_modules::request::classify;

    fn who(roles: &[Role], scopes: &[&str]) -> Identity {
        Identity {
            user_id: "u1".into(),
            roles: roles.to_vec(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn ok(id: &Identity, m: &str, p: &str, q: &str) -> bool {
        authorize(id, &classify(m, p, q).unwrap(), false).is_ok()
    }

    #[test]
    fn roles_without_scopes() {
        let reader = who(&[Role::Reader], &[]);
        let writer = who(&[Role::Writer], &[]);
        let admin = who(&[Role::Administrator], &[]);
        let none = who(&[Role::DataScientist], &[]);
        for (m, p) in [
            ("GET", "/Patient/1"),
            ("GET", "/Patient"),
            ("POST", "/Patient/_search"),
            ("HEAD", "/Patient/1"),
        ] {
            assert!(ok(&reader, m, p, ""), "{m} {p}");
            assert!(!ok(&writer, m, p, ""), "{m} {p}");
            assert!(ok(&admin, m, p, ""));
            assert!(!ok(&none, m, p, ""));
        }
        for (m, p) in [
            ("POST", "/Patient"),
            ("PUT", "/Patient/1"),
            ("PATCH", "/Patient/1"),
            ("DELETE", "/Patient/1"),
            ("POST", "/Patient/$validate"),
        ] {
            assert!(!ok(&reader, m, p, ""), "{m} {p}");
            assert!(ok(&writer, m, p, ""), "{m} {p}");
            assert!(ok(&admin, m, p, ""));
        }
        let e = authorize(&writer, &classify("GET", "/Patient/1", "").unwrap(), false).unwrap_err();
        assert!(e.contains("needs Reader or Administrator"), "{e}");
    }

    #[test]
    fn scopes_are_a_ceiling() {
        let r = who(&[Role::Reader, Role::Writer], &["user/Observation.read"]);
        assert!(ok(&r, "GET", "/Observation", "code=x"));
        assert!(!ok(&r, "GET", "/Patient/1", ""), "no scope for Patient");
        assert!(!ok(&r, "POST", "/Observation", ""), "write not in scope");
        // Scopes never replace roles...
        let no_role = who(&[], &["user/*.*"]);
        assert!(!ok(&no_role, "GET", "/Patient/1", ""));
        // ...unless configured.
        assert!(authorize(&no_role, &classify("GET", "/Patient/1", "").unwrap(), true).is_ok());
        // Includes need scopes on the included types too.
        let obs = who(&[Role::Reader], &["user/Observation.rs"]);
        assert!(!ok(
            &obs,
            "GET",
            "/Observation",
            "_revinclude=Provenance:target"
        ));
        assert!(!ok(
            &obs,
            "GET",
            "/Observation",
            "_include=Observation:subject"
        ));
        assert!(
            !ok(&obs, "GET", "", "name=x"),
            "system search needs a wildcard"
        );
    }

    #[test]
    fn patient_scopes_need_a_patient_context_and_leave_the_rest_to_the_scope_filter() {
        let mut p = who(&[Role::Reader, Role::Writer], &["patient/*.cruds"]);
        let e = authorize(&p, &classify("GET", "/Patient/p1", "").unwrap(), false).unwrap_err();
        assert!(e.contains("patient context"), "{e}");
        p.fhir_user = Some("Patient/p1".into());
        // Whatever the request names, the scope filter judges what comes back.
        for (m, path, q) in [
            ("GET", "/Patient/p1", ""),
            ("GET", "/Patient/p2", ""),
            ("GET", "/Observation/o1", ""),
            ("GET", "/Observation", "code=x"),
            ("GET", "/Patient/p1/$everything", ""),
            (
                "GET",
                "/Observation",
                "patient=p1&_include=Observation:performer",
            ),
            ("POST", "/Observation", ""),
            ("PUT", "/Observation/o1", ""),
            ("DELETE", "/Observation/o1", ""),
        ] {
            assert!(ok(&p, m, path, q), "{m} {path}?{q}");
        }
        // Parameters matching on other resources are oracles; exports are not filtered.
        for (m, path, q) in [
            ("GET", "/Patient", "_has:Observation:subject:code=x"),
            ("GET", "/Observation", "subject.name=x"),
            ("GET", "/Observation", "patient=p1&_query=everyone"),
            ("GET", "/Observation", "_filter=x"),
            ("GET", "/Patient/p1/$export", ""),
            ("POST", "/Patient/p1/$merge", ""),
        ] {
            assert!(!ok(&p, m, path, q), "{m} {path}?{q}");
        }
        // A user/ scope for the same type lifts the narrowing (and the oracle rule).
        let both = Identity {
            scopes: vec!["patient/*.read".into(), "user/Observation.read".into()],
            ..p.clone()
        };
        assert!(ok(&both, "GET", "/Observation", "_filter=x"));
    }

    #[test]
    fn granular_scopes_grant_narrowed_and_unsupported_ones_grant_nothing() {
        let lab = who(
            &[Role::Reader],
            &["user/Observation.rs?category=laboratory"],
        );
        assert!(ok(&lab, "GET", "/Observation", ""));
        assert!(ok(&lab, "GET", "/Observation/o1", ""));
        assert!(!ok(&lab, "GET", "/Observation", "_has:X:y:z=1"));
        assert!(!ok(&lab, "GET", "/Encounter", ""));
        let odd = who(&[Role::Reader], &["user/Observation.rs?date=gt2020"]);
        let e = authorize(&odd, &classify("GET", "/Observation", "").unwrap(), false).unwrap_err();
        assert!(e.contains("no scope grants"), "{e}");
    }

    #[test]
    fn everything_is_checked_against_every_compartment_type() {
        let mut p = who(
            &[Role::Reader],
            &["patient/Patient.read", "patient/Observation.read"],
        );
        p.fhir_user = Some("Patient/p1".into());
        let e = authorize(
            &p,
            &classify("GET", "/Patient/p1/$everything", "").unwrap(),
            false,
        )
        .unwrap_err();
        assert!(e.contains("no scope grants 'r'"), "{e}");
    }
}
