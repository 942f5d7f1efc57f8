//! `kame-devid enroll-idevid`, `enroll` and `activate`: the device's side of enrollment
//! with a manufacturer or owner CA (credential activation in the TPM), and writing what it
//! returns. A persisted LDevID key replaces only this directory's previous one, and is
//! restored when enrollment fails after it was staged.

use super::*;

// `enroll-idevid`'s flags.
#[derive(clap::Args)]
pub(super) struct EnrollIdevidArgs {
    #[command(flatten)]
    tpm: TpmArgs,
    /// The CA's enrollment endpoint, e.g. https://ca.example:8444 (TLS, with --tls-ca) or
    /// http://127.0.0.1:8444.
    #[arg(long)]
    ca: String,
    /// Root CA certificates (PEM) of the enrollment endpoint's TLS certificate; required
    /// with an https:// --ca.
    #[arg(long)]
    tls_ca: Vec<PathBuf>,
    /// The TCG-CSR-IDEVID (`kame-devid csr`).
    #[arg(long)]
    request: PathBuf,
    /// Persistent handle of the IAK.
    #[arg(long, default_value = IAK_HANDLE, value_parser = handle)]
    iak_handle: u32,
    /// Persistent handle of the IDevID key.
    #[arg(long, default_value = IDEVID_HANDLE, value_parser = handle)]
    idevid_handle: u32,
    #[command(flatten)]
    trust: TrustArgs,
    /// Where to write the files (created if missing).
    #[arg(long)]
    out_dir: PathBuf,
}

// `enroll`'s flags.
#[derive(clap::Args)]
pub(super) struct EnrollArgs {
    #[command(flatten)]
    tpm: TpmArgs,
    /// The CA's enrollment endpoint: https://host:port (with --tls-ca) or http://host:port.
    #[arg(long)]
    ca: String,
    /// Root CA certificates (PEM) of the enrollment endpoint's TLS certificate; required
    /// with an https:// --ca.
    #[arg(long)]
    tls_ca: Vec<PathBuf>,
    /// Persistent handle of the IAK.
    #[arg(long, default_value = IAK_HANDLE, value_parser = handle)]
    iak_handle: u32,
    /// Persistent handle of the IDevID key.
    #[arg(long, default_value = IDEVID_HANDLE, value_parser = handle)]
    idevid_handle: u32,
    /// The IAK certificate (PEM) from the manufacturer (iak.pem).
    #[arg(long)]
    iak_cert: PathBuf,
    /// The IDevID certificate (PEM) from the manufacturer (idevid.pem).
    #[arg(long)]
    idevid_cert: PathBuf,
    #[command(flatten)]
    trust: TrustArgs,
    /// Also persist the LDevID key at this handle (tpm_devid's `devid_handle`: no SRK and
    /// no load per attestation). A handle holding another object is refused before
    /// anything is asked; one holding this --out-dir's previous LDevID key is replaced.
    #[arg(long, value_parser = handle)]
    persist_handle: Option<u32>,
    /// Where to write the files (created if missing).
    #[arg(long)]
    out_dir: PathBuf,
}

// `activate`'s flags.
#[derive(clap::Args)]
pub(super) struct ActivateArgs {
    #[command(flatten)]
    tpm: TpmArgs,
    /// Persistent handle of the IAK.
    #[arg(long, default_value = IAK_HANDLE, value_parser = handle)]
    iak_handle: u32,
    /// Persistent handle of the IDevID key.
    #[arg(long, default_value = IDEVID_HANDLE, value_parser = handle)]
    idevid_handle: u32,
    /// The file `ca issue` wrote.
    #[arg(long)]
    sealed: PathBuf,
    #[command(flatten)]
    trust: TrustArgs,
    /// Where to write the files (created if missing).
    #[arg(long)]
    out_dir: PathBuf,
}

