//! tpm_devid attestation storm (not in CI): 1,000 synthetic agents attest against one
//! in-process kame-server at once. Each agent emulates its TPM in software with real keys:
//! an ECC P-256 EK with a certificate from a test EK CA, a restricted AK, a DevID key with a
//! certificate from a test DevID CA, a real TPMS_ATTEST certify signed by the AK, and a real
//! credential answer (ECDH with the EK, KDFe, KDFa, HMAC check, AES-128-CFB). Reports
//! attestations per second and the latency p50/p99 of one attestation. Goal: 1,000 in ≤ 5 s.
//!
//! Run: `cargo bench -p kame-tests --bench attest_storm`

use aws_lc_rs::agreement;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
};
use kame_api::pb;
use kame_api::tpm_devid::{AttestationRequest, ChallengeRequest, ChallengeResponse};
use kame_tpm::wire::public::{Params, Scheme, SymDef, Unique, attr};
use kame_tpm::wire::{self, Attest, AttestBody, ClockInfo, Public, Signature, alg, curve};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TD: &str = "example.org";
const AGENTS: usize = 1000;
/// Attestations in flight at once (`KAME_STORM_CONCURRENCY`, default 100).
fn concurrency() -> usize {
    std::env::var("KAME_STORM_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(100)
}

fn null_scheme() -> Scheme {
    Scheme {
        scheme: alg::NULL,
        hash: alg::NULL,
        count: None,
    }
}

fn null_sym() -> SymDef {
    SymDef {
        alg: alg::NULL,
        key_bits: 0,
        mode: 0,
    }
}

fn ecc_public(point: &[u8], attributes: u32, scheme: Scheme, symmetric: SymDef) -> Public {
    Public {
        name_alg: alg::SHA256,
        attributes,
        auth_policy: vec![],
        params: Params::Ecc {
            symmetric,
            scheme,
            curve: curve::NIST_P256,
            kdf: null_scheme(),
        },
        unique: Unique::Ecc {
            x: point[1..33].to_vec(),
            y: point[33..65].to_vec(),
        },
    }
}

/// A test CA: a P-256 key and its self-signed certificate.
struct Ca {
    key: EcdsaKeyPair,
    cert: Vec<u8>,
}

fn spki(k: &EcdsaKeyPair) -> Vec<u8> {
    k.public_key().as_der().unwrap().as_ref().to_vec()
}

fn cert(subject: &str, spki_der: &[u8], issuer: Option<&Ca>, signer: &EcdsaKeyPair) -> Vec<u8> {
    let td = kame_api::TrustDomain::parse(TD).unwrap();
    let name = kame_api::x509svid::parse_name(subject).unwrap();
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial).unwrap();
    serial[0] &= 0x7f;
    let now = kame_agent::manager::now_secs();
    let params = kame_api::x509svid::CaParams {
        trust_domain: &td,
        subject: &name,
        spki_der,
        serial: &serial,
        not_before: now - 60,
        not_after: now + 86400,
    };
    let info = issuer.map(|c| kame_api::x509svid::IssuerInfo::from_cert_der(&c.cert).unwrap());
    let tbs = kame_api::x509svid::ca_tbs(&params, info.as_ref()).unwrap();
    let sig = signer.sign(&SystemRandom::new(), &tbs).unwrap();
    let alg = kame_api::keys::KeyInfo::from_spki_der(&spki(signer))
        .unwrap()
        .x509_signature_algorithm();
    kame_api::x509svid::assemble(&tbs, &alg, sig.as_ref()).unwrap()
}

fn new_ca(cn: &str) -> Ca {
    let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
    let c = cert(&format!("CN={cn}"), &spki(&key), None, &key);
    Ca { key, cert: c }
}

/// One emulated TPM with its DevID.
struct SoftTpm {
    ek: agreement::PrivateKey,
    ak: EcdsaKeyPair,
    ak_name: Vec<u8>,
    devid: EcdsaKeyPair,
    message: Vec<u8>,
}

