//! TPMT_SIGNATURE parsing: never panics; what parses marshals back byte for byte.
#![no_main]
use kame_tpm::wire::Signature;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = Signature::parse(data) {
        assert_eq!(s.marshal().unwrap(), data);
    }
});
