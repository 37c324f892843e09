//! Rust types for the metastore's `.proto` file, compiled by protox (no
//! system `protoc` needed); block metadata comes from ember-engine's.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=../proto");
    let descriptors = protox::compile(
        ["ember/metastore/v1/metastore.proto"],
        ["proto", "../proto"],
    )?;
    prost_build::Config::new()
        .extern_path(".ember.block.v1", "::ember_engine::block")
        .compile_fds(descriptors)?;
    Ok(())
}
