//! Compiles `proto/channelgate/v1/*.proto` into `OUT_DIR` with no system `protoc`:
//! protox parses the files in Rust, tonic-prost-build generates the code, and the encoded
//! descriptor set is kept for the gRPC reflection service.

use std::{env, error::Error, fs, path::PathBuf};

use prost::Message as _;

const PROTOS: &[&str] = &["proto/channelgate/v1/control.proto"];

fn main() -> Result<(), Box<dyn Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("channelgate_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
