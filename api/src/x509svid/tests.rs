use super::*;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use x509_cert::time::Time;

/// A P-256 key for building test certificates (also used by other modules' tests).
pub(crate) struct Key(EcdsaKeyPair);
impl Key {
    pub(crate) fn new() -> Self {
        Key(EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap())
    }
    pub(crate) fn spki(&self) -> Vec<u8> {
        self.0.public_key().as_der().unwrap().as_ref().to_vec()
    }
    pub(crate) fn sign(&self, m: &[u8]) -> Vec<u8> {
        self.0
            .sign(&SystemRandom::new(), m)
            .unwrap()
            .as_ref()
            .to_vec()
    }
}

fn root(td: &TrustDomain, key: &Key) -> Vec<u8> {
    let subject = parse_name("C=US, O=SPIFFE").unwrap();
    let spki = key.spki();
    let tbs = ca_tbs(
        &CaParams {
            trust_domain: td,
            subject: &subject,
            spki_der: &spki,
            serial: &[1],
            not_before: 1_000,
            not_after: 4_000_000_000,
        },
        None,
    )
    .unwrap();
    let alg = KeyInfo::from_spki_der(&spki)
        .unwrap()
        .x509_signature_algorithm();
    assemble(&tbs, &alg, &key.sign(&tbs)).unwrap()
}

fn leaf(issuer_der: &[u8], issuer_key: &Key, id: &str, not_after: u64) -> (Vec<u8>, Key) {
    let k = Key::new();
    let spki = k.spki();
    let issuer = IssuerInfo::from_cert_der(issuer_der).unwrap();
    let id = SpiffeId::parse(id).unwrap();
    let tbs = leaf_tbs(
        &LeafParams {
            id: &id,
            dns_names: &["svc.example.org".into()],
            spki_der: &spki,
            serial: &[2],
            not_before: 2_000,
            not_after,
        },
        &issuer,
    )
    .unwrap();
    (
        assemble(&tbs, &issuer.signature_algorithm, &issuer_key.sign(&tbs)).unwrap(),
        k,
    )
}

