//! Protobuf's canonical JSON mapping (proto3 JSON), for the wire messages
//! that Connect clients may ask for as `application/json`.
//!
//! Messages derive serde with `rename_all = "camelCase"`; what serde cannot
//! say per field is done here once: parsers must accept both the proto
//! field name and its lowerCamelCase form, and `null` for any field; 64-bit
//! integers are strings on the wire (a JSON number loses precision past
//! 2^53) but may come in as numbers.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Largest nesting a request may have: requests are a few levels deep
/// (OTLP attributes nest a level or two more).
const MAX_DEPTH: usize = 32;

/// A message as proto3 JSON. Every integer becomes a string: the messages
/// this serialises carry no 32-bit integers (enums are written by name),
/// so every integer is a 64-bit field.
pub fn to_json<T: Serialize>(message: &T) -> serde_json::Result<Vec<u8>> {
    let mut value = serde_json::to_value(message)?;
    integers_as_strings(&mut value);
    serde_json::to_vec(&value)
}

/// A message from proto3 JSON, field names in either form.
pub fn from_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let mut value: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if !value.is_object() {
        return Err("a message must be a JSON object".into());
    }
    camel_case_keys(&mut value, 0)?;
    serde_json::from_value(value).map_err(|e| e.to_string())
}

fn integers_as_strings(value: &mut Value) {
    match value {
        Value::Number(n) if n.is_i64() || n.is_u64() => *value = Value::String(n.to_string()),
        Value::Array(items) => items.iter_mut().for_each(integers_as_strings),
        Value::Object(fields) => fields.values_mut().for_each(integers_as_strings),
        _ => {}
    }
}

/// Renames `snake_case` keys to `lowerCamelCase` and drops `null` fields
/// (proto3 JSON reads `null` as the default).
fn camel_case_keys(value: &mut Value, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("nested deeper than {MAX_DEPTH} levels"));
    }
    match value {
        Value::Object(fields) => {
            let renamed: Map<String, Value> = std::mem::take(fields)
                .into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (lower_camel_case(&k), v))
                .collect();
            *fields = renamed;
            for v in fields.values_mut() {
                camel_case_keys(v, depth + 1)?;
            }
        }
        Value::Array(items) => {
            for v in items {
                camel_case_keys(v, depth + 1)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn lower_camel_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// An int64 field: a JSON string or number.
pub mod int64 {
    use super::*;

    pub fn serialize<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(*v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        match Value::deserialize(d)? {
            Value::Number(n) => n
                .as_i64()
                .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
                .ok_or_else(|| serde::de::Error::custom(format!("{n} is not an int64"))),
            Value::String(s) => s
                .parse()
                .map_err(|_| serde::de::Error::custom(format!("{s:?} is not an int64"))),
            other => Err(serde::de::Error::custom(format!("{other} is not an int64"))),
        }
    }
}

/// Any integer field (int32, int64, uint64, fixed64): a JSON number or a
/// string holding one.
pub fn int<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64> + TryFrom<u64>,
{
    integer(Value::deserialize(d)?).map_err(serde::de::Error::custom)
}

/// A repeated integer field.
pub fn ints<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64> + TryFrom<u64>,
{
    Vec::<Value>::deserialize(d)?
        .into_iter()
        .map(integer)
        .collect::<Result<_, _>>()
        .map_err(serde::de::Error::custom)
}

fn integer<T: TryFrom<i64> + TryFrom<u64>>(v: Value) -> Result<T, String> {
    let out_of_range = |v: &dyn std::fmt::Display| format!("{v} is out of range");
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                T::try_from(i).map_err(|_| out_of_range(&n))
            } else if let Some(u) = n.as_u64() {
                T::try_from(u).map_err(|_| out_of_range(&n))
            } else {
                Err(format!("{n} is not an integer"))
            }
        }
        Value::String(s) => {
            if let Ok(i) = s.parse::<i64>() {
                T::try_from(i).map_err(|_| out_of_range(&s))
            } else if let Ok(u) = s.parse::<u64>() {
                T::try_from(u).map_err(|_| out_of_range(&s))
            } else {
                Err(format!("{s:?} is not an integer"))
            }
        }
        other => Err(format!("{other} is not an integer")),
    }
}

/// An optional int64 field (`optional int64`).
pub mod opt_int64 {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        int64::deserialize(d).map(Some)
    }
}

