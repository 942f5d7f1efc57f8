//! Compiles Kame's own `.proto` files with protox (no protoc needed) into tonic/prost code.
//! The Workload API gets its own codec (`crate::codec::LeanCodec`: encode buffers sized to
//! each message, for thousands of watcher streams); the others keep tonic's.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/spire/api/types/types.proto",
        "proto/spire/api/server/entry.proto",
        "proto/spire/api/server/bundle.proto",
        "proto/spire/api/server/svid.proto",
        "proto/spire/api/server/agent.proto",
        "proto/spire/api/server/localauthority.proto",
        "proto/spire/api/server/trustdomain.proto",
        "proto/spire/api/server/logger.proto",
        "proto/kame/devid/enrollment.proto",
        "proto/kame/breakglass/breakglass.proto",
    ];
    let workload = ["proto/workload/workload.proto"];
    for f in files.iter().chain(&workload) {
        println!("cargo:rerun-if-changed={f}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(protox::compile(files, ["proto"])?)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(protox::compile(workload, ["proto"])?)?;
    Ok(())
}
