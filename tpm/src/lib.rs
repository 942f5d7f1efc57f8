//! Everything TPM 2.0 for Kame. [`wire`] is the verification half: pure parsing, marshaling and
//! checking of TPM structures (TPMT_PUBLIC, names, TPMS_ATTEST, TPMT_SIGNATURE, PCR digests) and
//! software MakeCredential, so a server verifies TPM evidence with no TPM and no libtss2.
//! [`testing`] manufactures and runs software TPMs (swtpm) for tests. This crate holds no policy
//! and knows nothing about SPIFFE.

#[cfg(feature = "device")]
pub mod device;
pub mod testing;
pub mod wire;
