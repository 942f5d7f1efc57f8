//! SPIRE's tpm_devid attestation on the TPM, as the agent runs it: message 1 loads the DevID
//! key, makes and loads an AK (under the EK, or as SPIRE under the SRK), makes the EK, reads
//! the EK's public area and has the AK certify the DevID key (`tpm_devid.md` §1.3 steps 2 to
//! 9); the three objects stay held for the answer, which signs the server's nonce with the
//! DevID, activates its credential with the AK under the EK and, for Kame v2, certifies and
//! quotes over that nonce. It runs on `kame_tpm::device`'s primitives and holds no TPM state
//! beyond one [`Loaded`]: the next attestation releases whatever an unanswered one held.

use kame_tpm::device::{AkBlob, AkParent, Device, DeviceError, EkAlg, Held, KeyBlob};
use kame_tpm::wire;

/// Message 1's objects, held from message 1 to the answer, as SPIRE keeps them (three
/// transient objects, the most a TPM must hold), and what message 1 read from them.
#[derive(Debug)]
pub struct Loaded {
    devid: Held,
    ak: Held,
    ek: Held,
    pub ek_alg: EkAlg,
    /// The AK made for this attestation (its TPMT_PUBLIC is AKPub).
    pub ak_blob: AkBlob,
    /// The EK's TPMT_PUBLIC.
    pub ek_public: Vec<u8>,
    /// TPM2_Certify of the DevID by the AK with empty qualifying data: (TPMS_ATTEST,
    /// TPMT_SIGNATURE).
    pub certify: (Vec<u8>, Vec<u8>),
}

/// The TPM's answer to the server's challenge.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The DevID's TPMT_SIGNATURE over the nonce.
    pub signature: Vec<u8>,
    /// The activated credential.
    pub credential: Vec<u8>,
    /// With PCRs asked for (Kame v2): the certify and quote bound to the nonce, and the PCRs.
    pub v2: Option<kame_tpm::device::PersistentAkProof>,
}

/// Message 1 with a fresh AK under `parent`. Whatever an earlier, unanswered attestation
/// held is flushed first; on failure nothing stays loaded.
pub fn begin(
    d: &mut Device,
    ek_alg: EkAlg,
    devid: &KeyBlob,
    parent: AkParent,
) -> Result<Loaded, DeviceError> {
    d.release_held();
    let dh = d.load_held(devid)?;
    let made = match parent {
        // SPIRE's order: the AK under the SRK, then the EK.
        AkParent::Srk => d
            .create_under_srk(&wire::public::templates::bytes(
                wire::public::templates::AK_RSA,
            ))
            .and_then(|ak| {
                let akh = d.load_held(&ak)?;
                let blob = AkBlob {
                    public: ak.public,
                    private: ak.private,
                    parent: AkParent::Srk,
                };
                match d.ek_held(ek_alg) {
                    Ok(ekh) => Ok((akh, ekh, blob)),
                    Err(e) => {
                        d.flush_held(&akh);
                        Err(e)
                    }
                }
            }),
        // Kame's: in the endorsement hierarchy, so quotes carry true reset counts.
        AkParent::Ek => d
            .ek_held(ek_alg)
            .and_then(|ekh| match d.ak_under_ek_held(&ekh, ek_alg) {
                Ok((akh, blob)) => Ok((akh, ekh, blob)),
                Err(e) => {
                    d.flush_held(&ekh);
                    Err(e)
                }
            }),
    };
    let (akh, ekh, ak_blob) = match made {
        Ok(m) => m,
        Err(e) => {
            d.flush_held(&dh);
            return Err(e);
        }
    };
    let read = d
        .held_public(&ekh)
        .and_then(|ek_public| Ok((ek_public, d.certify_held(&dh, &akh, &[])?)));
    match read {
        Ok((ek_public, certify)) => Ok(Loaded {
            devid: dh,
            ak: akh,
            ek: ekh,
            ek_alg,
            ak_blob,
            ek_public,
            certify,
        }),
        Err(e) => {
            d.release_held();
            Err(e)
        }
    }
}

/// Whether `l`'s objects are still loaded in `d` (the same TPM connection, not superseded):
/// else the answer loads the blobs again.
pub fn holds(d: &Device, l: &Loaded) -> bool {
    d.holds(&l.devid) && d.holds(&l.ak) && d.holds(&l.ek)
}

/// The answer to the server's challenge with `l`'s objects: the DevID signs `message` (with
/// its scheme's hash; `devid_public` is its TPMT_PUBLIC), the AK activates the credential
/// under the EK, and when `v2` names a nonce and PCRs the AK certifies the DevID and quotes
/// those PCRs over the nonce.
pub fn answer(
    d: &mut Device,
    l: &Loaded,
    devid_public: &[u8],
    message: &[u8],
    credential_blob: &[u8],
    secret: &[u8],
    v2: Option<(&[u8], &[u32])>,
) -> Result<Answer, DeviceError> {
    let signature = d.sign_held(&l.devid, devid_public, message)?;
    let credential = d.activate_held(&l.ak, &l.ek, l.ek_alg, credential_blob, secret)?;
    let v2 = match v2 {
        None => None,
        Some((nonce, pcrs)) => {
            let (certify, certify_signature) = d.certify_held(&l.devid, &l.ak, nonce)?;
            let (quote, quote_signature) = d.quote_held(&l.ak, pcrs, nonce)?;
            Some(kame_tpm::device::PersistentAkProof {
                signature: vec![],
                certify,
                certify_signature,
                quote,
                quote_signature,
                pcr_values: d.pcr_values(pcrs)?,
            })
        }
    };
    Ok(Answer {
        signature,
        credential,
        v2,
    })
}

/// Flushes `l`'s objects (those still loaded; another attestation's are left alone).
pub fn end(d: &mut Device, l: &Loaded) {
    d.flush_held(&l.devid);
    d.flush_held(&l.ak);
    d.flush_held(&l.ek);
}
