//! Break-glass end to end (docs/break-glass.md): an agent attested with tpm_devid on swtpm
//! holds reserve SVIDs; with every server stopped, its workload's SVID expires as today until
//! the glass is broken, then py-spiffe receives reserve SVIDs that openssl verifies against
//! the bundle past the original expiry, for the workload's own IDs only, and that a verifier
//! refusing the break-glass policy refuses; the record reaches the server when it returns,
//! normal issuance resumes, and a taint and revoke of the authority ends the reserves. Then
//! the refusals: a server that answers, no reserves (an attestor the server does not allow),
//! a missing, forged, expired or foreign token, and a record tampered with.

mod common;
use common::devid::{ek_cas, opts, provision};
use common::*;
use kame_api::pb;
use kame_api::pb::localauthority as la;
use kame_api::pb::localauthority::local_authority_client::LocalAuthorityClient;
use kame_api::x509svid::ParsedCert;
use kame_tpm::testing::SwTpm;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn python() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python")
}

fn admin_sock(env: &Env) -> PathBuf {
    env.dir.path().join("agent/admin.sock")
}

async fn status(env: &Env) -> pb::breakglass::BreakGlassStatus {
    kame_agent::admin::client(&admin_sock(env), None)
        .await
        .unwrap()
}

async fn break_glass(
    env: &Env,
    reason: &str,
    secs: u64,
    token: Option<String>,
) -> Result<pb::breakglass::BreakGlassStatus, String> {
    kame_agent::admin::client(
        &admin_sock(env),
        Some((reason.into(), Duration::from_secs(secs), token)),
    )
    .await
    .map_err(|e| e.to_string())
}

/// The first X509-SVID response within `wait`, if any.
async fn fetch_within(env: &Env, wait: Duration) -> Option<pb::workload::X509svidResponse> {
    let mut s = env
        .workload_client()
        .await
        .fetch_x509svid(kame_agent::cli::with_header(
            pb::workload::X509svidRequest {},
        ))
        .await
        .ok()?
        .into_inner();
    tokio::time::timeout(wait, s.message()).await.ok()?.ok()?
}

fn leaf(m: &pb::workload::X509svidResponse) -> ParsedCert {
    let chain = kame_agent::cli::certs(&m.svids[0].x509_svid);
    ParsedCert::parse(&chain[0]).unwrap()
}

