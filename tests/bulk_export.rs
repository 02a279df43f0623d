//! Bulk Data export (spec §9, pitfall 29) through the gateway to the real SEKMET server, with
//! tokens from the real OIDC provider: kick-off, the status URL the gateway hands out (202
//! while running, the manifest rewritten), NDJSON files streamed and rewritten, DELETE; the
//! URLs bound to the caller who started the export (404 for anyone else, for a tampered token
//! and for the server's raw paths), and the role, participant and `_type`/scope rules.

mod common;

use common::bulk::*;
use common::idp::*;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    h.get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

/// Creates a resource directly at SEKMET (setup, not under test) and returns its id.
async fn create_at_sekmet(resource: Value) -> String {
    let ty = resource["resourceType"].as_str().unwrap().to_string();
    let r = client()
        .post(format!("{}/{ty}", sekmet_url()))
        .header("Content-Type", "application/fhir+json")
        .body(resource.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    v["id"].as_str().unwrap().to_string()
}

/// A headers-only post module on the route: exported files carry its headers too.
const NO_STORE: &str =
    "post:\n  - name: ResponseHeaders\n    settings: {set: {Cache-Control: no-store}}\n";

/// Downloads every output file of a manifest through the gateway as `token` (on a route with
/// `NO_STORE`): each streams (the access log says `road=stream`), carries `Cache-Control:
/// no-store`, is NDJSON of the manifest's type with its count of lines, and holds no upstream
/// address. Returns the files' lines by type.
async fn download_all(
    gw: &Gateway,
    manifest: &Value,
    token: &str,
) -> std::collections::HashMap<String, Vec<Value>> {
    let mut files = std::collections::HashMap::new();
    for out in manifest["output"].as_array().unwrap() {
        let url = out["url"].as_str().unwrap();
        assert!(
            url.starts_with(&format!("{}/$bulk-file/", gw.base())),
            "{url}"
        );
        let id = format!("bulk-file-{}", uniq());
        let r = client()
            .get(url)
            .bearer_auth(token)
            .header("X-Request-Id", &id)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{url}");
        let h = r.headers().clone();
        assert_eq!(header(&h, "content-type"), "application/fhir+ndjson");
        assert_eq!(header(&h, "x-request-id"), id);
        assert_eq!(header(&h, "cache-control"), "no-store", "{url}");
        let body = r.bytes().await.unwrap();
        assert_no_upstream_address(&h, &body, &sekmet_url());
        assert!(!String::from_utf8_lossy(&body).contains(":8090"));
        let lines: Vec<Value> = std::str::from_utf8(&body)
            .unwrap()
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).expect("each line a JSON resource"))
            .collect();
        let ty = out["type"].as_str().unwrap();
        assert!(lines.iter().all(|v| v["resourceType"] == ty), "{ty}");
        assert_eq!(lines.len() as u64, out["count"].as_u64().unwrap(), "{ty}");
        assert_eq!(road_of(gw, &id).await, "stream", "files are streamed");
        // SEKMET saw the server's own file path, with the gateway's service identity and
        // the caller's audit headers, never the caller's token.
        let got = sekmet_received(&id);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["method"], "GET");
        assert!(
            got[0]["url"]
                .as_str()
                .unwrap()
                .contains("/fhir/bulk-files/"),
            "{got:?}"
        );
        assert!(got[0]["headers"].get("authorization").is_none(), "{got:?}");
        assert_eq!(
            got[0]["headers"]["x-ms-azurefhir-audit-userid"],
            "oid-admin-app"
        );
        files.insert(ty.to_string(), lines);
    }
    files
}

