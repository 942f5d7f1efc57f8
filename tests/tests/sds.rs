//! Envoy SDS v3 on the agent, from a client built from Envoy's own protos (envoy-types; no
//! Envoy binary is installable here): `default`, `ROOTCA`, `ALL` and a federated trust domain
//! from FetchSecrets; the SPIFFE validator config lists both trust domains; the stream sends
//! a version and nonce, stays quiet on an ACK, ignores a stale nonce, and pushes a new
//! version when the SVID is re-issued; unknown names are InvalidArgument, a caller without
//! entries gets PermissionDenied, and the node metadata switches to `trusted_ca`. The
//! incremental stream (DeltaSecrets) sends versioned resources, names what does not exist as
//! removed, is quiet on an ACK or an unsubscribe, pushes only the secret that changed, and on a
//! reconnect sends only what the client does not hold.

mod common;

use common::*;
use envoy_types::pb::envoy::config::core::v3::{Node, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    Secret, SpiffeCertValidatorConfig, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use kame_api::pb;
use prost::Message;
use std::time::Duration;

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

async fn client(env: &Env) -> SecretDiscoveryServiceClient<tonic::transport::Channel> {
    SecretDiscoveryServiceClient::new(kame_agent::cli::connect(&env.socket_url()).await.unwrap())
}

fn request(names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: SECRET_TYPE.into(),
        ..Default::default()
    }
}

fn delta_request(subscribe: &[&str], unsubscribe: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: SECRET_TYPE.into(),
        resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        resource_names_unsubscribe: unsubscribe.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

/// (name, version) of each resource of a delta response, and its removed names.
fn delta_names(r: &DeltaDiscoveryResponse) -> (Vec<(String, String)>, Vec<String>) {
    let named = r
        .resources
        .iter()
        .map(|x| {
            let a = x.resource.as_ref().unwrap();
            assert_eq!(a.type_url, SECRET_TYPE);
            assert_eq!(Secret::decode(a.value.as_slice()).unwrap().name, x.name);
            (x.name.clone(), x.version.clone())
        })
        .collect();
    (named, r.removed_resources.clone())
}

async fn next<T>(s: &mut tonic::Streaming<T>, wait: Duration) -> Option<T> {
    tokio::time::timeout(wait, s.message())
        .await
        .ok()
        .map(|m| m.unwrap().unwrap())
}

fn secrets(r: &DiscoveryResponse) -> Vec<Secret> {
    r.resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, SECRET_TYPE);
            Secret::decode(a.value.as_slice()).unwrap()
        })
        .collect()
}

fn inline(d: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>) -> String {
    match d.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => String::from_utf8(b.clone()).unwrap(),
        other => panic!("not inline bytes: {other:?}"),
    }
}

/// The trust domains (name, PEM) of a SPIFFE validator secret.
fn validator_tds(s: &Secret) -> Vec<(String, String)> {
    let Some(secret::Type::ValidationContext(v)) = &s.r#type else {
        panic!("{} is not a validation context", s.name)
    };
    let c = v.custom_validator_config.as_ref().unwrap();
    assert_eq!(c.name, "envoy.tls.cert_validator.spiffe");
    let any = c.typed_config.as_ref().unwrap();
    assert_eq!(
        any.type_url,
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
    );
    SpiffeCertValidatorConfig::decode(any.value.as_slice())
        .unwrap()
        .trust_domains
        .iter()
        .map(|t| (t.name.clone(), inline(&t.trust_bundle)))
        .collect()
}

