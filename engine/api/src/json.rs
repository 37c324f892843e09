//! Proto3 JSON for the generated messages, as Connect clients send and read
//! it with `application/json`. The generated serde code does the mapping
//! (field names in either form, 64-bit integers as strings, enums by name,
//! bytes as base64); this adds what it leaves to the caller: `null` read as
//! the default, a bound on nesting, and errors that name the field.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// Deepest a request may nest: requests are a few levels deep (OTLP
/// attribute values nest a level or two more).
const MAX_DEPTH: usize = 32;

/// A message as proto3 JSON.
pub fn to_json<T: Serialize>(message: &T) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(message)
}

/// A message from proto3 JSON; the error names the field that failed.
pub fn from_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let mut value: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if !value.is_object() {
        return Err("a message must be a JSON object".into());
    }
    drop_nulls(&mut value, 0)?;
    serde_path_to_error::deserialize(value).map_err(|e| match e.path().to_string() {
        path if path == "." => e.inner().to_string(),
        path => format!("{path}: {}", e.inner()),
    })
}

/// Removes `null` fields (proto3 JSON reads them as the default), refusing
/// nesting deeper than [`MAX_DEPTH`].
fn drop_nulls(value: &mut Value, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("nested deeper than {MAX_DEPTH} levels"));
    }
    match value {
        Value::Object(fields) => {
            fields.retain(|_, v| !v.is_null());
            fields
                .values_mut()
                .try_for_each(|v| drop_nulls(v, depth + 1))
        }
        Value::Array(items) => items.iter_mut().try_for_each(|v| drop_nulls(v, depth + 1)),
        _ => Ok(()),
    }
}
