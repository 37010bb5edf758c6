//! Generates the messages and the client stubs of `proto/readthrough/v1/*.proto`.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so the build needs nothing preinstalled.
    // SAFETY: build scripts are single-threaded; nothing reads the environment concurrently.
    unsafe { env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };

    let protos = ["users", "products", "admin"].map(|name| PathBuf::from(format!("proto/readthrough/v1/{name}.proto")));
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&protos, &[PathBuf::from("proto"), protoc_bin_vendored::include_path()?])?;
    Ok(())
}
