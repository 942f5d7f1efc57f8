//! An LDevID enrollment (`FinishLdevidRequest`, protobuf) through the owner CA's checks
//! (`verify_ldevid_request`): never panics, whatever the bytes. The first input byte says how
//! the rest is used: as the whole protobuf message, or as one field of a valid request from a
//! device made in software; with the top bit set the device certifies and signs again (when
//! the new key's public area parses), so the fuzzer reaches the checks behind the signatures.
#![no_main]
use kame_api::pb::devid::FinishLdevidRequest;
use kame_devid::enroll::{LdevidRequest, verify_ldevid_request};
use kame_devid::testing::{DEVID_ATTRIBUTES, SoftCa, SoftDevice, SoftKey};
use kame_tpm::wire::public::Public;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use std::sync::OnceLock;

const NONCE: &[u8] = b"a nonce the owner CA issued once";

struct Fixture {
    device: SoftDevice,
    request: LdevidRequest,
    roots: Vec<Vec<u8>>,
    now: u64,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let device = SoftDevice::new("SN-FUZZ-2");
        let manufacturer = SoftCa::root("O=Kame Fuzz, CN=Manufacturer CA");
        let ldevid = SoftKey::new(DEVID_ATTRIBUTES);
        let request = device.ldevid_request(&manufacturer, &ldevid.public, NONCE);
        let roots = vec![manufacturer.cert.clone()];
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        assert!(verify_ldevid_request(&request, NONCE, &roots, now).is_ok());
        Fixture {
            device,
            request,
            roots,
            now,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let request = if mode & 0x0f == 0 {
        let Ok(m) = FinishLdevidRequest::decode(rest) else {
            return;
        };
        LdevidRequest {
            idevid_cert: m.idevid_certificate,
            iak_cert: m.iak_certificate,
            idevid_pub: m.idevid_public,
            iak_pub: m.iak_public,
            ldevid_pub: m.ldevid_public,
            certify_info: m.certify_info,
            certify_sig: m.certify_signature,
            idevid_sig: m.idevid_signature,
        }
    } else {
        let mut r = f.request.clone();
        let v = rest.to_vec();
        match mode & 0x0f {
            1 => r.idevid_cert = v,
            2 => r.iak_cert = v,
            3 => r.idevid_pub = v,
            4 => r.iak_pub = v,
            5 => r.ldevid_pub = v,
            6 => r.certify_info = v,
            7 => r.certify_sig = v,
            _ => r.idevid_sig = v,
        }
        if mode & 0x80 != 0
            && let Ok(ldevid) = Public::parse(&r.ldevid_pub)
        {
            f.device.sign_ldevid(&mut r, &ldevid, NONCE);
        }
        r
    };
    let _ = verify_ldevid_request(&request, NONCE, &f.roots, f.now);
});
