//! A TCG-CSR-IDEVID through the manufacturer CA's checks (`verify_idevid_request`): never
//! panics, whatever the bytes. The first input byte says how the rest is used: as the whole
//! request, or as one field of a valid request from a device made in software, signed again
//! by its IDevID key so that the fuzzer reaches the checks behind the signature.
#![no_main]
use kame_devid::enroll::{IdevidRequest, verify_idevid_request};
use kame_devid::testing::SoftDevice;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

struct Fixture {
    device: SoftDevice,
    request: IdevidRequest,
    roots: Vec<Vec<u8>>,
    now: u64,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let device = SoftDevice::new("SN-FUZZ-1");
        let request = device.idevid_request();
        let roots = vec![device.ek_ca.cert.clone()];
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let bytes = device.sign_request(&request).expect("a request");
        assert!(verify_idevid_request(&bytes, &roots, &[], now).is_ok());
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
    let bytes = if mode % 12 == 0 {
        rest.to_vec()
    } else {
        let mut r = f.request.clone();
        let v = rest.to_vec();
        let text = String::from_utf8_lossy(rest).into_owned();
        match mode % 12 {
            1 => r.prod_model = text,
            2 => r.prod_serial = text,
            3 => r.ek_cert = v,
            4 => r.attest_pub = v,
            5 => r.signing_pub = v,
            6 => r.sgn_certify_info = v,
            7 => r.sgn_certify_info_sig = v,
            8 => r.prod_ca_data = v,
            9 => r.boot_event_log = v,
            10 => r.hash_alg = u16::from_be_bytes([mode, rest.first().copied().unwrap_or(0)]),
            _ => r.at_certify_info = v,
        }
        match f.device.sign_request(&r) {
            Some(b) => b,
            None => return,
        }
    };
    let _ = verify_idevid_request(&bytes, &f.roots, &[], f.now);
});
