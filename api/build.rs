//! Compiles the protos with protox, a pure-Rust protobuf compiler, so building needs no `protoc`.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "cellplane/routing/v1/routing.proto",
    "cellplane/control/v1/control.proto",
    "cellplane/raft/v1/raft.proto",
    "cellplane/cell/v1/messaging.proto",
    "cellplane/cell/v1/sync.proto",
    "cellplane/cell/v1/admin.proto",
    "cellplane/cell/v1/replication.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // The descriptor set feeds gRPC reflection, so tools such as grpcurl work without the protos.
    std::fs::write(
        out_dir.join("cellplane_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