impl SoftTpm {
    fn new(i: usize, ek_ca: &Ca, devid_ca: &Ca) -> SoftTpm {
        let ek = agreement::PrivateKey::generate(&agreement::ECDH_P256).unwrap();
        let ek_point = ek.compute_public_key().unwrap().as_ref().to_vec();
        let mut ek_pub = ecc_public(
            &ek_point,
            attr::FIXED_TPM
                | attr::FIXED_PARENT
                | attr::SENSITIVE_DATA_ORIGIN
                | attr::ADMIN_WITH_POLICY
                | attr::RESTRICTED
                | attr::DECRYPT,
            null_scheme(),
            SymDef {
                alg: alg::AES,
                key_bits: 128,
                mode: alg::CFB,
            },
        );
        ek_pub.auth_policy = wire::policy::policy_secret_endorsement(alg::SHA256).unwrap();
        let ek_cert = cert(
            &format!("CN=ek-{i}"),
            &ek_pub.spki_der().unwrap(),
            Some(ek_ca),
            &ek_ca.key,
        );
        let sig_scheme = Scheme {
            scheme: alg::ECDSA,
            hash: alg::SHA256,
            count: None,
        };
        let ak = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let ak_pub = ecc_public(
            ak.public_key().as_ref(),
            attr::SIGN_ENCRYPT
                | attr::RESTRICTED
                | attr::FIXED_TPM
                | attr::FIXED_PARENT
                | attr::SENSITIVE_DATA_ORIGIN
                | attr::USER_WITH_AUTH,
            sig_scheme,
            null_sym(),
        );
        let devid = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
        let devid_pub = ecc_public(
            devid.public_key().as_ref(),
            attr::SIGN_ENCRYPT
                | attr::FIXED_TPM
                | attr::FIXED_PARENT
                | attr::SENSITIVE_DATA_ORIGIN
                | attr::USER_WITH_AUTH,
            sig_scheme,
            null_sym(),
        );
        let devid_cert = cert(
            &format!("CN=synthetic-{i}"),
            &devid_pub.spki_der().unwrap(),
            Some(devid_ca),
            &devid_ca.key,
        );
        let ak_name = ak_pub.name().unwrap();
        let devid_name = devid_pub.name().unwrap();
        let attest = Attest {
            attest_type: 0x8017,
            qualified_signer: ak_name.clone(),
            extra_data: vec![],
            clock_info: ClockInfo {
                clock: 1000,
                reset_count: 1,
                restart_count: 0,
                safe: true,
            },
            firmware_version: 0,
            body: AttestBody::Certify {
                name: devid_name.clone(),
                qualified_name: devid_name,
            },
        }
        .marshal()
        .unwrap();
        let raw = ak.sign(&SystemRandom::new(), &attest).unwrap();
        let sig = Signature::Ecdsa {
            hash: alg::SHA256,
            r: raw.as_ref()[..32].to_vec(),
            s: raw.as_ref()[32..].to_vec(),
        }
        .marshal()
        .unwrap();
        let message = AttestationRequest {
            devid_cert: vec![devid_cert],
            devid_pub: Some(devid_pub.marshal().unwrap()),
            ek_cert: Some(ek_cert),
            ek_pub: Some(ek_pub.marshal().unwrap()),
            ak_pub: Some(ak_pub.marshal().unwrap()),
            certified_devid: Some(attest),
            certification_signature: Some(sig),
            version: None,
            ek_cert_chain: vec![],
            ak_cert: vec![],
        }
        .encode();
        SoftTpm {
            ek,
            ak,
            ak_name,
            devid,
            message,
        }
    }

