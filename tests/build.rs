//! Generates a client from SPIRE's own protos (tests/proto/spire-api-sdk), independent of ours,
//! and their descriptor set (for clients built in other languages).
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
    // The same protos as a descriptor set, for clients in other languages (Python's grpcio).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("spire_sdk.fds"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
