//! tpm_devid message 3 through the server's last step (`finish`), after a valid first step of
//! a certified-AK node made in software with a PCR policy: never panics, whatever the bytes.
//! The first input byte says how the rest is used: as the whole response, or as one field of
//! the node's valid response (the DevID signature, the certify, the quote, PCR values), so the
//! fuzzer reaches the checks behind each signature.
#![no_main]
use kame_api::TrustDomain;
use kame_api::tpm_devid::ChallengeResponse;
use kame_devid::testing::SoftCertifiedAkNode;
use kame_server::attestation::tpm_devid::{DevIdConfig, Pending, begin, finish};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

struct Fixture {
    td: TrustDomain,
    pending: Pending,
    valid: ChallengeResponse,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let node = SoftCertifiedAkNode::new();
        let cfg = DevIdConfig {
            devid_roots: vec![node.devid_ca.cert.clone()],
            ek_roots: vec![],
            compat_mode: false,
            ek_allow_list: vec![],
            require_quote: true,
            pcr_policy: [(0, vec![0; 32]), (7, vec![0; 32])].into(),
            ak_roots: vec![node.ak_ca.cert.clone()],
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let td = TrustDomain::parse("example.org").expect("trust domain");
        let (pending, challenge) = begin(&cfg, &node.request().encode(), now).expect("begin");
        let valid = node.answer(&challenge);
        // The base is valid: a mutation is what fails.
        assert!(finish(&td, pending.clone(), &valid.encode()).is_ok());
        Fixture { td, pending, valid }
    })
}

/// PCR values from bytes: (index byte, length byte, value) repeated.
fn pcr_values(mut b: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut out = vec![];
    while let [i, n, rest @ ..] = b {
        let n = (*n as usize).min(rest.len());
        out.push((u32::from(*i % 24), rest[..n].to_vec()));
        b = &rest[n..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut r = f.valid.clone();
    let v = rest.to_vec();
    let response = match mode % 10 {
        0 => v,
        k => {
            match k {
                1 => r.devid = Some(v),
                2 => r.certified_devid = Some(v),
                3 => r.certification_signature = Some(v),
                4 => r.quote = Some(v),
                5 => r.quote_signature = Some(v),
                6 => r.cred_activation = Some(v),
                7 => r.pcr_values = pcr_values(rest),
                8 => r.pcr_values.extend(pcr_values(rest)),
                _ => {
                    r.quote = Some(v);
                    r.pcr_values = pcr_values(rest);
                }
            }
            r.encode()
        }
    };
    let _ = finish(&f.td, f.pending.clone(), &response);
});
