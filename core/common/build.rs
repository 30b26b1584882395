//! Compiles the wire protocol in `proto/` with protox (pure Rust: no `protoc` needed).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/ionet/common.proto",
        "proto/ionet/gcs.proto",
        "proto/ionet/node.proto",
        "proto/ionet/object.proto",
        "proto/ionet/metering.proto",
        "proto/ionet/worker.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    // Rows a head encodes once and sends to many nodes: shared, not copied, per reply.
    tonic_prost_build::configure().bytes(".ionet.gcs.NodeRows.nodes").compile_fds(descriptors)?;
    Ok(())
}