fn pem_der(pem: &str) -> Vec<Vec<u8>> {
    kame_api::bundle::certs_from_pem(pem).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sds_fetch_and_stream_secrets_as_envoy_sees_them() {
    let env = Env::start(Opts::default()).await;
    // A federated trust domain's bundle (any CA will do).
    let d = tempfile::tempdir().unwrap();
    let o = std::process::Command::new("openssl")
        .current_dir(d.path())
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "k.pem",
            "-out",
            "other.pem",
            "-subj",
            "/CN=other",
            "-days",
            "1",
            "-addext",
            "basicConstraints=critical,CA:true",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    let other = pem_der(&std::fs::read_to_string(d.path().join("other.pem")).unwrap());
    pb::bundle::bundle_client::BundleClient::new(env.admin().await)
        .batch_set_federated_bundle(pb::bundle::BatchSetFederatedBundleRequest {
            bundle: vec![pb::types::Bundle {
                trust_domain: "other.org".into(),
                x509_authorities: vec![pb::types::X509Certificate {
                    asn1: other[0].clone(),
                    tainted: false,
                }],
                ..Default::default()
            }],
            output_mask: None,
        })
        .await
        .unwrap();
    let entry = env
        .register("/web", &[&format!("unix:uid:{}", my_uid())], |e| {
            e.federates_with = vec!["other.org".into()]
        })
        .await;
    let m = env.wait_for_svids(&["/web"]).await;
    let own_roots = kame_upstream::spire::split_certs(&m.svids[0].bundle).unwrap();
    // The federated bundle reaches the agent with the entry.
    let mut c = client(&env).await;
    let mut fetched = None;
    for _ in 0..100 {
        match c
            .fetch_secrets(request(&["default", "ROOTCA", "spiffe://other.org"]))
            .await
        {
            Ok(r) => {
                fetched = Some(r.into_inner());
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let r = fetched.expect("FetchSecrets with a federated bundle");
    assert_eq!(r.version_info, "", "FetchSecrets has no version");
    assert_eq!(r.nonce, "");
    let s = secrets(&r);
    let names: Vec<&str> = s.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names, vec!["ROOTCA", "spiffe://other.org", "default"]);
    // ALL (asked alone: with ROOTCA, SPIRE answers only ROOTCA and refuses ALL).
    let all = secrets(
        &c.fetch_secrets(request(&["ALL"]))
            .await
            .unwrap()
            .into_inner(),
    );
    let tds = validator_tds(&all[0]);
    assert_eq!(
        tds.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        vec![TD, "other.org"],
        "one trust domain per bundle, sorted"
    );
    assert_eq!(pem_der(&tds[0].1), own_roots);
    assert_eq!(pem_der(&tds[1].1), other);
    assert_eq!(
        validator_tds(&s[0]),
        vec![(TD.to_string(), tds[0].1.clone())]
    );
    assert_eq!(validator_tds(&s[1])[0].0, "other.org");
    let Some(secret::Type::TlsCertificate(t)) = &s[2].r#type else {
        panic!("default is not a TLS certificate")
    };
    let chain = pem_der(&inline(&t.certificate_chain));
    assert_eq!(
        chain,
        kame_upstream::spire::split_certs(&m.svids[0].x509_svid).unwrap()
    );
    assert!(inline(&t.private_key).starts_with("-----BEGIN PRIVATE KEY-----"));
    // By SPIFFE ID, and everything with no names.
    let by_id = secrets(
        &c.fetch_secrets(request(&[&format!("spiffe://{TD}/web")]))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(by_id[0].name, format!("spiffe://{TD}/web"));
    let everything = secrets(&c.fetch_secrets(request(&[])).await.unwrap().into_inner());
    assert_eq!(
        everything.len(),
        3,
        "own bundle, federated bundle, the SVID"
    );
    // Unknown names are refused.
    let e = c
        .fetch_secrets(request(&["spiffe://example.org/not-mine"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("not authorized"), "{}", e.message());
    // The node asks for trusted_ca instead of the SPIFFE validator.
    let mut legacy = request(&["ROOTCA"]);
    let mut meta = envoy_types::pb::google::protobuf::Struct::default();
    meta.fields.insert(
        "disable_spiffe_cert_validation".into(),
        envoy_types::pb::google::protobuf::Value {
            kind: Some(envoy_types::pb::google::protobuf::value::Kind::BoolValue(
                true,
            )),
        },
    );
    legacy.node = Some(Node {
        metadata: Some(meta),
        ..Default::default()
    });
    let l = secrets(&c.fetch_secrets(legacy).await.unwrap().into_inner());
    let Some(secret::Type::ValidationContext(v)) = &l[0].r#type else {
        panic!("not a validation context")
    };
    assert_eq!(pem_der(&inline(&v.trusted_ca)), own_roots);
    assert!(v.custom_validator_config.is_none());

    // The stream: version 1 and a nonce; an ACK gets no answer; a stale nonce is ignored; a
    // re-issued SVID is pushed as version 2.
    let (tx, rx) = tokio::sync::mpsc::channel::<DiscoveryRequest>(4);
    let mut stream = c
        .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(request(&["default"])).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.version_info, "1");
    assert_eq!(first.nonce.len(), 8, "4 random bytes in hex");
    let mut ack = request(&["default"]);
    ack.version_info = first.version_info.clone();
    ack.response_nonce = first.nonce.clone();
    tx.send(ack).await.unwrap();
    let mut stale = request(&["default", "ROOTCA"]);
    stale.response_nonce = "00000000".into();
    tx.send(stale).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(1), stream.message())
            .await
            .is_err(),
        "no answer to an ACK or a stale request"
    );
    // The incremental stream: versioned resources, an unknown name removed at once.
    let (dtx, drx) = tokio::sync::mpsc::channel::<DeltaDiscoveryRequest>(4);
    let mut delta = c
        .delta_secrets(tokio_stream::wrappers::ReceiverStream::new(drx))
        .await
        .unwrap()
        .into_inner();
    dtx.send(delta_request(
        &["default", "ROOTCA", "spiffe://nobody.org"],
        &[],
        "",
    ))
    .await
    .unwrap();
    let d1 = next(&mut delta, Duration::from_secs(10)).await.unwrap();
    let (named, removed) = delta_names(&d1);
    assert_eq!(
        named.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        vec!["ROOTCA", "default"]
    );
    assert!(named.iter().all(|(_, v)| v.len() == 16), "{named:?}");
    assert_eq!(removed, vec!["spiffe://nobody.org".to_string()]);
    assert_eq!(d1.system_version_info, "1");
    assert_eq!(d1.type_url, SECRET_TYPE);
    let default_v1 = named[1].1.clone();
    // An ACK, then an unsubscribe: nothing to say.
    dtx.send(delta_request(&[], &[], &d1.nonce)).await.unwrap();
    dtx.send(delta_request(&[], &["ROOTCA"], "")).await.unwrap();
    assert!(next(&mut delta, Duration::from_secs(1)).await.is_none());
    // A new subscription: only that secret.
    dtx.send(delta_request(&["spiffe://other.org"], &[], ""))
        .await
        .unwrap();
    let d2 = next(&mut delta, Duration::from_secs(10)).await.unwrap();
    let (named, removed) = delta_names(&d2);
    assert_eq!(named.len(), 1);
    assert_eq!(named[0].0, "spiffe://other.org");
    assert!(removed.is_empty());
    let other_v = named[0].1.clone();

    // The entry changes (a DNS name): the agent re-issues, the stream pushes.
    let mut e = pb::entry::entry_client::EntryClient::new(env.admin().await)
        .get_entry(pb::entry::GetEntryRequest {
            id: entry.clone(),
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    e.dns_names = vec!["web.example.org".into()];
    pb::entry::entry_client::EntryClient::new(env.admin().await)
        .batch_update_entry(pb::entry::BatchUpdateEntryRequest {
            entries: vec![e],
            input_mask: None,
            output_mask: None,
        })
        .await
        .unwrap();
    let pushed = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("an update pushed")
        .unwrap()
        .unwrap();
    assert_eq!(pushed.version_info, "2");
    assert_ne!(pushed.nonce, first.nonce);
    let Some(secret::Type::TlsCertificate(t2)) = &secrets(&pushed)[0].r#type else {
        panic!()
    };
    assert_ne!(inline(&t2.certificate_chain), inline(&t.certificate_chain));
    drop(tx);
    // The incremental stream pushes the new SVID alone (the bundles did not change).
    let d3 = next(&mut delta, Duration::from_secs(20))
        .await
        .expect("a delta update pushed");
    let (named, removed) = delta_names(&d3);
    assert_eq!(named.len(), 1, "{named:?}");
    assert_eq!(named[0].0, "default");
    assert_ne!(named[0].1, default_v1);
    assert!(removed.is_empty());
    assert_eq!(d3.system_version_info, "3");
    drop(dtx);
    // A reconnect that holds the bundle and an old SVID is sent the SVID only.
    let (rtx, rrx) = tokio::sync::mpsc::channel::<DeltaDiscoveryRequest>(4);
    let mut again = c
        .delta_secrets(tokio_stream::wrappers::ReceiverStream::new(rrx))
        .await
        .unwrap()
        .into_inner();
    let mut first = delta_request(&["default", "spiffe://other.org"], &[], "");
    first.initial_resource_versions = [
        ("default".to_string(), default_v1.clone()),
        ("spiffe://other.org".to_string(), other_v),
    ]
    .into_iter()
    .collect();
    rtx.send(first).await.unwrap();
    let r1 = next(&mut again, Duration::from_secs(10)).await.unwrap();
    let (named, removed) = delta_names(&r1);
    assert_eq!(
        named.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        vec!["default"]
    );
    assert!(removed.is_empty());
    drop(rtx);
    // A stream subscribing to more names than it may hold is refused.
    let (htx, hrx) = tokio::sync::mpsc::channel::<DeltaDiscoveryRequest>(1);
    let mut hostile = c
        .delta_secrets(tokio_stream::wrappers::ReceiverStream::new(hrx))
        .await
        .unwrap()
        .into_inner();
    let many: Vec<String> = (0..=kame_agent::sds::MAX_SUBSCRIBED)
        .map(|i| format!("spiffe://x{i}.org"))
        .collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    htx.send(delta_request(&many, &[], "")).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), hostile.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    drop(htx);
    env.stop().await;

    // A caller no entry matches gets nothing.
    let bare = Env::start(Opts::default()).await;
    let e = client(&bare)
        .await
        .fetch_secrets(request(&[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    bare.stop().await;
}
