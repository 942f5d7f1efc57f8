//! Compiles Kame's own `.proto` files with protox (no protoc needed) into tonic/prost code.
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
        "proto/workload/workload.proto",
        "proto/kame/devid/enrollment.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
