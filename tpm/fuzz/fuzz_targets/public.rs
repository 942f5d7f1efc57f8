//! TPMT_PUBLIC / TPM2B_PUBLIC parsing: never panics; what parses marshals back byte for byte.
#![no_main]
use kame_tpm::wire::Public;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Public::parse(data) {
        assert_eq!(p.marshal().unwrap(), data);
        let _ = p.name();
        let _ = p.spki_der();
    }
    if let Ok(p) = Public::parse_tpm2b(data) {
        assert_eq!(p.marshal_tpm2b().unwrap(), data);
    }
});
