//! Byte fidelity for JSON the gateway did not author. Modules work on a parsed tree; when the
//! result goes out, every part they left unchanged is written as the FHIR server's own bytes
//! (key order, decimal text such as `37.20`, escapes), and only what they edited is
//! serialised. With serde_json's `preserve_order` and `arbitrary_precision`, even an edited
//! part keeps its key order and its numbers' text.

use fhir_gateway_modules::json::At;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::HashMap;
use std::ops::Range;

/// Serialises `out`, a module-edited copy of `orig`, which was parsed from `raw`.
pub fn to_vec(out: &Value, orig: &Value, raw: &[u8]) -> Vec<u8> {
    let mut w = Vec::with_capacity(raw.len());
    let parsed = std::str::from_utf8(raw)
        .ok()
        .and_then(|s| serde_json::from_str::<&RawValue>(s).ok());
    write(&mut w, out, parsed.map(|r| (orig, r)));
    w
}

/// Whether `a` and `b` are the same JSON with their keys in the same order: what "left
/// unchanged" means before the server's bytes are written for a part. Walking both objects in
/// order needs no key lookup, which `Value`'s own `==` makes (a hash) for every key.
pub fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((kx, vx), (ky, vy))| kx == ky && same(vx, vy))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        _ => a == b,
    }
}

/// Parses `raw` and hands the tree to `edit`; the answer is `raw` itself when nothing changed,
/// else the faithful serialisation. `None` when `raw` is not JSON or `edit` declines.
pub fn edit(raw: &[u8], edit: impl FnOnce(&mut Value) -> bool) -> Option<Vec<u8>> {
    let orig: Value = serde_json::from_slice(raw).ok()?;
    let mut out = orig.clone();
    if !edit(&mut out) {
        return None;
    }
    Some(if same(&out, &orig) {
        raw.to_vec()
    } else {
        to_vec(&out, &orig, raw)
    })
}

/// A Bundle parsed for filters (`parse_cut`), with where its parts lie in the server's bytes.
pub struct CutBundle {
    /// The tree modules see: every entry's resource cut down to the elements kept.
    pub tree: Value,
    /// Byte ranges in the server's document of its top-level members and of its entries,
    /// found in the pass that parsed it (so writing needs no second scan).
    members: HashMap<String, Range<usize>>,
    entries: Vec<Range<usize>>,
}

/// Parses a Bundle with every entry's resource cut down to the elements `keep` names: the
/// tree for modules that read only those (`BodyAccess::Compartment`). `CutBundle::to_vec`
/// writes every entry they left as the server's bytes, whole. `None` when `raw` is not a JSON
/// Bundle, or when an entry holds a Bundle (its own entries would be cut too): the caller
/// parses the whole document then.
pub fn parse_cut(raw: &[u8], keep: fn(&str) -> bool) -> Option<CutBundle> {
    let text = std::str::from_utf8(raw).ok()?;
    let top: Vec<(String, Member)> = serde_json::from_str::<Members>(text).ok()?.0;
    let at = |r: &RawValue| {
        let from = r.get().as_ptr() as usize - text.as_ptr() as usize;
        from..from + r.get().len()
    };
    let mut tree = serde_json::Map::new();
    let mut members = HashMap::new();
    let mut entries = Vec::new();
    for (k, m) in top {
        // A repeated member (two `entry` arrays): the ranges would not match the tree.
        if tree.contains_key(&k) {
            return None;
        }
        let v = match m {
            Member::Entries(items) => {
                let mut parsed = Vec::with_capacity(items.len());
                for e in items {
                    let mut d = serde_json::Deserializer::from_str(e.get());
                    parsed.push(Cut::Entry(keep).deserialize(&mut d).ok()?);
                    entries.push(at(e));
                }
                Value::Array(parsed)
            }
            Member::Other(r) => {
                members.insert(k.clone(), at(r));
                serde_json::from_str(r.get()).ok()?
            }
        };
        tree.insert(k, v);
    }
    let tree = Value::Object(tree);
    let bundle = tree.get("resourceType").and_then(Value::as_str) == Some("Bundle");
    let nested = tree
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|e| e.at("/resource/resourceType").and_then(Value::as_str) == Some("Bundle"));
    (bundle && !nested).then_some(CutBundle {
        tree,
        members,
        entries,
    })
}

