//! TPMS_ATTEST parsing: never panics; what parses marshals back byte for byte. Inputs are also
//! tried behind the TPM_GENERATED magic so the fuzzer reaches the body parsers quickly.
#![no_main]
use kame_tpm::wire::Attest;
use libfuzzer_sys::fuzz_target;

fn check(data: &[u8]) {
    if let Ok(a) = Attest::parse(data) {
        assert_eq!(a.marshal().unwrap(), data);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut v = 0xFF54_4347u32.to_be_bytes().to_vec();
    v.extend_from_slice(data);
    check(&v);
});
