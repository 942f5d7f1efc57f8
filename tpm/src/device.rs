//! The only code that talks to a TPM (feature `device`, tss-esapi 7.7 over libtss2). Opens a
//! TPM by TCTI string (`device:/dev/tpmrm0`, `swtpm:host=H,port=P`, `tabrmd:`), flushes
//! leftover transient objects at open, and runs one operation at a time with at most two
//! transient objects loaded (EK and AK), flushing them afterwards: a TPM without a resource
//! manager has only three slots. Calls block; async callers run them with `spawn_blocking`.
//! Results come back as wire bytes that [`crate::wire`] parses and verifies.

use crate::wire::{self, Public};
use std::str::FromStr;
use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, ak, ek};
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

/// One variant per failed step, so an operator knows which TPM command failed.
#[derive(Debug, thiserror::Error)]
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

/// One attestation with an EK and an AK made for it: the DevID key, the EK and the AK loaded
/// once, from message 1 to the answer, as SPIRE keeps them (three transient objects, the most
/// a TPM must hold). [`Device::begin_attestation`] makes it, [`Device::answer_attestation`]
/// uses it and [`Device::end_attestation`] flushes it; objects a dead process left behind are
/// flushed by the next [`Device::open`].
#[derive(Debug)]
pub struct LoadedAttestation {
    /// The [`Device`] the handles belong to, and which of its attestations this is.
    device: u64,
    number: u64,
    ek: KeyHandle,
    ak: KeyHandle,
    devid: KeyHandle,
    devid_secret: bool,
    pub ek_alg: EkAlg,
    /// The AK made under the EK (its TPMT_PUBLIC is AKPub).
    pub ak_blob: AkBlob,
    /// The EK's TPMT_PUBLIC.
    pub ek_public: Vec<u8>,
    /// TPM2_Certify of the DevID by the AK with empty qualifying data: (TPMS_ATTEST,
    /// TPMT_SIGNATURE).
    pub certify: (Vec<u8>, Vec<u8>),
}

/// What [`Device::answer_attestation`] returns: the DevID's TPMT_SIGNATURE over the nonce,
/// the activated credential, and with PCRs asked for (Kame v2) the certify and quote bound to
/// the nonce and the PCR values.
#[derive(Debug, Clone)]
pub struct AttestationAnswer {
    pub signature: Vec<u8>,
    pub credential: Vec<u8>,
    pub v2: Option<PersistentAkProof>,
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
    /// This opening of the TPM, among the process's (see [`LoadedAttestation`]).
    id: u64,
    /// The attestation whose objects are loaded (its number and handles): one at a time, so
    /// that one never answered cannot fill the TPM's object slots.
    attestation: Option<(u64, [KeyHandle; 3])>,
    attestations: u64,
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
            attestation: None,
            attestations: 0,
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

    fn create_ek(&mut self, alg: EkAlg) -> Result<KeyHandle> {
        let public = ek::create_ek_public_from_default_template_2(alg.selection(), None)
            .map_err(step("EK template"))?;
        self.create_endorsement_primary(public, "create EK")
    }

    /// TPM2_CreatePrimary in the endorsement hierarchy (retried while the TPM asks).
    fn create_endorsement_primary(
        &mut self,
        public: tss_esapi::structures::Public,
        what: &'static str,
    ) -> Result<KeyHandle> {
        let secret = self.endorsement_auth;
        retrying(|| {
            self.exec_auth(secret, |c| {
                c.create_primary(
                    tss_esapi::interface_types::resource_handles::Hierarchy::Endorsement,
                    public.clone(),
                    None,
                    None,
                    None,
                    None,
                )
            })
        })
        .map(|r| r.key_handle)
        .map_err(step(what))
    }

    /// The EK public area from the default template.
    pub fn ek_public(&mut self, alg: EkAlg) -> Result<Public> {
        let h = self.create_ek(alg)?;
        let r = self.ctx.read_public(h).map_err(step("read EK public"));
        self.flush(h);
        let (public, _, _) = r?;
        Ok(Public::parse(
            &public.marshall().map_err(step("marshal EK public"))?,
        )?)
    }

