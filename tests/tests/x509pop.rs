//! x509pop node attestation end to end, against SPIRE's behaviour: certificates and keys made
//! by openssl (an RSA-2048 and a P-256 leaf under an intermediate and a root), the agent and
//! server as configured by users, SPIRE's agent ID and selectors, and both directions of
//! interoperability with Go's standard library doing what SPIRE's agent and server do
//! (`tests/go/spire_x509pop`: RSA-PSS with the longest salt, ECDSA over the combined nonce).
//! Every refusal names the check that failed; nothing is attested.

mod common;

use common::devid::openssl;
use common::{Env, Opts, TD, wait_agent};
use kame_api::pb;
use std::path::{Path, PathBuf};
use tonic::Code;

/// The Go side (SPIRE's structs and proof in Go's standard library).
fn go_tool() -> PathBuf {
    common::go::program("spire_x509pop")
}

fn go(args: &[&str], stdin: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Write;
    let mut child = std::process::Command::new(go_tool())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let o = child.wait_with_output().unwrap();
    if o.status.success() {
        Ok(o.stdout)
    } else {
        Err(String::from_utf8_lossy(&o.stderr).to_string())
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A CA hierarchy and leaves made by openssl in one directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Root and intermediate CAs (P-256).
    fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
        };
        let p = |n: &str| s(&pki.path(n));
        std::fs::write(
            pki.path("ca.ext"),
            "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
        )
        .unwrap();
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=x509pop root",
            "-days",
            "2",
            "-keyout",
            &p("root.key"),
            "-out",
            &p("root.pem"),
        ]);
        pki.issue("inter", "/CN=x509pop intermediate", "ec", "root", "ca.ext");
        pki
    }

    /// A certificate `name` for a new key (`rsa:2048`, `rsa:3072` or `ec`) issued by `issuer`
    /// with the extensions in `ext` (a file in the directory).
    fn issue(&self, name: &str, subject: &str, key: &str, issuer: &str, ext: &str) {
        let p = |n: &str| s(&self.path(n));
        let mut args: Vec<String> = vec!["req".into(), "-newkey".into(), key.into()];
        if key == "ec" {
            args.extend(["-pkeyopt".into(), "ec_paramgen_curve:P-256".into()]);
        }
        args.extend(
            [
                "-nodes",
                "-subj",
                subject,
                "-keyout",
                &p(&format!("{name}.key")),
                "-out",
                &p(&format!("{name}.csr")),
            ]
            .map(String::from),
        );
        openssl(&args.iter().map(String::as_str).collect::<Vec<_>>());
        openssl(&[
            "x509",
            "-req",
            "-in",
            &p(&format!("{name}.csr")),
            "-CA",
            &p(&format!("{issuer}.pem")),
            "-CAkey",
            &p(&format!("{issuer}.key")),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &p(ext),
            "-out",
            &p(&format!("{name}.pem")),
        ]);
    }

    /// A leaf with keyUsage digitalSignature and an x509pop SAN, under the intermediate.
    fn leaf(&self, name: &str, key: &str) {
        std::fs::write(
            self.path("leaf.ext"),
            format!("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nsubjectAltName=URI:x509pop://{TD}/datacenter/us-east-1\n"),
        )
        .unwrap();
        self.issue(name, &format!("/CN={name}"), key, "inter", "leaf.ext");
    }

    fn der(&self, name: &str) -> Vec<u8> {
        kame_api::bundle::certs_from_pem(
            &std::fs::read_to_string(self.path(&format!("{name}.pem"))).unwrap(),
        )
        .unwrap()
        .remove(0)
    }
}

fn sha1_hex(b: &[u8]) -> String {
    hex::encode(<sha1::Sha1 as sha1::Digest>::digest(b))
}

fn server_block(extra: &str) -> String {
    format!(
        "NodeAttestor \"x509pop\" {{\n        plugin_data {{\n            {extra}\n        }}\n    }}"
    )
}

