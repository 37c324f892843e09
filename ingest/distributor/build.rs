//! Rust types for the wire formats' `.proto` files, compiled by protox (no
//! system `protoc` needed), with proto3 JSON (pbjson) for OTLP's.

use prost::Message;

const OTLP: [&str; 4] = [
    ".opentelemetry.proto.common.v1",
    ".opentelemetry.proto.resource.v1",
    ".opentelemetry.proto.profiles.v1development",
    ".opentelemetry.proto.collector.profiles.v1development",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(
        [
            "io/pyroscope/labels/pb/jfr_labels.proto",
            "opentelemetry/proto/collector/profiles/v1development/profiles_service.proto",
        ],
        ["proto"],
    )?;
    let encoded = descriptors.encode_to_vec();
    prost_build::Config::new().compile_fds(descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        .ignore_unknown_fields()
        .build(&OTLP)?;
    Ok(())
}
