//! UpstreamAuthority "aws_pca" against moto_server's ACM Private CA. moto 5.2.5 cannot issue a
//! subordinate CA: for `SubordinateCACertificate_PathLen0/V1` (SPIRE's default template) it
//! adds no basicConstraints and no keyUsage, it ignores the requested validity (one year) and
//! signing algorithm (its CA keys are RSA-2048, signed with SHA-512), and for
//! `RootCACertificate/V1` it returns an empty chain. So what is checked here: the requests Kame
//! sends (captured on the wire: the CA described first, then IssueCertificate with the CSR in
//! PEM, the CA's signing algorithm, SPIRE's default template and an absolute validity of now +
//! ca_ttl, then GetCertificate), how the answer is read (the issued certificate holds the
//! server's key and verifies under the PCA root; the root is the chain's last certificate,
//! joined by the supplemental bundle), and that the server refuses moto's certificate because
//! it is not a CA, saying so.

#![cfg(feature = "aws_pca")]

mod common;

use common::upstream::upstream_config_error;
use common::*;
use kame_keymanager::testing::{Moto, venv_tool};
use kame_upstream::UpstreamAuthority;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A root CA in moto's ACM PCA (ACTIVE, SHA256WITHECDSA configured): its ARN and PEM.
fn moto_pca(moto: &Moto, dir: &std::path::Path) -> (String, String) {
    let script = dir.join("pca.py");
    std::fs::write(
        &script,
        r#"
import boto3, sys
c = boto3.client("acm-pca", region_name="us-east-1", endpoint_url=sys.argv[1],
                 aws_access_key_id="testing", aws_secret_access_key="testing")
arn = c.create_certificate_authority(
    CertificateAuthorityConfiguration={"KeyAlgorithm": "EC_prime256v1",
        "SigningAlgorithm": "SHA256WITHECDSA",
        "Subject": {"CommonName": "Moto PCA Root", "Organization": "Kame Test"}},
    CertificateAuthorityType="ROOT")["CertificateAuthorityArn"]
csr = c.get_certificate_authority_csr(CertificateAuthorityArn=arn)["Csr"]
cert_arn = c.issue_certificate(CertificateAuthorityArn=arn, Csr=csr.encode(),
    SigningAlgorithm="SHA256WITHECDSA",
    TemplateArn="arn:aws:acm-pca:::template/RootCACertificate/V1",
    Validity={"Type": "DAYS", "Value": 365})["CertificateArn"]
cert = c.get_certificate(CertificateAuthorityArn=arn, CertificateArn=cert_arn)["Certificate"]
c.import_certificate_authority_certificate(CertificateAuthorityArn=arn, Certificate=cert.encode())
print(arn)
print(cert)
"#,
    )
    .unwrap();
    let o = std::process::Command::new(venv_tool("python"))
        .arg(&script)
        .arg(&moto.endpoint)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    let (arn, pem) = out.split_once('\n').unwrap();
    (arn.trim().to_string(), pem.to_string())
}

/// A relay to `target` that keeps every byte the client sent.
async fn capture(target: u16) -> (u16, Arc<Mutex<Vec<u8>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Arc<Mutex<Vec<u8>>> = Default::default();
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let seen = s2.clone();
            tokio::spawn(async move {
                let out = tokio::net::TcpStream::connect(("127.0.0.1", target))
                    .await
                    .unwrap();
                let (mut ir, mut iw) = inbound.into_split();
                let (mut or, mut ow) = out.into_split();
                let up = async move {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        let n = match ir.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        seen.lock().unwrap().extend_from_slice(&buf[..n]);
                        if ow.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let down = async move {
                    let _ = tokio::io::copy(&mut or, &mut iw).await;
                };
                tokio::join!(up, down);
            });
        }
    });
    (port, seen)
}

/// The JSON bodies of the requests for `target` (`X-Amz-Target: ACMPrivateCA.<op>`).
fn bodies(seen: &[u8], op: &str) -> Vec<serde_json::Value> {
    let text = String::from_utf8_lossy(seen).to_string();
    let lower = text.to_ascii_lowercase();
    let marker = format!("x-amz-target: acmprivateca.{}\r\n", op.to_ascii_lowercase());
    let mut out = vec![];
    let mut from = 0;
    while let Some(i) = lower[from..].find(&marker) {
        let at = from + i;
        let head_start = lower[..at].rfind("\r\n\r\n").map(|j| j + 4).unwrap_or(0);
        let head_end = at + lower[at..].find("\r\n\r\n").unwrap() + 4;
        let len: usize = lower[head_start..head_end]
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().unwrap())
            .unwrap();
        out.push(serde_json::from_str(&text[head_end..head_end + len]).unwrap());
        from = head_end + len;
    }
    out
}

