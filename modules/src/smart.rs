//! SMART on FHIR clinical scopes: v1 (`patient/Observation.read`, `user/*.write`), v2
//! (`patient/Observation.rs`, `system/*.cruds`), and the Entra ID dotted form
//! (`patient.Observation.read`, `user.all.write`).
//!
//! v2 granular scopes (`patient/Observation.rs?category=laboratory`) grant, narrowed: the
//! gateway keeps only the resources their query selects (`query.rs`, evaluated on each resource;
//! `filter.rs`, the gateway's scope filter). A query the gateway cannot evaluate exactly grants
//! nothing: ignoring it would widen access.

pub mod filter;
pub mod query;

pub use query::ScopeQuery;

/// `patient/`, `user/` or `system/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScopeContext {
    Patient,
    User,
    System,
}

/// The five v2 permissions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Perms {
    pub create: bool,
    pub read: bool,
    pub update: bool,
    pub delete: bool,
    pub search: bool,
}

impl Perms {
    pub const ALL: Perms = Perms {
        create: true,
        read: true,
        update: true,
        delete: true,
        search: true,
    };

    fn parse(s: &str) -> Option<Perms> {
        match s {
            "read" => Some(Perms {
                read: true,
                search: true,
                ..Default::default()
            }),
            "write" => Some(Perms {
                create: true,
                update: true,
                delete: true,
                ..Default::default()
            }),
            "*" | "all" => Some(Perms::ALL),
            _ => {
                // v2: letters in the order c, r, u, d, s, each at most once.
                let mut p = Perms::default();
                let mut last = 0;
                for ch in s.chars() {
                    let (rank, slot) = match ch {
                        'c' => (1, &mut p.create),
                        'r' => (2, &mut p.read),
                        'u' => (3, &mut p.update),
                        'd' => (4, &mut p.delete),
                        's' => (5, &mut p.search),
                        _ => return None,
                    };
                    if rank <= last {
                        return None;
                    }
                    last = rank;
                    *slot = true;
                }
                (last > 0).then_some(p)
            }
        }
    }

    pub fn allows(&self, p: Perm) -> bool {
        match p {
            Perm::Create => self.create,
            Perm::Read => self.read,
            Perm::Update => self.update,
            Perm::Delete => self.delete,
            Perm::Search => self.search,
        }
    }
}

/// One permission a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Perm {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

impl Perm {
    pub fn letter(self) -> char {
        match self {
            Perm::Create => 'c',
            Perm::Read => 'r',
            Perm::Update => 'u',
            Perm::Delete => 'd',
            Perm::Search => 's',
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClinicalScope {
    pub context: ScopeContext,
    /// `None` = every type (`*` / `all`).
    pub resource_type: Option<String>,
    pub perms: Perms,
    /// Whether the scope has a v2 query (then `query` holds it).
    pub restricted: bool,
    /// The v2 query: it narrows what the scope grants; an unsupported one grants nothing.
    pub query: Option<ScopeQuery>,
}

impl ClinicalScope {
    /// Whether the scope grants `perm` on `resource_type`, possibly narrowed (to the patient's
    /// compartment, to what its query selects): `narrows` says.
    pub fn grants(&self, resource_type: &str, perm: Perm) -> bool {
        self.query.as_ref().is_none_or(ScopeQuery::is_supported)
            && self.perms.allows(perm)
            && self
                .resource_type
                .as_deref()
                .is_none_or(|t| t == resource_type)
    }

    /// Whether what it grants is narrowed: to the patient's compartment, or by a query.
    pub fn narrows(&self) -> bool {
        self.context == ScopeContext::Patient || self.restricted
    }
}

/// Parses one scope; `None` for anything that is not a clinical scope (`openid`, `launch`,
/// `offline_access`, `fhirUser`, or garbage).
pub fn parse_scope(s: &str) -> Option<ClinicalScope> {
    let (s, query) = match s.split_once('?') {
        Some((base, q)) if !q.is_empty() => (base, Some(q)),
        Some((base, _)) => (base, None),
        None => (s, None),
    };
    let (ctx, rest) = if let Some((c, r)) = s.split_once('/') {
        (c, r)
    } else {
        // Entra dotted form: patient.Observation.read
        s.split_once('.')?
    };
    let context = match ctx {
        "patient" => ScopeContext::Patient,
        "user" => ScopeContext::User,
        "system" => ScopeContext::System,
        _ => return None,
    };
    let (ty, perms) = rest.rsplit_once('.')?;
    let resource_type = match ty {
        "*" | "all" => None,
        t if is_resource_type_name(t) => Some(t.to_string()),
        _ => return None,
    };
    let query = query.map(|q| ScopeQuery::parse(resource_type.as_deref(), q));
    Some(ClinicalScope {
        context,
        resource_type,
        perms: Perms::parse(perms)?,
        restricted: query.is_some(),
        query,
    })
}

fn is_resource_type_name(t: &str) -> bool {
    let mut chars = t.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && t.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric())
}

/// The clinical scopes of a token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScopeSet {
    pub scopes: Vec<ClinicalScope>,
}

impl ScopeSet {
    pub fn from_strings<S: AsRef<str>>(raw: &[S]) -> ScopeSet {
        ScopeSet {
            scopes: raw.iter().filter_map(|s| parse_scope(s.as_ref())).collect(),
        }
    }

    /// Whether the token carries clinical scopes at all (then they are a ceiling).
    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }

