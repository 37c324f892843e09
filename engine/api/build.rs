//! Rust types and proto3 JSON for Pyroscope's public API, compiled by
//! protox (no system `protoc` needed) and pbjson.

use prost::Message;

const PROTOS: [&str; 4] = [
    "google/v1/profile.proto",
    "types/v1/types.proto",
    "querier/v1/querier.proto",
    "push/v1/push.proto",
];

const PACKAGES: [&str; 4] = [".google.v1", ".types.v1", ".querier.v1", ".push.v1"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let encoded = descriptors.encode_to_vec();
    prost_build::Config::new()
        // A pushed profile is a slice of the request body, not a copy.
        .bytes([".push.v1.RawSample.raw_profile"])
        .compile_fds(descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        // Connect's JSON codec discards unknown fields, and so do we.
        .ignore_unknown_fields()
        .emit_fields()
        .build(&PACKAGES)?;
    Ok(())
}
