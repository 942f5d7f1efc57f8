//! Everything TPM 2.0 for Kame. [`wire`] is the verification half: pure parsing, marshaling and
//! checking of TPM structures (TPMT_PUBLIC, names, TPMS_ATTEST, TPMT_SIGNATURE, PCR digests) and
//! software MakeCredential, so a server verifies TPM evidence with no TPM and no libtss2.
//! [`testing`] manufactures and runs software TPMs (swtpm) for tests; `soft` (feature
//! `soft-keys`) makes TPM evidence with software keys. This crate holds no policy and knows
//! nothing about SPIFFE.

#[cfg(feature = "device")]
pub mod device;
#[cfg(any(test, feature = "soft-keys"))]
pub mod soft;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod wire;