#[tokio::test(flavor = "multi_thread")]
async fn patient_export_through_the_gateway_for_its_owner_only() {
    let gw = jwt_gateway(&bulk_yaml(NO_STORE)).await;
    let admin = token("admin-app").await;
    // A patient whose data names the server by its own address: the file must not.
    let pid = create_at_sekmet(json!({
        "resourceType": "Patient",
        "name": [{"family": format!("Bulk{}", uniq())}],
        "extension": [{"url": "http://example.org/source",
                       "valueUri": format!("{}/Patient/origin", sekmet_url())}]
    }))
    .await;
    create_at_sekmet(json!({
        "resourceType": "Observation", "status": "final",
        "code": {"text": "bulk"}, "subject": {"reference": format!("Patient/{pid}")}
    }))
    .await;

    // Kick-off: 202, the status URL is the gateway's and bound to this caller.
    let kid = format!("bulk-kick-{}", uniq());
    let kick = format!("{}/Patient/$export?_type=Patient,Observation", gw.base());
    let r = kick_off(&kick, &admin, &kid).await;
    assert_eq!(r.status(), 202);
    let h = r.headers().clone();
    let status_url = header(&h, "content-location").to_string();
    assert!(
        status_url.starts_with(&format!("{}/$bulk-status/", gw.base())),
        "{status_url}"
    );
    assert_no_upstream_address(&h, &r.bytes().await.unwrap(), &sekmet_url());
    let sent = sekmet_received(&kid);
    assert_eq!(sent.len(), 1);
    assert!(sent[0]["url"]
        .as_str()
        .unwrap()
        .ends_with("/fhir/Patient/$export?_type=Patient,Observation"));
    assert_eq!(sent[0]["headers"]["prefer"], "respond-async");
    assert!(sent[0]["headers"].get("authorization").is_none());
    assert!(carried_path(&status_url).starts_with("/bulk-status/"));

    // Polling: 202 with the server's progress headers while it runs, then the manifest.
    let done = poll_until_done(&status_url, &admin).await;
    if let Some(running) = &done.running {
        assert!(running.get("retry-after").is_some(), "{running:?}");
        assert!(running.get("x-progress").is_some(), "{running:?}");
    }
    assert_eq!(header(&done.headers, "content-type"), "application/json");
    assert_no_upstream_address(&done.headers, &done.body, &sekmet_url());
    let text = String::from_utf8_lossy(&done.body);
    assert!(
        !text.contains("8090") && !text.contains("localhost"),
        "{text}"
    );
    let m = &done.manifest;
    assert_eq!(m["request"], kick.as_str());
    assert_eq!(m["requiresAccessToken"], true);
    assert!(m["transactionTime"].is_string());
    let types: Vec<&str> = m["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["type"].as_str().unwrap())
        .collect();
    assert!(
        types.contains(&"Patient") && types.contains(&"Observation"),
        "{types:?}"
    );

    let files = download_all(&gw, m, &admin).await;
    let mine = files["Patient"]
        .iter()
        .find(|p| p["id"] == pid.as_str())
        .expect("the new patient is exported");
    assert_eq!(
        mine["extension"][0]["valueUri"],
        format!("{}/Patient/origin", gw.base()).as_str(),
        "the server's address inside the file is rewritten"
    );

    // Another Administrator of the same tenant, the same user id in another tenant: 404 on
    // the status URL and on a file URL, and nothing reaches SEKMET.
    let file_url = m["output"][0]["url"].as_str().unwrap().to_string();
    let others = [
        sign_as_idp(&admin_claims("oid-other-admin", TENANT_A, None)),
        sign_as_idp(&admin_claims("oid-admin-app", TENANT_B, None)),
    ];
    for other in &others {
        for url in [&status_url, &file_url] {
            let id = format!("bulk-foreign-{}", uniq());
            let r = client()
                .get(url)
                .bearer_auth(other)
                .header("X-Request-Id", &id)
                .send()
                .await
                .unwrap();
            let v = assert_outcome(r, 404, "not-found").await;
            assert!(
                v.to_string().contains("no such Bulk Data export URL"),
                "{v}"
            );
            assert_sekmet_never_received(&id).await;
        }
        let r = client()
            .delete(&status_url)
            .bearer_auth(other)
            .send()
            .await
            .unwrap();
        assert_outcome(r, 404, "not-found").await;
    }
    // A tampered token, a token of the wrong kind, no token at all.
    for url in [tampered(&status_url), tampered(&file_url)] {
        let r = client().get(&url).bearer_auth(&admin).send().await.unwrap();
        assert_outcome(r, 404, "not-found").await;
    }
    let wrong_kind = status_url.replace("/$bulk-status/", "/$bulk-file/");
    let r = client()
        .get(&wrong_kind)
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_outcome(r, 404, "not-found").await;
    let r = client().get(&status_url).send().await.unwrap();
    assert_outcome(r, 401, "login").await;
    let r = client()
        .post(&status_url)
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_outcome(r, 405, "not-supported").await;
    let r = client()
        .delete(&status_url)
        .bearer_auth(&admin)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_outcome(r, 400, "invalid").await;

    // The server's own paths, sent by a client, are not proxied (even by the owner).
    for path in [carried_path(&status_url), carried_path(&file_url)] {
        let id = format!("bulk-raw-{}", uniq());
        let r = client()
            .get(format!("{}{path}", gw.base()))
            .bearer_auth(&admin)
            .header("X-Request-Id", &id)
            .send()
            .await
            .unwrap();
        assert_outcome(r, 400, "invalid").await;
        assert_sekmet_never_received(&id).await;
    }
    let r = client()
        .delete(format!("{}{}", gw.base(), carried_path(&status_url)))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_outcome(r, 400, "invalid").await;
    // The owner's URLs still work after all that.
    let r = client()
        .get(&status_url)
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn group_export_and_cancel() {
    let gw = jwt_gateway(&bulk_yaml(NO_STORE)).await;
    let admin = token("admin-app").await;
    let family = format!("Grp{}", uniq());
    let mut members = Vec::new();
    for _ in 0..3 {
        members.push(
            create_at_sekmet(json!({"resourceType": "Patient", "name": [{"family": family}]}))
                .await,
        );
    }
    let group = create_at_sekmet(json!({
        "resourceType": "Group", "type": "person", "actual": true,
        "member": members.iter().map(|m| json!({"entity": {"reference": format!("Patient/{m}")}})).collect::<Vec<_>>()
    }))
    .await;

    let kick = format!("{}/Group/{group}/$export", gw.base());
    let r = kick_off(&kick, &admin, &format!("bulk-group-{}", uniq())).await;
    assert_eq!(r.status(), 202);
    let status_url = header(r.headers(), "content-location").to_string();
    let done = poll_until_done(&status_url, &admin).await;
    assert_eq!(done.manifest["request"], kick.as_str());
    let files = download_all(&gw, &done.manifest, &admin).await;
    let mut got: Vec<&str> = files["Patient"]
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    got.sort();
    members.sort();
    assert_eq!(got, members);
    assert_eq!(files["Group"][0]["id"], group.as_str());

    // Cancel: another export, DELETE on its status URL passes SEKMET's 202 on; afterwards the
    // status URL gives the server's 404.
    let r = kick_off(&kick, &admin, &format!("bulk-group-{}", uniq())).await;
    assert_eq!(r.status(), 202);
    let status_url = header(r.headers(), "content-location").to_string();
    let id = format!("bulk-cancel-{}", uniq());
    let r = client()
        .delete(&status_url)
        .bearer_auth(&admin)
        .header("X-Request-Id", &id)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(header(r.headers(), "x-request-id"), id);
    let h = r.headers().clone();
    let body = r.bytes().await.unwrap();
    assert_no_upstream_address(&h, &body, &sekmet_url());
    let sent = sekmet_received(&id);
    assert_eq!(sent[0]["method"], "DELETE");
    assert!(sent[0]["url"]
        .as_str()
        .unwrap()
        .contains("/fhir/bulk-status/"));
    assert_eq!(
        sent[0]["headers"]["x-ms-azurefhir-audit-userid"],
        "oid-admin-app"
    );
    let r = client()
        .get(&status_url)
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["resourceType"], "OperationOutcome");
}

#[tokio::test(flavor = "multi_thread")]
async fn who_may_export_and_which_types() {
    let gw = jwt_gateway(&bulk_yaml("")).await;
    let admin = token("admin-app").await;

    // System-level export works for an Administrator (cancelled at once: it is large).
    let r = kick_off(
        &format!("{}/$export", gw.base()),
        &admin,
        &format!("bulk-sys-{}", uniq()),
    )
    .await;
    assert_eq!(r.status(), 202);
    let status_url = header(r.headers(), "content-location").to_string();
    assert!(status_url.starts_with(&format!("{}/$bulk-status/", gw.base())));
    // Polled at once, a system export is still running: the server's 202 with its progress
    // headers, no body.
    let r = client()
        .get(&status_url)
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(header(r.headers(), "retry-after"), "1");
    assert!(r.headers().get("x-progress").is_some());
    assert!(r.bytes().await.unwrap().is_empty());
    let r = client()
        .delete(&status_url)
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    // Roles outside bulk.export_roles (default Administrator): 403 naming the rule, nothing
    // sent upstream. A Writer already fails the route's read rule.
    for (who, rule) in [
        ("reader-app", "Bulk Data export needs Administrator"),
        ("writer-app", "needs Reader or Administrator"),
    ] {
        let id = format!("bulk-role-{}", uniq());
        let r = kick_off(
            &format!("{}/Patient/$export", gw.base()),
            &token(who).await,
            &id,
        )
        .await;
        let v = assert_outcome(r, 403, "forbidden").await;
        assert!(v.to_string().contains(rule), "{who}: {v}");
        assert_sekmet_never_received(&id).await;
    }
    // A Reader cannot use an Administrator's status URL either (and learns nothing of it).
    let r = client()
        .get(&status_url)
        .bearer_auth(token("reader-app").await)
        .send()
        .await
        .unwrap();
    assert_outcome(r, 403, "forbidden").await;

    // `_type` against SMART scopes: a type outside them is refused, not dropped; no `_type`
    // with type-limited scopes is refused, not narrowed.
    let scoped = sign_as_idp(&admin_claims(
        "oid-scoped-admin",
        TENANT_A,
        Some("system/Patient.read system/Group.read"),
    ));
    for (query, why) in [
        ("?_type=Patient,Observation", "on Observation"),
        ("", "on every resource type"),
    ] {
        let id = format!("bulk-scope-{}", uniq());
        let r = kick_off(
            &format!("{}/Patient/$export{query}", gw.base()),
            &scoped,
            &id,
        )
        .await;
        let v = assert_outcome(r, 403, "forbidden").await;
        assert!(v.to_string().contains("scope: no scope grants 'r'"), "{v}");
        assert!(v.to_string().contains(why), "{v}");
        assert_sekmet_never_received(&id).await;
    }
    let r = kick_off(
        &format!("{}/Patient/$export?_type=Patient", gw.base()),
        &scoped,
        &format!("bulk-scope-{}", uniq()),
    )
    .await;
    assert_eq!(r.status(), 202);
    let scoped_status = header(r.headers(), "content-location").to_string();
    // Bound to that caller: the unscoped Administrator of the same tenant gets 404.
    let r = client()
        .get(&scoped_status)
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_outcome(r, 404, "not-found").await;
    let r = client()
        .delete(&scoped_status)
        .bearer_auth(&scoped)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // `patient/` scopes never export.
    let pat = sign_as_idp(&admin_claims(
        "oid-patient-scoped",
        TENANT_A,
        Some("patient/*.read"),
    ));
    let r = kick_off(
        &format!("{}/Patient/$export?_type=Patient", gw.base()),
        &pat,
        "bulk-pat-1",
    )
    .await;
    assert_outcome(r, 403, "forbidden").await;

    // Only the GET kick-off: a POST one (its _type would hide in a body) is refused.
    let r = client()
        .post(format!("{}/Patient/$export", gw.base()))
        .bearer_auth(&admin)
        .header("Prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_outcome(r, 405, "not-supported").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn callers_the_data_filters_would_filter_may_not_export() {
    // Practitioners may read here (through ParticipantFilter) and are even listed as export
    // roles: still refused, since exported files are not filtered per caller. A headers-only
    // module that applies to everyone (ResponseHeaders) changes no data and bars nobody.
    let gw = jwt_gateway(&bulk_yaml(
        "  export_roles: [Administrator, Practitioner]\npolicy:\n  read: [Reader, Administrator, Practitioner]\npost:\n  - name: ParticipantFilter\n  - name: ResponseHeaders\n    settings: {set: {Cache-Control: no-store}}\n",
    ))
    .await;
    let id = format!("bulk-participant-{}", uniq());
    let r = kick_off(
        &format!("{}/Patient/$export", gw.base()),
        &token("practitioner-app").await,
        &id,
    )
    .await;
    let v = assert_outcome(r, 403, "forbidden").await;
    assert!(v.to_string().contains("ParticipantFilter"), "{v}");
    assert_sekmet_never_received(&id).await;
    // An Administrator, whom the filter lets through, exports on the same route.
    let admin = token("admin-app").await;
    let r = kick_off(
        &format!("{}/Patient/$export?_type=Patient", gw.base()),
        &admin,
        &format!("bulk-participant-{}", uniq()),
    )
    .await;
    assert_eq!(r.status(), 202);
    let status_url = header(r.headers(), "content-location").to_string();
    let r = client()
        .delete(&status_url)
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_with_one_key_serve_each_others_urls() {
    // Two instances behind one load balancer, one key file: a status URL one of them handed
    // out works on the other (the token carries everything; no instance remembers it).
    let shared = bulk_yaml("");
    let (a, b) = (jwt_gateway(&shared).await, jwt_gateway(&shared).await);
    let admin = token("admin-app").await;
    let r = kick_off(
        &format!("{}/Patient/$export?_type=Patient", a.base()),
        &admin,
        &format!("bulk-lb-{}", uniq()),
    )
    .await;
    assert_eq!(r.status(), 202);
    let on_a = header(r.headers(), "content-location").to_string();
    let on_b = on_a.replace(&a.base(), &b.base());
    let done = poll_until_done(&on_b, &admin).await;
    let file_on_b = done.manifest["output"][0]["url"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(file_on_b.starts_with(&format!("{}/$bulk-file/", b.base())));
    let r = client()
        .get(file_on_b.replace(&b.base(), &a.base()))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // An instance without a configured key says so at start, and its own random key does not
    // verify the others' URLs.
    let alone = jwt_gateway("").await;
    alone
        .log_line("bulk.binding_key_file not set", Duration::from_secs(5))
        .await;
    assert!(!a.log().contains("bulk.binding_key_file not set"));
    let r = client()
        .get(on_a.replace(&a.base(), &alone.base()))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_outcome(r, 404, "not-found").await;
}