impl CutBundle {
    /// Serialises `out`, the modules' edit of `self.tree`: the server's bytes for every
    /// member and entry left unchanged, whole (the parts cut away included).
    pub fn to_vec(&self, out: &Value, raw: &[u8]) -> Vec<u8> {
        let (Value::Object(m), Value::Object(om)) = (out, &self.tree) else {
            let mut w = Vec::new();
            serialise(&mut w, out);
            return w;
        };
        let mut w = Vec::with_capacity(raw.len());
        w.push(b'{');
        for (i, (k, v)) in m.iter().enumerate() {
            if i > 0 {
                w.push(b',');
            }
            serialise_str(&mut w, k);
            w.push(b':');
            match (k.as_str(), v, om.get(k)) {
                ("entry", Value::Array(a), Some(Value::Array(oa))) => {
                    let items: Vec<&[u8]> = self.entries.iter().map(|r| &raw[r.clone()]).collect();
                    write_items(&mut w, a, oa, &items);
                }
                (_, v, Some(ov)) if same(ov, v) => match self.members.get(k) {
                    Some(r) => w.extend_from_slice(&raw[r.clone()]),
                    None => serialise(&mut w, v),
                },
                _ => serialise(&mut w, v),
            }
        }
        w.push(b'}');
        w
    }
}

/// A document's top level, each member's bytes borrowed, `entry`'s items one by one.
struct Members<'a>(Vec<(String, Member<'a>)>);

enum Member<'a> {
    Entries(Vec<&'a RawValue>),
    Other(&'a RawValue),
}

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Members<'de>, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    let v = if k == "entry" {
                        Member::Entries(m.next_value()?)
                    } else {
                        Member::Other(m.next_value()?)
                    };
                    out.push((k, v));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// An object key, borrowed unless it holds an escape.
struct Key<'de>(std::borrow::Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }

            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(v.into()))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(v.to_string().into()))
            }
        }
        d.deserialize_str(V)
    }
}

/// Where `parse_cut` is in the document: its top, an entry, or an entry's resource; for
/// `cut_document`, a resource that may be a Bundle (its entries cut in turn, nested ones too).
#[derive(Clone, Copy)]
enum Cut {
    Entry(fn(&str) -> bool),
    Resource(fn(&str) -> bool),
    Document(fn(&str) -> bool),
    DocumentEntry(fn(&str) -> bool),
}

/// A Bundle's `entry` array in `cut_document`: each item an entry whose resource is cut.
struct Entries(fn(&str) -> bool);

impl<'de> DeserializeSeed<'de> for Entries {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Entries {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("Bundle entries")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(e) = s.next_element_seed(Cut::DocumentEntry(self.0))? {
            out.push(e);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<Value, A::Error> {
        Cut::Document(self.0).visit_map(m)
    }
}

/// Parses a document (a resource, or a Bundle of them, nested Bundles included) keeping of
/// each resource only the elements `keep` names: the cheap read of whose data an answer
/// holds (the audit trail), without building the rest.
pub fn cut_document(raw: &[u8], keep: fn(&str) -> bool) -> Option<Value> {
    let mut d = serde_json::Deserializer::from_slice(raw);
    let v = Cut::Document(keep).deserialize(&mut d).ok()?;
    d.end().ok()?;
    Some(v)
}

impl<'de> DeserializeSeed<'de> for Cut {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Cut {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a FHIR JSON document")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        // Keys are borrowed from the document: most of a resource's are skipped.
        while let Some(Key(k)) = m.next_key::<Key>()? {
            // A number where an object belongs: serde_json hands it over as this map.
            if k == "$serde_json::private::Number" {
                return Err(serde::de::Error::custom("a number where an object belongs"));
            }
            let v = match (self, k.as_ref()) {
                (Cut::Entry(f), "resource") => m.next_value_seed(Cut::Resource(f))?,
                (Cut::DocumentEntry(f), "resource") => m.next_value_seed(Cut::Document(f))?,
                (Cut::Document(f), "entry") => m.next_value_seed(Entries(f))?,
                (Cut::Resource(f) | Cut::Document(f), name) if !f(name) => {
                    m.next_value::<IgnoredAny>()?;
                    continue;
                }
                _ => m.next_value::<Value>()?,
            };
            out.insert(k.into_owned(), v);
        }
        Ok(Value::Object(out))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(e) = s.next_element::<Value>()? {
            out.push(e);
        }
        Ok(Value::Array(out))
    }