    /// The EK certificate (DER) from its NV index, or None when the TPM has none. Read as
    /// go-tpm reads it: the NV buffer size, the index's public area, then NV_Read in chunks
    /// under the index's own (empty) authorization in a password session.
    pub fn ek_certificate(&mut self, alg: EkAlg) -> Result<Option<Vec<u8>>> {
        let index = match alg {
            EkAlg::Rsa2048 => 0x01c0_0002,
            EkAlg::EccP256 => 0x01c0_000a,
            EkAlg::EccP384 => 0x01c0_0016,
            EkAlg::Rsa3072 => 0x01c0_001c,
        };
        let idx = tss_esapi::handles::NvIndexTpmHandle::new(index).map_err(step("NV index"))?;
        let (caps, _) = self
            .ctx
            .get_capability(
                CapabilityType::TpmProperties,
                tss_esapi::constants::PropertyTag::NvBufferMax.into(),
                1,
            )
            .map_err(step("get_capability(NV_BUFFER_MAX)"))?;
        let chunk = match caps {
            CapabilityData::TpmProperties(list) => list
                .find(tss_esapi::constants::PropertyTag::NvBufferMax)
                .map(|p| p.value()),
            _ => None,
        }
        .and_then(|v| u16::try_from(v).ok())
        .filter(|v| *v > 0)
        .unwrap_or(512);
        // ESYS reads the index's public area (TPM2_NV_ReadPublic) to make the handle.
        let nv = match self
            .ctx
            .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::NvIndex(idx)))
        {
            Ok(h) => h,
            Err(tss_esapi::Error::Tss2Error(_)) => return Ok(None),
            Err(e) => return Err(step("open EK certificate NV index")(e)),
        };
        let r = self.nv_read_whole(tss_esapi::handles::NvIndexHandle::from(nv), chunk);
        let mut nv = nv;
        let _ = self.ctx.tr_close(&mut nv);
        let data = r?;
        Ok(Some(trim_der(&data)?))
    }

    /// The whole contents of the NV index `nvh` (its size from its public area), read in
    /// `chunk`-byte NV_Reads under the index's own empty authorization, as go-tpm reads it.
    fn nv_read_whole(
        &mut self,
        nvh: tss_esapi::handles::NvIndexHandle,
        chunk: u16,
    ) -> Result<Vec<u8>> {
        let size = self
            .ctx
            .execute_without_session(|c| c.nv_read_public(nvh))
            .map_err(step("NV_ReadPublic"))?
            .0
            .data_size();
        let mut data = Vec::with_capacity(size);
        while data.len() < size {
            let offset = u16::try_from(data.len())
                .map_err(|_| DeviceError::Invalid("NV index larger than 64 KiB".into()))?;
            let n = chunk.min(u16::try_from(size - data.len()).unwrap_or(chunk));
            let b = self
                .exec_auth(false, |c| {
                    c.nv_read(
                        tss_esapi::interface_types::resource_handles::NvAuth::NvIndex(nvh),
                        nvh,
                        n,
                        offset,
                    )
                })
                .map_err(step("NV_Read"))?;
            if b.is_empty() {
                return Err(DeviceError::Invalid("NV_Read returned nothing".into()));
            }
            data.extend_from_slice(b.value());
        }
        Ok(data)
    }

    /// EK chain certificates (issuer certificates up to the vendor root) from the TCG EK
    /// certificate chain NV range 0x01c00100..=0x01c001ff, in index order; each index may hold
    /// several concatenated DER certificates. Empty when the TPM has none.
    pub fn ek_chain_certificates(&mut self) -> Result<Vec<Vec<u8>>> {
        let (caps, _) = self
            .ctx
            .get_capability(CapabilityType::Handles, 0x01c0_0100, 256)
            .map_err(step("get_capability(NV indices)"))?;
        let CapabilityData::Handles(handles) = caps else {
            return Ok(vec![]);
        };
        let mut out = vec![];
        for h in handles.iter() {
            let raw = u32::from(*h);
            if !(0x01c0_0100..=0x01c0_01ff).contains(&raw) {
                continue;
            }
            let idx = tss_esapi::handles::NvIndexTpmHandle::new(raw).map_err(step("NV index"))?;
            let auth = self
                .ctx
                .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::NvIndex(idx)))
                .map_err(step("open NV index"))?;
            let data = self
                .exec_auth(false, |c| {
                    tss_esapi::abstraction::nv::read_full(
                        c,
                        tss_esapi::interface_types::resource_handles::NvAuth::NvIndex(auth.into()),
                        idx,
                    )
                })
                .map_err(step("read EK chain NV index"))?;
            let mut rest: &[u8] = &data;
            while rest.first() == Some(&0x30) {
                let cert = trim_der(rest)?;
                rest = &rest[cert.len()..];
                out.push(cert);
            }
        }
        Ok(out)
    }

    /// Creates an attestation key under the EK (restricted signing, SHA-256).
    pub fn create_ak(&mut self, ek_alg: EkAlg, ecc: bool) -> Result<AkBlob> {
        let ekh = self.create_ek(ek_alg)?;
        let (key_alg, sig) = if ecc {
            (
                AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
                SignatureSchemeAlgorithm::EcDsa,
            )
        } else {
            (
                AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
                SignatureSchemeAlgorithm::RsaSsa,
            )
        };
        let r = ak::create_ak_2(
            &mut self.ctx,
            ekh,
            HashingAlgorithm::Sha256,
            key_alg,
            sig,
            None,
            None,
        )
        .map_err(step("create AK"));
        self.flush(ekh);
        let r = r?;
        Ok(AkBlob {
            public: r.out_public.marshall().map_err(step("marshal AK public"))?,
            private: r.out_private.value().to_vec(),
            parent: AkParent::Ek,
        })
    }

    /// Runs `f` with the EK and the AK loaded, then flushes both.
    fn with_ak<T>(
        &mut self,
        ek_alg: EkAlg,
        blob: &AkBlob,
        f: impl FnOnce(&mut Self, KeyHandle, KeyHandle) -> Result<T>,
    ) -> Result<T> {
        // SPIRE's AK loads under a temporary SRK first, so that at most three objects are
        // ever loaded (a DevID being certified, the AK, then the EK).
        if blob.parent == AkParent::Srk {
            let key = KeyBlob {
                public: blob.public.clone(),
                private: blob.private.clone(),
                auth: vec![],
            };
            let akh = self.load_under_srk(&key)?;
            let ekh = match self.create_ek(ek_alg) {
                Ok(h) => h,
                Err(e) => {
                    self.flush(akh);
                    return Err(e);
                }
            };
            let r = f(self, ekh, akh);
            self.flush(akh);
            self.flush(ekh);
            return r;
        }
        let ekh = self.create_ek(ek_alg)?;
        let public = tss_esapi::structures::Public::unmarshall(&blob.public)
            .map_err(step("unmarshal AK public"));
        let private = Private::try_from(blob.private.clone()).map_err(step("AK private blob"));
        let loaded = match (public, private) {
            (Ok(p), Ok(k)) => ak::load_ak(&mut self.ctx, ekh, None, k, p).map_err(step("load AK")),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        let akh = match loaded {
            Ok(h) => h,
            Err(e) => {
                self.flush(ekh);
                return Err(e);
            }
        };
        let r = f(self, ekh, akh);
        self.flush(akh);
        self.flush(ekh);
        r
    }

    /// TPM2_Quote over SHA-256 PCRs `pcrs` with `nonce`; returns (TPMS_ATTEST, TPMT_SIGNATURE).
    pub fn quote(
        &mut self,
        ek_alg: EkAlg,
        blob: &AkBlob,
        pcrs: &[u32],
        nonce: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        self.with_ak(ek_alg, blob, |d, _ek, akh| d.quote_with(akh, pcrs, nonce))
    }

    /// TPM2_Quote with an AK persisted at `handle` (see [`Device::persist_ak`]).
    pub fn quote_persistent(
        &mut self,
        handle: u32,
        pcrs: &[u32],
        nonce: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let akh = self.persistent(handle)?;
        self.quote_with(akh, pcrs, nonce)
    }

    fn quote_with(
        &mut self,
        akh: KeyHandle,
        pcrs: &[u32],
        nonce: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let sel = pcr_selection(pcrs)?;
        let data = Data::try_from(nonce.to_vec()).map_err(step("nonce"))?;
        // A password session: the AK's authorization is empty and nothing in a quote is
        // secret, so an HMAC session would only cost two more TPM commands.
        let (attest, sig) = retrying(|| {
            self.ctx
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.quote(akh, data.clone(), SignatureScheme::Null, sel.clone())
                })
        })
        .map_err(step("quote"))?;
        Ok((
            attest.marshall().map_err(step("marshal attest"))?,
            sig.marshall().map_err(step("marshal signature"))?,
        ))
    }

    /// The ESYS handle of the persistent object at `handle`, opened once per [`Device`].
    fn persistent(&mut self, handle: u32) -> Result<KeyHandle> {
        if let Some(h) = self.persistents.get(&handle) {
            return Ok(*h);
        }
        let ph = PersistentTpmHandle::new(handle).map_err(step("persistent handle"))?;
        let h = self
            .ctx
            .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(ph)))
            .map(KeyHandle::from)
            .map_err(step("open persistent handle"))?;
        self.persistents.insert(handle, h);
        Ok(h)
    }

    /// Closes the ESYS handles of persistent objects opened so far (no TPM command): the next
    /// use opens them afresh, as an object may have been evicted and replaced meanwhile.
    pub fn forget_persistents(&mut self) {
        for (_, h) in self.persistents.drain() {
            let mut o = ObjectHandle::from(h);
            let _ = self.ctx.tr_close(&mut o);
        }
    }

    /// `public` (a TPMT_PUBLIC from a file) when it is the public area of the persistent
    /// object at `handle`: its Name (a hash over the whole public area) must equal the Name
    /// the TPM gave for the handle. Costs no TPM command beyond opening the handle, where
    /// [`Device::persistent_public`] costs a TPM2_ReadPublic more.
    pub fn persistent_public_matching(&mut self, handle: u32, public: &[u8]) -> Result<Vec<u8>> {
        let want = Public::parse(public)?.name()?;
        let kh = self.persistent(handle)?;
        let name = self
            .ctx
            .tr_get_name(ObjectHandle::from(kh))
            .map_err(step("name of persistent object"))?;
        if name.value() != want.as_slice() {
            return Err(DeviceError::PublicMismatch(handle));
        }
        Ok(public.to_vec())
    }

    /// Persists a key made by [`Device::create_under_srk`] at `handle` (owner range), e.g. an
    /// LDevID key, so that using it needs no SRK and no load. An occupied handle is an error;
    /// nothing is replaced.
    pub fn persist_key(&mut self, key: &KeyBlob, handle: u32) -> Result<()> {
        let ph = self.free_persistent_handle(handle)?;
        let kh = self.load_under_srk(key)?;
        let r = self.evict_control(ObjectHandle::from(kh), ph, "persist key (EvictControl)");
        self.flush(kh);
        r
    }

    /// `handle` as a persistent handle, refused when an object sits there already: nothing is
    /// ever replaced.
    fn free_persistent_handle(&mut self, handle: u32) -> Result<PersistentTpmHandle> {
        let ph = PersistentTpmHandle::new(handle).map_err(step("persistent handle"))?;
        if self.persistent_handles()?.contains(&handle) {
            return Err(DeviceError::Invalid(format!(
                "persistent handle {handle:#010x} is in use"
            )));
        }
        Ok(ph)
    }

    /// TPM2_EvictControl under the owner authorization: persists the transient `obj` at `ph`,
    /// or removes `obj` when it is the persistent object there.
    fn evict_control(
        &mut self,
        obj: ObjectHandle,
        ph: PersistentTpmHandle,
        what: &'static str,
    ) -> Result<()> {
        let secret = self.owner_auth;
        self.exec_auth(secret, |c| {
            c.evict_control(Provision::Owner, obj, Persistent::Persistent(ph))
        })
        .map(|_| ())
        .map_err(step(what))
    }

    /// Persists the AK at `handle` (owner range 0x81000000..=0x817fffff). An occupied handle is
    /// an error; nothing is replaced.
    pub fn persist_ak(&mut self, ek_alg: EkAlg, blob: &AkBlob, handle: u32) -> Result<()> {
        let ph = self.free_persistent_handle(handle)?;
        self.with_ak(ek_alg, blob, |d, _ek, akh| {
            d.evict_control(ObjectHandle::from(akh), ph, "persist AK (EvictControl)")
        })
    }

    /// Removes the persistent object at `handle`.
    pub fn evict_persistent(&mut self, handle: u32) -> Result<()> {
        let ph = PersistentTpmHandle::new(handle).map_err(step("persistent handle"))?;
        let obj = self.persistent(handle)?;
        self.evict_control(
            ObjectHandle::from(obj),
            ph,
            "evict persistent object (EvictControl)",
        )?;
        self.persistents.remove(&handle);
        Ok(())
    }

    /// The persistent object handles in use.
    pub fn persistent_handles(&mut self) -> Result<Vec<u32>> {
        let (caps, _) = self
            .ctx
            .get_capability(CapabilityType::Handles, 0x8100_0000, 64)
            .map_err(step("get_capability(persistent handles)"))?;
        Ok(match caps {
            CapabilityData::Handles(h) => h.iter().map(|t| u32::from(*t)).collect(),
            _ => vec![],
        })
    }

    /// Current SHA-256 PCR values.
    pub fn pcr_values(&mut self, pcrs: &[u32]) -> Result<wire::attest::PcrValues> {
        let mut out = wire::attest::PcrValues::new();
        for chunk in pcrs.chunks(8) {
            let sel = pcr_selection(chunk)?;
            let (_, _, digests) = self
                .ctx
                .execute_without_session(|c| c.pcr_read(sel))
                .map_err(step("pcr_read"))?;
            let mut sorted = chunk.to_vec();
            sorted.sort_unstable();
            for (i, d) in sorted.iter().zip(digests.value()) {
                out.insert((wire::alg::SHA256, *i), d.value().to_vec());
            }
        }
        Ok(out)
    }

    /// The storage root key from SPIRE's exact SRK_HIGH template (RSA-2048 or ECC P-256,
    /// empty unique): DevID blobs provisioned for SPIRE load under it.
    pub fn create_srk(&mut self, ecc: bool) -> Result<KeyHandle> {
        let hex = if ecc {
            wire::public::templates::SRK_HIGH_ECC
        } else {
            wire::public::templates::SRK_HIGH_RSA
        };
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| DeviceError::Invalid("bad SRK template".into()))?;
        let public =
            tss_esapi::structures::Public::unmarshall(&bytes).map_err(step("SRK template"))?;
        let secret = self.owner_auth;
        self.exec_auth(secret, |c| {
            c.create_primary(
                tss_esapi::interface_types::resource_handles::Hierarchy::Owner,
                public,
                None,
                None,
                None,
                None,
            )
        })
        .map(|r| r.key_handle)
        .map_err(step("create SRK"))
    }

    /// The SRK's public area (to compare with other stacks).
    pub fn srk_public(&mut self, ecc: bool) -> Result<Public> {
        let h = self.create_srk(ecc)?;
        let r = self.ctx.read_public(h).map_err(step("read SRK public"));
        self.flush(h);
        Ok(Public::parse(
            &r?.0.marshall().map_err(step("marshal SRK public"))?,
        )?)
    }

    /// Creates a key under the SRK from an exact TPMT_PUBLIC template (e.g.
    /// [`wire::public::templates::AK_RSA`], `DEVID_RSA`, `DEVID_ECC`) with an empty password;
    /// the SRK matches the key type (RSA or ECC). Returns the blobs in SPIRE's format.
    pub fn create_under_srk(&mut self, template: &[u8]) -> Result<KeyBlob> {
        let public =
            tss_esapi::structures::Public::unmarshall(template).map_err(step("key template"))?;
        let srk = self.create_srk(key_is_ecc(template))?;
        // The SRK's authorization is empty (it is made with none).
        let r = retrying(|| {
            self.exec_auth(false, |c| {
                c.create(srk, public.clone(), None, None, None, None)
            })
        })
        .map_err(step("create key under SRK"));
        self.flush(srk);
        let r = r?;
        Ok(KeyBlob {
            public: r
                .out_public
                .marshall()
                .map_err(step("marshal key public"))?,
            private: r.out_private.value().to_vec(),
            auth: vec![],
        })
    }

    /// Loads a key blob under the SRK (SRK flushed afterwards; the key stays loaded).
    fn load_under_srk(&mut self, key: &KeyBlob) -> Result<KeyHandle> {
        let ecc = key_is_ecc(&key.public);
        let srk = self.create_srk(ecc)?;
        let public =
            tss_esapi::structures::Public::unmarshall(&key.public).map_err(step("key public blob"));
        let private = Private::try_from(key.private.clone()).map_err(step("key private blob"));
        let r = match (public, private) {
            (Ok(p), Ok(k)) => self
                .ctx
                // The SRK's authorization is empty and the private part is TPM-wrapped: a
                // password session does.
                .execute_with_session(Some(AuthSession::Password), |c| c.load(srk, k, p))
                .map_err(step("load key")),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        self.flush(srk);
        let kh = r?;
        if !key.auth.is_empty() {
            let auth = tss_esapi::structures::Auth::try_from(key.auth.clone())
                .map_err(step("key authorization value"));
            if let Err(e) = auth.and_then(|a| {
                self.ctx
                    .tr_set_auth(ObjectHandle::from(kh), a)
                    .map_err(step("set key authorization"))
            }) {
                self.flush(kh);
                return Err(e);
            }
        }
        Ok(kh)
    }

    /// Sets the owner and endorsement hierarchy authorization values used from now on (SRK
    /// and EK creation, the EK's PolicySecret). Empty means none. A wrong value fails once at
    /// the TPM and is never retried (dictionary-attack lockout).
    pub fn set_hierarchy_auth(&mut self, owner: &[u8], endorsement: &[u8]) -> Result<()> {
        for (h, v, what) in [
            (ObjectHandle::Owner, owner, "owner hierarchy authorization"),
            (
                ObjectHandle::Endorsement,
                endorsement,
                "endorsement hierarchy authorization",
            ),
        ] {
            let a = tss_esapi::structures::Auth::try_from(v.to_vec()).map_err(step(what))?;
            self.ctx.tr_set_auth(h, a).map_err(step(what))?;
        }
        self.owner_auth = !owner.is_empty();
        self.endorsement_auth = !endorsement.is_empty();
        Ok(())
    }

    /// TPM2_Certify of `key` (loaded under the SRK) by the AK, with `nonce` as qualifying data.
    /// Returns (TPMS_ATTEST, TPMT_SIGNATURE).
    pub fn certify(
        &mut self,
        ek_alg: EkAlg,
        ak: &AkBlob,
        key: &KeyBlob,
        nonce: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let data = Data::try_from(nonce.to_vec()).map_err(step("nonce"))?;
        let kh = self.load_under_srk(key)?;
        let secret = !key.auth.is_empty();
        let r = self.with_ak(ek_alg, ak, |d, _ek, akh| {
            d.certify_loaded(kh, secret, akh, data)
        });
        self.flush(kh);
        r
    }

    /// Signs `message` (hashed here with the key's scheme hash) with `key`; returns TPMT_SIGNATURE.
    pub fn sign(&mut self, key: &KeyBlob, message: &[u8]) -> Result<Vec<u8>> {
        let digest = message_digest(&key.public, message)?;
        self.sign_loaded_digest(key, digest)
    }

    /// Signs a precomputed digest with `key`; returns TPMT_SIGNATURE.
    pub fn sign_digest(&mut self, key: &KeyBlob, digest: &[u8]) -> Result<Vec<u8>> {
        let digest = Digest::try_from(digest.to_vec()).map_err(step("digest"))?;
        self.sign_loaded_digest(key, digest)
    }

    /// Loads `key` under the SRK, signs `digest`, and flushes it.
    fn sign_loaded_digest(&mut self, key: &KeyBlob, digest: Digest) -> Result<Vec<u8>> {
        let kh = self.load_under_srk(key)?;
        let r = self.sign_loaded(kh, !key.auth.is_empty(), digest);
        self.flush(kh);
        r
    }

    /// TPM2_Sign by the loaded key `kh`; `secret`: its authorization value is not empty.
    fn sign_loaded(&mut self, kh: KeyHandle, secret: bool, digest: Digest) -> Result<Vec<u8>> {
        let ticket = tss_esapi::structures::HashcheckTicket::try_from(
            tss_esapi::tss2_esys::TPMT_TK_HASHCHECK {
                tag: tss_esapi::constants::tss::TPM2_ST_HASHCHECK,
                hierarchy: tss_esapi::constants::tss::TPM2_RH_NULL,
                digest: Default::default(),
            },
        )
        .map_err(step("null hashcheck ticket"))?;
        retrying(|| {
            self.exec_auth(secret, |c| {
                c.sign(kh, digest.clone(), SignatureScheme::Null, ticket.clone())
            })
        })
        .map_err(step("sign"))
        .and_then(|s| s.marshall().map_err(step("marshal signature")))
    }

    /// The proof of a DevID key with a persistent attestation key (a TCG IAK or LAK): the
    /// DevID key (persistent at `devid_handle`, or else loaded once under the SRK) signs `message` (hashed with its scheme hash);
    /// the AK at `ak` certifies it and quotes the SHA-256 PCRs `pcrs`, both with `nonce` as
    /// qualifying data. No EK, no AK to create or load: the fewest TPM commands that prove a
    /// DevID key resident in this TPM now.
    pub fn prove_with_persistent_ak(
        &mut self,
        devid: &KeyBlob,
        devid_handle: Option<u32>,
        ak: u32,
        message: &[u8],
        nonce: &[u8],
        pcrs: &[u32],
    ) -> Result<PersistentAkProof> {
        let digest = message_digest(&devid.public, message)?;
        let data = Data::try_from(nonce.to_vec()).map_err(step("nonce"))?;
        let akh = self.persistent(ak)?;
        let kh = match devid_handle {
            Some(h) => {
                let kh = self.persistent(h)?;
                let auth = tss_esapi::structures::Auth::try_from(devid.auth.clone())
                    .map_err(step("key authorization value"))?;
                self.ctx
                    .tr_set_auth(ObjectHandle::from(kh), auth)
                    .map_err(step("set key authorization"))?;
                kh
            }
            None => self.load_under_srk(devid)?,
        };
        let r = self
            .sign_loaded(kh, !devid.auth.is_empty(), digest)
            .and_then(|signature| {
                let (certify, certify_signature) =
                    self.certify_loaded(kh, !devid.auth.is_empty(), akh, data)?;
                Ok((signature, certify, certify_signature))
            });
        if devid_handle.is_none() {
            self.flush(kh);
        }
        let (signature, certify, certify_signature) = r?;
        let (quote, quote_signature) = self.quote_with(akh, pcrs, nonce)?;
        Ok(PersistentAkProof {
            signature,
            certify,
            certify_signature,
            quote,
            quote_signature,
            pcr_values: self.pcr_values(pcrs)?,
        })
    }

    /// TPM2_Certify of the loaded `kh` by `signer` (empty authorization). The certified
    /// object is authorized in an HMAC session when its value is `secret` (it never crosses
    /// the bus), else in a password session.
    fn certify_loaded(
        &mut self,
        kh: KeyHandle,
        secret: bool,
        signer: KeyHandle,
        data: Data,
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let object_session = if secret {
            Some(self.hmac_session()?)
        } else {
            None
        };
        let r = self
            .ctx
            .execute_with_sessions(
                (
                    Some(object_session.unwrap_or(AuthSession::Password)),
                    Some(AuthSession::Password),
                    None,
                ),
                |c| c.certify(ObjectHandle::from(kh), signer, data, SignatureScheme::Null),
            )
            .map_err(step("certify"));
        if let Some(session) = object_session {
            self.flush_session(session);
        }
        r.and_then(|(a, s)| {
            Ok((
                a.marshall().map_err(step("marshal attest"))?,
                s.marshall().map_err(step("marshal signature"))?,
            ))
        })
    }

    /// An unsalted, unbound HMAC session (parameter encryption on), as ESYS's null-auth
    /// session: the object's authorization value keys the HMAC and is never sent. The caller
    /// flushes it.
    fn hmac_session(&mut self) -> Result<AuthSession> {
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Hmac,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(step("start HMAC session"))?
            .ok_or_else(|| DeviceError::Invalid("TPM returned no session".into()))?;
        let (attributes, mask) = tss_esapi::attributes::SessionAttributesBuilder::new()
            .with_decrypt(true)
            .with_encrypt(true)
            .build();
        if let Err(e) = self.ctx.tr_sess_set_attributes(session, attributes, mask) {
            self.flush_session(session);
            return Err(step("HMAC session attributes")(e));
        }
        Ok(session)
    }

    /// Creates a TCG DevID key (IAK or IDevID) as a primary key in the endorsement hierarchy
    /// from the TCG template ([`wire::public::tcg_devid_template`]) and persists it at
    /// `handle` (owner range; the TCG Provisioning Guidance §7.8 uses 0x81020000 for the
    /// IDevID). An occupied handle is an error; nothing is replaced. Returns its TPMT_PUBLIC.
    pub fn provision_tcg_key(
        &mut self,
        key: wire::policy::DevIdKey,
        ecc: bool,
        handle: u32,
    ) -> Result<Vec<u8>> {
        let ph = self.free_persistent_handle(handle)?;
        let template = wire::public::tcg_devid_template(key, ecc)?.marshal()?;
        let public =
            tss_esapi::structures::Public::unmarshall(&template).map_err(step("TCG template"))?;
        let kh = self.create_endorsement_primary(public, "create TCG DevID primary")?;
        let out = self
            .ctx
            .read_public(kh)
            .map_err(step("read TCG key public"))
            .and_then(|(p, _, _)| p.marshall().map_err(step("marshal TCG key public")));
        let persisted = out.and_then(|out| {
            self.evict_control(ObjectHandle::from(kh), ph, "persist TCG key (EvictControl)")
                .map(|_| out)
        });
        self.flush(kh);
        persisted
    }

    /// The TPMT_PUBLIC of the persistent object at `handle`.
    pub fn persistent_public(&mut self, handle: u32) -> Result<Vec<u8>> {
        let kh = self.persistent(handle)?;
        let (p, _, _) = self.ctx.read_public(kh).map_err(step("read public"))?;
        p.marshall().map_err(step("marshal public"))
    }

    /// A policy session satisfying a TCG DevID key's policy for `code` (its ADMIN-role
    /// branch): PolicySecret(endorsement), PolicyCommandCode(code), PolicyOR over the four
    /// branches. The caller flushes it.
    fn tcg_admin_session(
        &mut self,
        key: wire::policy::DevIdKey,
        code: tss_esapi::constants::CommandCode,
    ) -> Result<tss_esapi::interface_types::session_handles::AuthSession> {
        let branches = wire::policy::tcg_devid_policy_branches(key, wire::alg::SHA256)?;
        let (session, ps) = self.endorsement_policy_session(HashingAlgorithm::Sha256)?;
        let r = self
            .ctx
            .execute_without_session(|c| c.policy_command_code(ps, code))
            .map_err(step("PolicyCommandCode"))
            .and_then(|_| self.policy_or_branches(ps, &branches, "PolicyOR (TCG DevID policy)"));
        if let Err(e) = r {
            self.flush_session(session);
            return Err(e);
        }
        Ok(session)
    }

    /// A policy session (`hash`) after TPM2_PolicySecret(TPM_RH_ENDORSEMENT) under the
    /// endorsement authorization: what EKs and the TCG DevID keys' policies start with. The
    /// caller flushes it; it is flushed here if PolicySecret fails.
    fn endorsement_policy_session(
        &mut self,
        hash: HashingAlgorithm,
    ) -> Result<(AuthSession, PolicySession)> {
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                hash,
            )
            .map_err(step("start policy session"))?
            .ok_or_else(|| DeviceError::Invalid("TPM returned no session".into()))?;
        let r = PolicySession::try_from(session)
            .map_err(step("policy session"))
            .and_then(|ps| self.policy_secret_endorsement(ps).map(|_| ps));
        match r {
            Ok(ps) => Ok((session, ps)),
            Err(e) => {
                self.flush_session(session);
                Err(e)
            }
        }
    }

    /// TPM2_PolicySecret(TPM_RH_ENDORSEMENT) in `ps`, under the endorsement authorization.
    fn policy_secret_endorsement(&mut self, ps: PolicySession) -> Result<()> {
        let secret = self.endorsement_auth;
        self.exec_auth(secret, |c| {
            c.policy_secret(
                ps,
                AuthHandle::Endorsement,
                Nonce::default(),
                Digest::default(),
                Nonce::default(),
                None,
            )
        })
        .map(|_| ())
        .map_err(step("PolicySecret(endorsement)"))
    }

    /// TPM2_PolicyOR over `branches` in `ps`.
    fn policy_or_branches(
        &mut self,
        ps: PolicySession,
        branches: &[Vec<u8>],
        what: &'static str,
    ) -> Result<()> {
        let mut list = tss_esapi::structures::DigestList::new();
        for b in branches {
            let dg = Digest::try_from(b.clone()).map_err(step("policy digest"))?;
            list.add(dg).map_err(step("policy digest list"))?;
        }
        self.ctx
            .execute_without_session(|c| c.policy_or(ps, list))
            .map_err(step(what))
    }

    fn flush_session(&mut self, s: AuthSession) {
        let _ = self.ctx.flush_context(SessionHandle::from(s).into());
    }

    /// TPM2_Certify of the TCG key at `object` (its ADMIN role through the policy's Certify
    /// branch) by the key at `signer` (USER role, empty password), with `nonce` as qualifying
    /// data. Returns (TPMS_ATTEST, TPMT_SIGNATURE).
    pub fn certify_tcg(
        &mut self,
        object: u32,
        object_key: wire::policy::DevIdKey,
        signer: u32,
        nonce: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let data = Data::try_from(nonce.to_vec()).map_err(step("nonce"))?;
        let oh = self.persistent(object)?;
        let sh = self.persistent(signer)?;
        let session =
            self.tcg_admin_session(object_key, tss_esapi::constants::CommandCode::Certify)?;
        let r = self
            .ctx
            .execute_with_sessions((Some(session), Some(AuthSession::Password), None), |c| {
                c.certify(ObjectHandle::from(oh), sh, data, SignatureScheme::Null)
            })
            .map_err(step("certify (TCG policy)"))
            .and_then(|(a, s)| {
                Ok((
                    a.marshall().map_err(step("marshal attest"))?,
                    s.marshall().map_err(step("marshal signature"))?,
                ))
            });
        self.flush_session(session);
        r
    }

    /// TPM2_Certify of `key` (loaded under the SRK, empty password) by the persistent key at
    /// `signer` (a TCG IAK, USER role, empty password), with `nonce` as qualifying data: an
    /// LDevID key certified by the IAK. Returns (TPMS_ATTEST, TPMT_SIGNATURE).
    pub fn certify_by_persistent(
        &mut self,
        key: &KeyBlob,
        signer: u32,
        nonce: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let data = Data::try_from(nonce.to_vec()).map_err(step("nonce"))?;
        let sh = self.persistent(signer)?;
        let kh = self.load_under_srk(key)?;
        let r = self.certify_loaded(kh, !key.auth.is_empty(), sh, data);
        self.flush(kh);
        r
    }

    /// Signs `message` with the persistent unrestricted key at `handle` (USER role, empty
    /// password): SHA-256, RSASSA for RSA keys without a scheme, else the key's scheme.
    /// Returns TPMT_SIGNATURE.
    pub fn sign_persistent(&mut self, handle: u32, message: &[u8]) -> Result<Vec<u8>> {
        let public = Public::parse(&self.persistent_public(handle)?)?;
        let digest =
            Digest::try_from(wire::hash(wire::alg::SHA256, message)?).map_err(step("digest"))?;
        let scheme = if public.is_rsa() && public.scheme().scheme == wire::alg::NULL {
            SignatureScheme::RsaSsa {
                hash_scheme: tss_esapi::structures::HashScheme::new(HashingAlgorithm::Sha256),
            }
        } else {
            SignatureScheme::Null
        };
        let ticket = tss_esapi::structures::HashcheckTicket::try_from(
            tss_esapi::tss2_esys::TPMT_TK_HASHCHECK {
                tag: tss_esapi::constants::tss::TPM2_ST_HASHCHECK,
                hierarchy: tss_esapi::constants::tss::TPM2_RH_NULL,
                digest: Default::default(),
            },
        )
        .map_err(step("null hashcheck ticket"))?;
        let kh = self.persistent(handle)?;
        retrying(|| {
            self.exec_auth(false, |c| {
                c.sign(kh, digest.clone(), scheme, ticket.clone())
            })
        })
        .map_err(step("sign"))
        .and_then(|s| s.marshall().map_err(step("marshal signature")))
    }

    /// TPM2_ActivateCredential with the persistent TCG IAK at `iak` (ADMIN role through the
    /// policy's ActivateCredential branch) under this TPM's EK: the answer to a CA's
    /// enrollment challenge. `credential_blob` and `secret` are TPM2B_ID_OBJECT and
    /// TPM2B_ENCRYPTED_SECRET.
    pub fn activate_credential_tcg(
        &mut self,
        ek_alg: EkAlg,
        iak: u32,
        credential_blob: &[u8],
        secret: &[u8],
    ) -> Result<Vec<u8>> {
        if matches!(ek_alg, EkAlg::EccP384 | EkAlg::Rsa3072) {
            return Err(DeviceError::Invalid(
                "TCG IAK credential activation uses a low-range (SHA-256) EK".into(),
            ));
        }
        let (id, es) = credential_parts(credential_blob, secret)?;
        let iakh = self.persistent(iak)?;
        let iak_session = self.tcg_admin_session(
            wire::policy::DevIdKey::Iak,
            tss_esapi::constants::CommandCode::ActivateCredential,
        )?;
        let ekh = match self.create_ek(ek_alg) {
            Ok(h) => h,
            Err(e) => {
                self.flush_session(iak_session);
                return Err(e);
            }
        };
        let r = self
            .endorsement_policy_session(HashingAlgorithm::Sha256)
            .and_then(|(ek_session, _)| {
                let r = self
                    .ctx
                    .execute_with_sessions((Some(iak_session), Some(ek_session), None), |c| {
                        c.activate_credential(iakh, ekh, id, es)
                    })
                    .map_err(step("ActivateCredential (TCG IAK)"));
                self.flush_session(ek_session);
                r
            });
        self.flush_session(iak_session);
        self.flush(ekh);
        Ok(r?.value().to_vec())
    }

    /// A policy session satisfying the EK's authPolicy: PolicySecret(TPM_RH_ENDORSEMENT)
    /// (policy A), and for the high-range templates (SHA-384 nameAlg) PolicyOR(A, C) on top
    /// (policy B). The caller flushes it.
    fn ek_policy_session(&mut self, ek_alg: EkAlg) -> Result<AuthSession> {
        let (session_hash, branches) = ek_policy(ek_alg)?;
        let (session, ps) = self.endorsement_policy_session(session_hash)?;
        if let Some(b) = &branches
            && let Err(e) = self.policy_or_branches(ps, b, "PolicyOR(A, C)")
        {
            self.flush_session(session);
            return Err(e);
        }
        Ok(session)
    }

    /// Satisfies the EK's authPolicy again in a policy session already used once (a policy
    /// session's digest starts over after each command).
    fn renew_ek_policy(&mut self, session: AuthSession, ek_alg: EkAlg) -> Result<()> {
        let ps = PolicySession::try_from(session).map_err(step("policy session"))?;
        self.policy_secret_endorsement(ps)?;
        if let (_, Some(b)) = ek_policy(ek_alg)? {
            self.policy_or_branches(ps, &b, "PolicyOR(A, C)")?;
        }
        Ok(())
    }

    /// TPM2_ActivateCredential of the loaded AK under the loaded EK: the AK (ADMIN role) with
    /// its empty password, the EK (USER role) through its policy.
    fn activate_loaded(
        &mut self,
        akh: KeyHandle,
        ekh: KeyHandle,
        ek_alg: EkAlg,
        id: IdObject,
        es: EncryptedSecret,
    ) -> Result<Vec<u8>> {
        let policy = self.ek_policy_session(ek_alg)?;
        let r = self
            .ctx
            .execute_with_sessions((Some(AuthSession::Password), Some(policy), None), |c| {
                c.activate_credential(akh, ekh, id, es)
            })
            .map_err(step("ActivateCredential"));
        self.flush_session(policy);
        Ok(r?.value().to_vec())
    }

    /// Message 1 of an attestation with a fresh AK: loads the DevID key (under the SRK, then
    /// flushed), creates an AK from SPIRE's `AK_RSA` template (RSA-2048 restricted signing)
    /// and loads it, makes the EK, reads the EK's public area, and certifies the DevID by the
    /// AK. The AK goes under `parent`: the EK (Kame: in the endorsement hierarchy quotes carry
    /// true reset counts), or the SRK, in SPIRE's order of commands (`tpm_devid.md` §1.3
    /// steps 2 to 9). On failure nothing stays loaded.
    pub fn begin_attestation(
        &mut self,
        ek_alg: EkAlg,
        devid: &KeyBlob,
        parent: AkParent,
    ) -> Result<LoadedAttestation> {
        // One never answered is dropped: its objects would take the TPM's slots.
        if let Some((_, handles)) = self.attestation.take() {
            for h in handles {
                self.flush(h);
            }
        }
        self.attestations += 1;
        let mut loaded = vec![];
        let r = match parent {
            AkParent::Ek => self.begin_attestation_into(ek_alg, devid, &mut loaded),
            AkParent::Srk => self.begin_spire_attestation_into(ek_alg, devid, &mut loaded),
        };
        match &r {
            Ok(a) => self.attestation = Some((a.number, [a.ak, a.ek, a.devid])),
            Err(_) => {
                for h in loaded.into_iter().rev() {
                    self.flush(h);
                }
            }
        }
        r
    }

    fn begin_spire_attestation_into(
        &mut self,
        ek_alg: EkAlg,
        devid: &KeyBlob,
        loaded: &mut Vec<KeyHandle>,
    ) -> Result<LoadedAttestation> {
        let dh = self.load_under_srk(devid)?;
        loaded.push(dh);
        let ak = self.create_under_srk(&wire::public::templates::bytes(
            wire::public::templates::AK_RSA,
        ))?;
        let akh = self.load_under_srk(&ak)?;
        loaded.push(akh);
        let ekh = self.create_ek(ek_alg)?;
        loaded.push(ekh);
        let ak_blob = AkBlob {
            public: ak.public,
            private: ak.private,
            parent: AkParent::Srk,
        };
        self.loaded_attestation([dh, akh, ekh], devid, ek_alg, ak_blob)
    }

    fn begin_attestation_into(
        &mut self,
        ek_alg: EkAlg,
        devid: &KeyBlob,
        loaded: &mut Vec<KeyHandle>,
    ) -> Result<LoadedAttestation> {
        let dh = self.load_under_srk(devid)?;
        loaded.push(dh);
        let ekh = self.create_ek(ek_alg)?;
        loaded.push(ekh);
        let template = tss_esapi::structures::Public::unmarshall(&wire::public::templates::bytes(
            wire::public::templates::AK_RSA,
        ))
        .map_err(step("AK template"))?;
        // One policy session for both uses of the EK: satisfied again before the load.
        let session = self.ek_policy_session(ek_alg)?;
        let created = retrying(|| {
            self.ctx.execute_with_session(Some(session), |c| {
                c.create(ekh, template.clone(), None, None, None, None)
            })
        })
        .map_err(step("create AK under the EK"));
        let akh = created.and_then(|created| {
            self.renew_ek_policy(session, ek_alg)?;
            let akh = self
                .ctx
                .execute_with_session(Some(session), |c| {
                    c.load(ekh, created.out_private.clone(), created.out_public.clone())
                })
                .map_err(step("load AK"))?;
            Ok((akh, created))
        });
        self.flush_session(session);
        let (akh, created) = akh?;
        loaded.push(akh);
        let ak_blob = AkBlob {
            public: created
                .out_public
                .marshall()
                .map_err(step("marshal AK public"))?,
            private: created.out_private.value().to_vec(),
            parent: AkParent::Ek,
        };
        self.loaded_attestation([dh, akh, ekh], devid, ek_alg, ak_blob)
    }

    /// Message 1's last steps with the DevID, AK and EK loaded: the EK's public area and the
    /// certify of the DevID by the AK (empty qualifying data).
    fn loaded_attestation(
        &mut self,
        [dh, akh, ekh]: [KeyHandle; 3],
        devid: &KeyBlob,
        ek_alg: EkAlg,
        ak_blob: AkBlob,
    ) -> Result<LoadedAttestation> {
        let ek_public = self
            .ctx
            .read_public(ekh)
            .map_err(step("read EK public"))
            .and_then(|(p, _, _)| p.marshall().map_err(step("marshal EK public")))?;
        let certify = self.certify_loaded(dh, !devid.auth.is_empty(), akh, Data::default())?;
        Ok(LoadedAttestation {
            device: self.id,
            number: self.attestations,
            ek: ekh,
            ak: akh,
            devid: dh,
            devid_secret: !devid.auth.is_empty(),
            ek_alg,
            ak_blob,
            ek_public,
            certify,
        })
    }

    /// The answer to the server's challenge in `a`: the DevID signs `message` (hashed with its
    /// scheme hash), the AK activates the credential under the EK, and when `pcrs` is Some
    /// (Kame v2) the AK certifies the DevID and quotes those PCRs with `nonce`.
    pub fn answer_attestation(
        &mut self,
        a: &LoadedAttestation,
        devid_public: &[u8],
        message: &[u8],
        credential_blob: &[u8],
        secret: &[u8],
        v2: Option<(&[u8], &[u32])>,
    ) -> Result<AttestationAnswer> {
        if !self.holds(a) {
            return Err(DeviceError::Invalid(
                "the attestation's objects are not loaded in this TPM connection".into(),
            ));
        }
        let digest = message_digest(devid_public, message)?;
        let signature = self.sign_loaded(a.devid, a.devid_secret, digest)?;
        let (id, es) = credential_parts(credential_blob, secret)?;
        let akh = a.ak;
        let credential = self.activate_loaded(akh, a.ek, a.ek_alg, id, es)?;
        let v2 = match v2 {
            None => None,
            Some((nonce, pcrs)) => {
                let data = Data::try_from(nonce.to_vec()).map_err(step("nonce"))?;
                let (certify, certify_signature) =
                    self.certify_loaded(a.devid, a.devid_secret, akh, data)?;
                let (quote, quote_signature) = self.quote_with(akh, pcrs, nonce)?;
                Some(PersistentAkProof {
                    signature: vec![],
                    certify,
                    certify_signature,
                    quote,
                    quote_signature,
                    pcr_values: self.pcr_values(pcrs)?,
                })
            }
        };
        Ok(AttestationAnswer {
            signature,
            credential,
            v2,
        })
    }

    /// Whether `a`'s objects are loaded in this [`Device`] (its latest attestation, not
    /// ended): a session carried to another opening of the TPM, or superseded, falls back to
    /// its blobs.
    pub fn holds(&self, a: &LoadedAttestation) -> bool {
        a.device == self.id && self.attestation.is_some_and(|(n, _)| n == a.number)
    }

    /// Flushes what [`Device::begin_attestation`] loaded (once; another's is left alone).
    pub fn end_attestation(&mut self, a: &LoadedAttestation) {
        if self.holds(a)
            && let Some((_, handles)) = self.attestation.take()
        {
            for h in handles {
                self.flush(h);
            }
        }
    }

    /// TPM2_ActivateCredential: recovers a credential made for the AK under this TPM's EK.
    /// `credential_blob` and `secret` are TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET.
    pub fn activate_credential(
        &mut self,
        ek_alg: EkAlg,
        blob: &AkBlob,
        credential_blob: &[u8],
        secret: &[u8],
    ) -> Result<Vec<u8>> {
        let (id, es) = credential_parts(credential_blob, secret)?;
        self.with_ak(ek_alg, blob, |d, ekh, akh| {
            d.activate_loaded(akh, ekh, ek_alg, id, es)
        })
    }
}

