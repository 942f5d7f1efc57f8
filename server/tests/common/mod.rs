//! Test harness: a kame-server started in-process on 127.0.0.1 with a free port, a temp data
//! directory and its own admin socket; stopped (and its files removed) when dropped.

#![allow(dead_code)]

use kame_api::pb;
use kame_server::config::Config;
use kame_server::run::{self, Running};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

pub mod upstream;
pub mod web;

pub const TD: &str = "example.org";

pub struct Opts {
    pub ca_ttl: &'static str,
    pub x509_ttl: &'static str,
    pub key_manager: &'static str,
    pub extra_server: &'static str,
    /// More plugin blocks (an UpstreamAuthority).
    pub extra_plugins: String,
    /// A whole `KeyManager "…" { … }` block in place of `key_manager`'s.
    pub key_manager_block: String,
    pub trust_domain: &'static str,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            ca_ttl: "24h",
            x509_ttl: "1h",
            key_manager: "disk",
            extra_server: "",
            extra_plugins: String::new(),
            key_manager_block: String::new(),
            trust_domain: TD,
        }
    }
}

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub socket: PathBuf,
    pub running: Option<Running>,
    pub tcp_port: u16,
    /// A KeyManager used in place of the configured one.
    pub key_manager: Option<std::sync::Arc<dyn kame_keymanager::KeyManager>>,
}

pub use kame_keymanager::testing::free_port;

pub fn config_text(dir: &Path, port: u16, o: &Opts) -> String {
    let d = dir.display();
    let km = match o.key_manager {
        _ if !o.key_manager_block.is_empty() => o.key_manager_block.clone(),
        "memory" => "KeyManager \"memory\" {}".to_string(),
        _ => format!(
            "KeyManager \"disk\" {{\n        plugin_data {{\n            keys_path = \"{d}/data/keys.json\"\n        }}\n    }}"
        ),
    };
    format!(
        r#"server {{
    bind_address = "127.0.0.1"
    bind_port = "{port}"
    socket_path = "{d}/sock/api.sock"
    trust_domain = "{td}"
    data_dir = "{d}/data"
    log_level = "WARN"
    ca_ttl = "{ca_ttl}"
    default_x509_svid_ttl = "{x509_ttl}"
    {extra}
}}
plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{d}/data/datastore.sqlite3"
        }}
    }}
    {km}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    {plugins}
}}
"#,
        plugins = o.extra_plugins,
        td = o.trust_domain,
        ca_ttl = o.ca_ttl,
        x509_ttl = o.x509_ttl,
        extra = o.extra_server,
    )
}

impl TestServer {
    pub async fn start(o: Opts) -> TestServer {
        Self::start_with(o, None).await
    }

    /// As [`TestServer::start`], with `key_manager` in place of the configured one.
    pub async fn start_with(
        o: Opts,
        key_manager: Option<std::sync::Arc<dyn kame_keymanager::KeyManager>>,
    ) -> TestServer {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let text = config_text(dir.path(), port, &o);
        let config_path = dir.path().join("server.conf");
        std::fs::write(&config_path, &text).unwrap();
        let mut s = TestServer {
            socket: dir.path().join("sock/api.sock"),
            dir,
            config_path,
            running: None,
            tcp_port: port,
            key_manager,
        };
        s.restart().await;
        s
    }

    pub fn config(&self) -> Config {
        Config::load(&self.config_path, false).unwrap()
    }

    /// Stops (if running) and starts the server again on the same files.
    pub async fn restart(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
        self.running = Some(
            run::start_with(self.config(), self.key_manager.clone())
                .await
                .unwrap(),
        );
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    pub async fn admin(&self) -> Channel {
        kame_server::cli::connect(&self.socket).await.unwrap()
    }

    /// Runs the kame-server binary with `args` plus `--socket-path`.
    pub async fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.push("--socket-path".into());
        all.push(self.socket.display().to_string());
        tokio::process::Command::new(env!("CARGO_BIN_EXE_kame-server"))
            .args(&all)
            .output()
            .await
            .unwrap()
    }

    pub async fn bundle(&self) -> pb::types::Bundle {
        pb::bundle::bundle_client::BundleClient::new(self.admin().await)
            .get_bundle(pb::bundle::GetBundleRequest { output_mask: None })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            // Best effort when a test panicked: signal shutdown; tasks end with the runtime.
            drop(r);
        }
    }
}

/// A P-256 key for building CSRs in tests.
pub struct TestKey(pub aws_lc_rs::signature::EcdsaKeyPair);

impl TestKey {
    pub fn new() -> Self {
        TestKey(
            aws_lc_rs::signature::EcdsaKeyPair::generate(
                &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            )
            .unwrap(),
        )
    }
    pub fn spki(&self) -> Vec<u8> {
        use aws_lc_rs::encoding::AsDer;
        use aws_lc_rs::signature::KeyPair;
        self.0.public_key().as_der().unwrap().as_ref().to_vec()
    }
    pub fn pkcs8(&self) -> Vec<u8> {
        self.0.to_pkcs8v1().unwrap().as_ref().to_vec()
    }
    pub fn csr(&self, uris: &[&str], dns: &[&str]) -> Vec<u8> {
        let uris: Vec<String> = uris.iter().map(|s| s.to_string()).collect();
        let dns: Vec<String> = dns.iter().map(|s| s.to_string()).collect();
        let info = kame_api::csr::request_info(&self.spki(), &uris, &dns).unwrap();
        let sig = self
            .0
            .sign(&aws_lc_rs::rand::SystemRandom::new(), &info)
            .unwrap();
        let alg = kame_api::keys::KeyInfo::from_spki_der(&self.spki())
            .unwrap()
            .x509_signature_algorithm();
        kame_api::x509svid::assemble(&info, &alg, sig.as_ref()).unwrap()
    }
}

/// A gRPC channel over TLS to the server's TCP port, verifying the server's SVID against
/// `roots` and presenting `client` (chain DER, PKCS#8 key) if given.
pub async fn tls_channel(
    port: u16,
    roots: Vec<Vec<u8>>,
    client: Option<(Vec<Vec<u8>>, Vec<u8>)>,
) -> Result<Channel, tonic::transport::Error> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(kame_api::tls::SpiffeServerVerifier::new(
        Arc::new(move || roots.clone()),
        kame_api::SpiffeId::parse(&format!("spiffe://{TD}/spire/server")).unwrap(),
        provider.clone(),
    ));
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match client {
        None => b.with_no_client_auth(),
        Some((chain, key)) => b
            .with_client_auth_cert(
                chain.into_iter().map(CertificateDer::from).collect(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
            )
            .unwrap(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                let name = rustls::pki_types::ServerName::try_from("kame-server").unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
}

pub fn spiffe_id(td: &str, path: &str) -> pb::types::Spiffeid {
    pb::types::Spiffeid {
        trust_domain: td.into(),
        path: path.into(),
    }
}

pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}
