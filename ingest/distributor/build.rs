//! Rust types for the wire formats' `.proto` files, compiled by protox (no
//! system `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["io/pyroscope/labels/pb/jfr_labels.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
