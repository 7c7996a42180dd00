//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and generates the tonic
//! client and server stubs plus a file descriptor set for gRPC reflection.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/wrapd/v1/data_key.proto",
        "proto/wrapd/v1/key.proto",
        "proto/kms/v2/api.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("wrapd_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(env::var_os("CARGO_FEATURE_SERVER").is_some())
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