/// Waits until `f` holds, polling every 200 ms, for at most `secs`.
async fn until<F, Fut>(secs: u64, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn records(env: &Env) -> Vec<pb::breakglass::RecordLine> {
    pb::breakglass::break_glass_client::BreakGlassClient::new(env.admin().await)
        .list_records(pb::breakglass::ListRecordsRequest {
            spiffe_id: env.agent_id.clone(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .lines
}

fn openssl_verify(bundle_pem: &Path, svid_pem: &Path) -> (bool, String) {
    let out = std::process::Command::new("openssl")
        .args(["verify", "-partial_chain", "-CAfile"])
        .arg(bundle_pem)
        .arg(svid_pem)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// py-spiffe fetches the workload's X509-SVID, writes its leaf to `out`, and reports its
/// SPIFFE ID, notAfter and whether a verifier refusing the break-glass policy refuses it.
async fn py_fetch(env: &Env, out: &Path) -> String {
    let script = r#"
import sys
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from spiffe import WorkloadApiClient
BREAK_GLASS = x509.ObjectIdentifier("2.25.161190094665278160941200676328092638606")
def refuses(cert):
    try:
        pol = cert.extensions.get_extension_for_class(x509.CertificatePolicies).value
    except x509.ExtensionNotFound:
        return False
    return any(p.policy_identifier == BREAK_GLASS for p in pol)
c = WorkloadApiClient(socket_path=sys.argv[1])
svid = c.fetch_x509_svid()
open(sys.argv[2], "wb").write(svid.leaf.public_bytes(Encoding.PEM))
print("id", svid.spiffe_id)
print("not_after", int(svid.leaf.not_valid_after_utc.timestamp()))
print("strict-verifier", "refused" if refuses(svid.leaf) else "accepted")
c.close()
"#;
    let o = tokio::process::Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(env.socket_url())
        .arg(out)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "py-spiffe failed: {text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    text
}

fn bundle_pem(b: &pb::types::Bundle, path: &Path) {
    std::fs::write(path, kame_api::bundle::x509_to_pem(b)).unwrap();
}

const SERVER_BG: &str =
    "break_glass {\n        slice = \"1m\"\n        max_extension = \"4m\"\n    }";
const AGENT_BG: &str = "admin_socket_path = \"$DIR/agent/admin.sock\"\n    break_glass {\n        outage = \"2s\"\n        max_duration = \"10m\"\n    }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_tpm_devid_reserves_serve_py_spiffe_past_expiry_recorded_and_revocable() {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "devid-bg");
    let ek_ca = ek_cas(&tpm, devid.dir.path());
    let mut env = Env::start(Opts {
        x509_ttl: "30s",
        extra_server: SERVER_BG,
        extra_agent: AGENT_BG,
        ..opts(&tpm, &devid, &devid.ca, &ek_ca)
    })
    .await;
    wait_agent(&env).await;
    env.register("/bg", &[&format!("unix:uid:{}", my_uid())], |_| {})
        .await;
    // Another workload's entry on this node: the agent holds its reserves, never serves them
    // to this workload.
    env.register("/other", &["unix:uid:4242"], |_| {}).await;
    env.wait_for_svids(&["/bg"]).await;
    until(60, "reserves cover 4 minutes past the SVIDs", || async {
        let s = status(&env).await;
        s.reserves >= 8 && s.covered_until as u64 >= kame_agent::manager::now_secs() + 200
    })
    .await;

    // Refused while the server answers.
    let e = break_glass(&env, "INC-1", 300, None).await.unwrap_err();
    assert!(e.contains("a server answered"), "{e}");

    // Every server stops. Without breaking the glass the SVID expires, as today.
    let before = env.wait_for_svids(&["/bg"]).await;
    let original_expiry = leaf(&before).not_after();
    assert!(!leaf(&before).is_break_glass().unwrap());
    env.stop_server().await;
    until(
        45,
        "the workload's SVID expired and nothing replaced it",
        || async {
            kame_agent::manager::now_secs() > original_expiry
                && fetch_within(&env, Duration::from_secs(2)).await.is_none()
        },
    )
    .await;

    // The glass is broken: py-spiffe receives a reserve for its own ID, valid past the
    // original expiry, that openssl verifies against the bundle; a strict verifier refuses.
    let s = break_glass(&env, "INC-1 every server down", 600, None)
        .await
        .unwrap();
    assert!(s.open, "{s:?}");
    let reserve_pem = env.dir.path().join("reserve.pem");
    let out = py_fetch(&env, &reserve_pem).await;
    assert!(out.contains(&format!("id spiffe://{TD}/bg")), "{out}");
    assert!(out.contains("strict-verifier refused"), "{out}");
    let not_after: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("not_after "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        not_after > original_expiry,
        "{not_after} vs {original_expiry}"
    );
    let m = fetch_within(&env, Duration::from_secs(5)).await.unwrap();
    assert_eq!(m.svids.len(), 1, "only the workload's own ID");
    let bundle_file = env.dir.path().join("bundle-now.pem");
    std::fs::copy(env.dir.path().join("bundle.pem"), &bundle_file).unwrap();
    let (ok, text) = openssl_verify(&bundle_file, &reserve_pem);
    assert!(ok, "openssl: {text}");
    let text = String::from_utf8(
        std::process::Command::new("openssl")
            .args(["x509", "-noout", "-ext", "certificatePolicies", "-in"])
            .arg(&reserve_pem)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        text.contains(kame_api::x509svid::BREAK_GLASS_POLICY),
        "openssl sees the policy: {text}"
    );
    // When that slice ends, the next one's reserve follows.
    until(75, "the first reserve's slice ended", || async {
        kame_agent::manager::now_secs() > not_after
    })
    .await;
    let next_pem = env.dir.path().join("reserve-next.pem");
    let out = py_fetch(&env, &next_pem).await;
    assert!(out.contains("strict-verifier refused"), "{out}");
    let next_after: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("not_after "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(next_after, not_after + 60, "{out}");
    let (ok, text) = openssl_verify(&bundle_file, &next_pem);
    assert!(ok, "openssl: {text}");
    let record = env.dir.path().join("agent/data/break_glass/record.jsonl");
    let lines = std::fs::read_to_string(&record).unwrap();
    assert!(lines.contains("\\\"kind\\\":\\\"open\\\""), "{lines}");
    assert!(lines.contains("\\\"kind\\\":\\\"deliver\\\""), "{lines}");

    // The server returns: the glass closes, the record arrives and verifies, normal
    // issuance resumes.
    env.start_server().await;
    until(30, "the record reaches the server", || async {
        let r = records(&env).await;
        r.iter().any(|l| l.kind == "close") && r.iter().any(|l| l.kind == "deliver")
    })
    .await;
    let r = records(&env).await;
    assert_eq!(r[0].kind, "open");
    assert!(
        r.iter().filter(|l| l.kind == "deliver").count() >= 2,
        "{r:?}"
    );
    assert!(r[0].line.contains("INC-1 every server down"));
    // What `kame-server agent show` adds for this agent.
    let (events, text) = kame_server::cli::break_glass_report(&r);
    assert!(
        text.contains("OPENED") && text.contains("INC-1 every server down"),
        "{text}"
    );
    assert!(
        text.contains(&format!("delivered \"spiffe://{TD}/bg\"")) && text.contains("unix:uid:"),
        "{text}"
    );
    assert!(text.contains("CLOSED: \"servers answered\""), "{text}");
    assert_eq!(events.as_array().unwrap().len(), r.len());
    assert!(!status(&env).await.open);
    until(30, "a normal SVID again", || async {
        fetch_within(&env, Duration::from_secs(2))
            .await
            .is_some_and(|m| !leaf(&m).is_break_glass().unwrap())
    })
    .await;

    // Taint and revoke the authority that signed the reserves: the delivered reserve no
    // longer verifies against the bundle, and the agent's reserves are all re-issued under
    // the new authority.
    let mut c = LocalAuthorityClient::new(env.admin().await);
    let state = c
        .get_x509_authority_state(la::GetX509AuthorityStateRequest {})
        .await
        .unwrap()
        .into_inner();
    let old = state.active.unwrap().authority_id;
    let new = c
        .prepare_x509_authority(la::PrepareX509AuthorityRequest { force: false })
        .await
        .unwrap()
        .into_inner()
        .prepared_authority
        .unwrap()
        .authority_id;
    c.activate_x509_authority(la::ActivateX509AuthorityRequest { authority_id: new })
        .await
        .unwrap();
    c.taint_x509_authority(la::TaintX509AuthorityRequest {
        authority_id: old.clone(),
    })
    .await
    .unwrap();
    c.revoke_x509_authority(la::RevokeX509AuthorityRequest {
        authority_id: old,
        force: true,
    })
    .await
    .unwrap();
    let b = env.bundle().await;
    bundle_pem(&b, &bundle_file);
    let (ok, text) = openssl_verify(&bundle_file, &reserve_pem);
    assert!(
        !ok,
        "a reserve under the revoked authority still verifies: {text}"
    );
    let roots: Vec<Vec<u8>> = b.x509_authorities.iter().map(|c| c.asn1.clone()).collect();
    let reserves_file = env.dir.path().join("agent/data/break_glass_reserves.json");
    until(
        30,
        "every reserve re-issued under the new authority",
        || async {
            let Ok(text) = std::fs::read_to_string(&reserves_file) else {
                return false;
            };
            let v: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
            let now = kame_agent::manager::now_secs();
            !v.is_empty()
                && v.iter().all(|r| {
                    use base64::Engine;
                    let chain: Vec<Vec<u8>> = r["chain"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|c| {
                            base64::engine::general_purpose::STANDARD
                                .decode(c.as_str().unwrap())
                                .unwrap()
                        })
                        .collect();
                    let at = now.max(r["not_before"].as_u64().unwrap() + 11);
                    kame_api::x509svid::verify_chain(&chain, &roots, at).is_ok()
                })
        },
    )
    .await;
    env.stop().await;
}

/// A JWT for `sub` with audience kame-break-glass signed by `key` (SubjectPublicKeyInfo and
/// signer), with key ID `kid` and expiry `exp`.
fn jwt_with(
    spki: &[u8],
    sign: impl FnOnce(&[u8]) -> Vec<u8>,
    kid: &str,
    sub: &str,
    exp: u64,
) -> String {
    let info = kame_api::keys::KeyInfo::from_spki_der(spki).unwrap();
    let sub = kame_api::SpiffeId::parse(sub).unwrap();
    let now = kame_agent::manager::now_secs();
    let input = kame_api::jwtsvid::signing_input(
        &info,
        kid,
        &kame_api::jwtsvid::Claims {
            sub: &sub,
            aud: &["kame-break-glass".to_string()],
            exp,
            iat: now.min(exp),
            iss: None,
        },
    )
    .unwrap();
    let sig = sign(input.as_bytes());
    kame_api::jwtsvid::assemble(&info, &input, &sig).unwrap()
}

async fn mint_token(env: &Env, agent_path: &str) -> String {
    pb::svid::svid_client::SvidClient::new(env.admin().await)
        .mint_jwtsvid(pb::svid::MintJwtsvidRequest {
            id: Some(sid(TD, agent_path)),
            audience: vec!["kame-break-glass".into()],
            ttl: 600,
        })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap()
        .token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_refuses_missing_forged_expired_and_foreign_tokens_and_a_tampered_record() {
    let mut env = Env::start(Opts {
        extra_server: "break_glass {\n        slice = \"1m\"\n        max_extension = \"2m\"\n        node_attestors = [\"join_token\"]\n    }",
        extra_agent: "admin_socket_path = \"$DIR/agent/admin.sock\"\n    break_glass {\n        outage = \"2s\"\n        require_token = true\n    }",
        ..Default::default()
    })
    .await;
    env.register("/bg", &[&format!("unix:uid:{}", my_uid())], |_| {})
        .await;
    env.wait_for_svids(&["/bg"]).await;
    until(60, "reserves", || async { status(&env).await.reserves > 0 }).await;
    let agent_path = env
        .agent_id
        .strip_prefix(&format!("spiffe://{TD}"))
        .unwrap()
        .to_string();
    // Made in advance by an admin: the agent's own token, and one for another agent.
    let token = mint_token(&env, &agent_path).await;
    let foreign = mint_token(&env, "/spire/agent/join_token/someone-else").await;
    // A workload cannot get a token for itself through its agent.
    let e = env
        .workload_client()
        .await
        .fetch_jwtsvid(kame_agent::cli::with_header(pb::workload::JwtsvidRequest {
            audience: vec!["kame-break-glass".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert!(e.message().contains("reserved for break-glass"), "{e:?}");
    // Forged: signed by a key not in the bundle, under the real key ID. Expired: signed by
    // a copy of the server's real JWT key.
    let header: serde_json::Value = {
        use base64::Engine;
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(token.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap()
    };
    let kid = header["kid"].as_str().unwrap().to_string();
    let now = kame_agent::manager::now_secs();
    let rogue = {
        use aws_lc_rs::encoding::AsDer;
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
        let k = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
        let spki = k.public_key().as_der().unwrap().as_ref().to_vec();
        jwt_with(
            &spki,
            |m| {
                k.sign(&aws_lc_rs::rand::SystemRandom::new(), m)
                    .unwrap()
                    .as_ref()
                    .to_vec()
            },
            &kid,
            &env.agent_id,
            now + 600,
        )
    };
    let expired = {
        use kame_keymanager::KeyManager;
        let bundle = env.bundle().await;
        let spki = bundle
            .jwt_authorities
            .iter()
            .find(|k| k.key_id == kid)
            .unwrap()
            .public_key
            .clone();
        let (stolen, key) = stolen_key(&env, &spki).await;
        let info = kame_api::keys::KeyInfo::from_spki_der(&spki).unwrap();
        let sub = kame_api::SpiffeId::parse(&env.agent_id).unwrap();
        let input = kame_api::jwtsvid::signing_input(
            &info,
            &kid,
            &kame_api::jwtsvid::Claims {
                sub: &sub,
                aud: &["kame-break-glass".to_string()],
                exp: now - 120,
                iat: now - 600,
                iss: None,
            },
        )
        .unwrap();
        let sig = stolen
            .sign(
                &key.id,
                input.as_bytes(),
                kame_keymanager::SignOpts::for_key(key.key_type),
            )
            .await
            .unwrap();
        kame_api::jwtsvid::assemble(&info, &input, &sig.bytes).unwrap()
    };

    env.stop_server().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let e = break_glass(&env, "INC-2", 60, None).await.unwrap_err();
    assert!(e.contains("token is required"), "{e}");
    for (t, says) in [
        (rogue, "break-glass token refused"),
        (expired, "break-glass token refused"),
        (foreign, "not this agent"),
        ("not.a.jwt".to_string(), "break-glass token refused"),
    ] {
        let e = break_glass(&env, "INC-2", 60, Some(t)).await.unwrap_err();
        assert!(e.contains(says) && e.contains("PermissionDenied"), "{e}");
    }
    let e = break_glass(&env, "INC-2", 30 * 86400, Some(token.clone()))
        .await
        .unwrap_err();
    assert!(e.contains("duration"), "{e}");
    let e = break_glass(&env, " ", 60, Some(token.clone()))
        .await
        .unwrap_err();
    assert!(e.contains("reason"), "{e}");
    // Nothing refused was recorded.
    let record = env.dir.path().join("agent/data/break_glass/record.jsonl");
    assert!(!record.exists());
    let s = break_glass(&env, "INC-2 datastore lost", 60, Some(token.clone()))
        .await
        .unwrap();
    assert!(s.open);
    let e = break_glass(&env, "again", 60, Some(token.clone()))
        .await
        .unwrap_err();
    assert!(e.contains("already broken"), "{e}");

    // The record is edited while the agent is down: the agent detects it (status, and no
    // further break), and the server refuses it when it returns.
    env.stop_agent().await;
    let text = std::fs::read_to_string(&record).unwrap();
    std::fs::write(
        &record,
        text.replace("INC-2 datastore lost", "INC-2 routine check"),
    )
    .unwrap();
    env.start_agent().await;
    let s = status(&env).await;
    assert!(s.record_error.contains("signature"), "{s:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let e = break_glass(&env, "INC-3", 60, Some(token))
        .await
        .unwrap_err();
    assert!(e.contains("does not verify"), "{e}");
    env.start_server().await;
    until(20, "the agent syncs again", || async {
        status(&env).await.last_server_contact as u64 + 3 > kame_agent::manager::now_secs()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        records(&env).await.is_empty(),
        "a tampered record was stored"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_refused_without_prerequisites_attestor_not_allowed_or_not_configured() {
    // The server gives reserves to tpm_devid agents only (the default): a join_token agent
    // has none, and cannot break the glass.
    let mut env = Env::start(Opts {
        extra_server: SERVER_BG,
        extra_agent: AGENT_BG,
        ..Default::default()
    })
    .await;
    env.register("/bg", &[&format!("unix:uid:{}", my_uid())], |_| {})
        .await;
    env.wait_for_svids(&["/bg"]).await;
    env.stop_server().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(status(&env).await.reserves, 0);
    let e = break_glass(&env, "INC-4", 60, None).await.unwrap_err();
    assert!(e.contains("no reserve SVID"), "{e}");
    // An agent with an admin socket but no break_glass block.
    env.stop_agent().await;
    let conf = std::fs::read_to_string(&env.agent_conf).unwrap();
    let start = conf.find("break_glass {").unwrap();
    let end = start + conf[start..].find('}').unwrap() + 1;
    std::fs::write(
        &env.agent_conf,
        format!("{}{}", &conf[..start], &conf[end..]),
    )
    .unwrap();
    env.start_agent().await;
    let e = kame_agent::admin::client(&admin_sock(&env), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not configured"), "{e}");
    env.stop().await;
}
