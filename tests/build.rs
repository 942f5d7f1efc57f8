//! Generates a client from SPIRE's own protos (tests/proto/spire-api-sdk), independent of ours.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "proto/spire-api-sdk";
    let files = [
        "spire/api/server/entry/v1/entry.proto",
        "spire/api/server/bundle/v1/bundle.proto",
        "spire/api/server/agent/v1/agent.proto",
        "spire/api/server/svid/v1/svid.proto",
    ];
    println!("cargo:rerun-if-changed={root}");
    let fds = protox::compile(files, [root])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
