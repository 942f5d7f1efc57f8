//! tpm_devid message 1 through the server's first step (`begin`): never panics, whatever the
//! bytes. The first input byte says how the rest is used: as the whole message, or as one
//! field of a valid message (the certified-AK route, or with the top bit the EK route) made in
//! software by `kame_devid::testing`, so the fuzzer reaches every check behind the JSON.
#![no_main]
use kame_api::tpm_devid::AttestationRequest;
use kame_devid::testing::SoftCertifiedAkNode;
use kame_server::attestation::tpm_devid::{DevIdConfig, begin};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

struct Fixture {
    cfg: DevIdConfig,
    ak_route: AttestationRequest,
    ek_route: AttestationRequest,
    now: u64,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let node = SoftCertifiedAkNode::new();
        let cfg = DevIdConfig {
            devid_roots: vec![node.devid_ca.cert.clone()],
            ek_roots: vec![node.ek_ca.cert.clone()],
            compat_mode: false,
            ek_allow_list: vec![],
            require_quote: false,
            pcr_policy: [(7, vec![0; 32])].into(),
            ak_roots: vec![node.ak_ca.cert.clone()],
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let f = Fixture {
            cfg,
            ak_route: node.request(),
            ek_route: node.ek_request(),
            now,
        };
        // The bases are valid: a mutation of one field is what fails.
        assert!(begin(&f.cfg, &f.ak_route.encode(), now).is_ok());
        assert!(begin(&f.cfg, &f.ek_route.encode(), now).is_ok());
        f
    })
}

/// `base` with the members of `json` (when it is a JSON object) over its own.
fn overridden(base: &AttestationRequest, json: &[u8]) -> Vec<u8> {
    let mut m: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&base.encode()).unwrap_or_default();
    if let Ok(serde_json::Value::Object(o)) = serde_json::from_slice(json) {
        m.extend(o);
    }
    serde_json::to_vec(&m).unwrap_or_default()
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut r = if mode & 0x80 == 0 {
        f.ak_route.clone()
    } else {
        f.ek_route.clone()
    };
    let v = rest.to_vec();
    let payload = match mode & 0x0f {
        0 => v,
        1 => {
            r.devid_cert = vec![v];
            r.encode()
        }
        2 => {
            r.devid_cert.push(v);
            r.encode()
        }
        3 => {
            r.devid_pub = Some(v);
            r.encode()
        }
        4 => {
            r.ak_pub = Some(v);
            r.encode()
        }
        5 => {
            r.ak_cert = vec![v];
            r.encode()
        }
        6 => {
            r.ak_cert.push(v);
            r.encode()
        }
        7 => {
            r.ek_cert = Some(v);
            r.encode()
        }
        8 => {
            r.ek_pub = Some(v);
            r.encode()
        }
        9 => {
            r.certified_devid = Some(v);
            r.encode()
        }
        10 => {
            r.certification_signature = Some(v);
            r.encode()
        }
        11 => {
            r.ek_cert_chain = vec![v];
            r.encode()
        }
        12 => {
            r.version = rest.first().map(|b| u32::from(*b));
            r.encode()
        }
        13 => {
            r.devid_cert = rest.chunks(64).map(<[u8]>::to_vec).collect();
            r.encode()
        }
        _ => overridden(&r, rest),
    };
    let _ = begin(&f.cfg, &payload, f.now);
});