/// Checks what a manufacturer CA issued ([`kame_devid::issued::check`], against the IAK's and
/// IDevID's public areas in this TPM) and writes iak.pub (the IAK's TPMT_PUBLIC, for
/// tpm_devid's attestation_key_pub_path), ca.pem, iak.pem and idevid.pem, each atomically;
/// nothing is written unless both certificates pass.
pub(super) fn write_manufactured(
    iak: &[u8],
    idevid: &[u8],
    ca: &[u8],
    pinned: &[Vec<u8>],
    publics: &(Vec<u8>, Vec<u8>),
    out_dir: &Path,
) -> Result<()> {
    let now = now()?;
    for (cert, kind, public) in [
        (iak, DevIdKind::Iak, &publics.0),
        (idevid, DevIdKind::IDevId, &publics.1),
    ] {
        kame_devid::issued::check(cert, kind, ca, pinned, public, now)?;
    }
    std::fs::create_dir_all(out_dir)?;
    write_public(&out_dir.join("iak.pub"), &publics.0)?;
    write_public(&out_dir.join("ca.pem"), pem(ca).as_bytes())?;
    write_public(&out_dir.join("iak.pem"), pem(iak).as_bytes())?;
    write_public(&out_dir.join("idevid.pem"), pem(idevid).as_bytes())?;
    Ok(())
}

/// The public areas (TPMT_PUBLIC) of the TCG IAK and IDevID keys persistent in the TPM.
pub(super) fn tcg_publics(d: &mut Device, iak: u32, idevid: u32) -> Result<(Vec<u8>, Vec<u8>)> {
    Ok((d.persistent_public(iak)?, d.persistent_public(idevid)?))
}

/// A client of the enrollment endpoint: over TLS (the server checked against `tls_ca`) for
/// https, plain HTTP/2 for http. An https endpoint without `tls_ca`, or `tls_ca` for http, is
/// refused rather than guessed at.
pub(super) async fn enrollment_client(
    ca: &str,
    tls_ca: &[PathBuf],
) -> Result<EnrollmentClient<tonic::transport::Channel>> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(ca.to_string())
        .with_context(|| format!("--ca {ca} is not a URL"))?;
    match (ca.starts_with("https://"), tls_ca.is_empty()) {
        (true, true) => {
            bail!("--ca {ca} is https: name the roots of its TLS certificate with --tls-ca")
        }
        (false, false) => bail!("--tls-ca needs an https:// --ca, not {ca}"),
        (true, false) => {
            let roots: String = read_all_pems(tls_ca)?.iter().map(|d| pem(d)).collect();
            endpoint = endpoint
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(roots)),
                )
                .context("the --tls-ca roots")?;
        }
        (false, true) => {}
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {ca}"))?;
    Ok(EnrollmentClient::new(channel))
}

/// The new LDevID public area, staged in --out-dir while the persistent handle changes.
pub(super) const STAGED_PUB: &str = ".devid.pub.next";

/// Whether the persistent handle `h` holds this --out-dir's LDevID key (its devid.pub, or one
/// staged by an interrupted run): Ok(true); is free: Ok(false); holds anything else: refused.
pub(super) fn handle_holds_ours(d: &mut Device, h: u32, out_dir: &Path) -> Result<bool> {
    if !d.persistent_handles()?.contains(&h) {
        return Ok(false);
    }
    for name in ["devid.pub", STAGED_PUB] {
        if let Ok(public) = std::fs::read(out_dir.join(name))
            && d.persistent_public_matching(h, &public).is_ok()
        {
            return Ok(true);
        }
    }
    bail!(
        "persistent handle {h:#010x} holds an object that is not this --out-dir's LDevID key: choose another --persist-handle"
    )
}

