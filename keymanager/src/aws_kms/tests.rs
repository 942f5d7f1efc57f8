use super::*;
use crate::testing::Moto;

fn config(moto: &Moto, server_id: &str) -> AwsKmsConfig {
    AwsKmsConfig {
        region: "us-east-1".into(),
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing".into()),
        endpoint: Some(moto.endpoint.clone()),
        trust_domain: "example.org".into(),
        server_id: server_id.into(),
        key_policy: None,
        key_tags: vec![("team".into(), "kame".into())],
        call_timeout: Duration::from_secs(10),
        tag_discovery: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_kms_passes_keymanager_conformance_on_moto() {
    let moto = Moto::start();
    let km = AwsKmsKeyManager::open(config(&moto, "server-a"))
        .await
        .unwrap();
    crate::conformance::run(
        &km,
        crate::conformance::Skip {
            large_messages: true,
            rsa_pss: true,
        },
    )
    .await;
    crate::conformance::lifecycle(&km).await;
    // Reopened, the backend finds the same keys through their aliases.
    let again = AwsKmsKeyManager::open(config(&moto, "server-a"))
        .await
        .unwrap();
    let mut a = km.public_keys().await.unwrap();
    let mut b = again.public_keys().await.unwrap();
    a.sort_by(|x, y| x.id.cmp(&y.id));
    b.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(a, b);
    // Tag-based discovery finds the same.
    let mut c = config(&moto, "server-a");
    c.tag_discovery = true;
    let by_tags = AwsKmsKeyManager::open(c).await.unwrap();
    let mut t = by_tags.public_keys().await.unwrap();
    t.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(a, t);
    // Another server sees none of them.
    let other = AwsKmsKeyManager::open(config(&moto, "server-b"))
        .await
        .unwrap();
    assert!(other.public_keys().await.unwrap().is_empty());
}

/// Messages over 4,096 bytes go as a digest of the requested hash (moto_server mishandles
/// DIGEST, so the request is what is checked here), smaller ones as RAW.
#[test]
fn aws_kms_large_messages_are_sent_as_digests_raw_up_to_4096() {
    let small = vec![7u8; MAX_RAW_MESSAGE];
    assert_eq!(
        sign_input(&small, HashAlgorithm::Sha256),
        (MessageType::Raw, small.clone())
    );
    let big = vec![7u8; MAX_RAW_MESSAGE + 1];
    for h in [
        HashAlgorithm::Sha256,
        HashAlgorithm::Sha384,
        HashAlgorithm::Sha512,
    ] {
        let (t, d) = sign_input(&big, h);
        assert_eq!(t, MessageType::Digest);
        assert_eq!(d, crate::encoding::digest(h, &big));
    }
    assert_eq!(
        signing_algorithm(KeyType::EcP384, SignOpts::for_key(KeyType::EcP384)),
        Some(SigningAlgorithmSpec::EcdsaSha384)
    );
    assert_eq!(
        signing_algorithm(
            KeyType::Rsa2048,
            SignOpts {
                hash: HashAlgorithm::Sha512,
                pss: true
            }
        ),
        Some(SigningAlgorithmSpec::RsassaPssSha512)
    );
    assert_eq!(
        signing_algorithm(
            KeyType::EcP256,
            SignOpts {
                hash: HashAlgorithm::Sha384,
                pss: false
            }
        ),
        None
    );
}

/// SPIRE's names: alias, description and tags; a replaced key is pending deletion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_kms_names_keys_as_spire_and_schedules_replaced_keys_for_deletion() {
    let moto = Moto::start();
    let km = AwsKmsKeyManager::open(config(&moto, "srv-1"))
        .await
        .unwrap();
    km.generate_key("x509-CA-A", KeyType::EcP256).await.unwrap();
    let first = km.arn("x509-CA-A").unwrap();
    let aliases = km.kms.list_aliases().send().await.unwrap();
    let alias = aliases
        .aliases()
        .iter()
        .find(|a| a.alias_name() == Some("alias/SPIRE_SERVER/example_org/srv-1/x509-CA-A"))
        .expect("SPIRE's alias");
    let d = km.kms.describe_key().key_id(&first).send().await.unwrap();
    let md = d.key_metadata().unwrap();
    assert_eq!(alias.target_key_id(), Some(md.key_id()));
    assert_eq!(
        md.description(),
        Some("SPIRE_SERVER_KEY/example_org/x509-CA-A")
    );
    let tags = km
        .kms
        .list_resource_tags()
        .key_id(&first)
        .send()
        .await
        .unwrap();
    let tags: HashMap<&str, &str> = tags
        .tags()
        .iter()
        .map(|t| (t.tag_key(), t.tag_value()))
        .collect();
    assert_eq!(tags.get("spire-server-td"), Some(&"example.org"));
    assert_eq!(tags.get("spire-server-id"), Some(&"srv-1"));
    assert_eq!(tags.get("spire-active"), Some(&"true"));
    assert_eq!(tags.get("spire-key-id"), Some(&"x509-CA-A"));
    assert!(tags.contains_key("spire-last-update"));
    assert_eq!(tags.get("team"), Some(&"kame"));
    // Replaced: the alias moves, the old key is pending deletion.
    km.generate_key("x509-CA-A", KeyType::EcP256).await.unwrap();
    let second = km.arn("x509-CA-A").unwrap();
    assert_ne!(first, second);
    let d = km.kms.describe_key().key_id(&first).send().await.unwrap();
    assert_eq!(
        d.key_metadata().unwrap().key_state(),
        Some(&KeyState::PendingDeletion)
    );
    // Dotted key ids are encoded as SPIRE encodes them.
    km.generate_key("a.b+c", KeyType::EcP256).await.unwrap();
    let aliases = km.kms.list_aliases().send().await.unwrap();
    assert!(
        aliases
            .aliases()
            .iter()
            .any(|a| a.alias_name() == Some("alias/SPIRE_SERVER/example_org/srv-1/a_2eb_2bc"))
    );
    let again = AwsKmsKeyManager::open(config(&moto, "srv-1"))
        .await
        .unwrap();
    assert!(again.public_key("a.b+c").await.is_ok());
}

/// Liveness and the sweep: another server's keys not refreshed for 14 days are scheduled
/// for deletion and tagged inactive; fresh ones and this server's own are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_kms_sweeps_only_stale_keys_of_other_servers() {
    let moto = Moto::start();
    let me = AwsKmsKeyManager::open(config(&moto, "alive"))
        .await
        .unwrap();
    let dead = AwsKmsKeyManager::open(config(&moto, "dead")).await.unwrap();
    let fresh = AwsKmsKeyManager::open(config(&moto, "fresh"))
        .await
        .unwrap();
    me.generate_key("k", KeyType::EcP256).await.unwrap();
    dead.generate_key("k", KeyType::EcP256).await.unwrap();
    fresh.generate_key("k", KeyType::EcP256).await.unwrap();
    let now = now_secs();
    // The dead server last refreshed 15 days ago.
    dead.kms
        .tag_resource()
        .key_id(dead.arn("k").unwrap())
        .tags(tag("spire-last-update", &(now - 15 * 86400).to_string()).unwrap())
        .send()
        .await
        .unwrap();
    me.kms
        .tag_resource()
        .key_id(me.arn("k").unwrap())
        .tags(tag("spire-last-update", "0").unwrap())
        .send()
        .await
        .unwrap();
    let swept = me.sweep(now).await.unwrap();
    assert_eq!(swept, vec![dead.arn("k").unwrap()]);
    let state = |arn: String| {
        let kms = me.kms.clone();
        async move {
            kms.describe_key()
                .key_id(arn)
                .send()
                .await
                .unwrap()
                .key_metadata()
                .unwrap()
                .key_state()
                .cloned()
        }
    };
    assert_eq!(
        state(dead.arn("k").unwrap()).await,
        Some(KeyState::PendingDeletion)
    );
    assert_eq!(
        state(fresh.arn("k").unwrap()).await,
        Some(KeyState::Enabled)
    );
    assert_eq!(state(me.arn("k").unwrap()).await, Some(KeyState::Enabled));
    // Refresh stamps this server's keys.
    me.refresh().await.unwrap();
    let mine = me
        .trust_domain_keys()
        .await
        .unwrap()
        .into_iter()
        .find(|k| k.server_id.as_deref() == Some("alive"))
        .unwrap();
    assert!(mine.last_update.unwrap() >= now);
    // The swept key is inactive and no longer listed.
    assert!(
        !me.trust_domain_keys()
            .await
            .unwrap()
            .iter()
            .any(|k| k.server_id.as_deref() == Some("dead"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_kms_unreachable_endpoint_is_unavailable_fast() {
    let mut moto = Moto::start();
    let km = AwsKmsKeyManager::open(config(&moto, "s")).await.unwrap();
    km.generate_key("k", KeyType::EcP256).await.unwrap();
    moto.stop();
    let t = std::time::Instant::now();
    let e = km
        .sign("k", b"m", SignOpts::for_key(KeyType::EcP256))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
}

#[test]
fn aws_kms_user_tags_follow_spires_limits() {
    let t = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    assert!(check_user_tags(&t("team", "kame")).is_ok());
    assert!(check_user_tags(&t("spire-x", "v")).is_err());
    assert!(check_user_tags(&t("aws:x", "v")).is_err());
    assert!(check_user_tags(&t("", "v")).is_err());
    assert!(check_user_tags(&t("k", "bad#char")).is_err());
    let many: Vec<_> = (0..51)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    assert!(check_user_tags(&many).is_err());
}
