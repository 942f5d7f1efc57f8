//! KeyManager benchmarks (not in CI):
//!
//! 1. Signatures per second (ECDSA P-256 over a 1 KiB message) through each backend at
//!    concurrency 1, 8 and 32: `memory` (aws-lc in process, the baseline, measured in the same
//!    run), `aws_kms` on moto_server, `hashicorp_vault` on an OpenBao dev server, `pkcs11` on
//!    SoftHSM2 (in a child process: SoftHSM2 reads its configuration from the environment).
//!    Each figure is printed with its ratio to the baseline at the same concurrency. The
//!    emulators are not the services: these rates measure Kame's client path plus a local
//!    emulator, not what AWS KMS or a Vault cluster would sustain.
//! 2. KMS Sign requests per 1,000 X509-SVIDs minted by a kame-server on aws_kms (moto), in
//!    `direct` and `kms_rooted` signing modes, counted on the wire by a relay. Goal: ≤ 1 in
//!    `kms_rooted`.
//!
//! Run: `cargo bench -p kame-tests --bench keymanager` (after `scripts/bootstrap`; set
//! `KAME_BENCH_SECONDS` to change the 2 s per measurement).

use kame_keymanager::testing::{Bao, Moto, Relay, SoftHsm};
use kame_keymanager::{KeyManager, KeyType, SignOpts};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CONCURRENCY: [usize; 3] = [1, 8, 32];

fn seconds() -> Duration {
    Duration::from_secs_f64(
        std::env::var("KAME_BENCH_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2.0),
    )
}

/// Signatures per second with `conc` tasks signing for the measurement period.
async fn rate(km: Arc<dyn KeyManager>, conc: usize) -> f64 {
    km.generate_key("bench", KeyType::EcP256).await.unwrap();
    let msg = vec![0x42u8; 1024];
    let opts = SignOpts::for_key(KeyType::EcP256);
    // Warm up (connections, sessions).
    km.sign("bench", &msg, opts).await.unwrap();
    let period = seconds();
    let start = Instant::now();
    let mut tasks = vec![];
    for _ in 0..conc {
        let (km, msg) = (km.clone(), msg.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while start.elapsed() < period {
                km.sign("bench", &msg, opts).await.unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

async fn rates(name: &str, km: Arc<dyn KeyManager>, baseline: &[f64]) -> Vec<f64> {
    let mut out = vec![];
    for (i, conc) in CONCURRENCY.iter().enumerate() {
        let r = rate(km.clone(), *conc).await;
        match baseline.get(i) {
            Some(b) => println!(
                "{name:>16} concurrency {conc:>2}: {r:>10.0} signs/s  ({:.4}× memory)",
                r / b
            ),
            None => println!("{name:>16} concurrency {conc:>2}: {r:>10.0} signs/s  (baseline)"),
        }
        out.push(r);
    }
    out
}

/// KMS Sign requests for 1,000 X509-SVIDs from a kame-server on aws_kms in `mode`.
async fn kms_signs_per_1000(moto: &Moto, mode: &str) -> usize {
    let relay = Relay::new(moto.port);
    relay.up();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let port = kame_keymanager::testing::free_port();
    let extra = if mode == "kms_rooted" {
        "signing_mode = \"kms_rooted\""
    } else {
        ""
    };
    let conf = format!(
        r#"server {{
    bind_address = "127.0.0.1"
    bind_port = "{port}"
    socket_path = "{d}/api.sock"
    trust_domain = "example.org"
    data_dir = "{d}/data"
    log_level = "ERROR"
    {extra}
}}
plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{d}/data/ds.sqlite3"
        }}
    }}
    KeyManager "aws_kms" {{
        plugin_data {{
            region = "us-east-1"
            access_key_id = "testing"
            secret_access_key = "testing"
            endpoint = "http://127.0.0.1:{relay}"
            key_identifier_value = "bench-{mode}"
        }}
    }}
}}
"#,
        relay = relay.port
    );
    let cfg = kame_server::config::Config::parse(&conf, false).unwrap();
    let server = kame_server::run::start(cfg).await.unwrap();
    let ca = server.ctx.ca.clone();
    let key = aws_lc_rs::signature::EcdsaKeyPair::generate(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
    )
    .unwrap();
    let spki = {
        use aws_lc_rs::encoding::AsDer;
        use aws_lc_rs::signature::KeyPair;
        key.public_key().as_der().unwrap().as_ref().to_vec()
    };
    let before = relay.sign_requests();
    let t = Instant::now();
    for i in 0..1000 {
        let id = kame_api::SpiffeId::parse(&format!("spiffe://example.org/w/{i}")).unwrap();
        ca.sign_x509_svid(&spki, &id, &[], Duration::from_secs(600))
            .await
            .unwrap();
    }
    let calls = relay.sign_requests() - before;
    println!(
        "{mode:>10}: {calls:>4} KMS Sign requests for 1,000 X509-SVIDs ({:.0} SVIDs/s)",
        1000.0 / t.elapsed().as_secs_f64()
    );
    server.stop().await;
    relay.down();
    calls
}

