//! The only code that talks to a TPM (feature `device`, tss-esapi 7.7 over libtss2). Opens a
//! TPM by TCTI string (`device:/dev/tpmrm0`, `swtpm:host=H,port=P`, `tabrmd:`), flushes
//! leftover transient objects at open, and runs one operation at a time with at most two
//! transient objects loaded (EK and AK), flushing them afterwards: a TPM without a resource
//! manager has only three slots. Calls block; async callers run them with `spawn_blocking`.
//! Results come back as wire bytes that [`crate::wire`] parses and verifies.
//!
//! This module holds the device, its errors and the blob types; the commands are grouped in
//! `ek` (endorsement key and its certificates), `nv`, `ak` (attestation keys, quotes,
//! certify), `persistent` objects, `keys` under the SRK, `session`s, `tcg` device identity
//! provisioning, and objects a caller keeps loaded between the steps of its own protocol
//! (`held`: SPIRE's tpm_devid sequence runs in the agent on these primitives).

use crate::wire::{self, Public};
use std::str::FromStr;
use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, ak as tss_ak, ek as tss_ek};
use tss_esapi::constants::{CapabilityType, SessionType};
use tss_esapi::handles::{
    AuthHandle, KeyHandle, ObjectHandle, PersistentTpmHandle, SessionHandle, TpmHandle,
};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::Provision;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    CapabilityData, Data, Digest, EncryptedSecret, IdObject, Nonce, PcrSelectionListBuilder,
    PcrSlot, Private, SignatureScheme, SymmetricDefinition,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};

mod ak;
mod ek;
mod held;
mod keys;
mod nv;
mod persistent;
mod session;
mod tcg;
pub use held::Held;
use keys::*;
pub use nv::*;
use tcg::*;

/// One variant per failed step, so an operator knows which TPM command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    #[error("invalid TCTI {0:?}")]
    BadTcti(String),
    #[error(
        "cannot open the TPM at {tcti:?} (is the device or simulator there, and may Kame use it?): {source}"
    )]
    Open {
        tcti: String,
        #[source]
        source: tss_esapi::Error,
    },
    #[error("TPM {step} failed: {source}")]
    Tpm {
        step: &'static str,
        #[source]
        source: tss_esapi::Error,
    },
    #[error("TPM returned a structure Kame cannot parse: {0}")]
    Wire(#[from] wire::Error),
    #[error("{0}")]
    Invalid(String),
    /// The blocking task that ran the TPM operation was cancelled or panicked.
    #[error("TPM task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    #[error("the public area given for persistent handle {0:#010x} is not the key there")]
    PublicMismatch(u32),
}

type Result<T> = std::result::Result<T, DeviceError>;

fn step(step: &'static str) -> impl FnOnce(tss_esapi::Error) -> DeviceError {
    move |source| DeviceError::Tpm { step, source }
}

/// Runs a TPM command again when the TPM asks for it (TPM_RC_RETRY, TPM_RC_YIELDED,
/// TPM_RC_TESTING), a few times with a growing pause. Nothing else is retried: an authorization
/// failure must never be repeated (dictionary-attack lockout).
fn retrying<T>(
    mut f: impl FnMut() -> std::result::Result<T, tss_esapi::Error>,
) -> std::result::Result<T, tss_esapi::Error> {
    use tss_esapi::constants::response_code::Tss2ResponseCodeKind as K;
    let mut attempt = 0u64;
    loop {
        match f() {
            Err(tss_esapi::Error::Tss2Error(rc))
                if attempt < 5 && matches!(rc.kind(), Some(K::Retry | K::Yielded | K::Testing)) =>
            {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(20 * attempt));
            }
            r => return r,
        }
    }
}