    // Anything but an object or an array where one is expected: kept as it is (the filters
    // judge a malformed entry as they would in the whole tree).
    fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

fn write(w: &mut Vec<u8>, out: &Value, orig: Option<(&Value, &RawValue)>) {
    let Some((o, raw)) = orig else {
        serialise(w, out);
        return;
    };
    if same(o, out) {
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
            let items: Vec<&[u8]> = items.iter().map(|r| r.get().as_bytes()).collect();
            write_items(w, a, oa, &items);
        }
        _ => serialise(w, out),
    }
}

/// Writes array `a`, an edit of `oa` whose items' bytes are `items`.
fn write_items(w: &mut Vec<u8>, a: &[Value], oa: &[Value], items: &[&[u8]]) {
    if items.len() != oa.len() {
        serialise(w, &Value::Array(a.to_vec()));
        return;
    }
    // Filters remove elements and sorts reorder them: find each one among the originals,
    // looking on from the last match first.
    let mut next = 0;
    w.push(b'[');
    for (i, v) in a.iter().enumerate() {
        if i > 0 {
            w.push(b',');
        }
        let found = (next..oa.len()).chain(0..next).find(|&j| same(&oa[j], v));
        match found {
            Some(j) => {
                w.extend_from_slice(items[j]);
                next = j + 1;
            }
            // Edited in place: what it kept unchanged stays the server's bytes.
            None if a.len() == oa.len() => {
                match std::str::from_utf8(items[i])
                    .ok()
                    .and_then(|t| serde_json::from_str::<&RawValue>(t).ok())
                {
                    Some(r) => write(w, v, Some((&oa[i], r))),
                    None => serialise(w, v),
                }
            }
            None => serialise(w, v),
        }
    }
    w.push(b']');
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
    fn same_is_equality_with_key_order_and_number_text() {
        let v = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        assert!(same(&v(SERVER), &v(SERVER)));
        assert!(same(
            &v(r#"{"a":[1,{"b":null}]}"#),
            &v(r#"{"a":[1,{"b":null}]}"#)
        ));
        // Reordered keys are not "left unchanged": their bytes are written anew.
        assert!(!same(&v(r#"{"a":1,"b":2}"#), &v(r#"{"b":2,"a":1}"#)));
        assert!(!same(&v(r#"{"a":37.20}"#), &v(r#"{"a":37.2}"#)));
        assert!(!same(&v(r#"[1,2]"#), &v(r#"[1,2,3]"#)));
        assert!(!same(&v(r#"{"a":1}"#), &v(r#"{"a":1,"b":1}"#)));
        assert!(!same(&v(r#"{"a":"x"}"#), &v(r#"{"b":"x"}"#)));
        assert!(!same(&v(r#"{"a":[]}"#), &v(r#"{"a":{}}"#)));
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

    fn owner_fields(name: &str) -> bool {
        matches!(name, "resourceType" | "id" | "subject")
    }

    #[test]
    fn a_cut_tree_holds_only_what_decides_the_owner_and_writes_whole_entries() {
        let cut = parse_cut(SERVER.as_bytes(), owner_fields).unwrap();
        // The resources lost what the filters do not read; the entries kept the rest.
        assert_eq!(
            cut.tree["entry"][0],
            serde_json::json!({"fullUrl": "http://up/fhir/Observation/a",
                               "resource": {"resourceType": "Observation", "id": "a"}})
        );
        assert_eq!(cut.tree["total"], 3);
        // A filter removes an entry: the kept ones go out whole, as the server wrote them.
        let mut out = cut.tree.clone();
        out["entry"].as_array_mut().unwrap().remove(1);
        out.as_object_mut().unwrap().shift_remove("total");
        let written = String::from_utf8(cut.to_vec(&out, SERVER.as_bytes())).unwrap();
        let before = entry_bytes(SERVER);
        assert_eq!(
            entry_bytes(&written),
            vec![before[0].clone(), before[2].clone()]
        );
        assert!(written.starts_with(r#"{"resourceType":"Bundle","type":"searchset","link":[{"relation":"self","url":"http://up/fhir/Observation?x=1"}],"entry":["#));
        // Entries reordered and a notice added: the notice is serialised, the rest are bytes.
        let mut out = cut.tree.clone();
        let e = out["entry"].as_array_mut().unwrap();
        e.reverse();
        e.push(serde_json::json!({"search": {"mode": "outcome"}}));
        let written = String::from_utf8(cut.to_vec(&out, SERVER.as_bytes())).unwrap();
        let mut want = before.clone();
        want.reverse();
        want.push(r#"{"search":{"mode":"outcome"}}"#.to_string());
        assert_eq!(entry_bytes(&written), want);
        // Nothing changed: the server's bytes.
        assert_eq!(cut.to_vec(&cut.tree, SERVER.as_bytes()), SERVER.as_bytes());
    }

    #[test]
    fn only_flat_bundles_are_cut() {
        let nested = r#"{"resourceType":"Bundle","type":"batch-response","entry":[{"resource":{"resourceType":"Bundle","type":"searchset","entry":[]}}]}"#;
        assert!(parse_cut(nested.as_bytes(), owner_fields).is_none());
        assert!(parse_cut(br#"{"resourceType":"Patient","id":"p"}"#, owner_fields).is_none());
        assert!(parse_cut(br#"{"resourceType":"Bundle","entry":7}"#, owner_fields).is_none());
        assert!(parse_cut(
            br#"{"resourceType":"Bundle","entry":[{"resource":7}]}"#,
            owner_fields
        )
        .is_none());
        assert!(parse_cut(b"not json", owner_fields).is_none());
        assert!(parse_cut(
            br#"{"resourceType":"Bundle","entry":[],"entry":[{"resource":{"id":"a"}}]}"#,
            owner_fields
        )
        .is_none());
        // A Bundle that is not valid JSON past the part a filter reads is refused too.
        assert!(parse_cut(
            br#"{"resourceType":"Bundle","entry":[{"resource":{"text":[1,}}}]}"#,
            owner_fields
        )
        .is_none());
    }
}
