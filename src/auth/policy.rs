//! Authorization: roles decide what a caller may do; SMART clinical scopes, when the token
//! carries any, are a ceiling on that (or decide alone when `scopes_alone_suffice`).
//!
//! `patient/` scopes need a patient context and, until the data-level filters check every
//! returned resource, are honoured only for requests that name that patient: a read of the
//! Patient itself, its compartment (`Patient/{id}/Type`, `$everything`), or a search restricted
//! to it by a compartment parameter. Everything else is denied — never widened.

use fhir_gateway_modules::compartment::patient_params;
use fhir_gateway_modules::request::{FhirRequest, Interaction, Types};
use fhir_gateway_modules::smart::{ScopeContext, ScopeSet};
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
    let mut patient_only = false;
    for need in &req.needs {
        let contexts_per_type: Vec<(String, Vec<ScopeContext>)> = match &need.types {
            Types::All => vec![(
                "*".to_string(),
                scopes.granting_contexts_all_types(need.perm),
            )],
            Types::Some(types) => types
                .iter()
                .map(|t| (t.clone(), scopes.granting_contexts(t, need.perm)))
                .collect(),
        };
        for (t, contexts) in contexts_per_type {
            if contexts.is_empty() {
                return Err(format!(
                    "scope: no scope grants '{}' on {} (needed by {})",
                    need.perm.letter(),
                    if t == "*" {
                        "every resource type".to_string()
                    } else {
                        t
                    },
                    describe(req)
                ));
            }
            if contexts == [ScopeContext::Patient] {
                patient_only = true;
            }
        }
    }
    if patient_only {
        let Some(pid) = id.patient_context() else {
            return Err("scope: patient/ scopes need a patient context (fhirUser or patient claim); none in the token".into());
        };
        within_patient(req, &pid)?;
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

/// Does the request stay inside the compartment of patient `pid`?
fn within_patient(req: &FhirRequest, pid: &str) -> Result<(), Denied> {
    let outside = || {
        Err(format!(
            "scope: patient/ scopes allow only the patient's own data (Patient/{pid}, Patient/{pid}/<Type>, or a search with patient={pid}); {} is not limited to it",
            describe(req)
        ))
    };
    let pulls_in_others = req.params.iter().any(|(k, _)| {
        let k = k.split(':').next().unwrap_or("");
        matches!(
            k,
            "_include" | "_revinclude" | "_has" | "_query" | "_filter"
        ) || k.contains('.')
    });
    if pulls_in_others {
        return Err("scope: _include, _revinclude, _has, _query, _filter and chained parameters are not allowed with patient/ scopes".into());
    }
    if let Some((ty, cid)) = &req.compartment {
        return if ty == "Patient" && cid == pid {
            Ok(())
        } else {
            outside()
        };
    }
    let ty = req.resource_type.as_deref().unwrap_or("");
    match &req.interaction {
        Interaction::Read | Interaction::VRead | Interaction::History if ty == "Patient" => {
            if req.id.as_deref() == Some(pid) {
                Ok(())
            } else {
                outside()
            }
        }
        Interaction::Search if ty == "Patient" => {
            let ids: Vec<&str> = req.param("_id").collect();
            if !ids.is_empty() && ids.iter().all(|v| v.split(',').all(|x| x == pid)) {
                Ok(())
            } else {
                outside()
            }
        }
        Interaction::Search => {
            let Some(params) = patient_params(ty) else {
                return outside();
            };
            // Only an exact parameter (no `:not`, `:missing`, `:identifier`...) restricts the
            // results to the patient; other parameters can only narrow them further.
            let restricted = req.params.iter().any(|(k, v)| {
                let name = k.as_str();
                // `patient` always targets a Patient; the compartment parameters may too.
                // A bare id on other parameters could name another type (Group/p1).
                let typed = v == &format!("Patient/{pid}");
                (name == "patient" && (v == pid || typed)) || (params.contains(&name) && typed)
            });
            if restricted {
                Ok(())
            } else {
                outside()
            }
        }
        _ => outside(),
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
    fn patient_scopes_need_and_respect_a_patient_context() {
        let mut p = who(&[Role::Reader], &["patient/*.read"]);
        let e = authorize(&p, &classify("GET", "/Patient/p1", "").unwrap(), false).unwrap_err();
        assert!(e.contains("patient context"), "{e}");
        p.fhir_user = Some("Patient/p1".into());
        assert!(ok(&p, "GET", "/Patient/p1", ""));
        assert!(
            !ok(&p, "GET", "/Patient/p12", ""),
            "Patient/p1 is not Patient/p12"
        );
        assert!(ok(&p, "GET", "/Patient/p1/Observation", ""));
        assert!(!ok(&p, "GET", "/Patient/p2/Observation", ""));
        assert!(ok(&p, "GET", "/Patient/p1/$everything", ""));
        assert!(!ok(&p, "GET", "/Patient/p2/$everything", ""));
        assert!(ok(&p, "GET", "/Observation", "patient=p1&code=x"));
        assert!(ok(&p, "GET", "/Observation", "subject=Patient/p1"));
        assert!(
            !ok(&p, "GET", "/Observation", "code=x"),
            "unrestricted search"
        );
        assert!(!ok(&p, "GET", "/Observation", "patient=p1,p2"));
        assert!(
            !ok(&p, "GET", "/Observation", "patient:not=p1"),
            "modifiers do not restrict"
        );
        assert!(!ok(&p, "GET", "/Observation", "subject:not=Patient/p1"));
        assert!(!ok(&p, "GET", "/Observation", "patient:identifier=p1"));
        assert!(!ok(&p, "GET", "/Observation", "patient=p1&_query=everyone"));
        assert!(
            !ok(&p, "GET", "/Observation", "subject=p1"),
            "a bare id may name a Group"
        );
        assert!(ok(&p, "GET", "/Observation", "patient=p1&code:not=x"));
        assert!(!ok(
            &p,
            "GET",
            "/Observation",
            "patient=p1&_include=Observation:performer:Practitioner"
        ));
        assert!(
            !ok(&p, "GET", "/Observation/o1", ""),
            "reads by id are not checked yet: denied"
        );
        assert!(ok(&p, "GET", "/Patient", "_id=p1"));
        assert!(!ok(&p, "GET", "/Patient", "name=x"));
        // A user/ scope for the same type lifts the restriction.
        let both = Identity {
            scopes: vec!["patient/*.read".into(), "user/Observation.read".into()],
            ..p.clone()
        };
        assert!(ok(&both, "GET", "/Observation", "code=x"));
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