/// Which default EK template (TCG EK Credential Profile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EkAlg {
    /// RSA-2048, template L-1 (certificate at NV 0x01c00002).
    Rsa2048,
    /// ECC P-256, template L-2 (NV 0x01c0000a).
    EccP256,
    /// ECC P-384, high-range template H-3 (NV 0x01c00016).
    EccP384,
    /// RSA-3072, high-range template H-4 (NV 0x01c0001c).
    Rsa3072,
}

impl EkAlg {
    fn selection(self) -> AsymmetricAlgorithmSelection {
        match self {
            EkAlg::Rsa2048 => AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            EkAlg::EccP256 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            EkAlg::EccP384 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP384),
            EkAlg::Rsa3072 => AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa3072),
        }
    }
}

/// A TPM-resident key (e.g. a DevID) as blobs: its TPMT_PUBLIC and TPM-wrapped private part,
/// both without TPM2B size prefixes (SPIRE's format), and its authorization value (empty for
/// none; never printed).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct KeyBlob {
    pub public: Vec<u8>,
    pub private: Vec<u8>,
    pub auth: Vec<u8>,
}

impl std::fmt::Debug for KeyBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyBlob")
            .field("public_len", &self.public.len())
            .field("has_auth", &!self.auth.is_empty())
            .finish_non_exhaustive()
    }
}

impl KeyBlob {
    /// Reads key blobs in SPIRE's format (no size prefix) or tpm2-tools' (TPM2B, with the 2-byte
    /// size): a blob whose first two bytes equal the length of the rest is taken as a TPM2B.
    pub fn from_files(public: &[u8], private: &[u8]) -> Self {
        KeyBlob {
            public: strip_tpm2b_if_present(public).to_vec(),
            private: strip_tpm2b_if_present(private).to_vec(),
            auth: vec![],
        }
    }
}

fn strip_tpm2b_if_present(b: &[u8]) -> &[u8] {
    if b.len() >= 2 && u16::from_be_bytes([b[0], b[1]]) as usize == b.len() - 2 {
        &b[2..]
    } else {
        b
    }
}

/// An attestation key as blobs (TPMT_PUBLIC and the TPM-wrapped private part), and the
/// parent it loads under.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AkBlob {
    pub public: Vec<u8>,
    pub private: Vec<u8>,
    pub parent: AkParent,
}

/// What [`Device::prove_with_persistent_ak`] returns: TPMT_SIGNATURE of the DevID key over
/// the message, TPMS_ATTEST and TPMT_SIGNATURE of the certify and of the quote, and the PCR
/// values quoted.
#[derive(Debug, Clone)]
pub struct PersistentAkProof {
    pub signature: Vec<u8>,
    pub certify: Vec<u8>,
    pub certify_signature: Vec<u8>,
    pub quote: Vec<u8>,
    pub quote_signature: Vec<u8>,
    pub pcr_values: wire::attest::PcrValues,
}

/// Where an AK lives: under the EK (tss-esapi's AK, loaded with the EK policy) or under the
/// SRK (SPIRE's: go-tpm-tools `AKTemplateRSA`, template `AK_RSA`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AkParent {
    #[default]
    Ek,
    Srk,
}

pub struct Device {
    ctx: tss_esapi::Context,
    /// Whether the owner and endorsement hierarchies have an authorization value set
    /// ([`Device::set_hierarchy_auth`]): then their commands use an HMAC session.
    owner_auth: bool,
    endorsement_auth: bool,
    /// ESYS handles of persistent objects opened so far (each open costs a TPM2_ReadPublic).
    persistents: std::collections::HashMap<u32, KeyHandle>,
    /// This opening of the TPM, among the process's (see [`Held`]).
    id: u64,
    /// Objects held for callers (their numbers and handles), and how many were ever held.
    held: Vec<(u64, KeyHandle)>,
    held_count: u64,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Device")
    }
}