fn pkcs11_child() {
    // In the child: SOFTHSM2_CONF is set; print the pkcs11 rates.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let hsm = SoftHsm::child("unused").expect("run by the parent with a token");
        let km: Arc<dyn KeyManager> = Arc::new(
            kame_keymanager::pkcs11::Pkcs11KeyManager::open(
                kame_keymanager::pkcs11::Pkcs11Config {
                    module_path: hsm.module.clone(),
                    token_label: hsm.token_label.clone(),
                    user_pin: hsm.pin.as_str().into(),
                    server_id: "bench".into(),
                },
            )
            .await
            .unwrap(),
        );
        let base: Vec<f64> = std::env::var("KAME_BENCH_BASELINE")
            .unwrap_or_default()
            .split(',')
            .filter_map(|v| v.parse().ok())
            .collect();
        rates("pkcs11/SoftHSM2", km, &base).await;
    });
}

fn main() {
    if std::env::var("KAME_BENCH_PKCS11_CHILD").is_ok() {
        return pkcs11_child();
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!("Signatures per second, ECDSA P-256, 1 KiB messages:");
        let memory: Arc<dyn KeyManager> =
            Arc::new(kame_keymanager::memory::MemoryKeyManager::new());
        let base = rates("memory", memory, &[]).await;

        let moto = Moto::start();
        let kms: Arc<dyn KeyManager> = Arc::new(
            kame_keymanager::aws_kms::AwsKmsKeyManager::open(
                kame_keymanager::aws_kms::AwsKmsConfig {
                    region: "us-east-1".into(),
                    access_key_id: Some("testing".into()),
                    secret_access_key: Some("testing".into()),
                    endpoint: Some(moto.endpoint.clone()),
                    trust_domain: "example.org".into(),
                    server_id: "bench".into(),
                    key_policy: None,
                    key_tags: vec![],
                    call_timeout: Duration::from_secs(30),
                    tag_discovery: false,
                },
            )
            .await
            .unwrap(),
        );
        rates("aws_kms/moto", kms, &base).await;

        let bao = Bao::start();
        let vault: Arc<dyn KeyManager> = kame_keymanager::hashicorp_vault::VaultKeyManager::open(
            kame_keymanager::hashicorp_vault::VaultConfig {
                vault_addr: bao.addr.clone(),
                namespace: None,
                ca_cert_path: None,
                insecure_skip_verify: false,
                transit_engine_path: "transit".into(),
                auth: kame_keymanager::hashicorp_vault::VaultAuth::Token(
                    bao.root_token.as_str().into(),
                ),
                server_id: "bench".into(),
                call_timeout: Duration::from_secs(30),
            },
        )
        .await
        .unwrap();
        rates("vault/OpenBao", vault, &base).await;

        // pkcs11 in a child process with its own SoftHSM2 token.
        let dir = tempfile::tempdir().unwrap();
        let hsm = SoftHsm::create(dir.path());
        let o = std::process::Command::new(std::env::current_exe().unwrap())
            .env("KAME_BENCH_PKCS11_CHILD", "1")
            .env("SOFTHSM2_CONF", &hsm.conf)
            .env("KAME_TEST_SOFTHSM_TOKEN", &hsm.token_label)
            .env("KAME_TEST_SOFTHSM_PIN", &hsm.pin)
            .env(
                "KAME_BENCH_BASELINE",
                base.iter()
                    .map(|b| b.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .output()
            .unwrap();
        print!("{}", String::from_utf8_lossy(&o.stdout));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

        println!();
        println!("KMS Sign requests per 1,000 X509-SVIDs (aws_kms on moto, counted on the wire):");
        let direct = kms_signs_per_1000(&moto, "direct").await;
        let rooted = kms_signs_per_1000(&moto, "kms_rooted").await;
        println!(
            "kms_rooted goal (≤ 1): {}; direct/kms_rooted: {direct} vs {rooted}",
            if rooted <= 1 { "met" } else { "MISSED" }
        );
    });
}
