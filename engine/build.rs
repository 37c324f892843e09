//! Rust types for Ember's `.proto` files, compiled by protox (no system
//! `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["ember/block/v1/block.proto"];
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(protos, ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