impl Device {
    /// Opens the TPM named by `tcti` and flushes transient objects a crashed process left.
    pub fn open(tcti: &str) -> Result<Self> {
        let conf =
            TctiNameConf::from_str(tcti).map_err(|_| DeviceError::BadTcti(tcti.to_string()))?;
        let ctx = tss_esapi::Context::new(conf).map_err(|source| DeviceError::Open {
            tcti: tcti.to_string(),
            source,
        })?;
        let mut d = Device {
            ctx,
            owner_auth: false,
            endorsement_auth: false,
            persistents: Default::default(),
            id: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            },
            held: vec![],
            held_count: 0,
        };
        d.flush_transients()?;
        Ok(d)
    }

    /// Runs `f` authorizing its one object or hierarchy: with an HMAC session when that
    /// authorization value is `secret` (non-empty: it never crosses the bus), else with a
    /// password session. An HMAC session over an empty value protects nothing and costs a
    /// StartAuthSession and a FlushContext per command, which go-tpm (SPIRE) never sends.
    fn exec_auth<T>(
        &mut self,
        secret: bool,
        f: impl FnOnce(&mut tss_esapi::Context) -> tss_esapi::Result<T>,
    ) -> tss_esapi::Result<T> {
        if secret {
            self.ctx.execute_with_nullauth_session(f)
        } else {
            self.ctx
                .execute_with_session(Some(AuthSession::Password), f)
        }
    }

    fn flush_transients(&mut self) -> Result<()> {
        let (caps, _) = self
            .ctx
            .get_capability(CapabilityType::Handles, 0x8000_0000, 16)
            .map_err(step("get_capability(handles)"))?;
        if let CapabilityData::Handles(handles) = caps {
            for h in handles.iter() {
                let obj = self
                    .ctx
                    .execute_without_session(|c| c.tr_from_tpm_public(*h))
                    .map_err(step("tr_from_tpm_public"))?;
                self.ctx.flush_context(obj).map_err(step("flush_context"))?;
            }
        }
        Ok(())
    }

    fn flush(&mut self, h: KeyHandle) {
        let _ = self.ctx.flush_context(ObjectHandle::from(h));
    }
}

/// A [`Device`] shared by async code: each operation runs on tokio's blocking pool, one at a
/// time (the TPM and its three transient slots are one resource), never on the async runtime.
#[derive(Debug, Clone)]
pub struct SharedDevice {
    inner: std::sync::Arc<std::sync::Mutex<Device>>,
}

impl SharedDevice {
    /// Opens the TPM named by `tcti` on the blocking pool.
    pub async fn open(tcti: &str) -> Result<Self> {
        let tcti = tcti.to_string();
        let d = tokio::task::spawn_blocking(move || Device::open(&tcti))
            .await
            .map_err(DeviceError::Task)??;
        Ok(SharedDevice {
            inner: std::sync::Arc::new(std::sync::Mutex::new(d)),
        })
    }

    /// Runs `f` with exclusive use of the TPM on the blocking pool.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Device) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut d = inner
                .lock()
                .map_err(|_| DeviceError::Invalid("an earlier TPM operation panicked".into()))?;
            f(&mut d)
        })
        .await
        .map_err(DeviceError::Task)?
    }
}

/// The ESYS C library under tss-esapi prints every failed TPM command to stderr, and only
/// its `TSS2_LOG` environment variable (read by the library itself) quiets it; the errors
/// this crate returns carry the same response code, decoded, with their context. Unless the
/// operator set `TSS2_LOG`, this replaces the process with itself (same pid, arguments and
/// environment) with `TSS2_LOG=all+NONE`, so each TPM error is printed once. Call it first
/// thing in `main` of a binary that opens a TPM; it returns only when it cannot re-execute
/// (then the library's lines stay). Nothing else is changed.
pub fn quiet_esys_stderr() {
    use std::os::unix::process::CommandExt as _;
    if std::env::var_os("TSS2_LOG").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    // exec returns only on failure: the process then goes on as it is.
    let _ = std::process::Command::new(&exe)
        .arg0(arg0)
        .args(args)
        .env("TSS2_LOG", "all+NONE")
        .exec();
}