/// The EK's authPolicy for `ek_alg`: (the policy session's hash, the PolicyOR branches).
/// Policy A = PolicySecret(TPM_RH_ENDORSEMENT) for the low-range templates; for the
/// high-range ones (SHA-384 nameAlg) policy B = PolicyOR(A, C), satisfied by PolicySecret then
/// PolicyOR over both branches.
fn ek_policy(ek_alg: EkAlg) -> Result<(HashingAlgorithm, Option<[Vec<u8>; 2]>)> {
    let ek_name_alg = match ek_alg {
        EkAlg::Rsa2048 | EkAlg::EccP256 => wire::alg::SHA256,
        EkAlg::EccP384 | EkAlg::Rsa3072 => wire::alg::SHA384,
    };
    Ok(match wire::policy::ek_policy_b_branches(ek_name_alg)? {
        Some(b) => (HashingAlgorithm::Sha384, Some(b)),
        None => (HashingAlgorithm::Sha256, None),
    })
}

/// A credential as ActivateCredential takes it, from TPM2B_ID_OBJECT and
/// TPM2B_ENCRYPTED_SECRET (each with its size, filling its bytes exactly).
fn credential_parts(credential_blob: &[u8], secret: &[u8]) -> Result<(IdObject, EncryptedSecret)> {
    let strip = |b: &[u8]| -> Result<Vec<u8>> {
        let mut r = wire::Reader::new(b, "TPM2B");
        let inner = r.tpm2b()?.to_vec();
        r.finish()?;
        Ok(inner)
    };
    Ok((
        IdObject::try_from(strip(credential_blob)?).map_err(step("credential blob"))?,
        EncryptedSecret::try_from(strip(secret)?).map_err(step("encrypted secret"))?,
    ))
}

