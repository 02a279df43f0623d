//! Byte fidelity for JSON the gateway did not author. Modules work on a parsed tree; when the
//! result goes out, every part they left unchanged is written as the FHIR server's own bytes
//! (key order, decimal text such as `37.20`, escapes), and only what they edited is
//! serialised. With serde_json's `preserve_order` and `arbitrary_precision`, even an edited
//! part keeps its key order and its numbers' text.

use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::HashMap;

/// Serialises `out`, a module-edited copy of `orig`, which was parsed from `raw`.
pub fn to_vec(out: &Value, orig: &Value, raw: &[u8]) -> Vec<u8> {
    let mut w = Vec::with_capacity(raw.len());
    let parsed = std::str::from_utf8(raw)
        .ok()
        .and_then(|s| serde_json::from_str::<&RawValue>(s).ok());
    write(&mut w, out, parsed.map(|r| (orig, r)));
    w
}

/// Parses `raw` and hands the tree to `edit`; the answer is `raw` itself when nothing changed,
/// else the faithful serialisation. `None` when `raw` is not JSON or `edit` declines.
pub fn edit(raw: &[u8], edit: impl FnOnce(&mut Value) -> bool) -> Option<Vec<u8>> {
    let orig: Value = serde_json::from_slice(raw).ok()?;
    let mut out = orig.clone();
    if !edit(&mut out) {
        return None;
    }
    Some(if out == orig {
        raw.to_vec()
    } else {
        to_vec(&out, &orig, raw)
    })
}

fn write(w: &mut Vec<u8>, out: &Value, orig: Option<(&Value, &RawValue)>) {
    let Some((o, raw)) = orig else {
        serialise(w, out);
        return;
    };
    if o == out {
        w.extend_from_slice(raw.get().as_bytes());
        return;
    }
    match (out, o) {
        (Value::Object(m), Value::Object(om)) => {
            let Ok(members) = serde_json::from_str::<HashMap<String, &RawValue>>(raw.get()) else {
                serialise(w, out);
                return;
            };
            w.push(b'{');
            for (i, (k, v)) in m.iter().enumerate() {
                if i > 0 {
                    w.push(b',');
                }
                serialise_str(w, k);
                w.push(b':');
                let before = om.get(k).zip(members.get(k.as_str()).copied());
                write(w, v, before);
            }
            w.push(b'}');
        }
        (Value::Array(a), Value::Array(oa)) => {
            let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(raw.get()) else {
                serialise(w, out);
                return;
            };
            // Filters remove elements and sorts reorder them: find each one among the
            // originals, looking on from the last match first.
            let mut next = 0;
            w.push(b'[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    w.push(b',');
                }
                let found = (next..oa.len()).chain(0..next).find(|&j| oa[j] == *v);
                match found {
                    Some(j) => {
                        w.extend_from_slice(items[j].get().as_bytes());
                        next = j + 1;
                    }
                    // Edited in place: what it kept unchanged stays the server's bytes.
                    None if a.len() == oa.len() => write(w, v, Some((&oa[i], items[i]))),
                    None => serialise(w, v),
                }
            }
            w.push(b']');
        }
        _ => serialise(w, out),
    }
}

fn serialise(w: &mut Vec<u8>, v: &Value) {
    serde_json::to_writer(w, v).expect("a Value always serialises");
}

fn serialise_str(w: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(w, s).expect("a string always serialises");
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = r#"{"resourceType":"Bundle","type":"searchset","total":3,"link":[{"relation":"self","url":"http://up/fhir/Observation?x=1"}],"entry":[{"fullUrl":"http://up/fhir/Observation/a","resource":{"resourceType":"Observation","id":"a","valueQuantity":{"value":37.20,"unit":"\u00b0C"},"note":[{"text":"caf\u00e9 \/ \"q\""}],"big":123456789012345678901234567890}},{"fullUrl":"http://up/fhir/Observation/b","resource":{"resourceType":"Observation","id":"b","valueQuantity":{"value":1.0E2}}},{"fullUrl":"http://up/fhir/Observation/c","resource":{"id":"c","resourceType":"Observation","valueQuantity":{"value":-0.000}}}]}"#;

    fn entry_bytes(body: &str) -> Vec<String> {
        let v: HashMap<String, &RawValue> = serde_json::from_str(body).unwrap();
        let e: Vec<&RawValue> = serde_json::from_str(v["entry"].get()).unwrap();
        e.iter().map(|r| r.get().to_string()).collect()
    }

    #[test]
    fn unchanged_documents_are_the_servers_bytes() {
        let out = edit(SERVER.as_bytes(), |_| true).unwrap();
        assert_eq!(out, SERVER.as_bytes());
    }

    #[test]
    fn removed_entries_leave_the_others_byte_identical() {
        let out = edit(SERVER.as_bytes(), |v| {
            let e = v["entry"].as_array_mut().unwrap();
            e.remove(1);
            v.as_object_mut().unwrap().shift_remove("total");
            true
        })
        .unwrap();
        let out = String::from_utf8(out).unwrap();
        let before = entry_bytes(SERVER);
        assert_eq!(
            entry_bytes(&out),
            vec![before[0].clone(), before[2].clone()]
        );
        // The rest of the document keeps its order and text.
        assert!(out.starts_with(r#"{"resourceType":"Bundle","type":"searchset","link":[{"relation":"self","url":"http://up/fhir/Observation?x=1"}],"entry":["#), "{out}");
    }

    #[test]
    fn reordered_entries_keep_their_bytes() {
        let out = edit(SERVER.as_bytes(), |v| {
            v["entry"].as_array_mut().unwrap().reverse();
            true
        })
        .unwrap();
        let mut before = entry_bytes(SERVER);
        before.reverse();
        assert_eq!(entry_bytes(std::str::from_utf8(&out).unwrap()), before);
    }

    #[test]
    fn an_edited_entry_keeps_its_unchanged_fields_and_numbers() {
        let out = edit(SERVER.as_bytes(), |v| {
            v["entry"][0]["resource"]["status"] = Value::from("final");
            true
        })
        .unwrap();
        let out = String::from_utf8(out).unwrap();
        let e = entry_bytes(&out);
        assert_eq!(
            e[0],
            r#"{"fullUrl":"http://up/fhir/Observation/a","resource":{"resourceType":"Observation","id":"a","valueQuantity":{"value":37.20,"unit":"\u00b0C"},"note":[{"text":"caf\u00e9 \/ \"q\""}],"big":123456789012345678901234567890,"status":"final"}}"#
        );
        assert_eq!(e[1..], entry_bytes(SERVER)[1..]);
    }

    #[test]
    fn new_content_keeps_decimal_text_and_key_order() {
        // A module that builds a new tree from parsed parts (no original to reuse).
        let v: Value =
            serde_json::from_str(r#"{"z":1,"a":{"value":37.20,"n":12345678901234567890123.000}}"#)
                .unwrap();
        let mut w = Vec::new();
        write(&mut w, &v, None);
        assert_eq!(
            std::str::from_utf8(&w).unwrap(),
            r#"{"z":1,"a":{"value":37.20,"n":12345678901234567890123.000}}"#
        );
    }

    #[test]
    fn declined_or_invalid_input_gives_none() {
        assert!(edit(b"not json", |_| true).is_none());
        assert!(edit(SERVER.as_bytes(), |_| false).is_none());
    }
}
