//! Reading pprof profiles as agents send them: gzip under a size limit,
//! then profile.proto (the messages live in `ember_engine::pprof`).

use std::io::Read;

use flate2::read::GzDecoder;
use prost::Message;

use crate::IngestError;

pub use ember_engine::pprof::*;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Gunzips `data` if it is gzip, refusing output beyond `limit` bytes (a
/// gzip bomb is refused before it is inflated).
pub fn maybe_gunzip(data: &[u8], limit: usize, what: &'static str) -> Result<Vec<u8>, IngestError> {
    if !data.starts_with(&GZIP_MAGIC) {
        if data.len() > limit {
            return Err(IngestError::Decompress {
                what,
                reason: format!("{} bytes exceed the limit of {limit} bytes", data.len()),
            });
        }
        return Ok(data.to_vec());
    }
    gunzip(data, limit, what)
}

/// Gunzips `data` (a body sent with `Content-Encoding: gzip`), refusing
/// output beyond `limit` bytes.
pub fn gunzip(data: &[u8], limit: usize, what: &'static str) -> Result<Vec<u8>, IngestError> {
    let mut out = Vec::new();
    let read = GzDecoder::new(data)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| IngestError::Decompress {
            what,
            reason: e.to_string(),
        })?;
    if read > limit {
        return Err(IngestError::Decompress {
            what,
            reason: format!("decompressed size exceeds the limit of {limit} bytes"),
        });
    }
    Ok(out)
}

/// Decodes a pprof profile, gzipped or not.
pub fn decode(data: &[u8], limit: usize) -> Result<Profile, IngestError> {
    decode_sized(data, limit).map(|(p, _)| p)
}

/// Decodes a pprof profile, gzipped or not, with its decompressed size.
pub fn decode_sized(data: &[u8], limit: usize) -> Result<(Profile, usize), IngestError> {
    let raw = maybe_gunzip(data, limit, "pprof profile")?;
    let profile = Profile::decode(raw.as_slice()).map_err(|e| IngestError::Decode {
        what: "pprof profile",
        reason: e.to_string(),
    })?;
    Ok((profile, raw.len()))
}

/// The string table of a profile an agent sent.
pub trait ProfileStrings {
    /// The string at `index`, or an error naming the field that pointed
    /// outside the string table.
    fn string(&self, index: i64, field: &str) -> Result<String, IngestError>;
}

impl ProfileStrings for Profile {
    fn string(&self, index: i64, field: &str) -> Result<String, IngestError> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.string_table.get(i))
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .ok_or_else(|| {
                IngestError::Invalid(format!(
                    "{field} points at string {index} of a table of {}",
                    self.string_table.len()
                ))
            })
    }
}
