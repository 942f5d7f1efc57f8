//! Harness for agent end-to-end tests: a kame-server and a kame-agent started in-process on
//! 127.0.0.1 with free ports and one temp directory, the agent attested with a join token from
//! the server's admin API. Everything stops on `stop()` (or with the runtime when a test fails).

#![allow(dead_code)]

pub mod devid;
pub mod driver;
pub mod go;

use kame_api::pb;
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::Channel;

pub const TD: &str = "example.org";

pub use kame_keymanager::testing::free_port;

pub struct Env {
    pub dir: tempfile::TempDir,
    pub server: Option<kame_server::run::Running>,
    pub server_conf: PathBuf,
    pub admin_socket: PathBuf,
    pub tcp_port: u16,
    pub agent: Option<kame_agent::run::Running>,
    pub agent_conf: PathBuf,
    pub agent_socket: PathBuf,
    pub agent_id: String,
    /// The trust domain of the server and the agent.
    pub td: &'static str,
}

pub struct Opts {
    pub x509_ttl: &'static str,
    /// Extra lines for the server's `server { }` block.
    pub extra_server: &'static str,
    pub sync: &'static str,
    pub key_manager: &'static str,
    /// Extra plugin blocks for the server (e.g. `NodeAttestor "tpm_devid" {...}`).
    pub server_plugins: String,
    /// The agent's NodeAttestor block and its agent ID; None: join_token.
    pub agent_attestor: Option<(String, String)>,
    /// The server's KeyManager block; None: `disk` in the server's data_dir.
    pub server_key_manager: Option<String>,
    pub trust_domain: &'static str,
    /// Extra lines for the agent's `agent { }` block (`$DIR` stands for the test's directory).
    pub extra_agent: &'static str,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            x509_ttl: "1h",
            extra_server: "",
            sync: "1s",
            key_manager: "disk",
            server_plugins: String::new(),
            agent_attestor: None,
            server_key_manager: None,
            trust_domain: TD,
            extra_agent: "",
        }
    }
}

pub fn sid(td: &str, path: &str) -> pb::types::Spiffeid {
    pb::types::Spiffeid {
        trust_domain: td.into(),
        path: path.into(),
    }
}

pub fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

impl Env {
    pub async fn start(o: Opts) -> Env {
        match Env::try_start(o).await {
            Ok(e) => e,
            Err(e) => panic!("the server did not start: {e}"),
        }
    }

