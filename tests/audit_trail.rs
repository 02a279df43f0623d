//! Issue 16 against SEKMET and the real IdP: the audit trail says exactly who was shown which
//! patient's data (after ParticipantFilter), `/manage/audit` answers it, a patient reads their
//! own access log, and `fhir-gateway audit verify` catches a deleted, an edited and a
//! reordered record.

mod common;

use common::idp::*;
use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn audit_yaml(file: &Path, key: &Path) -> String {
    format!(
        "audit:\n  file: {}\n  key_file: {}\n  instance: gw-test\n  checkpoint_every: 5\n  patient_access_log: true\n",
        file.display(),
        key.display()
    )
}

/// The patients a response body shows, computed independently of the gateway: Patients by
/// id, everything else by `subject` (the only patient reference the seeded data uses).
fn shown(body: &Value, out: &mut BTreeSet<String>) {
    let mut one = |r: &Value| match r["resourceType"].as_str() {
        Some("Patient") => {
            out.insert(r["id"].as_str().unwrap().to_string());
        }
        Some(_) => {
            if let Some(s) = r["subject"]["reference"].as_str() {
                let id = s.rsplit("Patient/").next().unwrap();
                out.insert(id.to_string());
            }
        }
        None => {}
    };
    if body["resourceType"] == "Bundle" {
        for e in body["entry"].as_array().into_iter().flatten() {
            if e.get("resource").is_some() {
                one(&e["resource"]);
            }
        }
    } else {
        one(body);
    }
}

