//! Go's `encoding/json` conventions for the JSON messages node attestors exchange with
//! SPIRE's agents and servers: byte slices as standard padded base64, nil as `null`, struct
//! fields written in declaration order, and on reading, key names matched case-insensitively
//! (an exact match wins) and unknown keys ignored. Pure data: no I/O.

use crate::Error;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value};

pub(crate) fn bad(msg: impl Into<String>) -> Error {
    Error::BadAttestation(msg.into())
}

pub(crate) fn object(data: &[u8], what: &str) -> Result<Map<String, Value>, Error> {
    match serde_json::from_slice(data) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(bad(format!("{what} is not a JSON object"))),
        Err(e) => Err(bad(format!("{what} is not JSON: {e}"))),
    }
}

/// Go's case-insensitive field lookup (an exact match wins).
pub(crate) fn field<'a>(m: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    m.get(name).or_else(|| {
        m.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

pub(crate) fn bytes(m: &Map<String, Value>, name: &str) -> Result<Option<Vec<u8>>, Error> {
    match field(m, name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => STANDARD
            .decode(s)
            .map(Some)
            .map_err(|_| bad(format!("{name} is not base64"))),
        Some(_) => Err(bad(format!("{name} is not a base64 string"))),
    }
}

/// A list of byte strings (Go's `[][]byte`) of at most `max` members; a longer one is refused
/// before anything in it is decoded.
pub(crate) fn bytes_list(
    m: &Map<String, Value>,
    name: &str,
    max: usize,
) -> Result<Vec<Vec<u8>>, Error> {
    match field(m, name) {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) if a.len() > max => Err(Error::TooManyCertificates {
            field: name.to_string(),
            got: a.len(),
            max,
        }),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => STANDARD
                    .decode(s)
                    .map_err(|_| bad(format!("{name} holds a value that is not base64"))),
                Value::Null => Ok(vec![]),
                _ => Err(bad(format!("{name} holds a value that is not a string"))),
            })
            .collect(),
        Some(_) => Err(bad(format!("{name} is not an array"))),
    }
}

pub(crate) fn enc(b: &Option<Vec<u8>>) -> Value {
    match b {
        None => Value::Null,
        Some(b) => Value::String(STANDARD.encode(b)),
    }
}

/// A JSON object with its members in the given order (Go writes struct fields in declaration
/// order; serde_json's map would sort them).
pub(crate) fn ordered(members: Vec<(&str, Value)>) -> Vec<u8> {
    let mut out = b"{".to_vec();
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // Serializing strings and Values cannot fail.
        out.extend(serde_json::to_vec(k).unwrap_or_default());
        out.push(b':');
        out.extend(serde_json::to_vec(v).unwrap_or_default());
    }
    out.push(b'}');
    out
}
