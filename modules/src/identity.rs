//! Who is calling: the identity the gateway extracted from a validated token.

/// Application roles, after mapping the token's role values (configurable per issuer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Administrator,
    Reader,
    Writer,
    Patient,
    Practitioner,
    RelatedPerson,
    DataScientist,
}

impl Role {
    pub const ALL: [Role; 7] = [
        Role::Administrator,
        Role::Reader,
        Role::Writer,
        Role::Patient,
        Role::Practitioner,
        Role::RelatedPerson,
        Role::DataScientist,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Administrator => "Administrator",
            Role::Reader => "Reader",
            Role::Writer => "Writer",
            Role::Patient => "Patient",
            Role::Practitioner => "Practitioner",
            Role::RelatedPerson => "RelatedPerson",
            Role::DataScientist => "DataScientist",
        }
    }
}

/// A caller as the gateway knows it. Values come from validated claims only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// Name of the trusted issuer entry that validated the token.
    pub issuer: String,
    /// `oid` (fallback `sub`): the stable user or service-principal id.
    pub user_id: String,
    /// `tid`.
    pub tenant: Option<String>,
    /// `upn` → `preferred_username` → `unique_name` → `email`.
    pub upn: Option<String>,
    pub roles: Vec<Role>,
    /// Raw scope strings (`scp` or `scope`).
    pub scopes: Vec<String>,
    /// `fhirUser` claim (`Patient/123` or an absolute URL).
    pub fhir_user: Option<String>,
    /// SMART `patient` launch-context claim.
    pub patient: Option<String>,
    /// `azp` / `appid` / `client_id`.
    pub client_id: Option<String>,
}

impl Identity {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// The patient this caller's `patient/` scopes are bound to: the `patient` claim, else a
    /// `fhirUser` that names a Patient. Only the id is returned.
    pub fn patient_context(&self) -> Option<String> {
        if let Some(p) = self.patient.as_deref().filter(|p| !p.is_empty()) {
            let id = p.rsplit_once("Patient/").map_or(p, |(_, id)| id);
            return valid_id(id).then(|| id.to_string());
        }
        let fu = self.fhir_user.as_deref()?;
        let (_, rest) = fu.rsplit_once("Patient/")?;
        let id = rest.split('/').next()?;
        // `.../Patient/123` only: a RelatedPerson's URL that happens to contain "Patient/" must
        // not count, so the segment before must end the type cleanly.
        let ty_start = fu.len() - rest.len() - "Patient/".len();
        let clean = ty_start == 0 || fu.as_bytes()[ty_start - 1] == b'/';
        (clean && valid_id(id)).then(|| id.to_string())
    }
}

/// FHIR id syntax: `[A-Za-z0-9\-\.]{1,64}`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patient_context_sources() {
        let mut id = Identity {
            fhir_user: Some("https://fhir.example/fhir/Patient/123".into()),
            ..Default::default()
        };
        assert_eq!(id.patient_context().as_deref(), Some("123"));
        id.fhir_user = Some("Patient/abc-1".into());
        assert_eq!(id.patient_context().as_deref(), Some("abc-1"));
        id.fhir_user = Some("Practitioner/9".into());
        assert_eq!(id.patient_context(), None);
        id.fhir_user = Some("https://x/RelatedPatient/5".into());
        assert_eq!(id.patient_context(), None);
        id.fhir_user = Some("Patient/bad id".into());
        assert_eq!(id.patient_context(), None);
        id.patient = Some("p-7".into());
        assert_eq!(id.patient_context().as_deref(), Some("p-7"));
    }
}