fn agent_block(pki: &Pki, leaf: &str) -> String {
    format!(
        "NodeAttestor \"x509pop\" {{\n        plugin_data {{\n            certificate_path = \"{}\"\n            private_key_path = \"{}\"\n            intermediates_path = \"{}\"\n        }}\n    }}",
        s(&pki.path(&format!("{leaf}.pem"))),
        s(&pki.path(&format!("{leaf}.key"))),
        s(&pki.path("inter.pem")),
    )
}

async fn server(pki: &Pki, extra: &str) -> Env {
    let mut o = Opts {
        server_plugins: server_block(&format!(
            "ca_bundle_path = \"{}\"\n            {extra}",
            s(&pki.path("root.pem"))
        )),
        ..Default::default()
    };
    o.agent_attestor = None;
    Env::start(o).await
}

async fn begin(
    env: &Env,
    payload: Vec<u8>,
) -> Result<(common::driver::Tx, common::driver::Rx, Vec<u8>), tonic::Status> {
    common::driver::begin_typed(env, "x509pop", payload).await
}

use common::driver::finish;

fn refused(r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, says: &str) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            assert!(
                s.message().starts_with("nodeattestor(x509pop): ") && s.message().contains(says),
                "{says:?} not in {:?}",
                s.message()
            );
        }
        Ok(v) => panic!("accepted: {v:?}"),
    }
}