/// Puts `key` at the persistent handle `h` in place of this --out-dir's previous LDevID key
/// (checked again now). Returns the previous key's blobs, when there was one, for
/// [`restore_ldevid`]; if the new key cannot be persisted, the previous one is put back.
pub(super) fn persist_ldevid(
    tcti: &str,
    h: u32,
    key: &kame_tpm::device::KeyBlob,
    out_dir: &Path,
) -> Result<Option<kame_tpm::device::KeyBlob>> {
    let mut d = Device::open(tcti)?;
    let ours = handle_holds_ours(&mut d, h, out_dir)?;
    write_public(&out_dir.join(STAGED_PUB), &key.public)?;
    let previous = if ours {
        let public = std::fs::read(out_dir.join("devid.pub")).ok();
        let private = std::fs::read(out_dir.join("devid.priv")).ok();
        d.evict_persistent(h)?;
        match (public, private) {
            (Some(public), Some(private)) => {
                Some(kame_tpm::device::KeyBlob::from_files(&public, &private))
            }
            _ => None,
        }
    } else {
        None
    };
    if let Err(e) = d.persist_key(key, h) {
        if let Some(p) = &previous {
            let _ = d.persist_key(p, h);
        }
        return Err(e.into());
    }
    Ok(previous)
}

/// Puts the previous LDevID key back at `h` after the files of a new one could not be
/// written.
pub(super) fn restore_ldevid(
    tcti: &str,
    h: u32,
    previous: &kame_tpm::device::KeyBlob,
) -> Result<()> {
    let mut d = Device::open(tcti)?;
    d.evict_persistent(h)?;
    d.persist_key(previous, h)?;
    Ok(())
}

pub(super) async fn enroll_idevid(args: EnrollIdevidArgs) -> Result<()> {
    let EnrollIdevidArgs {
        tpm,
        ca,
        request,
        iak_handle,
        idevid_handle,
        trust,
        tls_ca,
        out_dir,
    } = args;
    let pinned = trusted_cas(&trust)?;
    let bytes =
        std::fs::read(&request).with_context(|| format!("reading {}", request.display()))?;
    let mut client = enrollment_client(&ca, &tls_ca).await?;
    let ch = client
        .begin_idevid(kame_api::pb::devid::BeginIdevidRequest {
            tcg_csr_idevid: bytes,
        })
        .await
        .map_err(|s| {
            anyhow::anyhow!(
                "the CA refused the request ({:?}): {}",
                s.code(),
                s.message()
            )
        })?
        .into_inner();
    let mut d = Device::open(&tpm.tcti)?;
    let publics = tcg_publics(&mut d, iak_handle, idevid_handle)?;
    let secret = d.activate_credential_tcg(
        EkAlg::Rsa2048,
        iak_handle,
        &ch.credential_blob,
        &ch.encrypted_secret,
    )?;
    drop(d);
    let certs = client
        .finish_idevid(kame_api::pb::devid::FinishRequest {
            challenge_id: ch.challenge_id,
            secret,
        })
        .await
        .map_err(|s| {
            anyhow::anyhow!(
                "the CA refused the answer ({:?}): {}",
                s.code(),
                s.message()
            )
        })?
        .into_inner();
    write_manufactured(
        &certs.iak_certificate,
        &certs.idevid_certificate,
        &certs.ca_certificate,
        &pinned,
        &publics,
        &out_dir,
    )?;
    println!("enrolled: {}", out_dir.display());
    Ok(())
}