    /// The scopes granting `perm` on `resource_type` (`None`: on every type).
    pub fn granting<'a>(
        &'a self,
        resource_type: Option<&'a str>,
        perm: Perm,
    ) -> impl Iterator<Item = &'a ClinicalScope> + 'a {
        self.scopes.iter().filter(move |s| match resource_type {
            Some(t) => s.grants(t, perm),
            None => !s.restricted && s.resource_type.is_none() && s.perms.allows(perm),
        })
    }

    /// The contexts under which `perm` on `resource_type` is granted.
    pub fn granting_contexts(&self, resource_type: &str, perm: Perm) -> Vec<ScopeContext> {
        let mut v: Vec<ScopeContext> = self
            .scopes
            .iter()
            .filter(|s| s.grants(resource_type, perm))
            .map(|s| s.context)
            .collect();
        v.dedup();
        v
    }

    /// Whether `perm` is granted on every type (needed for system-wide searches).
    pub fn granting_contexts_all_types(&self, perm: Perm) -> Vec<ScopeContext> {
        let mut v: Vec<ScopeContext> = self
            .scopes
            .iter()
            .filter(|s| !s.restricted && s.resource_type.is_none() && s.perms.allows(perm))
            .map(|s| s.context)
            .collect();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ClinicalScope {
        parse_scope(s).unwrap_or_else(|| panic!("{s} should parse"))
    }

    #[test]
    fn v1_forms() {
        let s = p("patient/Observation.read");
        assert_eq!(s.context, ScopeContext::Patient);
        assert_eq!(s.resource_type.as_deref(), Some("Observation"));
        assert!(s.grants("Observation", Perm::Read));
        assert!(s.grants("Observation", Perm::Search));
        assert!(!s.grants("Observation", Perm::Create));
        assert!(!s.grants("Patient", Perm::Read));
        let w = p("user/*.write");
        assert!(w.grants("Patient", Perm::Create) && w.grants("Encounter", Perm::Delete));
        assert!(!w.grants("Patient", Perm::Read));
        assert!(p("system/*.*").grants("X", Perm::Search));
    }

    #[test]
    fn v2_forms() {
        let s = p("patient/Observation.rs");
        assert!(s.grants("Observation", Perm::Read) && s.grants("Observation", Perm::Search));
        assert!(!s.grants("Observation", Perm::Update));
        assert_eq!(p("system/*.cruds").perms, Perms::ALL);
        assert!(p("user/Encounter.cu").grants("Encounter", Perm::Update));
        // Out of order or repeated letters are not v2.
        assert!(parse_scope("user/Encounter.rc").is_none());
        assert!(parse_scope("user/Encounter.rr").is_none());
        assert!(parse_scope("user/Encounter.x").is_none());
    }

    #[test]
    fn entra_dotted_forms() {
        let s = p("patient.Observation.read");
        assert_eq!(s.context, ScopeContext::Patient);
        assert!(s.grants("Observation", Perm::Read));
        assert!(p("user.all.write").grants("Patient", Perm::Delete));
        assert!(p("system.all.read").grants("Patient", Perm::Search));
    }

    #[test]
    fn granular_v2_scopes_grant_narrowed_unless_unsupported() {
        let s = p("patient/Observation.rs?category=laboratory");
        assert!(s.restricted && s.narrows());
        assert!(s.grants("Observation", Perm::Read));
        assert!(!s.grants("Patient", Perm::Read));
        let u = p("user/Observation.rs?category=laboratory");
        assert!(u.narrows() && u.grants("Observation", Perm::Search));
        assert!(!p("user/Observation.rs").narrows());
        assert!(p("patient/Observation.rs").narrows());
        // A query the gateway cannot evaluate exactly grants nothing.
        for s in [
            "patient/Observation.rs?date=gt2020",
            "user/Observation.rs?category:not=laboratory",
            "system/*.rs?category=laboratory",
        ] {
            let s = p(s);
            assert!(s.restricted);
            assert!(!s.grants("Observation", Perm::Read), "{s:?}");
        }
        let set = ScopeSet::from_strings(&["patient/Observation.rs?code=x"]);
        assert_eq!(
            set.granting_contexts("Observation", Perm::Read),
            vec![ScopeContext::Patient]
        );
        assert!(set.granting_contexts_all_types(Perm::Read).is_empty());
    }

    #[test]
    fn non_clinical_scopes_are_ignored() {
        for s in [
            "openid",
            "fhirUser",
            "launch/patient",
            "offline_access",
            "patient/",
            "admin/*.read",
            "user/observation.read",
            "user/Obs-1.read",
            "",
        ] {
            assert!(parse_scope(s).is_none(), "{s}");
        }
        let set = ScopeSet::from_strings(&["openid", "launch/patient"]);
        assert!(set.is_empty());
    }

    #[test]
    fn granting_contexts() {
        let set = ScopeSet::from_strings(&[
            "patient/Observation.read",
            "user/*.read",
            "system/Patient.write",
        ]);
        assert_eq!(
            set.granting_contexts("Observation", Perm::Read),
            vec![ScopeContext::Patient, ScopeContext::User]
        );
        assert_eq!(
            set.granting_contexts_all_types(Perm::Search),
            vec![ScopeContext::User]
        );
        assert!(set.granting_contexts("Patient", Perm::Delete) == vec![ScopeContext::System]);
    }
}