fn plugin_block(endpoint: &str, arn: &str, extra: &str) -> String {
    format!(
        "UpstreamAuthority \"aws_pca\" {{\n plugin_data {{\n region = \"us-east-1\"\n certificate_authority_arn = \"{arn}\"\n endpoint = \"{endpoint}\"\n access_key_id = \"testing\"\n secret_access_key = \"testing\"\n {extra}\n }}\n }}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_aws_pca_sends_spires_requests_and_refuses_motos_certificate_that_is_not_a_ca() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let (arn, _) = moto_pca(&moto, dir.path());
    let (port, seen) = capture(moto.port).await;
    let text = config_text(
        dir.path(),
        free_port(),
        &Opts {
            ca_ttl: "12h",
            extra_plugins: plugin_block(&format!("http://127.0.0.1:{port}"), &arn, ""),
            ..Default::default()
        },
    );
    let path = dir.path().join("server.conf");
    std::fs::write(&path, text).unwrap();
    let cfg = kame_server::config::Config::load(&path, false).unwrap();
    let before = kame_server::ca::now_secs() as i64;
    let e = match kame_server::run::start_with(cfg, None).await {
        Ok(r) => {
            r.stop().await;
            panic!("moto's certificate has no CA extensions and must be refused")
        }
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("X509 CA minted by upstream authority is invalid")
            && e.contains("signing certificate is not a CA"),
        "{e}"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        bodies(&seen, "DescribeCertificateAuthority"),
        vec![serde_json::json!({"CertificateAuthorityArn": arn})]
    );
    let issue = bodies(&seen, "IssueCertificate");
    assert_eq!(issue.len(), 1, "{issue:?}");
    let b = &issue[0];
    assert_eq!(b["CertificateAuthorityArn"], arn.as_str());
    assert_eq!(
        b["SigningAlgorithm"], "SHA256WITHECDSA",
        "the CA's, described"
    );
    assert_eq!(
        b["TemplateArn"],
        "arn:aws:acm-pca:::template/SubordinateCACertificate_PathLen0/V1"
    );
    assert_eq!(b["Validity"]["Type"], "ABSOLUTE");
    let not_after = b["Validity"]["Value"].as_i64().unwrap();
    assert!(
        (before + 12 * 3600..=before + 12 * 3600 + 60).contains(&not_after),
        "now + ca_ttl: {not_after} (start {before})"
    );
    use base64::Engine;
    let csr_pem = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b["Csr"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert!(
        csr_pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
        "{csr_pem}"
    );
    let der: String = csr_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let csr = kame_api::csr::parse(
        &base64::engine::general_purpose::STANDARD
            .decode(der)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(csr.uris, vec![format!("spiffe://{TD}")]);
    assert_eq!(bodies(&seen, "GetCertificate").len(), 1);
}

/// The plugin on its own: what comes back is read as SPIRE reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_aws_pca_reads_the_issued_certificate_chain_and_supplemental_roots() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let (arn, root_pem) = moto_pca(&moto, dir.path());
    let root = kame_api::bundle::certs_from_pem(&root_pem)
        .unwrap()
        .remove(0);
    // A supplemental root: any other CA (here an openssl one).
    let o = std::process::Command::new("openssl")
        .current_dir(dir.path())
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "extra.key",
            "-out",
            "extra.pem",
            "-subj",
            "/CN=extra",
            "-days",
            "1",
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    let extra = kame_api::bundle::certs_from_pem(
        &std::fs::read_to_string(dir.path().join("extra.pem")).unwrap(),
    )
    .unwrap()
    .remove(0);
    let up = kame_upstream::aws_pca::AwsPcaUpstream::new(kame_upstream::aws_pca::AwsPcaConfig {
        region: "us-east-1".into(),
        certificate_authority_arn: arn,
        ca_signing_template_arn: None,
        signing_algorithm: None,
        assume_role_arn: None,
        endpoint: Some(moto.endpoint.clone()),
        supplemental_roots: vec![extra.clone(), root.clone()],
        supplemental_bundle_path: None,
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing".into()),
        call_timeout: Duration::from_secs(10),
    });
    let key = TestKey::new();
    let csr = key.csr(&[&format!("spiffe://{TD}")], &[]);
    let (m, _) = up
        .mint_x509_ca(&csr, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(
        m.chain.len(),
        1,
        "the issued certificate; the root is not in the chain"
    );
    assert_eq!(m.upstream_roots, vec![root.clone(), extra], "deduplicated");
    let issued = kame_api::x509svid::ParsedCert::parse(&m.chain[0]).unwrap();
    assert_eq!(issued.spki_der().unwrap(), key.spki(), "the server's key");
    let root_key = kame_api::x509svid::ParsedCert::parse(&root)
        .unwrap()
        .spki_der()
        .unwrap();
    issued
        .check_signed_by(&root_key)
        .expect("signed by the PCA root");
    // A CSR that is not one is refused before AWS is asked.
    assert!(matches!(
        up.mint_x509_ca(b"junk", Duration::from_secs(60)).await,
        Err(kame_upstream::UpstreamError::BadCsr(_))
    ));
}

#[test]
fn upstream_aws_pca_configuration_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad_bundle = dir.path().join("bad.pem");
    std::fs::write(&bad_bundle, "not pem").unwrap();
    for (data, want) in [
        ("certificate_authority_arn = \"a\"".to_string(), "region"),
        (
            "region = \"us-east-1\"".to_string(),
            "certificate_authority_arn",
        ),
        (
            "region = \"r\"\n certificate_authority_arn = \"a\"\n access_key_id = \"x\""
                .to_string(),
            "give both access_key_id and secret_access_key",
        ),
        (
            format!(
                "region = \"r\"\n certificate_authority_arn = \"a\"\n supplemental_bundle_path = \"{}\"",
                bad_bundle.display()
            ),
            "supplemental_bundle_path",
        ),
        (
            "region = \"r\"\n certificate_authority_arn = \"a\"\n signing_algo = \"x\"".to_string(),
            "signing_algo",
        ),
    ] {
        let e = upstream_config_error(dir.path(), "aws_pca", &data);
        assert!(e.contains(want), "{data}: {e}");
    }
}
