//! Helpers for the UpstreamAuthority tests: openssl on the command line, SVIDs minted with the
//! CLI and checked with `openssl verify`, the CA's authority state.

use super::TestServer;
use kame_api::pb::localauthority as la;
use kame_api::x509svid::ParsedCert;
use la::local_authority_client::LocalAuthorityClient;
use std::path::Path;

pub fn openssl(dir: &Path, args: &[&str]) {
    let o = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

pub fn der_of(pem: &Path) -> Vec<u8> {
    kame_api::bundle::certs_from_pem(&std::fs::read_to_string(pem).unwrap()).unwrap()[0].clone()
}

/// Mints an X509-SVID with the CLI into `out`; the chain in svid.pem (leaf first).
pub async fn mint(s: &TestServer, out: &Path) -> Vec<Vec<u8>> {
    let o = s
        .cli(&[
            "x509",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/w",
            "--write",
            out.to_str().unwrap(),
        ])
        .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    kame_api::bundle::certs_from_pem(&std::fs::read_to_string(out.join("svid.pem")).unwrap())
        .unwrap()
}

pub fn verify_with_openssl(ca_file: &Path, svid: &Path) {
    let o = std::process::Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca_file)
        .arg("-untrusted")
        .arg(svid)
        .arg(svid)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

pub async fn x509_state(s: &TestServer) -> la::GetX509AuthorityStateResponse {
    LocalAuthorityClient::new(s.admin().await)
        .get_x509_authority_state(la::GetX509AuthorityStateRequest {})
        .await
        .unwrap()
        .into_inner()
}

pub fn skid_of(pem: &Path) -> String {
    hex::encode(
        ParsedCert::parse(&der_of(pem))
            .unwrap()
            .subject_key_id()
            .unwrap()
            .unwrap(),
    )
}

/// Why the configuration with `UpstreamAuthority "<name>" { plugin_data { <data> } }` is
/// refused (written in `dir`).
pub fn upstream_config_error(dir: &Path, name: &str, data: &str) -> String {
    let text = super::config_text(
        dir,
        super::free_port(),
        &super::Opts {
            extra_plugins: format!(
                "UpstreamAuthority \"{name}\" {{\n plugin_data {{\n {data}\n }}\n }}"
            ),
            ..Default::default()
        },
    );
    let path = dir.join("server.conf");
    std::fs::write(&path, text).unwrap();
    kame_server::config::Config::load(&path, false)
        .unwrap_err()
        .to_string()
}