/// A bytes field: base64 (standard alphabet, padded) when written;
/// standard or URL-safe, padded or not, when read.
pub mod bytes {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    use base64::Engine;

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        let trimmed = text.trim_end_matches('=');
        STANDARD_NO_PAD
            .decode(trimmed)
            .or_else(|_| URL_SAFE_NO_PAD.decode(trimmed))
            .map_err(|e| serde::de::Error::custom(format!("bytes field: {e}")))
    }
}

/// Repeated strings held as bytes (pprof's string table), written as
/// strings with invalid UTF-8 replaced.
pub mod lossy_strings {
    use super::*;

    pub fn serialize<S: Serializer>(strings: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(strings.iter().map(|b| String::from_utf8_lossy(b)))
    }
}

/// An enum field: its value name or its number.
pub fn enum_number<'de, D: Deserializer<'de>>(d: D, names: &[&str]) -> Result<i32, D::Error> {
    match Value::deserialize(d)? {
        Value::Number(n) => n
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .ok_or_else(|| serde::de::Error::custom(format!("{n} is not an enum number"))),
        Value::String(s) => names
            .iter()
            .position(|name| *name == s)
            .map(|i| i as i32)
            .ok_or_else(|| {
                serde::de::Error::custom(format!("{s:?} is not one of {}", names.join(", ")))
            }),
        other => Err(serde::de::Error::custom(format!(
            "{other} is not an enum value"
        ))),
    }
}

/// A field whose message Ember does not read: only its presence counts.
pub fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
    Value::deserialize(d).map(|_| Some(Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Default, Debug, PartialEq)]
    #[serde(default, rename_all = "camelCase")]
    struct Request {
        profile_type_id: String,
        #[serde(with = "int64")]
        start: i64,
        #[serde(deserialize_with = "opt_int64::deserialize")]
        max_nodes: Option<i64>,
        #[serde(with = "bytes")]
        tree: Vec<u8>,
        values: Vec<i64>,
        ratio: f64,
    }

    #[test]
    fn fields_read_in_either_name_and_64_bit_integers_as_strings_or_numbers() {
        let a: Request = from_json(
            br#"{"profile_type_id":"cpu","start":"1700000000000","maxNodes":16,"tree":"AAE=","ratio":null}"#,
        )
        .unwrap();
        assert_eq!(a.profile_type_id, "cpu");
        assert_eq!(a.start, 1_700_000_000_000);
        assert_eq!(a.max_nodes, Some(16));
        assert_eq!(a.tree, vec![0, 1]);
        assert_eq!(a.ratio, 0.0);
        let err = from_json::<Request>(br#"{"start":"soon"}"#).unwrap_err();
        assert!(err.contains("not an int64"), "{err}");
        assert!(from_json::<Request>(b"[1]").is_err());
    }

    #[test]
    fn written_integers_are_strings_and_floats_stay_numbers() {
        let r = Request {
            start: i64::MAX,
            values: vec![1, -2],
            ratio: 2.0,
            tree: vec![0xff],
            ..Default::default()
        };
        let json: Value = serde_json::from_slice(&to_json(&r).unwrap()).unwrap();
        assert_eq!(json["start"], Value::String(i64::MAX.to_string()));
        assert_eq!(json["values"], serde_json::json!(["1", "-2"]));
        assert_eq!(json["ratio"], serde_json::json!(2.0));
        assert_eq!(json["tree"], "/w==");
    }

    #[test]
    fn integers_of_any_width_from_numbers_or_strings() {
        #[derive(Deserialize, Default)]
        #[serde(default, rename_all = "camelCase")]
        struct M {
            #[serde(deserialize_with = "int")]
            time_unix_nano: u64,
            #[serde(deserialize_with = "int")]
            index: i32,
            #[serde(deserialize_with = "ints")]
            values: Vec<i64>,
        }
        let m: M = from_json(
            br#"{"time_unix_nano":"18446744073709551615","index":3,"values":["1",-2,3]}"#,
        )
        .unwrap();
        assert_eq!(
            (m.time_unix_nano, m.index, m.values),
            (u64::MAX, 3, vec![1, -2, 3])
        );
        let err = from_json::<M>(br#"{"index":"99999999999"}"#).err().unwrap();
        assert!(err.contains("out of range"), "{err}");
    }

    #[test]
    fn a_request_nested_too_deep_is_refused() {
        let deep = "[".repeat(100) + &"]".repeat(100);
        let body = format!(r#"{{"values":{deep}}}"#);
        let err = from_json::<Request>(body.as_bytes()).unwrap_err();
        assert!(err.contains("deeper"), "{err}");
    }
}