    /// As [`Env::start`]; a server that refuses to start is the error (its message).
    pub async fn try_start(o: Opts) -> Result<Env, String> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let port = free_port();
        let server_conf = d.join("server.conf");
        std::fs::write(
            &server_conf,
            format!(
                r#"server {{
    bind_address = "127.0.0.1"
    bind_port = "{port}"
    socket_path = "{d}/srv/api.sock"
    trust_domain = "{td}"
    data_dir = "{d}/srv"
    log_level = "WARN"
    default_x509_svid_ttl = "{ttl}"
    {extra}
}}
plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{d}/srv/datastore.sqlite3"
        }}
    }}
    {server_km}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    {plugins}
}}
"#,
                d = d.display(),
                td = o.trust_domain,
                plugins = o.server_plugins,
                server_km = o.server_key_manager.clone().unwrap_or_else(|| format!(
                    "KeyManager \"disk\" {{\n        plugin_data {{\n            keys_path = \"{}/srv/keys.json\"\n        }}\n    }}",
                    d.display()
                )),
                ttl = o.x509_ttl,
                extra = o.extra_server,
            ),
        )
        .unwrap();
        let mut env = Env {
            admin_socket: d.join("srv/api.sock"),
            agent_socket: d.join("agent/public/api.sock"),
            agent_conf: d.join("agent.conf"),
            dir,
            server: None,
            server_conf,
            tcp_port: port,
            agent: None,
            agent_id: String::new(),
            td: o.trust_domain,
        };
        let cfg = kame_server::config::Config::load(&env.server_conf, false)
            .map_err(|e| e.to_string())?;
        env.server = Some(
            kame_server::run::start(cfg)
                .await
                .map_err(|e| e.to_string())?,
        );
        let (attestor_block, token) = match &o.agent_attestor {
            Some((block, agent_id)) => {
                env.agent_id = agent_id.clone();
                (block.clone(), String::new())
            }
            None => {
                let token = pb::agent::agent_client::AgentClient::new(env.admin().await)
                    .create_join_token(pb::agent::CreateJoinTokenRequest {
                        ttl: 600,
                        token: String::new(),
                        agent_id: None,
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .value;
                env.agent_id = format!("spiffe://{}/spire/agent/join_token/{token}", env.td);
                (
                    "NodeAttestor \"join_token\" {\n        plugin_data {}\n    }".to_string(),
                    token,
                )
            }
        };
        let bundle = env.bundle().await;
        std::fs::write(d.join("bundle.pem"), kame_api::bundle::x509_to_pem(&bundle)).unwrap();
        let km = match o.key_manager {
            "memory" => "KeyManager \"memory\" {}".to_string(),
            _ => "KeyManager \"disk\" {\n        plugin_data {}\n    }".to_string(),
        };
        std::fs::write(
            &env.agent_conf,
            format!(
                r#"agent {{
    data_dir = "{d}/agent/data"
    server_address = "127.0.0.1"
    server_port = "{port}"
    socket_path = "{sock}"
    trust_bundle_path = "{d}/bundle.pem"
    trust_domain = "{td}"
    join_token = "{token}"
    log_level = "WARN"
    sync_interval = "{sync}"
    {extra_agent}
}}
plugins {{
    {attestor_block}
    {km}
    WorkloadAttestor "unix" {{
        plugin_data {{
            discover_workload_path = true
        }}
    }}
}}
"#,
                d = d.display(),
                td = env.td,
                sock = env.agent_socket.display(),
                sync = o.sync,
                extra_agent = o.extra_agent.replace("$DIR", &d.display().to_string()),
            ),
        )
        .unwrap();
        env.start_agent().await;
        Ok(env)
    }

    /// A channel to the server's TCP port as an agent before attestation has one: no client
    /// certificate, the server verified against the trust domain's bundle.
    pub async fn agent_channel(&self) -> Channel {
        let roots: Vec<Vec<u8>> = self
            .bundle()
            .await
            .x509_authorities
            .iter()
            .map(|c| c.asn1.clone())
            .collect();
        kame_agent::client::connect(
            "127.0.0.1",
            self.tcp_port,
            &kame_api::SpiffeId::parse(&format!("spiffe://{}/spire/server", self.td)).unwrap(),
            std::sync::Arc::new(std::sync::RwLock::new(roots)),
            None,
        )
        .await
        .unwrap()
    }

    pub async fn start_server(&mut self) {
        let cfg = kame_server::config::Config::load(&self.server_conf, false).unwrap();
        self.server = Some(kame_server::run::start(cfg).await.unwrap());
    }

    pub async fn stop_server(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
    }

    pub async fn start_agent(&mut self) {
        let cfg = kame_agent::config::Config::load(&self.agent_conf, false).unwrap();
        self.agent = Some(kame_agent::run::start(&cfg).await.unwrap());
    }

    pub async fn stop_agent(&mut self) {
        if let Some(a) = self.agent.take() {
            a.stop().await;
        }
    }

    pub async fn stop(mut self) {
        self.stop_agent().await;
        self.stop_server().await;
    }

    pub async fn admin(&self) -> Channel {
        kame_server::cli::connect(&self.admin_socket).await.unwrap()
    }

    pub async fn bundle(&self) -> pb::types::Bundle {
        pb::bundle::bundle_client::BundleClient::new(self.admin().await)
            .get_bundle(pb::bundle::GetBundleRequest { output_mask: None })
            .await
            .unwrap()
            .into_inner()
    }

    /// Registers `path` under the agent with `selectors` (`type:value`); returns the entry id.
    pub async fn register(
        &self,
        path: &str,
        selectors: &[&str],
        f: impl FnOnce(&mut pb::types::Entry),
    ) -> String {
        let mut e = pb::types::Entry {
            spiffe_id: Some(sid(self.td, path)),
            parent_id: Some(sid(
                self.td,
                self.agent_id
                    .trim_start_matches(&format!("spiffe://{}", self.td)),
            )),
            selectors: selectors
                .iter()
                .map(|s| {
                    let (t, v) = s.split_once(':').unwrap();
                    pb::types::Selector {
                        r#type: t.into(),
                        value: v.into(),
                    }
                })
                .collect(),
            ..Default::default()
        };
        f(&mut e);
        let r = pb::entry::entry_client::EntryClient::new(self.admin().await)
            .batch_create_entry(pb::entry::BatchCreateEntryRequest {
                entries: vec![e],
                output_mask: None,
            })
            .await
            .unwrap()
            .into_inner();
        let res = &r.results[0];
        assert_eq!(res.status.as_ref().unwrap().code, 0, "{:?}", res.status);
        res.entry.as_ref().unwrap().id.clone()
    }

    pub async fn delete_entry(&self, id: &str) {
        pb::entry::entry_client::EntryClient::new(self.admin().await)
            .batch_delete_entry(pb::entry::BatchDeleteEntryRequest {
                ids: vec![id.into()],
            })
            .await
            .unwrap();
    }

    pub fn socket_url(&self) -> String {
        format!("unix://{}", self.agent_socket.display())
    }

    /// A raw Workload API client (no header added).
    pub async fn workload_client(
        &self,
    ) -> pb::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<Channel> {
        pb::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
            kame_agent::cli::connect(&self.socket_url()).await.unwrap(),
        )
    }

    /// Waits until the Workload API gives this process SVIDs for exactly `ids` (sorted).
    pub async fn wait_for_svids(&self, ids: &[&str]) -> pb::workload::X509svidResponse {
        let mut want: Vec<String> = ids
            .iter()
            .map(|i| format!("spiffe://{}{i}", self.td))
            .collect();
        want.sort();
        // Generous: on a loaded 2-core machine a software TPM's key generation takes seconds.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let r = self
                .workload_client()
                .await
                .fetch_x509svid(kame_agent::cli::with_header(
                    pb::workload::X509svidRequest {},
                ))
                .await;
            if let Ok(s) = r {
                let mut s = s.into_inner();
                if let Ok(Ok(Some(m))) =
                    tokio::time::timeout(Duration::from_secs(2), s.message()).await
                {
                    let mut got: Vec<String> =
                        m.svids.iter().map(|s| s.spiffe_id.clone()).collect();
                    got.sort();
                    if got == want {
                        return m;
                    }
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the agent did not serve SVIDs for {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The attested agent as the server records it. The first attestation runs key generation
/// in a software TPM (seconds each on a loaded 2-core machine), so the wait is generous.
pub async fn wait_agent(env: &Env) -> pb::types::Agent {
    let path = env
        .agent_id
        .trim_start_matches(&format!("spiffe://{TD}"))
        .to_string();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let r = pb::agent::agent_client::AgentClient::new(env.admin().await)
            .get_agent(pb::agent::GetAgentRequest {
                id: Some(sid(TD, &path)),
                output_mask: None,
            })
            .await;
        if let Ok(a) = r {
            return a.into_inner();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent did not attest"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// A copy of the server's KeyManager file, and in it the key whose public key is `spki`.
pub async fn stolen_key(
    env: &Env,
    spki: &[u8],
) -> (
    kame_keymanager::disk::DiskKeyManager,
    kame_keymanager::PublicKey,
) {
    use kame_keymanager::KeyManager;
    let copy = env.dir.path().join("stolen-keys.json");
    std::fs::copy(env.dir.path().join("srv/keys.json"), &copy).unwrap();
    let stolen = kame_keymanager::disk::DiskKeyManager::open(&copy).unwrap();
    let key = stolen
        .public_keys()
        .await
        .unwrap()
        .into_iter()
        .find(|k| k.spki_der == spki)
        .unwrap();
    (stolen, key)
}
