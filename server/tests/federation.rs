//! Federation with `https_spiffe` bundle endpoints: two servers on one machine, `example.org`
//! and `other.org`, each publishing its bundle and federating with the other after a one-time
//! bundle set; a rotation at one (prepare) reaches the other's copy within the refresh bounds;
//! a JWT-SVID minted in `other.org` validates with `example.org`'s copy. The endpoint answers
//! only `GET /` with the SPIFFE bundle JSON; an endpoint with the wrong SPIFFE ID or a bundle
//! for another trust domain is refused and the last good bundle kept.

mod common;

use common::*;
use kame_api::pb;
use kame_api::pb::localauthority as la;
use kame_server::federation::refresher::{RefreshError, Refresher};
use kame_server::federation::{Relationship, RelationshipProfile};
use std::sync::Arc;
use std::time::{Duration, Instant};

const OTHER: &str = "other.org";

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// `server.federation`: an https_spiffe endpoint on `port` (hint 1 min: peers poll every
/// 15 s) and a relationship with `peer` at `peer_port`.
fn federation(port: u16, peer: &str, peer_port: u16) -> &'static str {
    leak(format!(
        r#"federation {{
        bundle_endpoint {{
            address = "127.0.0.1"
            port = {port}
            refresh_hint = "1m"
            profile "https_spiffe" {{}}
        }}
        federates_with "{peer}" {{
            bundle_endpoint_url = "https://127.0.0.1:{peer_port}/"
            bundle_endpoint_profile "https_spiffe" {{
                endpoint_spiffe_id = "spiffe://{peer}/spire/server"
            }}
        }}
    }}"#
    ))
}

async fn federated(s: &TestServer, td: &str) -> Option<pb::types::Bundle> {
    pb::bundle::bundle_client::BundleClient::new(s.admin().await)
        .get_federated_bundle(pb::bundle::GetFederatedBundleRequest {
            trust_domain: td.into(),
            output_mask: None,
        })
        .await
        .ok()
        .map(|r| r.into_inner())
}