/// `message` hashed as the key whose TPMT_PUBLIC is `public` signs it: SHA-384 when its
/// scheme says so, else SHA-256.
fn message_digest(public: &[u8], message: &[u8]) -> Result<Digest> {
    let hash_alg = match Public::parse(public)?.scheme().hash {
        wire::alg::SHA384 => wire::alg::SHA384,
        _ => wire::alg::SHA256,
    };
    Digest::try_from(wire::hash(hash_alg, message)?).map_err(step("digest"))
}

fn key_is_ecc(tpmt_public: &[u8]) -> bool {
    tpmt_public.len() >= 2 && u16::from_be_bytes([tpmt_public[0], tpmt_public[1]]) == wire::alg::ECC
}

fn pcr_selection(pcrs: &[u32]) -> Result<tss_esapi::structures::PcrSelectionList> {
    let slots = pcrs
        .iter()
        .map(|i| {
            if *i > 23 {
                return Err(DeviceError::Invalid(format!("PCR {i} does not exist")));
            }
            PcrSlot::try_from(1u32 << i).map_err(step("PCR slot"))
        })
        .collect::<Result<Vec<_>>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(step("PCR selection"))
}

/// The DER certificate at the start of NV contents (which may be padded).
pub fn trim_der(nv: &[u8]) -> std::result::Result<Vec<u8>, wire::Error> {
    let mut r = wire::Reader::new(nv, "EK certificate");
    if r.u8()? != 0x30 {
        return Err(wire::Error::Invalid(
            "EK certificate is not a DER SEQUENCE".into(),
        ));
    }
    let first = r.u8()?;
    let (len, hdr) = match first {
        n if n < 0x80 => (n as usize, 2),
        0x81 => (r.u8()? as usize, 3),
        0x82 => ((r.u16()?) as usize, 4),
        _ => {
            return Err(wire::Error::Invalid(
                "EK certificate length is not supported".into(),
            ));
        }
    };
    if nv.len() < hdr + len {
        return Err(wire::Error::Truncated("EK certificate"));
    }
    Ok(nv[..hdr + len].to_vec())
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
            .map_err(|e| DeviceError::Invalid(format!("TPM task failed: {e}")))??;
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
        .map_err(|e| DeviceError::Invalid(format!("TPM task failed: {e}")))?
    }
}
