//! x509pop through the server's two steps: never panics, whatever the bytes. The first input
//! byte says how the rest is used: with the top bit clear, as message 1, whole (0) or as the
//! leaf or an intermediate of a valid chain made in software (a DevID-profile leaf, which has
//! digitalSignature, under a software CA); with the top bit set, as the response to the
//! challenge a valid message 1 drew.
#![no_main]
use kame_api::TrustDomain;
use kame_api::x509pop::AttestationData;
use kame_devid::profile::DevIdKind;
use kame_devid::testing::{DEVID_ATTRIBUTES, SoftCa, SoftKey, issue_devid};
use kame_server::attestation::x509pop::X509Pop;
use kame_server::attestation::{NodeAttestor, Step};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

struct Fixture {
    attestor: X509Pop,
    chain: Vec<Vec<u8>>,
    now: u64,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = SoftCa::root("O=Kame Fuzz, CN=x509pop root");
        let inter = root.issue_ca("O=Kame Fuzz, CN=x509pop intermediate");
        let key = SoftKey::new(DEVID_ATTRIBUTES);
        let leaf = issue_devid(&inter, DevIdKind::IDevId, "SN-1", &key.spki());
        let attestor = X509Pop::external_pki(
            TrustDomain::parse("example.org").expect("trust domain"),
            vec![root.cert.clone()],
        )
        .expect("attestor");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let chain = vec![leaf, inter.cert.clone()];
        let payload = AttestationData {
            certificates: chain.clone(),
        }
        .encode();
        assert!(matches!(
            attestor.begin(&payload, now),
            Ok(Step::Challenge { .. })
        ));
        Fixture {
            attestor,
            chain,
            now,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let valid = || {
        AttestationData {
            certificates: f.chain.clone(),
        }
        .encode()
    };
    if mode & 0x80 != 0 {
        if let Ok(Step::Challenge { pending, .. }) = f.attestor.begin(&valid(), f.now) {
            let _ = f.attestor.finish(pending, rest, f.now);
        }
        return;
    }
    let payload = match mode % 4 {
        0 => rest.to_vec(),
        1 => AttestationData {
            certificates: vec![rest.to_vec(), f.chain[1].clone()],
        }
        .encode(),
        2 => AttestationData {
            certificates: vec![f.chain[0].clone(), rest.to_vec()],
        }
        .encode(),
        _ => AttestationData {
            certificates: rest.chunks(256).map(<[u8]>::to_vec).collect(),
        }
        .encode(),
    };
    let _ = f.attestor.begin(&payload, f.now);
});
