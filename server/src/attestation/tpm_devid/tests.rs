use super::*;

fn cfg_with_root(root: Vec<u8>) -> DevIdConfig {
    DevIdConfig {
        devid_roots: vec![root],
        ek_roots: vec![],
        compat_mode: false,
        ek_allow_list: vec![],
        require_quote: false,
        pcr_policy: Default::default(),
        ak_roots: vec![],
    }
}

fn now() -> u64 {
    crate::ca::now_secs()
}

/// Issue 19 item 1: a message 1 whose DevID chain is 64 CAs sharing one name, ordered so
/// that a naive path builder tries every one at every depth, costs nothing.
#[test]
fn tpm_devid_64_attacker_intermediates_are_refused_in_under_10ms() {
    let (leaf, cas) = kame_devid::testing::same_name_chain(64, "CN=attacker");
    let root = kame_devid::testing::SoftCa::root("CN=Real DevID Root").cert;
    let cfg = cfg_with_root(root);
    let mut certs = vec![leaf];
    certs.extend(cas);
    let payload = AttestationRequest {
        devid_cert: certs,
        version: Some(2),
        ..Default::default()
    }
    .encode();
    let t = std::time::Instant::now();
    let r = begin(&cfg, &payload, now());
    let took = t.elapsed();
    eprintln!("64 attacker intermediates refused in {took:?}");
    assert!(r.is_err(), "the attacker's chain was accepted");
    assert!(
        took < std::time::Duration::from_millis(10),
        "refusing 64 attacker intermediates took {took:?}"
    );
}

fn soft_node_cfg(node: &kame_devid::testing::SoftCertifiedAkNode) -> DevIdConfig {
    let mut cfg = cfg_with_root(node.devid_ca.cert.clone());
    cfg.ak_roots = vec![node.ak_ca.cert.clone()];
    cfg
}

/// A certified-AK node made in software (what the fuzz targets start from) attests, and
/// the shifted-PCR attack on it is refused: the checks behind the signatures hold without
/// a TPM.
#[test]
fn tpm_devid_certified_ak_node_in_software_attests_and_shifted_pcrs_are_refused() {
    let node = kame_devid::testing::SoftCertifiedAkNode::new();
    let mut cfg = soft_node_cfg(&node);
    cfg.pcr_policy.insert(7, vec![0; 32]);
    let td = TrustDomain::parse("example.org").unwrap();
    // The EK route's first step passes too (its challenge needs a TPM to answer).
    cfg.ek_roots = vec![node.ek_ca.cert.clone()];
    let (_, ch) = begin(&cfg, &node.ek_request().encode(), now()).unwrap();
    assert!(ch.cred_activation.is_some());
    let (pending, ch) = begin(&cfg, &node.request().encode(), now()).unwrap();
    assert_eq!(ch.pcrs, vec![7]);
    let a = finish(&td, pending, &node.answer(&ch).encode()).unwrap();
    assert!(
        a.selectors
            .iter()
            .any(|s| s.value == format!("pcr:sha256:7:{}", "00".repeat(32))),
        "{:?}",
        a.selectors
    );
    // PCRs 6 and 7 quoted; the values claimed as 6 = R6||R7, 7 = empty.
    let (pending, mut ch) = begin(&cfg, &node.request().encode(), now()).unwrap();
    ch.pcrs = vec![6, 7];
    let mut r = node.answer(&ch);
    r.pcr_values = vec![(6, vec![0; 64]), (7, vec![])];
    let e = finish(&td, pending, &r.encode()).unwrap_err();
    assert!(
        e.to_string().contains("PCR sha256:6 value is 64 bytes"),
        "{e}"
    );
    // One PCR named twice ("7" and "07").
    let (pending, ch) = begin(&cfg, &node.request().encode(), now()).unwrap();
    let r = node.answer(&ch).encode();
    let text = String::from_utf8(r).unwrap().replace(
        r#""PCRValues":{"#,
        &format!(r#""PCRValues":{{"07":"{}","#, "A".repeat(43) + "="),
    );
    assert!(matches!(
        finish(&td, pending, text.as_bytes()),
        Err(DevIdError::DuplicatePcr(7))
    ));
}

/// Issue 19 item 6: a `pcr_policy` cannot be skipped by an agent that does not announce
/// v2 (it would get an SVID without any quote).
#[test]
fn tpm_devid_pcr_policy_implies_require_quote() {
    let root = kame_devid::testing::SoftCa::root("CN=DevID Root");
    let mut cfg = cfg_with_root(root.cert.clone());
    cfg.pcr_policy.insert(7, vec![0; 32]);
    let payload = AttestationRequest {
        devid_cert: vec![root.issue_leaf("CN=node")],
        ..Default::default()
    }
    .encode();
    assert!(matches!(
        begin(&cfg, &payload, now()),
        Err(DevIdError::QuoteRequired)
    ));
}
