//! Identity links and `/manage` against the real IdP and SEKMET: who may use the API, what it
//! writes into the FHIR server (and with whose audit headers), that a link or an unlink takes
//! effect on the very next request, and that a relation written through the gateway does too.

mod common;

use common::idp::*;
use common::*;
use serde_json::{json, Value};

/// Caches far longer than the test: only invalidation can explain a change seen at once.
const CHAIN: &str = "identity_links:\n  cache_ttl_secs: 600\npolicy:\n  read: [Reader, Administrator, Practitioner]\n  write: [Writer, Administrator]\npost:\n  - name: ParticipantFilter\n    settings: {cache_ttl_secs: 600}\n";

/// A practitioner token with no fhirUser: who they are comes from a link.
fn practitioner_token(oid: &str) -> String {
    let now = now_secs();
    sign_as_idp(&json!({
        "iss": IDP, "aud": AUDIENCE, "exp": now + 300, "iat": now, "sub": oid,
        "roles": ["Practitioner"], "oid": oid, "tid": TENANT_A
    }))
}

async fn observation_ids(gw: &Gateway, token: &str, mark: &str) -> Vec<String> {
    let r = client()
        .get(format!(
            "{}/Observation?code=urn:manage-test|{mark}",
            gw.base()
        ))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    let mut ids: Vec<String> = b["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["search"]["mode"] != "outcome")
        .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

async fn manage(gw: &Gateway, token: &str, op: &str, body: &Value) -> (u16, Value) {
    let r = client()
        .post(gw.url(&format!("/manage/{op}")))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn manage_needs_an_administrator() {
    let gw = jwt_gateway(CHAIN).await;
    let r = client().get(gw.url("/manage/links")).send().await.unwrap();
    assert_outcome(r, 401, "login").await;
    let r = client()
        .get(gw.url("/manage/links"))
        .bearer_auth(token("reader-app").await)
        .send()
        .await
        .unwrap();
    assert_outcome(r, 403, "forbidden").await;
    let admin = token("admin-app").await;
    let r = client()
        .delete(gw.url("/manage/link"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let r = client()
        .get(gw.url("/manage/nothing"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_outcome(r, 404, "not-found").await;
    for bad in [
        json!({"tenant": TENANT_A, "oid": "x", "reference": "Observation/1"}),
        json!({"tenant": TENANT_A, "oid": "x", "reference": "Patient/a b"}),
        json!({"tenant": TENANT_A, "oid": "x|y", "reference": "Patient/1"}),
        json!({"tenant": TENANT_A, "oid": "x", "reference": "Patient/1", "extra": 1}),
    ] {
        let (s, b) = manage(&gw, &admin, "link", &bad).await;
        assert_eq!(s, 400, "{bad}: {b}");
        assert_eq!(b["resourceType"], "OperationOutcome");
    }
    let (s, _) = manage(
        &gw,
        &admin,
        "link",
        &json!({"tenant": TENANT_A, "oid": "x", "reference": format!("Practitioner/missing-{}", uniq())}),
    )
    .await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_link_and_an_unlink_take_effect_on_the_next_request() {
    let gw = jwt_gateway(CHAIN).await;
    let admin = token("admin-app").await;
    let admin_oid = claims_of(&admin)["oid"].as_str().unwrap().to_string();
    let m = uniq();
    let (dr, other_dr, pa, pb) = (
        format!("{m}-dr"),
        format!("{m}-dr2"),
        format!("{m}-pa"),
        format!("{m}-pb"),
    );
    put_direct(
        &format!("Practitioner/{dr}"),
        json!({"resourceType": "Practitioner", "id": dr, "name": [{"family": format!("Linktest{m}")}]}),
    )
    .await;
    put_direct(
        &format!("Practitioner/{other_dr}"),
        json!({"resourceType": "Practitioner", "id": other_dr}),
    )
    .await;
    for (p, gp) in [(&pa, Some(&dr)), (&pb, None)] {
        let mut patient = json!({"resourceType": "Patient", "id": p});
        if let Some(gp) = gp {
            patient["generalPractitioner"] = json!([{"reference": format!("Practitioner/{gp}")}]);
        }
        put_direct(&format!("Patient/{p}"), patient).await;
        put_direct(
            &format!("Observation/{p}-obs"),
            json!({"resourceType": "Observation", "id": format!("{p}-obs"), "status": "final",
                   "code": {"coding": [{"system": "urn:manage-test", "code": m}]},
                   "subject": {"reference": format!("Patient/{p}")}}),
        )
        .await;
    }
    let oid = format!("oid-{m}");
    let tok = practitioner_token(&oid);
    // Not linked: nobody in the FHIR server, so no patient data at all.
    assert!(observation_ids(&gw, &tok, &m).await.is_empty());

    // find
    let r = client()
        .get(gw.url(&format!("/manage/find?type=Practitioner&name=Linktest{m}")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let found: Value = r.json().await.unwrap();
    assert_eq!(
        found["candidates"][0]["reference"],
        format!("Practitioner/{dr}")
    );

    // link, written into the FHIR server with the administrator's audit headers
    let link = json!({"tenant": TENANT_A, "oid": oid, "reference": format!("Practitioner/{dr}")});
    let rid = format!("link-{m}");
    let r = client()
        .post(gw.url("/manage/link"))
        .bearer_auth(&admin)
        .header("X-Request-Id", &rid)
        .json(&link)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let put = sekmet_received(&rid)
        .into_iter()
        .find(|c| c["method"] == "PUT")
        .expect("SEKMET received the PUT");
    assert!(put["url"]
        .as_str()
        .unwrap()
        .ends_with(&format!("/Practitioner/{dr}")));
    assert_eq!(put["headers"]["x-ms-azurefhir-audit-userid"], admin_oid);
    assert!(put["headers"]["if-match"].is_string(), "optimistic update");
    let stored: Value = client()
        .get(format!("{}/Practitioner/{dr}", sekmet_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        stored["identifier"][0]["value"],
        format!("{TENANT_A}/{oid}")
    );
    // The very next request: the practitioner sees their patient, not the other one.
    assert_eq!(observation_ids(&gw, &tok, &m).await, [format!("{pa}-obs")]);

    // Idempotent; a second resource for the same identity is a conflict.
    assert_eq!(manage(&gw, &admin, "link", &link).await.0, 200);
    let again =
        json!({"tenant": TENANT_A, "oid": oid, "reference": format!("Practitioner/{other_dr}")});
    let (s, b) = manage(&gw, &admin, "link", &again).await;
    assert_eq!(s, 409, "{b}");

    // list
    let r = client()
        .get(gw.url("/manage/links"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    let listed: Value = r.json().await.unwrap();
    assert!(
        listed["links"].as_array().unwrap().contains(&link),
        "{listed}"
    );

    // A relation written through the gateway: the practitioner joins pb's CareTeam.
    let writer = token("writer-app").await;
    let r = client()
        .put(format!("{}/CareTeam/{m}-ct", gw.base()))
        .bearer_auth(&writer)
        .header("Content-Type", "application/fhir+json")
        .body(
            json!({"resourceType": "CareTeam", "id": format!("{m}-ct"),
               "subject": {"reference": format!("Patient/{pb}")},
               "participant": [{"member": {"reference": format!("Practitioner/{dr}")}}]})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        observation_ids(&gw, &tok, &m).await,
        [format!("{pa}-obs"), format!("{pb}-obs")]
    );

    // unlink: at once, nobody again.
    let (s, _) = manage(&gw, &admin, "unlink", &link).await;
    assert_eq!(s, 200);
    assert!(observation_ids(&gw, &tok, &m).await.is_empty());
    let (s, _) = manage(&gw, &admin, "unlink", &link).await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn only_manage_writes_link_identifiers() {
    let gw = jwt_gateway(CHAIN).await;
    let admin = token("admin-app").await;
    let writer = token("readwrite-app").await;
    let writer_oid = claims_of(&writer)["oid"].as_str().unwrap().to_string();
    let m = uniq();
    let p = format!("{m}-victim");
    put_direct(
        &format!("Patient/{p}"),
        json!({"resourceType": "Patient", "id": p}),
    )
    .await;
    let link = |oid: &str| json!({"system": "urn:fhir-gateway:identity-link", "value": format!("{TENANT_A}/{oid}")});
    // A Writer linking themselves to a patient: refused, nothing reaches the server.
    for (method, path, body) in [
        (
            "PUT",
            format!("Patient/{p}"),
            json!({"resourceType": "Patient", "id": p, "identifier": [link(&writer_oid)]}),
        ),
        (
            "POST",
            "Patient".to_string(),
            json!({"resourceType": "Patient", "identifier": [link(&writer_oid)]}),
        ),
        (
            "PATCH",
            format!("Patient/{p}"),
            json!([{"op": "add", "path": "/identifier", "value": [link(&writer_oid)]}]),
        ),
    ] {
        let rid = format!("guard-{}", uniq());
        let r = client()
            .request(method.parse().unwrap(), format!("{}/{path}", gw.base()))
            .bearer_auth(&writer)
            .header("X-Request-Id", &rid)
            .header(
                "Content-Type",
                if method == "PATCH" {
                    "application/json-patch+json"
                } else {
                    "application/fhir+json"
                },
            )
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_outcome(r, 403, "forbidden").await;
        // At most the read that compares links, with the writer's audit headers; no write.
        for call in sekmet_received_settled(&rid).await {
            assert_eq!(call["method"], "GET", "{call}");
            assert_eq!(
                call["headers"]["x-ms-azurefhir-audit-userid"],
                writer_oid.as_str()
            );
        }
    }
    // A link made through /manage survives an ordinary update that keeps it.
    let oid = format!("oid-{m}");
    let (s, _) = manage(
        &gw,
        &admin,
        "link",
        &json!({"tenant": TENANT_A, "oid": oid, "reference": format!("Patient/{p}")}),
    )
    .await;
    assert_eq!(s, 201);
    let r = client()
        .put(format!("{}/Patient/{p}", gw.base()))
        .bearer_auth(&writer)
        .header("Content-Type", "application/fhir+json")
        .body(
            json!({"resourceType": "Patient", "id": p, "gender": "female",
                   "identifier": [{"use": "secondary", "system": "urn:fhir-gateway:identity-link",
                                   "value": format!("{TENANT_A}/{oid}")}]})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "an update that keeps the link");
    // ... but not one that adds a second identity.
    let r = client()
        .put(format!("{}/Patient/{p}", gw.base()))
        .bearer_auth(&writer)
        .header("Content-Type", "application/fhir+json")
        .body(
            json!({"resourceType": "Patient", "id": p,
                   "identifier": [link(&oid), link(&writer_oid)]})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_outcome(r, 403, "forbidden").await;
    // Administrators may (they can use /manage anyway).
    let r = client()
        .put(format!("{}/Patient/{p}", gw.base()))
        .bearer_auth(&admin)
        .header("Content-Type", "application/fhir+json")
        .body(json!({"resourceType": "Patient", "id": p, "identifier": [link(&oid)]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
