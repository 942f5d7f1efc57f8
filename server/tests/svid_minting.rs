//! X509-SVID and JWT-SVID minting through the real server: the issuer rules of X509-SVID.md on
//! what the server actually mints, `openssl verify` on `x509 mint --write`, and a JWT-SVID
//! verified by an independent library (jsonwebtoken) against `bundle show --format spiffe`.

mod common;

use common::*;
use kame_api::pb;
use kame_api::x509svid::{ParsedCert, check_signing_cert, verify_chain};
use std::time::Duration;

async fn mint(
    s: &TestServer,
    key: &TestKey,
    id: &str,
    dns: &[&str],
    ttl: i32,
) -> Result<pb::types::X509svid, tonic::Status> {
    pb::svid::svid_client::SvidClient::new(s.admin().await)
        .mint_x509svid(pb::svid::MintX509svidRequest {
            csr: key.csr(&[id], dns),
            ttl,
        })
        .await
        .map(|r| r.into_inner().svid.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_issuer_rules_on_minted_svid() {
    let s = TestServer::start(Opts::default()).await;
    let key = TestKey::new();
    let svid = mint(
        &s,
        &key,
        "spiffe://example.org/web",
        &["web.example.org"],
        600,
    )
    .await
    .unwrap();
    let leaf = ParsedCert::parse(&svid.cert_chain[0]).unwrap();
    let bundle = s.bundle().await;
    let roots: Vec<Vec<u8>> = bundle
        .x509_authorities
        .iter()
        .map(|c| c.asn1.clone())
        .collect();

    // X509-01, X509-02: exactly one URI SAN and it is the SPIFFE ID; DNS SANs may follow.
    let (_, uris, dns) = leaf.sans().unwrap().unwrap();
    assert_eq!(uris, vec!["spiffe://example.org/web"]);
    assert_eq!(dns, vec!["web.example.org"]);
    // X509-04: subject is not empty (so the SAN need not be critical).
    assert!(!leaf.cert.tbs_certificate().subject().is_empty());
    // X509-05: basic constraints cA=false.
    let (_, bc) = leaf.basic_constraints().unwrap().unwrap();
    assert!(!bc.ca);
    // X509-07: key usage present and critical; X509-08 digitalSignature; X509-09 no cert/CRL sign.
    let (critical, ku) = leaf.key_usage().unwrap().unwrap();
    assert!(critical, "X509-07");
    assert!(ku.digital_signature(), "X509-08");
    assert!(!ku.key_cert_sign() && !ku.crl_sign(), "X509-09");
    // X509-12: EKU has serverAuth and clientAuth.
    let eku = leaf.extended_key_usage().unwrap().unwrap();
    assert_eq!(eku.0.len(), 2);
    // The public key is the CSR's (ID-15: key in the signed part).
    assert_eq!(leaf.spki_der().unwrap(), key.spki());
    // NotBefore backdated 10 s; TTL honoured.
    let now = kame_server::ca::now_secs();
    assert!(
        leaf.not_before() <= now.saturating_sub(9) && leaf.not_before() >= now.saturating_sub(12)
    );
    assert!((leaf.not_after() as i64 - (now as i64 + 600)).abs() <= 2);
    // X509-06, X509-11: the signing certificate is a CA with keyCertSign and a path-less ID.
    let ca = ParsedCert::parse(&roots[0]).unwrap();
    check_signing_cert(&ca).unwrap();
    assert_eq!(ca.spiffe_id().unwrap().to_string(), "spiffe://example.org");
    // X509-14: the chain validates against the trust domain's bundle.
    let v = verify_chain(&svid.cert_chain, &roots, now).unwrap();
    assert_eq!(v.id.to_string(), "spiffe://example.org/web");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_svid_not_after_capped_at_ca_not_after() {
    let s = TestServer::start(Opts {
        ca_ttl: "1h",
        ..Default::default()
    })
    .await;
    let key = TestKey::new();
    let svid = mint(&s, &key, "spiffe://example.org/w", &[], i32::MAX)
        .await
        .unwrap();
    let leaf = ParsedCert::parse(&svid.cert_chain[0]).unwrap();
    let ca = s.running().ctx.ca.current_x509().unwrap();
    assert_eq!(leaf.not_after(), ca.not_after);
    assert_eq!(svid.expires_at as u64, ca.not_after);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_mint_cli_write_dir_verifies_with_openssl() {
    let s = TestServer::start(Opts::default()).await;
    let out = s.dir.path().join("out");
    let o = s
        .cli(&[
            "x509",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/cli",
            "--dns-name",
            "cli.example.org",
            "--write",
            out.to_str().unwrap(),
        ])
        .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["svid.pem", "key.pem", "bundle.pem"] {
        assert!(out.join(f).exists(), "{f}");
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(out.join("key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let v = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(out.join("bundle.pem"))
        .arg(out.join("svid.pem"))
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    // The private key matches the certificate (X509-15).
    let pubkey = |args: &[&str]| {
        std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap()
            .stdout
    };
    let a = pubkey(&[
        "x509",
        "-noout",
        "-pubkey",
        "-in",
        out.join("svid.pem").to_str().unwrap(),
    ]);
    let b = pubkey(&[
        "pkey",
        "-pubout",
        "-in",
        out.join("key.pem").to_str().unwrap(),
    ]);
    assert_eq!(a, b);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_mint_verifies_with_jsonwebtoken_against_spiffe_bundle() {
    let s = TestServer::start(Opts::default()).await;
    let o = s
        .cli(&[
            "jwt",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/api",
            "--audience",
            "aud-1",
            "--ttl",
            "120",
        ])
        .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let token = String::from_utf8(o.stdout).unwrap().trim().to_string();
    let b = s.cli(&["bundle", "show", "--format", "spiffe"]).await;
    assert!(b.status.success());
    let bundle: serde_json::Value = serde_json::from_slice(&b.stdout).unwrap();
    // Keep only the jwt-svid keys (JWT-14) and hand them to an independent implementation.
    let keys: Vec<serde_json::Value> = bundle["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .cloned()
        .collect();
    assert_eq!(keys.len(), 1);
    let jwks: jsonwebtoken::jwk::JwkSet =
        serde_json::from_value(serde_json::json!({ "keys": keys })).unwrap();
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    let jwk = jwks
        .find(header.kid.as_deref().unwrap())
        .expect("kid is in the bundle");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["aud-1"]);
    v.set_required_spec_claims(&["exp", "sub", "aud"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(&token, &key, &v).unwrap();
    assert_eq!(data.claims["sub"], "spiffe://example.org/api");
    let exp = data.claims["exp"].as_u64().unwrap();
    let iat = data.claims["iat"].as_u64().unwrap();
    assert_eq!(exp - iat, 120);
    // A wrong audience fails (JWT-07).
    let mut wrong = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    wrong.set_audience(&["other"]);
    assert!(jsonwebtoken::decode::<serde_json::Value>(&token, &key, &wrong).is_err());
    // Our own validator agrees (JWT-01..10).
    let bundle_pb = s.bundle().await;
    let out = kame_api::jwtsvid::validate(&token, "aud-1", kame_server::ca::now_secs(), |td| {
        (td.as_str() == TD).then(|| {
            bundle_pb
                .jwt_authorities
                .iter()
                .map(|k| kame_api::jwtsvid::JwtAuthority {
                    kid: k.key_id.clone(),
                    spki_der: k.public_key.clone(),
                })
                .collect()
        })
    })
    .unwrap();
    assert_eq!(out.sub.to_string(), "spiffe://example.org/api");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_mint_rsa_key_type_uses_rs256() {
    let s = TestServer::start(Opts {
        extra_server: "jwt_key_type = \"rsa-2048\"",
        ..Default::default()
    })
    .await;
    let o = s
        .cli(&[
            "jwt",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/api",
            "--audience",
            "a",
        ])
        .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let token = String::from_utf8(o.stdout).unwrap().trim().to_string();
    assert_eq!(
        jsonwebtoken::decode_header(&token).unwrap().alg,
        jsonwebtoken::Algorithm::RS256
    );
    let b = s.bundle().await;
    kame_api::jwtsvid::validate(&token, "a", kame_server::ca::now_secs(), |_| {
        Some(
            b.jwt_authorities
                .iter()
                .map(|k| kame_api::jwtsvid::JwtAuthority {
                    kid: k.key_id.clone(),
                    spki_der: k.public_key.clone(),
                })
                .collect(),
        )
    })
    .unwrap();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_key_types_p384_and_rsa_mint_verifiable_svids() {
    for kt in ["ec-p384", "rsa-2048"] {
        let extra: &'static str = Box::leak(format!("ca_key_type = \"{kt}\"").into_boxed_str());
        let s = TestServer::start(Opts {
            extra_server: extra,
            ..Default::default()
        })
        .await;
        let key = TestKey::new();
        let svid = mint(&s, &key, "spiffe://example.org/w", &[], 0)
            .await
            .unwrap();
        let roots: Vec<Vec<u8>> = s
            .bundle()
            .await
            .x509_authorities
            .iter()
            .map(|c| c.asn1.clone())
            .collect();
        verify_chain(&svid.cert_chain, &roots, kame_server::ca::now_secs()).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        s.stop().await;
    }
}