#[test]
fn x509_issuer_rules_hold_for_minted_leaf() {
    let td = TrustDomain::parse("example.org").unwrap();
    let ck = Key::new();
    let ca = root(&td, &ck);
    let (l, _) = leaf(&ca, &ck, "spiffe://example.org/w", 3_000_000_000);
    let p = ParsedCert::parse(&l).unwrap();
    // X509-01/02: exactly one URI SAN, the SPIFFE ID; DNS SAN allowed.
    let (_, uris, dns) = p.sans().unwrap().unwrap();
    assert_eq!(uris, vec!["spiffe://example.org/w".to_string()]);
    assert_eq!(dns, vec!["svc.example.org".to_string()]);
    // X509-05: cA=false, critical.
    let (crit, bc) = p.basic_constraints().unwrap().unwrap();
    assert!(crit && !bc.ca);
    // X509-07/08/09: critical KU with digitalSignature, no keyCertSign/cRLSign.
    let (crit, ku) = p.key_usage().unwrap().unwrap();
    assert!(crit && ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
    // X509-12: EKU has serverAuth and clientAuth.
    let eku = p.extended_key_usage().unwrap().unwrap();
    assert!(eku.0.contains(&ID_KP_SERVER_AUTH) && eku.0.contains(&ID_KP_CLIENT_AUTH));
    // notAfter capped at the CA's (4e9 > 3e9 here, so not capped) and backdating is the caller's.
    assert_eq!(p.not_after(), 3_000_000_000);
    let v = verify_chain(&[l], std::slice::from_ref(&ca), 2_500).unwrap();
    assert_eq!(v.id.to_string(), "spiffe://example.org/w");
    // X509-06 / X509-11: the CA is cA=true + keyCertSign, URI SAN without path.
    let cp = ParsedCert::parse(&ca).unwrap();
    check_signing_cert(&cp).unwrap();
    assert_eq!(cp.spiffe_id().unwrap().to_string(), "spiffe://example.org");
}

#[test]
fn validity_times_encode_like_the_der_crate() {
    for secs in [
        0u64,
        951_782_400,
        1_795_339_518,
        2_524_607_999,
        2_524_608_000,
        4_102_444_800,
        253_402_300_799,
    ] {
        let dt = der::DateTime::from_unix_duration(Duration::from_secs(secs)).unwrap();
        let want = Time::from(dt).to_der().unwrap();
        assert_eq!(time_der(secs).unwrap(), want, "{secs}");
    }
}

#[test]
fn x509_svid_not_after_is_capped_at_ca_not_after() {
    let td = TrustDomain::parse("example.org").unwrap();
    let ck = Key::new();
    let ca = root(&td, &ck);
    let (l, _) = leaf(&ca, &ck, "spiffe://example.org/w", 5_000_000_000);
    assert_eq!(ParsedCert::parse(&l).unwrap().not_after(), 4_000_000_000);
}

#[test]
fn x509_03_root_path_leaf_is_refused_by_issuer() {
    let td = TrustDomain::parse("example.org").unwrap();
    let ck = Key::new();
    let ca = root(&td, &ck);
    let issuer = IssuerInfo::from_cert_der(&ca).unwrap();
    let id = SpiffeId::parse("spiffe://example.org").unwrap();
    let spki = Key::new().spki();
    assert!(
        leaf_tbs(
            &LeafParams {
                id: &id,
                dns_names: &[],
                spki_der: &spki,
                serial: &[1],
                not_before: 1,
                not_after: 2
            },
            &issuer
        )
        .is_err()
    );
}

#[test]
fn x509_14_chain_validation_failures() {
    let td = TrustDomain::parse("example.org").unwrap();
    let ck = Key::new();
    let ca = root(&td, &ck);
    let other_key = Key::new();
    let other = root(&TrustDomain::parse("other.org").unwrap(), &other_key);
    let (l, _) = leaf(&ca, &ck, "spiffe://example.org/w", 3_000);
    assert!(matches!(
        verify_chain(std::slice::from_ref(&l), std::slice::from_ref(&ca), 3_500),
        Err(Error::Expired(0))
    ));
    assert!(matches!(
        verify_chain(std::slice::from_ref(&l), std::slice::from_ref(&ca), 1_500),
        Err(Error::NotYetValid(0))
    ));
    assert!(matches!(
        verify_chain(std::slice::from_ref(&l), &[other], 2_500),
        Err(Error::UntrustedChain(_))
    ));
    // a leaf signed by a key other than the CA's
    let (forged, _) = leaf(&ca, &other_key, "spiffe://example.org/w", 3_000);
    assert!(verify_chain(&[forged], std::slice::from_ref(&ca), 2_500).is_err());
    // a CA certificate is not a leaf (X509-10)
    assert!(verify_chain(std::slice::from_ref(&ca), std::slice::from_ref(&ca), 2_500).is_err());
}

#[test]
fn csr_round_trip_and_bad_signature() {
    let k = Key::new();
    let info = crate::csr::request_info(
        &k.spki(),
        &["spiffe://example.org/w".into()],
        &["a.example".into()],
    )
    .unwrap();
    let alg = KeyInfo::from_spki_der(&k.spki())
        .unwrap()
        .x509_signature_algorithm();
    let csr = assemble(&info, &alg, &k.sign(&info)).unwrap();
    let parsed = crate::csr::parse(&csr).unwrap();
    assert_eq!(parsed.uris, vec!["spiffe://example.org/w".to_string()]);
    assert_eq!(parsed.dns_names, vec!["a.example".to_string()]);
    let forged = assemble(&info, &alg, &Key::new().sign(&info)).unwrap();
    let e = crate::csr::parse(&forged).unwrap_err();
    assert!(matches!(e, Error::CsrSignature(_)), "{e}");
    assert!(
        e.to_string()
            .starts_with("bad CSR: CSR signature check failed"),
        "{e}"
    );
    let e = crate::csr::parse(b"\x30\x03\x02\x01\x00").unwrap_err();
    assert!(
        matches!(e, Error::Der { .. }) && e.to_string().starts_with("bad CSR: malformed CSR"),
        "{e}"
    );
}

/// A reserve SVID names the break-glass policy (the OID's 128-bit arc encoded by hand, checked
/// here against its dotted form), still passes the validator's X509-SVID rules and chains to
/// its CA; a normal SVID names no policy.
#[test]
fn break_glass_policy_marks_reserve_svids_only() {
    // The dotted form, re-derived from the encoded contents.
    let content = break_glass_oid_content();
    assert_eq!(content[0], 2 * 40 + 25);
    let mut arc: u128 = 0;
    for b in &content[1..] {
        arc = (arc << 7) | u128::from(b & 0x7f);
    }
    assert_eq!(content.last().unwrap() & 0x80, 0);
    assert_eq!(format!("2.25.{arc}"), BREAK_GLASS_POLICY);

    let td = TrustDomain::parse("example.org").unwrap();
    let ck = Key::new();
    let ca = root(&td, &ck);
    let (normal, _) = leaf(&ca, &ck, "spiffe://example.org/w", 3_000_000_000);
    assert!(
        !ParsedCert::parse(&normal)
            .unwrap()
            .is_break_glass()
            .unwrap()
    );

    let k = Key::new();
    let spki = k.spki();
    let issuer = IssuerInfo::from_cert_der(&ca).unwrap();
    let id = SpiffeId::parse("spiffe://example.org/w").unwrap();
    let tbs = leaf_tbs_with(
        &LeafParams {
            id: &id,
            dns_names: &[],
            spki_der: &spki,
            serial: &[3],
            not_before: 2_000,
            not_after: 3_000_000_000,
        },
        &issuer,
        &[break_glass_policy_ext().unwrap()],
    )
    .unwrap();
    let reserve = assemble(&tbs, &issuer.signature_algorithm, &ck.sign(&tbs)).unwrap();
    let p = ParsedCert::parse(&reserve).unwrap();
    assert!(p.is_break_glass().unwrap());
    check_leaf(&p).unwrap();
    verify_chain(&[reserve], &[ca], 1_000_000_000).unwrap();
}