async fn get(gw: &Gateway, path: &str, token: &str) -> (u16, Value) {
    let r = client()
        .get(format!("{}/{path}", gw.base()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

async fn manage_audit(gw: &Gateway, query: &str, token: &str) -> (u16, Value) {
    let r = client()
        .get(gw.url(&format!("/manage/audit?{query}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

fn verify(file: &Path, key: &Path) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fhir-gateway"))
        .args(["audit", "verify"])
        .arg(file)
        .arg("--key-file")
        .arg(key)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_trail_names_exactly_who_was_shown_each_patient_and_verify_catches_tampering() {
    let (dir, file, key) = audit_trail_dir("audit");
    let gw = jwt_gateway(&format!(
        "policy:\n  read: [Reader, Administrator, Patient, Practitioner]\n  write: [Writer, Administrator]\npost:\n  - name: ParticipantFilter\n    settings: {{cache_ttl_secs: 30}}\n{}break_the_glass:\n  roles: [Practitioner]\n  minutes: 5\n",
        audit_yaml(&file, &key)
    ))
    .await;
    let m = uniq();
    let (pa, pb, pc, dr) = (
        format!("au-a-{m}"),
        format!("au-b-{m}"),
        format!("au-c-{m}"),
        format!("au-dr-{m}"),
    );
    put_direct(
        &format!("Practitioner/{dr}"),
        json!({"resourceType": "Practitioner", "id": dr}),
    )
    .await;
    for p in [&pa, &pb, &pc] {
        let mut pat = json!({"resourceType": "Patient", "id": p});
        if *p == pa {
            pat["generalPractitioner"] = json!([{"reference": format!("Practitioner/{dr}")}]);
        }
        put_direct(&format!("Patient/{p}"), pat).await;
        for i in 0..2 {
            put_direct(
                &format!("Observation/{p}-o{i}"),
                json!({"resourceType": "Observation", "id": format!("{p}-o{i}"), "status": "final",
                       "code": {"text": format!("audit-{m}")}, "subject": {"reference": format!("Patient/{p}")}}),
            )
            .await;
        }
    }
    let users = [
        (
            "oid-admin",
            user_token(&format!("admin-{m}"), &["Administrator"], None),
        ),
        (
            "oid-pa",
            user_token(
                &format!("pa-{m}"),
                &["Patient"],
                Some(&format!("Patient/{pa}")),
            ),
        ),
        (
            "oid-dr",
            user_token(
                &format!("dr-{m}"),
                &["Practitioner"],
                Some(&format!("Practitioner/{dr}")),
            ),
        ),
        (
            "oid-reader",
            user_token(&format!("reader-{m}"), &["Reader"], None),
        ),
    ];
    let user_id = |k: &str| format!("{}-{m}", k.trim_start_matches("oid-"));
    // The workload: reads, searches and one refusal per user, some of it filtered.
    let paths = [
        format!("Observation?code:text=audit-{m}"),
        format!("Patient/{pa}"),
        format!("Patient/{pb}"),
        format!("Observation?subject=Patient/{pc}"),
        format!("Observation/{pb}-o1"),
    ];
    let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut requests = 0;
    for (who, token) in &users {
        for p in &paths {
            let (st, body) = get(&gw, p, token).await;
            requests += 1;
            if st == 200 {
                let mut seen = BTreeSet::new();
                shown(&body, &mut seen);
                for pid in seen {
                    expected.entry(pid).or_default().insert(user_id(who));
                }
            }
        }
    }
    // The filter did its part: the practitioner and the patient saw A only; the Reader, who
    // is nobody in the FHIR server, saw no patient (ParticipantFilter bypasses Administrators).
    assert_eq!(
        expected.get(&pb).cloned().unwrap_or_default(),
        BTreeSet::from([user_id("oid-admin")])
    );
    assert_eq!(
        expected.get(&pa).cloned().unwrap_or_default(),
        BTreeSet::from([user_id("oid-admin"), user_id("oid-pa"), user_id("oid-dr")])
    );

    // For every patient, who the trail says saw them is who was shown them: 0 missing, 0 extra.
    let admin = &users[0].1;
    for p in [&pa, &pb, &pc] {
        let (st, bundle) = manage_audit(&gw, &format!("patient=Patient/{p}"), admin).await;
        assert_eq!(st, 200, "{bundle}");
        let said: BTreeSet<String> = bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["resource"]["outcome"] == "0")
            .map(|e| {
                e["resource"]["agent"][0]["who"]["identifier"]["value"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let want = expected.get(p.as_str()).cloned().unwrap_or_default();
        let missing: Vec<_> = want.difference(&said).collect();
        let extra: Vec<_> = said.difference(&want).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "Patient/{p}: missing {missing:?}, extra {extra:?}"
        );
    }

    // A patient reads their own access log, not another's; a reader reads none.
    let (st, own) = manage_audit(&gw, &format!("patient=Patient/{pa}"), &users[1].1).await;
    assert_eq!(st, 200, "{own}");
    assert!(own["total"].as_u64().unwrap() >= 4, "{own}");
    let (st, _) = manage_audit(&gw, &format!("patient=Patient/{pb}"), &users[1].1).await;
    assert_eq!(st, 403);
    let (st, _) = manage_audit(&gw, &format!("patient=Patient/{pa}"), &users[3].1).await;
    assert_eq!(st, 403);
    // `since` after everything: nothing.
    let (st, later) = manage_audit(
        &gw,
        &format!("patient=Patient/{pa}&since=2999-01-01T00:00:00Z"),
        admin,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(later["total"], 0);

    // Break-the-glass: without a reason refused; with one the practitioner reads B, and so
    // for the session's time; every such read is audited with the reason.
    let dr_token = &users[2].1;
    let glass = |reason: Option<&'static str>| {
        let mut r = client()
            .get(format!("{}/Patient/{pb}", gw.base()))
            .bearer_auth(dr_token);
        if let Some(why) = reason {
            r = r.header("X-Break-The-Glass", why);
        }
        r
    };
    let r = glass(Some(" ")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("needs a reason"));
    let r = glass(None).send().await.unwrap();
    assert_ne!(r.status(), 200, "no session yet: filtered");
    let r = glass(Some("unconscious patient in ED"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["id"], pb.as_str());
    let r = glass(None).send().await.unwrap();
    assert_eq!(r.status(), 200, "the session holds");
    let r = client()
        .get(format!("{}/Patient/{pb}", gw.base()))
        .bearer_auth(&users[1].1)
        .header("X-Break-The-Glass", "curious")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a Patient may not break the glass");
    let (st, sessions) = {
        let r = client()
            .get(gw.url("/manage/glass"))
            .bearer_auth(admin)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(st, 200);
    assert_eq!(sessions["sessions"][0]["user"], user_id("oid-dr"));
    assert_eq!(
        sessions["sessions"][0]["reason"],
        "unconscious patient in ED"
    );
    assert!(
        gw.log().contains("break-the-glass: user"),
        "logged for the privacy officer"
    );
    let (_, trail) = manage_audit(&gw, &format!("patient=Patient/{pb}"), admin).await;
    let glassed: Vec<&Value> = trail["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .filter(|ev| ev["agent"][0]["who"]["identifier"]["value"] == user_id("oid-dr").as_str())
        .collect();
    assert_eq!(
        glassed.len(),
        2,
        "both reads of B under the session: {trail}"
    );
    for ev in glassed {
        assert_eq!(
            ev["agent"][0]["purposeOfUse"][0]["text"],
            "unconscious patient in ED"
        );
        assert_eq!(ev["purposeOfEvent"][0]["coding"][0]["code"], "BTG");
    }

    // Every request of the workload has a record, with its correlation id; the token never.
    let text = std::fs::read_to_string(&file).unwrap();
    let records = text.lines().filter(|l| l.contains("\"event\"")).count();
    assert!(
        records >= requests,
        "{records} records for {requests} requests"
    );
    assert!(!text.contains(&users[0].1), "a token in the trail");

    // Intact: verify passes. Then one deleted, one edited, one reordered record: each found.
    let (code, out) = verify(&file, &key);
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = text.lines().collect();
    let record_at = |i: usize| {
        lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains("\"event\""))
            .nth(i)
            .unwrap()
            .0
    };
    let write = |name: &str, ls: Vec<String>| {
        let f = dir.join(name);
        std::fs::write(&f, ls.join("\n") + "\n").unwrap();
        f
    };
    let all = || lines.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut deleted = all();
    deleted.remove(record_at(3));
    let (code, out) = verify(&write("deleted.jsonl", deleted), &key);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("missing") && out.contains("deleted"), "{out}");
    let mut edited = all();
    let at = record_at(5);
    edited[at] = edited[at].replacen("\"outcome\":\"0\"", "\"outcome\":\"4\"", 1);
    assert_ne!(edited[at], lines[at]);
    let (code, out) = verify(&write("edited.jsonl", edited), &key);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("edited"), "{out}");
    let mut moved = all();
    moved.swap(record_at(6), record_at(7));
    let (code, out) = verify(&write("moved.jsonl", moved), &key);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("reordered"), "{out}");
    let _ = std::fs::remove_dir_all(dir);
}