/// The agents attested through x509pop (the harness's own agent uses a join token).
async fn agents(env: &Env) -> Vec<pb::types::Agent> {
    pb::agent::agent_client::AgentClient::new(env.admin().await)
        .list_agents(pb::agent::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents
        .into_iter()
        .filter(|a| a.attestation_type == "x509pop")
        .collect()
}

/// SPIRE's attestation success cases: an RSA (RSA-PSS, longest salt) and a P-256 agent, each
/// with its chain through an intermediate, get SPIRE's agent ID
/// `spiffe://<td>/spire/agent/x509pop/<sha1 of the leaf DER>` and its selectors; the agent
/// then serves workloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509pop_rsa_and_p256_agents_attest_with_spire_agent_id_and_selectors() {
    let pki = Pki::new();
    pki.leaf("node-rsa", "rsa:2048");
    pki.leaf("node-ec", "ec");
    for leaf in ["node-rsa", "node-ec"] {
        let fp = sha1_hex(&pki.der(leaf));
        let env = Env::start(Opts {
            server_plugins: server_block(&format!(
                "ca_bundle_path = \"{}\"",
                s(&pki.path("root.pem"))
            )),
            agent_attestor: Some((
                agent_block(&pki, leaf),
                format!("spiffe://{TD}/spire/agent/x509pop/{fp}"),
            )),
            ..Default::default()
        })
        .await;
        let agent = wait_agent(&env).await;
        assert_eq!(agent.attestation_type, "x509pop");
        assert!(agent.can_reattest);
        let id = agent.id.unwrap();
        assert_eq!(id.path, format!("/spire/agent/x509pop/{fp}"), "{leaf}");
        let sels: Vec<String> = agent
            .selectors
            .iter()
            .map(|s| format!("{}:{}", s.r#type, s.value))
            .collect();
        let serial = kame_api::x509svid::ParsedCert::parse(&pki.der(leaf))
            .unwrap()
            .serial_hex()
            .trim_start_matches("00")
            .to_string();
        let mut want = vec![
            format!("x509pop:subject:cn:{leaf}"),
            format!("x509pop:ca:fingerprint:{}", sha1_hex(&pki.der("inter"))),
            format!("x509pop:ca:fingerprint:{}", sha1_hex(&pki.der("root"))),
            format!("x509pop:serialnumber:{serial}"),
            "x509pop:san:datacenter:us-east-1".to_string(),
        ];
        let mut got = sels.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{leaf}");
        env.register(
            "/workload",
            &[&format!("unix:uid:{}", common::my_uid())],
            |_| {},
        )
        .await;
        env.wait_for_svids(&["/workload"]).await;
        env.stop().await;
    }
}

/// Both directions of interoperability with Go's standard library doing what SPIRE does:
/// Go's message 1 and Go's RSA-PSS and ECDSA answers attest through Kame's server, and the
/// answers Kame's agent makes verify with Go's `rsa.VerifyPSS` and `ecdsa.Verify`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509pop_interoperates_with_go_both_ways() {
    let pki = Pki::new();
    pki.leaf("node-rsa", "rsa:2048");
    pki.leaf("node-ec", "ec");
    let env = server(&pki, "").await;
    for leaf in ["node-rsa", "node-ec"] {
        let cert = s(&pki.path(&format!("{leaf}.pem")));
        let key = s(&pki.path(&format!("{leaf}.key")));
        // A SPIRE (Go) agent against Kame's server.
        let payload = go(&["payload", &cert, &s(&pki.path("inter.pem"))], b"").unwrap();
        let (tx, rx, c) = begin(&env, payload).await.unwrap();
        let resp = go(&["respond", &key], &c).unwrap();
        let id = finish(tx, rx, resp).await.unwrap();
        assert_eq!(
            id,
            format!(
                "spiffe://{TD}/spire/agent/x509pop/{}",
                sha1_hex(&pki.der(leaf))
            )
        );
        // Kame's agent, checked by Go (SPIRE's server side) and by Kame's server.
        let cfg = kame_agent::x509pop::X509PopConfig {
            certificate_path: cert.clone().into(),
            private_key_path: key.clone().into(),
            intermediates_path: Some(pki.path("inter.pem")),
        };
        use kame_agent::attestation::AgentAttestor;
        let (payload, mut responder) = cfg.start().await.unwrap();
        let (tx, rx, c) = begin(&env, payload).await.unwrap();
        let resp = responder.respond(c.clone()).await.unwrap();
        let challenge_file = pki.path("challenge.json");
        std::fs::write(&challenge_file, &c).unwrap();
        go(&["verify", &cert, &s(&challenge_file)], &resp)
            .unwrap_or_else(|e| panic!("Go refused Kame's {leaf} answer: {e}"));
        finish(tx, rx, resp).await.unwrap();
    }
    assert_eq!(agents(&env).await.len(), 2);
    env.stop().await;
}

/// SPIRE's attestation failure cases, over the wire: a signature by another key, an
/// untrusted CA, a leaf without digitalSignature, too many intermediates, an RSA key over
/// max_rsa_key_size, a response replayed into another attempt, an answer of the wrong kind,
/// and malformed messages. Nothing is attested.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509pop_refuses_other_key_untrusted_ca_no_digital_signature_too_many_intermediates_big_rsa_and_replay()
 {
    let pki = Pki::new();
    pki.leaf("node-rsa", "rsa:2048");
    pki.leaf("node-ec", "ec");
    pki.leaf("node-big", "rsa:3072");
    std::fs::write(
        pki.path("nosig.ext"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,keyEncipherment\n",
    )
    .unwrap();
    pki.issue(
        "node-nosig",
        "/CN=node-nosig",
        "rsa:2048",
        "inter",
        "nosig.ext",
    );
    let env = server(&pki, "max_rsa_key_size = 2048").await;
    let inter = s(&pki.path("inter.pem"));
    let payload = |leaf: &str| {
        go(
            &["payload", &s(&pki.path(&format!("{leaf}.pem"))), &inter],
            b"",
        )
        .unwrap()
    };
    let key = |leaf: &str| s(&pki.path(&format!("{leaf}.key")));

    // A signature by another key (the certificate is genuine; the key is not its).
    let other = tempfile::tempdir().unwrap();
    let other_key = s(&other.path().join("other.key"));
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        &other_key,
    ]);
    let (tx, rx, c) = begin(&env, payload("node-rsa")).await.unwrap();
    refused(
        finish(tx, rx, go(&["respond", &other_key], &c).unwrap()).await,
        Code::PermissionDenied,
        "RSA signature verify failed",
    );
    // An answer of the other kind.
    let (tx, rx, c) = begin(&env, payload("node-rsa")).await.unwrap();
    let mut ch: serde_json::Value = serde_json::from_slice(&c).unwrap();
    ch["ecdsa_signature"] = ch["rsa_signature"].take();
    let wrong = go(
        &["respond", &key("node-ec")],
        &serde_json::to_vec(&ch).unwrap(),
    )
    .unwrap();
    refused(
        finish(tx, rx, wrong).await,
        Code::PermissionDenied,
        "expecting RSA response",
    );
    // A response replayed into another attempt: its nonce is not this attempt's.
    let (tx, rx, c) = begin(&env, payload("node-ec")).await.unwrap();
    let first = go(&["respond", &key("node-ec")], &c).unwrap();
    finish(tx, rx, first.clone()).await.unwrap();
    let (tx, rx, _) = begin(&env, payload("node-ec")).await.unwrap();
    refused(
        finish(tx, rx, first).await,
        Code::PermissionDenied,
        "ECDSA signature verify failed",
    );
    let before = agents(&env).await.len();
    // Malformed: not JSON, no certificate, a leaf that is not DER.
    refused(
        begin(&env, b"payload".to_vec()).await,
        Code::InvalidArgument,
        "failed to unmarshal data",
    );
    refused(
        begin(&env, br#"{"certificates":[]}"#.to_vec()).await,
        Code::InvalidArgument,
        "no certificate to attest",
    );
    refused(
        begin(&env, br#"{"certificates":["AA=="]}"#.to_vec()).await,
        Code::InvalidArgument,
        "unable to parse leaf certificate",
    );
    let (tx, rx, _) = begin(&env, payload("node-ec")).await.unwrap();
    refused(
        finish(tx, rx, b"{}".to_vec()).await,
        Code::PermissionDenied,
        "expecting ECDSA response",
    );
    // Too many intermediates (SPIRE's default 4, the leaf not counted), refused before any
    // certificate is decoded.
    let inter_der = base64_std(&pki.der("inter"));
    let too_many = format!(
        r#"{{"certificates":["{}",{}]}}"#,
        base64_std(&pki.der("node-ec")),
        vec![format!("\"{inter_der}\""); 5].join(",")
    );
    refused(
        begin(&env, too_many.into_bytes()).await,
        Code::PermissionDenied,
        "too many intermediate certificates",
    );
    // An RSA key over max_rsa_key_size (2048 here).
    refused(
        begin(&env, payload("node-big")).await,
        Code::PermissionDenied,
        "leaf certificate key size too large",
    );
    // A leaf whose keyUsage lacks digitalSignature.
    refused(
        begin(&env, payload("node-nosig")).await,
        Code::PermissionDenied,
        "digital signature",
    );
    // An untrusted CA: a server that trusts another root.
    let elsewhere = Pki::new();
    let env2 = server(&elsewhere, "").await;
    refused(
        begin(&env2, payload("node-ec")).await,
        Code::PermissionDenied,
        "certificate verification failed",
    );
    assert_eq!(agents(&env2).await.len(), 0);
    env2.stop().await;
    assert_eq!(
        agents(&env).await.len(),
        before,
        "nothing attested by the refusals"
    );
    env.stop().await;
}

/// A CSR for the PKCS#8 P-256 key `pkcs8` carrying `uri` as its URI SAN.
fn csr_with_uri(pkcs8: &[u8], uri: &str) -> Vec<u8> {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
    let k = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8).unwrap();
    let spki = kame_agent::keys::spki(pkcs8).unwrap();
    let info = kame_api::csr::request_info(&spki, &[uri.to_string()], &[]).unwrap();
    let sig = k
        .sign(&aws_lc_rs::rand::SystemRandom::new(), &info)
        .unwrap();
    let alg = kame_api::keys::KeyInfo::from_spki_der(&spki)
        .unwrap()
        .x509_signature_algorithm();
    kame_api::x509svid::assemble(&info, &alg, sig.as_ref()).unwrap()
}

fn base64_std(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// spiffe mode (SPIRE's "spiffe exchange"): the agent proves an X509-SVID the server itself
/// issued under `spiffe_prefix`; its agent ID is the path past the prefix. An SVID outside the
/// prefix is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509pop_spiffe_mode_attests_an_svid_under_the_prefix() {
    let env = Env::start(Opts {
        server_plugins: server_block("mode = \"spiffe\""),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mint = |path: &'static str| {
        let env = &env;
        let dir = dir.path().to_path_buf();
        async move {
            let key = kame_agent::keys::generate().unwrap();
            let svid = pb::svid::svid_client::SvidClient::new(env.admin().await)
                .mint_x509svid(pb::svid::MintX509svidRequest {
                    csr: csr_with_uri(&key, &format!("spiffe://{TD}{path}")),
                    ttl: 600,
                })
                .await
                .unwrap()
                .into_inner()
                .svid
                .unwrap();
            let name = path.trim_start_matches('/').replace('/', "-");
            let cert = dir.join(format!("{name}.pem"));
            std::fs::write(
                &cert,
                svid.cert_chain
                    .iter()
                    .map(|c| kame_api::bundle::pem_block("CERTIFICATE", c))
                    .collect::<String>(),
            )
            .unwrap();
            let keyf = dir.join(format!("{name}.key"));
            std::fs::write(&keyf, kame_api::bundle::pem_block("PRIVATE KEY", &key)).unwrap();
            (cert, keyf)
        }
    };
    let (cert, key) = mint("/spire-exchange/host1").await;
    let cfg = kame_agent::x509pop::X509PopConfig {
        certificate_path: cert,
        private_key_path: key,
        intermediates_path: None,
    };
    let a = kame_agent::attestation::NodeAttestor::Plugin(std::sync::Arc::new(cfg))
        .attest(env.agent_channel().await, {
            let k = kame_agent::keys::generate().unwrap();
            kame_agent::keys::csr(&k).unwrap()
        })
        .await
        .unwrap();
    let leaf = kame_api::x509svid::ParsedCert::parse(&a.chain[0]).unwrap();
    assert_eq!(
        kame_api::x509svid::check_leaf(&leaf).unwrap().to_string(),
        format!("spiffe://{TD}/spire/agent/x509pop/host1")
    );
    let (cert, key) = mint("/elsewhere/host2").await;
    let cfg = kame_agent::x509pop::X509PopConfig {
        certificate_path: cert,
        private_key_path: key,
        intermediates_path: None,
    };
    let e = kame_agent::attestation::NodeAttestor::Plugin(std::sync::Arc::new(cfg))
        .attest(env.agent_channel().await, {
            let k = kame_agent::keys::generate().unwrap();
            kame_agent::keys::csr(&k).unwrap()
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("doesnt match SVID prefix"), "{e}");
    env.stop().await;
}

/// SPIRE's Configure cases, server and agent: each bad setting is refused naming its full
/// path, and a missing file names the file and the key.
#[test]
fn x509pop_configuration_errors_name_the_key_and_the_file() {
    let pki = Pki::new();
    pki.leaf("node-ec", "ec");
    let root = s(&pki.path("root.pem"));
    let server = |data: &str| {
        let text = format!(
            "server {{\n trust_domain = \"{TD}\"\n data_dir = \"/tmp/x\"\n}}\nplugins {{\n DataStore \"sql\" {{\n plugin_data {{\n database_type = \"sqlite3\"\n connection_string = \"/tmp/x/ds\"\n }}\n }}\n KeyManager \"memory\" {{}}\n NodeAttestor \"x509pop\" {{\n plugin_data {{\n {data}\n }}\n }}\n}}\n"
        );
        kame_server::config::Config::parse(&text, false)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    server(&format!("ca_bundle_path = \"{root}\"")).unwrap();
    server(&format!("ca_bundle_paths = [\"{root}\", \"{root}\"]\n max_intermediates = 20\n max_rsa_key_size = 8192")).unwrap();
    server("mode = \"spiffe\"\n spiffe_prefix = \"/x\"").unwrap();
    let k = "plugins.NodeAttestor.x509pop.plugin_data";
    for (data, want) in [
        // A typo of the one required key is named as the typo.
        (
            format!("ca_bundle_pth = \"{root}\""),
            format!("{k}.ca_bundle_pth: unknown key (did you mean ca_bundle_path?)"),
        ),
        (
            "mode = \"external_pki\"".to_string(),
            format!(
                "{k}.ca_bundle_path: one of ca_bundle_path or ca_bundle_paths must be configured"
            ),
        ),
        (
            format!("ca_bundle_path = \"{root}\"\n ca_bundle_pth = 1"),
            format!("{k}.ca_bundle_pth: unknown key"),
        ),
        (
            "ca_bundle_path = \"/nonexistent/ca.pem\"".to_string(),
            format!("{k}.ca_bundle_path: /nonexistent/ca.pem"),
        ),
        (
            format!("ca_bundle_path = \"{root}\"\n ca_bundle_paths = [\"{root}\"]"),
            "only one of ca_bundle_path or ca_bundle_paths".to_string(),
        ),
        (
            format!("mode = \"spiffe\"\n ca_bundle_path = \"{root}\""),
            "you can not use ca_bundle_path or ca_bundle_paths in spiffe mode".to_string(),
        ),
        (
            format!("mode = \"other\"\n ca_bundle_path = \"{root}\""),
            format!("{k}.mode: mode can only be either spiffe or external_pki"),
        ),
        (
            format!("ca_bundle_path = \"{root}\"\n max_intermediates = 0"),
            "max_intermediates must be greater than 0".to_string(),
        ),
        (
            format!("ca_bundle_path = \"{root}\"\n max_rsa_key_size = -1"),
            "max_rsa_key_size must be greater than 0".to_string(),
        ),
        (
            format!("ca_bundle_path = \"{root}\"\n agent_path_template = \"/{{{{ .Foo }}}}\""),
            "failed to parse agent svid template".to_string(),
        ),
    ] {
        let e = server(&data).unwrap_err();
        assert!(e.contains(&want), "{want}: {e}");
    }
    let agent = |data: &str| {
        let text = format!(
            "agent {{\n trust_domain = \"{TD}\"\n server_address = \"x\"\n trust_bundle_path = \"x\"\n}}\nplugins {{\n NodeAttestor \"x509pop\" {{\n plugin_data {{\n {data}\n }}\n }}\n KeyManager \"memory\" {{}}\n WorkloadAttestor \"unix\" {{}}\n}}\n"
        );
        kame_agent::config::Config::parse(&text, false)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let cert = s(&pki.path("node-ec.pem"));
    let key = s(&pki.path("node-ec.key"));
    agent(&format!(
        "certificate_path = \"{cert}\"\n private_key_path = \"{key}\""
    ))
    .unwrap();
    for (data, want) in [
        (
            format!("certificate_path = \"{cert}\""),
            "private_key_path is required".to_string(),
        ),
        (
            format!("private_key_path = \"{key}\""),
            "certificate_path is required".to_string(),
        ),
        (
            format!("certificate_path = \"/nonexistent/c.pem\"\n private_key_path = \"{key}\""),
            format!("{k}.certificate_path: unable to load certificates from /nonexistent/c.pem"),
        ),
        (
            format!(
                "certificate_path = \"{cert}\"\n private_key_path = \"{}\"",
                s(&pki.path("inter.key"))
            ),
            "is not the key of the certificate".to_string(),
        ),
        (
            format!(
                "certificate_path = \"{cert}\"\n private_key_path = \"{key}\"\n intermediates_path = \"/nonexistent/i.pem\""
            ),
            format!("{k}.intermediates_path: unable to load certificates from /nonexistent/i.pem"),
        ),
        (
            format!(
                "certificate_path = \"{cert}\"\n private_key_path = \"{key}\"\n certificat_path = 1"
            ),
            format!("{k}.certificat_path: unknown key"),
        ),
    ] {
        let e = agent(&data).unwrap_err();
        assert!(e.contains(&want), "{want}: {e}");
    }
}