pub(super) async fn enroll(args: EnrollArgs) -> Result<()> {
    let EnrollArgs {
        tpm,
        ca,
        iak_handle,
        idevid_handle,
        iak_cert,
        idevid_cert,
        trust,
        tls_ca,
        persist_handle,
        out_dir,
    } = args;
    let pinned = trusted_cas(&trust)?;
    // Whether the handle may take the new key, decided before the CA is asked.
    if let Some(h) = persist_handle {
        handle_holds_ours(&mut Device::open(&tpm.tcti)?, h, &out_dir)?;
    }
    use kame_api::pb::devid as pb;
    let iak_cert = read_pems(&iak_cert)?.remove(0);
    let idevid_cert = read_pems(&idevid_cert)?.remove(0);
    let mut client = enrollment_client(&ca, &tls_ca).await?;
    let n = client
        .begin_ldevid(pb::BeginLdevidRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("the CA refused ({:?}): {}", s.code(), s.message()))?
        .into_inner();
    let (key, request, request_iak_public) = {
        let mut d = Device::open(&tpm.tcti)?;
        let key = d.create_under_srk(&wire::public::templates::bytes(
            wire::public::templates::DEVID_RSA,
        ))?;
        let (certify_info, certify_signature) =
            d.certify_by_persistent(&key, iak_handle, &n.nonce)?;
        let idevid_signature = d.sign_persistent(idevid_handle, &certify_info)?;
        let iak_public = d.persistent_public(iak_handle)?;
        let request = pb::FinishLdevidRequest {
            nonce_id: n.nonce_id,
            idevid_certificate: idevid_cert,
            iak_certificate: iak_cert,
            idevid_public: d.persistent_public(idevid_handle)?,
            iak_public: iak_public.clone(),
            ldevid_public: key.public.clone(),
            certify_info,
            certify_signature,
            idevid_signature,
        };
        (key, request, iak_public)
    };
    let r = client
        .finish_ldevid(request)
        .await
        .map_err(|s| anyhow::anyhow!("the CA refused ({:?}): {}", s.code(), s.message()))?
        .into_inner();
    kame_devid::issued::check(
        &r.ldevid_certificate,
        DevIdKind::LDevId,
        &r.ca_certificate,
        &pinned,
        &key.public,
        now()?,
    )?;
    std::fs::create_dir_all(&out_dir)?;
    // The persistent handle changes first, with the new public staged beside the old
    // one so that a crash before the files are written still lets a re-run replace
    // it; a failure puts the previous key back.
    let previous = match persist_handle {
        Some(h) => persist_ldevid(&tpm.tcti, h, &key, &out_dir)?,
        None => None,
    };
    let written = (|| -> Result<()> {
        write_public(&out_dir.join("iak.pub"), &request_iak_public)?;
        // Each file atomically, the key first and the certificate last: an interrupted
        // re-enrollment leaves the old certificate, which tpm_devid then refuses as
        // not the key's (DevIDPub mismatch), never a half-written file.
        // The TPM-wrapped private part: useless outside this TPM, still kept private.
        kame_keymanager::fs::write_secret(&out_dir.join("devid.priv"), &key.private)?;
        write_public(&out_dir.join("devid.pub"), &key.public)?;
        write_public(
            &out_dir.join("devid-ca.pem"),
            pem(&r.ca_certificate).as_bytes(),
        )?;
        write_public(
            &out_dir.join("devid.pem"),
            pem(&r.ldevid_certificate).as_bytes(),
        )
    })();
    if let Err(e) = written {
        if let (Some(h), Some(previous)) = (persist_handle, &previous) {
            let _ = restore_ldevid(&tpm.tcti, h, previous);
        }
        return Err(e);
    }
    let _ = std::fs::remove_file(out_dir.join(STAGED_PUB));
    println!("enrolled: {}", out_dir.display());
    Ok(())
}

pub(super) async fn activate(args: ActivateArgs) -> Result<()> {
    let ActivateArgs {
        tpm,
        iak_handle,
        idevid_handle,
        sealed,
        trust,
        out_dir,
    } = args;
    let pinned = trusted_cas(&trust)?;
    let bytes = std::fs::read(&sealed).with_context(|| format!("reading {}", sealed.display()))?;
    let s = kame_devid::enroll::Sealed::decode(&bytes)?;
    let mut d = Device::open(&tpm.tcti)?;
    let publics = tcg_publics(&mut d, iak_handle, idevid_handle)?;
    let key = zeroize::Zeroizing::new(d.activate_credential_tcg(
        EkAlg::Rsa2048,
        iak_handle,
        &s.credential_blob,
        &s.encrypted_secret,
    )?);
    drop(d);
    let certs = s.open(&key)?;
    let [iak, idevid, ca] = certs.as_slice() else {
        anyhow::bail!(
            "{} holds {} certificates, not 3 (IAK, IDevID, CA)",
            sealed.display(),
            certs.len()
        );
    };
    write_manufactured(iak, idevid, ca, &pinned, &publics, &out_dir)?;
    println!("enrolled: {}", out_dir.display());
    Ok(())
}
