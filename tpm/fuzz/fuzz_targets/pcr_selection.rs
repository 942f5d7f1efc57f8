//! TPML_PCR_SELECTION parsing: never panics.
#![no_main]
use kame_tpm::wire::Reader;
use kame_tpm::wire::attest::read_pcr_selection;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data, "fuzz");
    if let Ok(sel) = read_pcr_selection(&mut r) {
        for s in sel {
            let _ = s.indices();
        }
    }
});
