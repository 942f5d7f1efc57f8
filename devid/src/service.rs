//! The manufacturer CA's enrollment service (`kame.devid.v1.Enrollment`): BeginIdevid checks a
//! TCG-CSR-IDEVID and answers with a credential activation challenge; FinishIdevid takes the
//! recovered secret and issues the IAK and IDevID certificates. Malformed requests are
//! InvalidArgument, failed proofs PermissionDenied, an unknown or replayed challenge
//! FailedPrecondition, a serial or TPM the registry has seen with another AlreadyExists, a
//! peer (an IPv4 address or IPv6 /64) that already holds its share of pending challenges
//! ResourceExhausted. LDevID nonces keep no state until a request bound to one passes.
//! Every decision is logged with the device serial; nothing is issued
//! before the challenge is answered. It must not hold the CA key (the KeyManager does).

use crate::ca::DevIdCa;
use crate::enroll::{
    Challenges, EnrollError, LdevidError, LdevidRequest, Nonces, verify_idevid_request,
    verify_ldevid_request,
};
use kame_api::pb::devid as pb;
use tonic::{Request, Response, Status};

/// The service's settings and state.
#[derive(Debug)]
pub struct EnrollmentService {
    pub ca: DevIdCa,
    /// TPM vendor root CAs (DER) EK certificates must chain to, and intermediates.
    pub ek_roots: Vec<Vec<u8>>,
    pub ek_intermediates: Vec<Vec<u8>>,
    /// The subject of issued certificates (the device serial is added).
    pub subject: String,
    pub challenges: Challenges,
    /// As an owner CA: the manufacturer CAs IDevIDs and IAKs must chain to (empty: LDevID
    /// enrollment is refused).
    pub manufacturer_roots: Vec<Vec<u8>>,
    pub nonces: Nonces,
    /// The record of devices certified (None: not kept).
    pub registry: Option<crate::registry::Registry>,
}

fn registry_status(e: crate::registry::RegistryError) -> Status {
    use crate::registry::RegistryError as R;
    match e {
        R::SerialTaken { .. } | R::EkTaken { .. } => Status::already_exists(e.to_string()),
        R::Corrupt { .. } => Status::failed_precondition(e.to_string()),
        R::Io { .. } | R::Write(_) => Status::unavailable(e.to_string()),
    }
}

fn ldevid_status(e: LdevidError) -> Status {
    match e {
        LdevidError::Enroll(e) => enroll_status(e),
        e => Status::permission_denied(e.to_string()),
    }
}

/// Maps a refused enrollment to its gRPC status.
pub fn enroll_status(e: EnrollError) -> Status {
    use EnrollError as E;
    match e {
        E::Malformed(_)
        | E::MalformedField(_)
        | E::Missing(_)
        | E::SealedMalformed(_)
        | E::SealedFormat(_)
        | E::BadSerial(_)
        | E::BadEkCert(_) => Status::invalid_argument(e.to_string()),
        E::UnknownChallenge => Status::failed_precondition(e.to_string()),
        E::TooManyPending(..) => Status::resource_exhausted(e.to_string()),
        E::Credential(_) | E::Crypto(_) => Status::internal(e.to_string()),
        E::BadIak(_)
        | E::IakNotRestricted
        | E::IakNotFixed
        | E::BadIdevid(_)
        | E::IdevidExportable
        | E::IdevidNotSigning
        | E::BadRequestSignature(_)
        | E::IdevidNotCertified(_)
        | E::EkUntrusted(_)
        | E::EkUnsupported
        | E::WrongAnswer
        | E::SealedForAnotherTpm => Status::permission_denied(e.to_string()),
    }
}

