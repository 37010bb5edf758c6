//! Generates the gRPC servers and the descriptor set that server reflection
//! serves, from the protos of the client crate (`client/proto`), the one copy
//! of the contract. Clients (the tests' and the benchmark's too) use
//! `readthrough-client`'s stubs, so no client code is generated here.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so the build needs nothing preinstalled.
    // SAFETY: build scripts are single-threaded; nothing reads the environment concurrently.
    unsafe { env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Malformed requests are INVALID_ARGUMENT, not prost's INTERNAL.
        .codec_path("crate::api::codec::StrictCodec")
        .build_client(false)
        .file_descriptor_set_path(out_dir.join("readthrough_descriptor.bin"))
        .compile_protos(
            &[
                PathBuf::from("client/proto/readthrough/v1/users.proto"),
                PathBuf::from("client/proto/readthrough/v1/products.proto"),
                PathBuf::from("client/proto/readthrough/v1/admin.proto"),
            ],
            &[PathBuf::from("client/proto"), protoc_bin_vendored::include_path()?],
        )?;
    Ok(())
}
