//! Compiles `proto/credgate/v1/password_service.proto` and emits the file
//! descriptor set that server reflection serves.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/credgate/v1/password_service.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-env-changed=PROTOC");

    // Honour an explicit $PROTOC; otherwise use the vendored binary so a fresh
    // machine needs nothing installed by hand.
    let protoc = match env::var_os("PROTOC") {
        Some(path) => PathBuf::from(path),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);

    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("credgate_descriptor.bin"))
        // The generated Debug would print both passwords; `api` implements a
        // redacting Debug by hand.
        .skip_debug([".credgate.v1.ChangePasswordRequest"])
        .compile_with_config(config, &[proto], &["proto"])?;
    Ok(())
}