/// The peer a pending enrollment is held for: the caller's IPv4 address, or the /64 of its
/// IPv6 address (one host usually has a whole /64 to pick addresses from).
fn peer<T>(req: &Request<T>) -> String {
    match req.remote_addr().map(|a| a.ip().to_canonical()) {
        None => crate::enroll::LOCAL_PEER.to_string(),
        Some(std::net::IpAddr::V4(a)) => a.to_string(),
        Some(std::net::IpAddr::V6(a)) => {
            let s = a.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[tonic::async_trait]
impl pb::enrollment_server::Enrollment for EnrollmentService {
    async fn begin_idevid(
        &self,
        req: Request<pb::BeginIdevidRequest>,
    ) -> Result<Response<pb::Challenge>, Status> {
        let peer = peer(&req);
        // A peer already holding its share is refused before its request costs anything.
        self.challenges.has_room(&peer).map_err(|e| {
            tracing::warn!(%peer, error = %e, "enrollment request refused");
            enroll_status(e)
        })?;
        let bytes = req.into_inner().tcg_csr_idevid;
        let verified = verify_idevid_request(&bytes, &self.ek_roots, &self.ek_intermediates, now())
            .map_err(|e| {
                tracing::warn!(error = %e, "enrollment request refused");
                enroll_status(e)
            })?;
        let serial = verified.request.prod_serial.clone();
        let ch = self
            .challenges
            .issue(verified, &peer)
            .map_err(enroll_status)?;
        tracing::info!(device_serial = %serial, "enrollment request accepted; challenge sent");
        Ok(Response::new(pb::Challenge {
            challenge_id: ch.id,
            credential_blob: ch.credential_blob,
            encrypted_secret: ch.encrypted_secret,
        }))
    }

    async fn finish_idevid(
        &self,
        req: Request<pb::FinishRequest>,
    ) -> Result<Response<pb::IdevidCertificates>, Status> {
        let r = req.into_inner();
        let enrolled = self
            .challenges
            .answer(&r.challenge_id, &r.secret)
            .map_err(|e| {
                tracing::warn!(error = %e, "enrollment challenge answer refused");
                enroll_status(e)
            })?;
        if let Some(registry) = self.registry.clone() {
            let serial = enrolled.request.prod_serial.clone();
            let ek = enrolled
                .ek
                .spki_der()
                .map_err(|e| Status::internal(format!("EK public key: {e}")))?;
            // Proven: the TPM just answered the credential activation for this EK.
            tokio::task::spawn_blocking(move || registry.claim(&serial, &ek, true))
                .await
                .map_err(|e| Status::internal(format!("registry task failed: {e}")))?
                .map_err(|e| {
                    tracing::warn!(error = %e, device_serial = %enrolled.request.prod_serial, "enrollment refused by the registry");
                    registry_status(e)
                })?;
        }
        let (iak, idevid) = self
            .ca
            .issue_manufactured(&enrolled, &self.subject)
            .await
            .map_err(|e| match e {
                crate::ca::CaError::KeyManager(kame_keymanager::Error::Unavailable(_)) => {
                    tracing::warn!(error = %e, "CA key backend unavailable");
                    Status::unavailable("CA key backend unavailable; try again later")
                }
                e => {
                    tracing::error!(error = %e, "cannot issue device certificates");
                    Status::internal(format!("cannot issue certificates: {e}"))
                }
            })?;
        tracing::info!(device_serial = %enrolled.request.prod_serial, "IAK and IDevID certificates issued");
        Ok(Response::new(pb::IdevidCertificates {
            iak_certificate: iak,
            idevid_certificate: idevid,
            ca_certificate: self.ca.certificate().to_vec(),
        }))
    }

    async fn begin_ldevid(
        &self,
        _req: Request<pb::BeginLdevidRequest>,
    ) -> Result<Response<pb::LdevidNonce>, Status> {
        if self.manufacturer_roots.is_empty() {
            return Err(Status::failed_precondition(
                "this CA does not enroll LDevIDs (no manufacturer CA configured)",
            ));
        }
        let (nonce_id, nonce) = self.nonces.issue().map_err(enroll_status)?;
        Ok(Response::new(pb::LdevidNonce { nonce_id, nonce }))
    }

    async fn finish_ldevid(
        &self,
        req: Request<pb::FinishLdevidRequest>,
    ) -> Result<Response<pb::LdevidCertificate>, Status> {
        let r = req.into_inner();
        let nonce = self.nonces.nonce(&r.nonce_id).map_err(enroll_status)?;
        let request = LdevidRequest {
            idevid_cert: r.idevid_certificate,
            iak_cert: r.iak_certificate,
            idevid_pub: r.idevid_public,
            iak_pub: r.iak_public,
            ldevid_pub: r.ldevid_public,
            certify_info: r.certify_info,
            certify_sig: r.certify_signature,
            idevid_sig: r.idevid_signature,
        };
        let v = verify_ldevid_request(&request, &nonce, &self.manufacturer_roots, now()).map_err(
            |e| {
                tracing::warn!(error = %e, "LDevID request refused");
                ldevid_status(e)
            },
        )?;
        // Spent only by a request that passed: failed attempts hold nothing; a replay of a
        // good one (or a second one racing it) is refused here.
        self.nonces.spend(&r.nonce_id).map_err(enroll_status)?;
        let cert =
            self.ca.issue_ldevid(&v, &self.subject).await.map_err(|e| {
                Status::internal(format!("cannot issue the LDevID certificate: {e}"))
            })?;
        tracing::info!(device_serial = %v.device.serial_number, "LDevID certificate issued");
        Ok(Response::new(pb::LdevidCertificate {
            ldevid_certificate: cert,
            ca_certificate: self.ca.certificate().to_vec(),
        }))
    }
}
