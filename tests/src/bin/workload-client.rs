//! A minimal Workload API client for tests that must call the agent as another process (for
//! example under another uid): `workload-client SOCKET` fetches X509-SVIDs once and prints
//! `ok <spiffe id>...` or `err <gRPC code>`; exit status 0 either way, 2 on a usage error.

use kame_api::pb::workload as wl;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let Some(sock) = std::env::args().nth(1) else {
        eprintln!("usage: workload-client SOCKET");
        std::process::exit(2);
    };
    let ch = match kame_agent::cli::connect(&sock).await {
        Ok(c) => c,
        Err(e) => {
            println!("err connect {e}");
            return;
        }
    };
    let mut c = wl::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(ch);
    let r = c
        .fetch_x509svid(kame_agent::cli::with_header(wl::X509svidRequest {}))
        .await;
    let first = match r {
        Ok(s) => s.into_inner().message().await,
        Err(s) => Err(s),
    };
    match first {
        Ok(Some(m)) => {
            let ids: Vec<String> = m.svids.into_iter().map(|s| s.spiffe_id).collect();
            println!("ok {}", ids.join(" "));
        }
        Ok(None) => println!("err stream-ended"),
        Err(s) => println!("err {:?}", s.code()),
    }
}