    /// TPM2_ActivateCredential and the nonce signature, in software.
    fn answer(&self, challenge: &[u8]) -> Vec<u8> {
        let _ = &self.ak;
        let c = ChallengeRequest::decode(challenge).unwrap();
        let nonce = c.devid.unwrap();
        let cred = c.cred_activation.unwrap();
        // secret = TPMS_ECC_POINT of the server's ephemeral key
        let mut r = wire::Reader::new(&cred.secret, "point");
        let ex = r.tpm2b().unwrap().to_vec();
        let ey = r.tpm2b().unwrap().to_vec();
        let peer = [&[4u8][..], &ex, &ey].concat();
        let z = agreement::agree(
            &self.ek,
            agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, &peer),
            (),
            |z| Ok(z.to_vec()),
        )
        .unwrap();
        let ek_point = self.ek.compute_public_key().unwrap().as_ref().to_vec();
        let seed = wire::credential::kdfe(alg::SHA256, &z, "IDENTITY", &ex, &ek_point[1..33], 256)
            .unwrap();
        // credential = TPM2B(integrity) || encIdentity
        let mut r = wire::Reader::new(&cred.credential, "id object");
        let integrity = r.tpm2b().unwrap().to_vec();
        let rest_len = cred.credential.len() - 2 - integrity.len();
        let mut enc_identity = cred.credential[cred.credential.len() - rest_len..].to_vec();
        let hmac_key =
            wire::credential::kdfa(alg::SHA256, &seed, "INTEGRITY", &[], &[], 256).unwrap();
        let want = wire::hmac(alg::SHA256, &hmac_key, &[&enc_identity, &self.ak_name]).unwrap();
        assert_eq!(want, integrity, "credential integrity");
        let sym =
            wire::credential::kdfa(alg::SHA256, &seed, "STORAGE", &self.ak_name, &[], 128).unwrap();
        let key =
            aws_lc_rs::cipher::UnboundCipherKey::new(&aws_lc_rs::cipher::AES_128, &sym).unwrap();
        let dec = aws_lc_rs::cipher::DecryptingKey::cfb128(key).unwrap();
        let plain = dec
            .decrypt(
                &mut enc_identity,
                aws_lc_rs::cipher::DecryptionContext::Iv128([0u8; 16].into()),
            )
            .unwrap();
        let mut r = wire::Reader::new(plain, "secret");
        let secret = r.tpm2b().unwrap().to_vec();
        let sig = self.devid.sign(&SystemRandom::new(), &nonce).unwrap();
        ChallengeResponse {
            devid: Some(sig.as_ref().to_vec()),
            cred_activation: Some(secret),
            ..Default::default()
        }
        .encode()
    }
}

async fn attest_one(
    port: u16,
    roots: Arc<std::sync::RwLock<Vec<Vec<u8>>>>,
    tpm: Arc<SoftTpm>,
) -> Duration {
    let t = Instant::now();
    let server_id = kame_api::SpiffeId::parse(&format!("spiffe://{TD}/spire/server")).unwrap();
    let ch = kame_agent::client::connect("127.0.0.1", port, &server_id, roots, None)
        .await
        .unwrap();
    let key = kame_agent::keys::generate().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(pb::agent::AttestAgentRequest {
        step: Some(pb::agent::attest_agent_request::Step::Params(
            pb::agent::attest_agent_request::Params {
                data: Some(pb::types::AttestationData {
                    r#type: "tpm_devid".into(),
                    payload: tpm.message.clone(),
                }),
                params: Some(pb::agent::AgentX509svidParams {
                    csr: kame_agent::keys::csr(&key).unwrap(),
                }),
            },
        )),
    })
    .await
    .unwrap();
    let mut s = pb::agent::agent_client::AgentClient::new(ch)
        .attest_agent(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::agent::attest_agent_response::Step::Challenge(c)) =
        s.message().await.unwrap().and_then(|m| m.step)
    else {
        panic!("no challenge");
    };
    let answer = tokio::task::spawn_blocking(move || tpm.answer(&c))
        .await
        .unwrap();
    tx.send(pb::agent::AttestAgentRequest {
        step: Some(pb::agent::attest_agent_request::Step::ChallengeResponse(
            answer,
        )),
    })
    .await
    .unwrap();
    match s.message().await.unwrap().and_then(|m| m.step) {
        Some(pb::agent::attest_agent_response::Step::Result(_)) => {}
        other => panic!("attestation failed: {other:?}"),
    }
    t.elapsed()
}

