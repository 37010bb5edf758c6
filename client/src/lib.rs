//! The gRPC client of readthrough: its protos and the stubs tonic and prost
//! generate from them.

/// Messages and client stubs generated from `proto/readthrough/v1/*.proto`
/// (package `readthrough.v1`).
pub mod proto {
    tonic::include_proto!("readthrough.v1");
}