async fn set_federated(s: &TestServer, b: pb::types::Bundle) {
    let r = pb::bundle::bundle_client::BundleClient::new(s.admin().await)
        .batch_set_federated_bundle(pb::bundle::BatchSetFederatedBundleRequest {
            bundle: vec![b],
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results[0].status.as_ref().unwrap().code, 0, "{r:?}");
}

fn roots(b: &pb::types::Bundle) -> Vec<Vec<u8>> {
    b.x509_authorities.iter().map(|c| c.asn1.clone()).collect()
}

/// `GET path` (or another method) on the endpoint at `port`, which must present
/// `spiffe://<td>/spire/server` under `trust`: status line and body.
async fn endpoint_request(
    port: u16,
    td: &str,
    trust: Vec<Vec<u8>>,
    method: &str,
    path: &str,
) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(kame_api::tls::SpiffeServerVerifier::new(
        Arc::new(move || trust.clone()),
        kame_api::SpiffeId::parse(&format!("spiffe://{td}/spire/server")).unwrap(),
        provider.clone(),
    ));
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    tls.write_all(format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_https_spiffe_both_ways_after_one_bundle_set_rotation_and_jwt() {
    let (pa, pb_) = (free_port(), free_port());
    let a = TestServer::start(Opts {
        extra_server: federation(pa, OTHER, pb_),
        ..Default::default()
    })
    .await;
    let b = TestServer::start(Opts {
        trust_domain: OTHER,
        extra_server: federation(pb_, TD, pa),
        ..Default::default()
    })
    .await;
    // Without a local copy, https_spiffe cannot authenticate the peer.
    assert!(federated(&a, OTHER).await.is_none());

    // The endpoint: GET / only, the SPIFFE bundle JSON with the hint and sequence.
    let b_bundle = b.bundle().await;
    let (status, body) = endpoint_request(pb_, OTHER, roots(&b_bundle), "GET", "/").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["spiffe_refresh_hint"], 60);
    assert_eq!(doc["spiffe_sequence"], b_bundle.sequence_number);
    let parsed = kame_api::bundle::from_spiffe_json(
        &kame_api::TrustDomain::parse(OTHER).unwrap(),
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(roots(&parsed), roots(&b_bundle));
    let (status, _) = endpoint_request(pb_, OTHER, roots(&b_bundle), "GET", "/x").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _) = endpoint_request(pb_, OTHER, roots(&b_bundle), "POST", "/").await;
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");

    // One-time bootstrap each way; from then on each side fetches the other's endpoint.
    let mut a_bundle = a.bundle().await;
    a_bundle.trust_domain = TD.into();
    set_federated(&a, b_bundle.clone()).await;
    set_federated(&b, a_bundle.clone()).await;

    // A rotation at B (prepare) reaches A's copy within the refresh bounds (hint 1 min: a
    // poll every 15 s).
    let t = Instant::now();
    prepare(&b).await;
    let want = roots(&b.bundle().await);
    assert_eq!(want.len(), 2);
    loop {
        if federated(&a, OTHER)
            .await
            .is_some_and(|x| roots(&x) == want)
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(25),
            "B's prepared authority did not reach A within one refresh interval"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("B prepare → A's copy: {:?}", t.elapsed());
    // And B holds A's bundle as A publishes it.
    let b_copy = federated(&b, TD).await.unwrap();
    assert_eq!(roots(&b_copy), roots(&a.bundle().await));

    // A JWT-SVID minted in other.org validates with example.org's copy of other.org's keys.
    let token = pb::svid::svid_client::SvidClient::new(b.admin().await)
        .mint_jwtsvid(pb::svid::MintJwtsvidRequest {
            id: Some(spiffe_id(OTHER, "/payments")),
            audience: vec!["example-api".into()],
            ttl: 300,
        })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap()
        .token;
    let copy = federated(&a, OTHER).await.unwrap();
    let keys: Vec<kame_api::jwtsvid::JwtAuthority> = copy
        .jwt_authorities
        .iter()
        .map(|k| kame_api::jwtsvid::JwtAuthority {
            kid: k.key_id.clone(),
            spki_der: k.public_key.clone(),
        })
        .collect();
    let v = kame_api::jwtsvid::validate(&token, "example-api", kame_server::ca::now_secs(), |td| {
        (td.as_str() == OTHER).then(|| keys.clone())
    })
    .unwrap();
    assert_eq!(v.sub.to_string(), format!("spiffe://{OTHER}/payments"));

    // Refusals, the last good bundle kept: the wrong SPIFFE ID at the endpoint, and a bundle
    // whose authorities belong to another trust domain.
    let ds = a.running().ctx.ds.clone();
    let refresher = Refresher::new(ds.clone(), Default::default());
    let before = federated(&a, OTHER).await.unwrap();
    let wrong_id = Relationship {
        trust_domain: kame_api::TrustDomain::parse(OTHER).unwrap(),
        bundle_endpoint_url: format!("https://127.0.0.1:{pb_}/"),
        profile: RelationshipProfile::HttpsSpiffe {
            endpoint_spiffe_id: kame_api::SpiffeId::parse(&format!("spiffe://{OTHER}/not-it"))
                .unwrap(),
        },
    };
    let e = refresher.refresh(&wrong_id).await.unwrap_err();
    assert!(matches!(e, RefreshError::Fetch { .. }), "{e}");
    let foreign = Relationship {
        trust_domain: kame_api::TrustDomain::parse("third.org").unwrap(),
        bundle_endpoint_url: format!("https://127.0.0.1:{pb_}/"),
        profile: RelationshipProfile::HttpsSpiffe {
            endpoint_spiffe_id: kame_api::SpiffeId::parse(&format!(
                "spiffe://{OTHER}/spire/server"
            ))
            .unwrap(),
        },
    };
    let e = refresher.refresh(&foreign).await.unwrap_err();
    assert!(
        matches!(&e, RefreshError::ForeignAuthority { found, .. } if found == OTHER),
        "{e}"
    );
    assert!(federated(&a, "third.org").await.is_none(), "nothing stored");
    assert_eq!(
        federated(&a, OTHER).await.unwrap(),
        before,
        "last good kept"
    );

    // The endpoint never serves data it cannot vouch for: a bundle without an unexpired
    // authority, or one of a trust domain it has none of.
    let src = kame_server::federation::endpoint::BundleSource::new(
        kame_api::TrustDomain::parse(TD).unwrap(),
        ds.clone(),
        Duration::from_secs(60),
        std::sync::Arc::new(|| 0),
    );
    assert!(src.document(kame_server::ca::now_secs()).await.is_ok());
    let e = src.document(u64::MAX / 2).await.unwrap_err();
    assert!(e.contains("no unexpired X.509 authority"), "{e}");
    let none = kame_server::federation::endpoint::BundleSource::new(
        kame_api::TrustDomain::parse("nobody.org").unwrap(),
        ds,
        Duration::from_secs(60),
        std::sync::Arc::new(|| 0),
    );
    assert!(none.document(kame_server::ca::now_secs()).await.is_err());

    a.stop().await;
    b.stop().await;
}

async fn prepare(s: &TestServer) {
    la::local_authority_client::LocalAuthorityClient::new(s.admin().await)
        .prepare_x509_authority(la::PrepareX509AuthorityRequest { force: false })
        .await
        .unwrap();
}

#[test]
fn federation_configuration_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (block, want) in [
        (
            "federation {\n bundle_endpoint {\n profile \"https_web\" {\n acme {\n domain_name = \"x.org\"\n }\n }\n }\n }",
            "federation.bundle_endpoint.profile.https_web.acme.email: missing",
        ),
        (
            "federation {\n bundle_endpoint {\n profile \"https_web\" {\n acme {\n email = \"a@x.org\"\n }\n }\n }\n }",
            "federation.bundle_endpoint.profile.https_web.acme.domain_name: missing",
        ),
        (
            "federation {\n bundle_endpoint {\n profile \"https_web\" {\n acme {\n domain_name = \"*.x.org\"\n email = \"a@x.org\"\n }\n }\n }\n }",
            "is not a DNS name a certificate can be issued for",
        ),
        (
            "federation {\n bundle_endpoint {\n profile \"https_web\" {\n acme {\n domain_name = \"x.org\"\n email = \"a@x.org\"\n directory_url = \"http://acme.x.org/dir\"\n }\n }\n }\n }",
            "an ACME directory is served over https",
        ),
        (
            "federation {\n bundle_endpoint {\n profile \"https_web\" {\n acme {\n domain_name = \"x.org\"\n email = \"a@x.org\"\n tos_acepted = true\n }\n }\n }\n }",
            "tos_acepted",
        ),
        (
            "federation {\n bundle_endpoint {\n profile \"https_web\" {}\n }\n }",
            "'acme' or 'serving_cert_file' is required",
        ),
        (
            "federation {\n bundle_endpoint {\n profile \"https_web\" {\n acme {\n domain_name = \"x.org\"\n email = \"a@x.org\"\n }\n serving_cert_file {\n cert_file_path = \"/x\"\n key_file_path = \"/y\"\n }\n }\n }\n }",
            "give acme or serving_cert_file, not both",
        ),
        (
            "federation {\n bundle_endpoint {\n acme {\n domain_name = \"x.org\"\n email = \"a@x.org\"\n }\n profile \"https_spiffe\" {}\n }\n }",
            "either bundle endpoint 'acme' or 'profile' can be set, but not both",
        ),
        (
            "federation {\n federates_with \"example.org\" {\n bundle_endpoint_url = \"https://x/\"\n bundle_endpoint_profile \"https_web\" {}\n }\n }",
            "does not federate with itself",
        ),
        (
            "federation {\n federates_with \"b.org\" {\n bundle_endpoint_url = \"http://x/\"\n bundle_endpoint_profile \"https_web\" {}\n }\n }",
            "not an https URL",
        ),
        (
            "federation {\n federates_with \"b.org\" {\n bundle_endpoint_url = \"https://x/\"\n bundle_endpoint_profile \"https_spiffe\" {}\n }\n }",
            "endpoint_spiffe_id",
        ),
        (
            "federation {\n federates_with \"b.org\" {\n bundle_endpoint_url = \"https://x/\"\n bundle_endpoint_profile \"https_other\" {}\n }\n }",
            "unknown profile",
        ),
    ] {
        let text = config_text(
            dir.path(),
            free_port(),
            &Opts {
                extra_server: block,
                ..Default::default()
            },
        );
        let path = dir.path().join("server.conf");
        std::fs::write(&path, text).unwrap();
        let e = kame_server::config::Config::load(&path, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{block}: {e}");
    }
}

/// SPIRE's accepted forms: `acme` in the `https_web` profile (defaults: Let's Encrypt, terms
/// not accepted), the deprecated `acme` right in `bundle_endpoint`, and the deprecated block
/// without a profile (https_spiffe); the deprecated ones carry the warning logged at start.
#[test]
fn federation_bundle_endpoint_acme_and_spire_legacy_forms_parse() {
    use kame_server::federation::EndpointProfile;
    use kame_server::federation::acme::{AcmeConfig, DEFAULT_DIRECTORY_URL};
    let dir = tempfile::tempdir().unwrap();
    let want = AcmeConfig {
        domain_name: "bundle.example.org".into(),
        email: "ops@example.org".into(),
        directory_url: DEFAULT_DIRECTORY_URL.into(),
        tos_accepted: false,
    };
    for (block, profile, deprecated) in [
        (
            "federation {\n bundle_endpoint {\n profile \"https_web\" {\n acme {\n domain_name = \"Bundle.Example.org\"\n email = \"ops@example.org\"\n }\n }\n }\n }",
            EndpointProfile::HttpsWebAcme(want.clone()),
            false,
        ),
        (
            "federation {\n bundle_endpoint {\n acme {\n domain_name = \"bundle.example.org\"\n email = \"ops@example.org\"\n directory_url = \"https://acme.example.org/dir\"\n tos_accepted = true\n }\n }\n }",
            EndpointProfile::HttpsWebAcme(AcmeConfig {
                directory_url: "https://acme.example.org/dir".into(),
                tos_accepted: true,
                ..want.clone()
            }),
            true,
        ),
        (
            "federation {\n bundle_endpoint {\n port = 8443\n }\n }",
            EndpointProfile::HttpsSpiffe,
            true,
        ),
    ] {
        let text = config_text(
            dir.path(),
            free_port(),
            &Opts {
                extra_server: block,
                ..Default::default()
            },
        );
        let path = dir.path().join("server.conf");
        std::fs::write(&path, text).unwrap();
        let cfg = kame_server::config::Config::load(&path, false).unwrap();
        let ep = cfg.federation.bundle_endpoint.unwrap();
        assert_eq!(ep.profile, profile, "{block}");
        assert_eq!(ep.deprecation.is_some(), deprecated, "{block}");
    }
}

/// The TrustDomain API and `federation` CLI: a relationship made at run time (with its
/// bundle, the https_spiffe bootstrap), listed, shown, refreshed on demand, updated and
/// deleted; bad input refused with the right code and nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_trustdomain_api_and_cli_manage_relationships_at_run_time() {
    use kame_api::pb::trustdomain as td;
    use td::trust_domain_client::TrustDomainClient;
    let pb_ = free_port();
    let a = TestServer::start(Opts::default()).await;
    let b = TestServer::start(Opts {
        trust_domain: OTHER,
        extra_server: leak(format!(
            "federation {{\n bundle_endpoint {{\n address = \"127.0.0.1\"\n port = {pb_}\n refresh_hint = \"1m\"\n profile \"https_spiffe\" {{}}\n }}\n }}"
        )),
        ..Default::default()
    })
    .await;
    let show = b.cli(&["bundle", "show", "--format", "spiffe"]).await;
    assert!(show.status.success());
    let bundle_file = a.dir.path().join("other.json");
    std::fs::write(&bundle_file, &show.stdout).unwrap();
    let url = format!("https://127.0.0.1:{pb_}/");
    let o = a
        .cli(&[
            "federation",
            "create",
            "--trust-domain",
            OTHER,
            "--bundle-endpoint-url",
            &url,
            "--bundle-endpoint-profile",
            "https_spiffe",
            "--endpoint-spiffe-id",
            &format!("spiffe://{OTHER}/spire/server"),
            "--trust-domain-bundle-path",
            bundle_file.to_str().unwrap(),
            "--trust-domain-bundle-format",
            "spiffe",
        ])
        .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("https_spiffe"));
    let list = a.cli(&["federation", "list", "--output", "json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(v["federation_relationships"][0]["trust_domain"], OTHER);
    assert_eq!(
        v["federation_relationships"][0]["endpoint_spiffe_id"],
        format!("spiffe://{OTHER}/spire/server")
    );
    assert_eq!(
        roots(&federated(&a, OTHER).await.unwrap()),
        roots(&b.bundle().await),
        "the bundle given with the relationship is stored"
    );

    // A rotation at B, then `federation refresh`: A's copy follows at once.
    prepare(&b).await;
    let want = roots(&b.bundle().await);
    let o = a.cli(&["federation", "refresh", "--id", OTHER]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = Instant::now();
    while federated(&a, OTHER).await.is_none_or(|x| roots(&x) != want) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "refresh did not fetch at once"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Refusals, nothing stored.
    let mut c = TrustDomainClient::new(a.admin().await);
    let rel = |tdn: &str, url: &str| kame_api::pb::types::FederationRelationship {
        trust_domain: tdn.into(),
        bundle_endpoint_url: url.into(),
        bundle_endpoint_profile: Some(
            kame_api::pb::types::federation_relationship::BundleEndpointProfile::HttpsWeb(
                kame_api::pb::types::HttpsWebProfile {},
            ),
        ),
        trust_domain_bundle: None,
    };
    for (r, code) in [
        (rel(OTHER, &url), 6),              // AlreadyExists
        (rel("third.org", "http://x/"), 3), // InvalidArgument
        (rel(TD, "https://x/"), 3),         // its own trust domain
        (rel("Bad_TD", "https://x/"), 3),
    ] {
        let res = c
            .batch_create_federation_relationship(td::BatchCreateFederationRelationshipRequest {
                federation_relationships: vec![r.clone()],
                output_mask: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(res.results[0].status.as_ref().unwrap().code, code, "{r:?}");
    }
    let e = c
        .get_federation_relationship(td::GetFederationRelationshipRequest {
            trust_domain: "third.org".into(),
            output_mask: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = c
        .refresh_bundle(td::RefreshBundleRequest {
            trust_domain: "third.org".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // Update (the URL only), then delete.
    let o = a
        .cli(&[
            "federation",
            "update",
            "--trust-domain",
            OTHER,
            "--bundle-endpoint-url",
            "https://127.0.0.1:1/",
        ])
        .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let shown = a
        .cli(&["federation", "show", "--id", OTHER, "--output", "json"])
        .await;
    let v: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(v["bundle_endpoint_url"], "https://127.0.0.1:1/");
    assert_eq!(
        v["bundle_endpoint_profile"], "https_spiffe",
        "the profile kept"
    );
    // Nothing answers there: `refresh` says so, and the bundle held stays.
    let held = federated(&a, OTHER).await.unwrap();
    let o = a.cli(&["federation", "refresh", "--id", OTHER]).await;
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        err.contains("Unavailable") && err.contains("127.0.0.1:1"),
        "{err}"
    );
    assert_eq!(federated(&a, OTHER).await.unwrap(), held);
    let o = a.cli(&["federation", "delete", "--id", OTHER]).await;
    assert!(o.status.success());
    let o = a.cli(&["federation", "delete", "--id", OTHER]).await;
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("NotFound"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let list = a.cli(&["federation", "list", "--output", "json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(v["federation_relationships"], serde_json::json!([]));
    a.stop().await;
    b.stop().await;
}
