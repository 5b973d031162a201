//! Properties of the frame path: `check_client_frame` against generated JSON,
//! and the `Assembler` against generated fragmentations.

use fastwebsockets::{Frame, OpCode, Payload};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use serde_json::{Map, Value};
use switchboard::protocol::{check_client_frame, RESERVED_TYPES};
use switchboard::session::frames::{Assembler, Incoming};

/// Any JSON value, a few levels deep.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            btree_map(".{0,8}", inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A value for `type`: a reserved type, any string, or not a string at all.
fn type_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        proptest::sample::select(RESERVED_TYPES).prop_map(|t| Value::String(t.to_owned())),
        "[a-z-]{0,12}".prop_map(Value::String),
        ".{0,12}".prop_map(Value::String),
        json(),
    ]
}

/// `s` as a JSON string literal, each character escaped as `\uXXXX` where `escape` says so.
fn escaped_literal(s: &str, escape: &[bool]) -> String {
    let mut out = String::from("\"");
    for (i, c) in s.chars().enumerate() {
        if escape.get(i).copied().unwrap_or(false) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out.push('"');
    out
}

fn text(fin: bool, data: &[u8]) -> Frame<'static> {
    Frame::new(fin, OpCode::Text, None, Payload::Owned(data.to_vec()))
}

fn cont(fin: bool, data: &[u8]) -> Frame<'static> {
    Frame::new(fin, OpCode::Continuation, None, Payload::Owned(data.to_vec()))
}

proptest! {
    #[test]
    fn objects_pass_unless_their_type_is_reserved(fields in btree_map("[a-z]{1,6}", json(), 0..6), kind in proptest::option::of(type_value()), pretty in any::<bool>()) {
        let mut object: Map<String, Value> = fields.into_iter().filter(|(k, _)| k != "type").collect();
        if let Some(kind) = &kind {
            object.insert("type".into(), kind.clone());
        }
        let value = Value::Object(object);
        let bytes = if pretty { serde_json::to_vec_pretty(&value) } else { serde_json::to_vec(&value) }.unwrap();
        let verdict = check_client_frame(&bytes);
        match kind.as_ref().and_then(Value::as_str) {
            Some(t) if RESERVED_TYPES.contains(&t) => {
                prop_assert_eq!(verdict.unwrap_err().code(), "reserved_type");
            }
            t => {
                let info = verdict.unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&bytes)));
                prop_assert_eq!(info.kind.as_deref(), t);
            }
        }
    }

    #[test]
    fn non_objects_are_invalid_json(value in json().prop_filter("not an object", |v| !v.is_object())) {
        let bytes = serde_json::to_vec(&value).unwrap();
        prop_assert_eq!(check_client_frame(&bytes).unwrap_err().code(), "invalid_json");
    }

    #[test]
    fn truncated_objects_are_invalid_json(value in json(), cut in any::<proptest::sample::Index>()) {
        let bytes = serde_json::to_vec(&serde_json::json!({"type": "offer", "v": value})).unwrap();
        let cut = cut.index(bytes.len());
        prop_assert_eq!(check_client_frame(&bytes[..cut]).unwrap_err().code(), "invalid_json");
    }

    #[test]
    fn reserved_types_are_caught_however_escaped(t in proptest::sample::select(RESERVED_TYPES), escape in vec(any::<bool>(), 12), key_escape in vec(any::<bool>(), 4)) {
        let frame = format!("{{{}:{},\"sdp\":\"x\"}}", escaped_literal("type", &key_escape), escaped_literal(t, &escape));
        prop_assert_eq!(check_client_frame(frame.as_bytes()).unwrap_err().code(), "reserved_type", "{}", frame);
    }

    #[test]
    fn fragments_reassemble_exactly_within_the_limit(
        message in vec(any::<u8>(), 0..300).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        cuts in vec(any::<proptest::sample::Index>(), 0..6),
        limit in 1usize..600,
    ) {
        let bytes = message.as_bytes();
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        points.sort_unstable();
        points.dedup();
        let mut pieces = Vec::new();
        let mut start = 0;
        for p in points.into_iter().chain([bytes.len()]) {
            if p >= start {
                pieces.push(&bytes[start..p]);
                start = p;
            }
        }
        let mut assembler = Assembler::new(limit);
        let last = pieces.len() - 1;
        let mut result = None;
        for (i, piece) in pieces.iter().enumerate() {
            let frame = if i == 0 { text(i == last, piece) } else { cont(i == last, piece) };
            if let Some(done) = assembler.push(frame) {
                result = Some(done);
                break;
            }
        }
        match result {
            Some(Incoming::Text(got)) => {
                prop_assert!(bytes.len() <= limit);
                prop_assert_eq!(&got[..], bytes);
            }
            Some(Incoming::TooBig) => prop_assert!(bytes.len() > limit),
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }
}

#[test]
fn deep_nesting_is_scanned_without_recursion() {
    // Half a 64 KiB message of nesting, in a skipped value or in `type`:
    // scanned without recursion, so no stack overflow, and accepted as JSON.
    let depth = 32 * 1024;
    let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let objects = format!("{}1{}", "{\"a\":".repeat(depth / 4), "}".repeat(depth / 4));
    for (what, frame, kind) in [
        ("arrays", format!("{{\"type\":\"offer\",\"n\":{arrays}}}"), Some("offer")),
        ("arrays in type", format!("{{\"type\":{arrays}}}"), None),
        ("objects", format!("{{\"type\":\"offer\",\"n\":{objects}}}"), Some("offer")),
        ("objects in type", format!("{{\"type\":{objects}}}"), None),
    ] {
        let info = check_client_frame(frame.as_bytes()).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(info.kind.as_deref(), kind, "{what}");
    }
}
