//! Endpoints the gateway answers itself: health probes, SMART configuration, and the secured
//! CapabilityStatement of `/metadata`.

use super::*;

impl FhirProxy {
    /// Answers what the gateway serves itself: `/healthz`, `/readyz`, `/manage`, paths outside
    /// every route, and a route's SMART configuration. `None`: the request is for a route
    /// (`ctx.route` is set) and goes on to admission.
    pub(super) async fn local_endpoint(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> Option<Result<bool>> {
        let path = session.req_header().uri.path().to_string();
        let get = matches!(session.req_header().method, Method::GET | Method::HEAD);
        let answer = match path.as_str() {
            "/healthz" | "/readyz" if !get => Err(GatewayError::MethodNotAllowed(
                "health endpoints answer GET and HEAD".into(),
            )),
            "/healthz" => Ok(br#"{"status":"ok"}"#.to_vec()),
            "/readyz" => match self.gw.health.not_ready_reason(&self.gw) {
                None => Ok(br#"{"status":"ready"}"#.to_vec()),
                Some(why) => Err(GatewayError::NotReady(why.into())),
            },
            p if p == "/manage" || p.starts_with("/manage/") => {
                return Some(self.manage(session, ctx).await);
            }
            _ => match self.gw.route_for(&path) {
                None => Err(GatewayError::NotFound(format!("no route for {path}"))),
                Some(route) => {
                    ctx.route = route;
                    ctx.routed = true;
                    let rest = &path[self.gw.routes[route].prefix.len()..];
                    ctx.metadata = rest == "/metadata" && get;
                    if rest != "/.well-known/smart-configuration" || !get {
                        return None;
                    }
                    self.smart_configuration()
                }
            },
        };
        Some(match answer {
            Ok(body) => {
                self.respond(session, ctx, 200, "application/json", body)
                    .await
            }
            Err(e) => self.respond_error(session, ctx, e).await,
        })
    }

    /// `/.well-known/smart-configuration` from the IdP's discovery document.
    pub(super) fn smart_configuration(&self) -> std::result::Result<Vec<u8>, GatewayError> {
        let gw = &self.gw;
        let issuer = gw
            .auth
            .smart_issuer(gw.smart.issuer.as_deref())
            .ok_or_else(|| GatewayError::NotFound("no OAuth issuer configured".into()))?;
        let disc = issuer
            .keys
            .discovery
            .read()
            .expect("discovery lock")
            .clone()
            .ok_or_else(|| {
                GatewayError::NotReady(
                    "the identity provider's discovery document is not loaded".into(),
                )
            })?;
        let pick = |k: &str| disc.get(k).cloned().unwrap_or(Value::Null);
        let mut doc = json!({
            "issuer": pick("issuer"),
            "jwks_uri": pick("jwks_uri"),
            "authorization_endpoint": pick("authorization_endpoint"),
            "token_endpoint": pick("token_endpoint"),
            "token_endpoint_auth_methods_supported": pick("token_endpoint_auth_methods_supported"),
            "grant_types_supported": pick("grant_types_supported"),
            "scopes_supported": pick("scopes_supported"),
            "response_types_supported": pick("response_types_supported"),
            "code_challenge_methods_supported": ["S256"],
            // What the gateway enforces; override with auth.smart.configuration to match the IdP.
            "capabilities": [
                "launch-standalone", "client-public", "client-confidential-symmetric",
                "permission-patient", "permission-user", "permission-v1", "permission-v2"
            ]
        });
        let obj = doc.as_object_mut().expect("object");
        obj.retain(|_, v| !v.is_null());
        for (k, v) in &gw.smart.configuration {
            obj.insert(k.clone(), v.clone());
        }
        Ok(serde_json::to_vec(&doc).expect("serialises"))
    }

    /// Sets `rest[].security` of a CapabilityStatement to our OAuth endpoints.
    pub(super) fn secure_capability_statement(&self, body: &[u8]) -> Option<Vec<u8>> {
        let gw = &self.gw;
        if gw.auth_mode != AuthMode::Jwt {
            return None;
        }
        // Without the IdP's endpoints there is nothing true to advertise.
        let disc = gw
            .auth
            .smart_issuer(gw.smart.issuer.as_deref())
            .and_then(|i| i.keys.discovery.read().expect("discovery lock").clone())?;
        let mut uris = Vec::new();
        for (name, key) in [
            ("token", "token_endpoint"),
            ("authorize", "authorization_endpoint"),
        ] {
            if let Some(u) = disc.get(key).and_then(Value::as_str) {
                uris.push(json!({"url": name, "valueUri": u}));
            }
        }
        let security = json!({
            "cors": true,
            "service": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                "code": "SMART-on-FHIR"
            }]}],
            "extension": [{
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": uris
            }]
        });
        // Only `rest[].security` is the gateway's: the rest keeps the server's bytes.
        crate::faithful::edit(body, |cs| {
            if cs.get("resourceType").and_then(Value::as_str) != Some("CapabilityStatement") {
                return false;
            }
            if let Some(rest) = cs.get_mut("rest").and_then(Value::as_array_mut) {
                for r in rest {
                    if let Some(o) = r.as_object_mut() {
                        o.insert("security".into(), security.clone());
                    }
                }
            }
            true
        })
    }
}