/// The baseline: a join_token attestation over the same kind of TLS connection.
async fn join_one(
    port: u16,
    roots: Arc<std::sync::RwLock<Vec<Vec<u8>>>>,
    token: String,
) -> Duration {
    let t = Instant::now();
    let server_id = kame_api::SpiffeId::parse(&format!("spiffe://{TD}/spire/server")).unwrap();
    let ch = kame_agent::client::connect("127.0.0.1", port, &server_id, roots, None)
        .await
        .unwrap();
    let key = kame_agent::keys::generate().unwrap();
    kame_agent::attestation::NodeAttestor::JoinToken(Some(token.into()))
        .attest(ch, kame_agent::keys::csr(&key).unwrap())
        .await
        .unwrap();
    t.elapsed()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let ek_ca = new_ca("Synthetic EK CA");
    let devid_ca = new_ca("Synthetic DevID CA");
    std::fs::write(
        dir.path().join("ek.pem"),
        kame_api::bundle::pem_block("CERTIFICATE", &ek_ca.cert),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("devid.pem"),
        kame_api::bundle::pem_block("CERTIFICATE", &devid_ca.cert),
    )
    .unwrap();
    let t = Instant::now();
    let tpms: Vec<Arc<SoftTpm>> = (0..AGENTS)
        .map(|i| Arc::new(SoftTpm::new(i, &ek_ca, &devid_ca)))
        .collect();
    println!(
        "emulated {AGENTS} TPMs (EK, AK, DevID, certificates, certify) in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let port = kame_keymanager::testing::free_port();
    let conf = dir.path().join("server.conf");
    std::fs::write(
        &conf,
        format!(
            r#"server {{
    bind_address = "127.0.0.1"
    bind_port = "{port}"
    socket_path = "{d}/api.sock"
    trust_domain = "{TD}"
    data_dir = "{d}/data"
    log_level = "ERROR"
    # Every synthetic agent connects from 127.0.0.1: the per-IP limit would measure itself.
    ratelimit {{
        attestation = false
    }}
}}
plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{d}/data/datastore.sqlite3"
        }}
    }}
    KeyManager "memory" {{}}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    NodeAttestor "tpm_devid" {{
        plugin_data {{
            devid_ca_path = "{d}/devid.pem"
            endorsement_ca_path = "{d}/ek.pem"
        }}
    }}
}}
"#
        ),
    )
    .unwrap();
    let server = kame_server::run::start(kame_server::config::Config::load(&conf, false).unwrap())
        .await
        .unwrap();
    let bundle = pb::bundle::bundle_client::BundleClient::new(
        kame_server::cli::connect(&dir.path().join("api.sock"))
            .await
            .unwrap(),
    )
    .get_bundle(pb::bundle::GetBundleRequest { output_mask: None })
    .await
    .unwrap()
    .into_inner();
    let roots = Arc::new(std::sync::RwLock::new(
        bundle
            .x509_authorities
            .iter()
            .map(|c| c.asn1.clone())
            .collect::<Vec<_>>(),
    ));
    // Warm-up: one attestation outside the measurement.
    attest_one(port, roots.clone(), tpms[0].clone()).await;
    let conc = concurrency();
    let sem = Arc::new(tokio::sync::Semaphore::new(conc));
    let start = Instant::now();
    let mut tasks = vec![];
    for tpm in tpms.iter().skip(1).cloned() {
        let sem = sem.clone();
        let roots = roots.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.unwrap();
            attest_one(port, roots, tpm).await
        }));
    }
    let mut lat = vec![];
    for t in tasks {
        lat.push(t.await.unwrap());
    }
    let total = start.elapsed();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3;
    println!(
        "{} tpm_devid attestations ({conc} at a time, each on its own TLS connection) in {:.2} s: {:.0} attestations/s; latency p50 {:.1} ms, p99 {:.1} ms (goal: 1,000 in <= 5 s)",
        lat.len(),
        total.as_secs_f64(),
        lat.len() as f64 / total.as_secs_f64(),
        pct(0.50),
        pct(0.99)
    );
    let n = server.ctx.ds.list_nodes().await.unwrap().len();
    println!("attested agents recorded: {n}");
    // Baseline in the same run: as many join_token attestations (same server, same TLS, same
    // concurrency, agent SVID signing and node record), so the ratio is tpm_devid's own cost.
    let admin = kame_server::cli::connect(&dir.path().join("api.sock"))
        .await
        .unwrap();
    let mut tokens = vec![];
    for _ in 0..lat.len() {
        tokens.push(
            pb::agent::agent_client::AgentClient::new(admin.clone())
                .create_join_token(pb::agent::CreateJoinTokenRequest {
                    ttl: 600,
                    token: String::new(),
                    agent_id: None,
                })
                .await
                .unwrap()
                .into_inner()
                .value,
        );
    }
    let start = Instant::now();
    let mut tasks = vec![];
    for token in tokens {
        let sem = sem.clone();
        let roots = roots.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.unwrap();
            join_one(port, roots, token).await
        }));
    }
    let mut base = vec![];
    for t in tasks {
        base.push(t.await.unwrap());
    }
    let base_total = start.elapsed();
    base.sort();
    let base_rate = base.len() as f64 / base_total.as_secs_f64();
    let rate = lat.len() as f64 / total.as_secs_f64();
    println!(
        "baseline: {} join_token attestations in {:.2} s: {:.0}/s; tpm_devid rate / join_token rate = {:.2}",
        base.len(),
        base_total.as_secs_f64(),
        base_rate,
        rate / base_rate
    );
    server.stop().await;
}
