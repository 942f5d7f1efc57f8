//! `kame-devid`: device identities from the factory floor. On the device: create the TCG IAK
//! and IDevID keys in the TPM, build the TCG-CSR-IDEVID, and enroll with the manufacturer CA
//! (answering its credential activation challenge). On the CA: make the CA key in a
//! KeyManager (disk key file or PKCS#11 HSM) and serve enrollment over gRPC (TLS with
//! --tls-cert/--tls-key). Certificates are
//! public and written 0644; no private key ever leaves the TPM or the KeyManager.

use anyhow::{Context, Result, bail};
use base64::Engine;
use clap::{Parser, Subcommand};
use kame_api::pb::devid::enrollment_client::EnrollmentClient;
use kame_devid::ca::DevIdCa;
use kame_devid::enroll::{Challenges, IdevidRequest};
use kame_devid::profile::DevIdKind;
use kame_keymanager::KeyManager;
use kame_tpm::device::{Device, EkAlg};
use kame_tpm::wire::{self, policy::DevIdKey};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The TCG Provisioning Guidance's IDevID key handle (§7.8, Table 2), and the next one for
/// the IAK (the guidance names none for it).
const IDEVID_HANDLE: &str = "0x81020000";
const IAK_HANDLE: &str = "0x81020001";
const CA_KEY_ID: &str = "devid-ca";

#[derive(Parser)]
#[command(
    name = "kame-devid",
    version,
    about = "IEEE 802.1AR device identities (TPM 2.0)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Keys in the TPM.
    #[command(subcommand)]
    Tpm(TpmCmd),
    /// Builds the TCG-CSR-IDEVID enrollment request (signed by the IDevID key in the TPM).
    Csr {
        #[command(flatten)]
        tpm: TpmArgs,
        /// Persistent handle of the IAK.
        #[arg(long, default_value = IAK_HANDLE, value_parser = handle)]
        iak_handle: u32,
        /// Persistent handle of the IDevID key.
        #[arg(long, default_value = IDEVID_HANDLE, value_parser = handle)]
        idevid_handle: u32,
        /// Product model (prodModel).
        #[arg(long)]
        model: String,
        /// Product serial number (prodSerial): the certificates' serialNumber.
        #[arg(long)]
        serial: String,
        /// Where to write the output.
        #[arg(long)]
        out: PathBuf,
    },
    /// Enrolls with the manufacturer CA: sends the request, answers the challenge with the
    /// TPM, writes iak.pem, idevid.pem, ca.pem and iak.pub (the IAK's public area) to --out-dir.
    EnrollIdevid {
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
    },
    /// Enrolls an LDevID with the owner CA: a new signing key in the TPM (under the SRK, as
    /// tpm_devid loads it) certified by the IAK over the CA's nonce, the IDevID signing the
    /// certify. Writes devid.pem, devid-ca.pem, devid.pub and devid.priv (0600) to --out-dir:
    /// the files tpm_devid's devid_cert_path, devid_pub_path and devid_priv_path name; and
    /// iak.pub, the IAK's public area (attestation_key_pub_path).
    Enroll {
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
    },
    /// Opens certificates sealed by `ca issue` (offline issuance): the IAK recovers the key by
    /// credential activation under the EK, so only the TPM that made the request can. Writes
    /// iak.pem, idevid.pem, ca.pem and iak.pub to --out-dir.
    Activate {
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
    },
    /// The manufacturer CA (or an owner CA).
    #[command(subcommand)]
    Ca(CaCmd),
}

/// What the device trusts beforehand about the CA that answers.
#[derive(clap::Args, Clone)]
struct TrustArgs {
    /// CA certificates (PEM) this device trusts beforehand: what the CA sends must chain to
    /// one of them. Repeatable.
    #[arg(long)]
    trust_ca: Vec<PathBuf>,
    /// Accept whatever CA answers, checked only against the CA certificate it sends (SPIRE's
    /// insecure_bootstrap): for a first enrollment on a trusted network, never by default.
    #[arg(long, conflicts_with = "trust_ca")]
    insecure_bootstrap: bool,
}

/// The TPM vendor CAs EK certificates must chain to, and the subject of what is issued.
#[derive(clap::Args, Clone)]
struct VendorArgs {
    /// TPM vendor CA certificates (PEM) EK certificates must chain to.
    #[arg(long, required = true)]
    ek_root: Vec<PathBuf>,
    /// Intermediate vendor CA certificates (PEM).
    #[arg(long)]
    ek_intermediate: Vec<PathBuf>,
    /// Subject of issued certificates (the device serial is added).
    #[arg(long, default_value = "O=Kame Devices")]
    subject: String,
    /// The record of devices certified (JSON, created on first use): a serial is certified
    /// for one TPM only, a TPM as one serial. Share it between `ca serve` and `ca issue`.
    #[arg(long)]
    registry: Option<PathBuf>,
}

/// The registry of --registry, or a warning that serials are not tracked.
fn registry(v: &VendorArgs) -> Result<Option<kame_devid::registry::Registry>> {
    match &v.registry {
        Some(p) => Ok(Some(kame_devid::registry::Registry::open(p)?)),
        None => {
            eprintln!(
                "warning: no --registry: this CA does not record which TPM each device serial went to"
            );
            Ok(None)
        }
    }
}

#[derive(clap::Args, Clone)]
struct TpmArgs {
    /// TCTI of the TPM (`device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`).
    #[arg(long, default_value = "device:/dev/tpmrm0")]
    tcti: String,
}

#[derive(Subcommand)]
enum TpmCmd {
    /// Creates the IAK (TCG template, restricted signing) in the endorsement hierarchy and
    /// persists it; prints its public area (hex).
    CreateIak {
        #[command(flatten)]
        tpm: TpmArgs,
        #[arg(long, default_value = IAK_HANDLE, value_parser = handle)]
        handle: u32,
        /// ECC NIST P-256 instead of RSA 2048.
        #[arg(long)]
        ecc: bool,
    },
    /// Creates the IDevID key (TCG template, unrestricted signing) and persists it.
    CreateIdevid {
        #[command(flatten)]
        tpm: TpmArgs,
        #[arg(long, default_value = IDEVID_HANDLE, value_parser = handle)]
        handle: u32,
        #[arg(long)]
        ecc: bool,
    },
}

#[derive(clap::Args, Clone)]
struct CaKey {
    /// The CA key in a key file (the `disk` KeyManager, 0600).
    #[arg(long, conflicts_with = "pkcs11_module")]
    keys_path: Option<PathBuf>,
    /// The CA key in a PKCS#11 token: the module, token label and a file with the user PIN.
    #[arg(long, requires_all = ["token_label", "pin_file"])]
    pkcs11_module: Option<PathBuf>,
    #[arg(long)]
    token_label: Option<String>,
    #[arg(long)]
    pin_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CaCmd {
    /// Makes the CA key and its self-signed certificate (PEM at --out).
    Init {
        #[command(flatten)]
        key: CaKey,
        #[arg(long, default_value = "O=Kame, CN=Kame Manufacturer CA")]
        subject: String,
        #[arg(long, default_value_t = 3650)]
        ttl_days: u64,
        /// Where to write the output.
        #[arg(long)]
        out: PathBuf,
    },
    /// Offline issuance: checks a TCG-CSR-IDEVID as `serve` does, issues the IAK and IDevID
    /// certificates and seals them to the requesting TPM (`kame-devid activate` opens them
    /// there), instead of a challenge round.
    Issue {
        #[command(flatten)]
        key: CaKey,
        /// The CA's certificate (PEM, `ca init --out`).
        #[arg(long)]
        ca_cert: PathBuf,
        #[command(flatten)]
        vendor: VendorArgs,
        /// The TCG-CSR-IDEVID (`kame-devid csr`).
        #[arg(long)]
        request: PathBuf,
        /// Where to write the sealed certificates.
        #[arg(long)]
        out: PathBuf,
    },
    /// Serves enrollment (kame.devid.v1.Enrollment) over gRPC, TLS with --tls-cert and
    /// --tls-key; prints the address.
    Serve {
        #[command(flatten)]
        key: CaKey,
        /// The CA's certificate (PEM, `ca init --out`).
        #[arg(long)]
        ca_cert: PathBuf,
        #[command(flatten)]
        vendor: VendorArgs,
        /// As an owner CA: manufacturer CA certificates (PEM) IDevIDs and IAKs must chain to
        /// for LDevID enrollment.
        #[arg(long)]
        idevid_ca: Vec<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// TLS certificate chain (PEM) of the endpoint; with --tls-key, serves over TLS.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// TLS private key (PEM) of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Most credential activation challenges waiting for an answer (when full, the peer
        /// holding the most gives up its oldest).
        #[arg(long, default_value_t = kame_devid::enroll::PendingLimits::default().total, value_parser = clap::value_parser!(usize))]
        max_pending: usize,
        /// Most of those one peer (an IPv4 address or an IPv6 /64) may hold.
        #[arg(long, default_value_t = kame_devid::enroll::PendingLimits::default().per_peer, value_parser = clap::value_parser!(usize))]
        max_pending_per_peer: usize,
    },
}

fn handle(s: &str) -> std::result::Result<u32, String> {
    let h = s.trim_start_matches("0x");
    u32::from_str_radix(h, 16).map_err(|e| format!("{s:?} is not a hex handle: {e}"))
}

fn pem(der: &[u8]) -> String {
    kame_api::bundle::pem_block("CERTIFICATE", der)
}

fn read_pems(path: &Path) -> Result<Vec<Vec<u8>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = vec![];
    let mut b64 = String::new();
    let mut inside = false;
    for l in text.lines() {
        if l.starts_with("-----BEGIN CERTIFICATE") {
            inside = true;
            b64.clear();
        } else if l.starts_with("-----END CERTIFICATE") {
            inside = false;
            out.push(
                base64::engine::general_purpose::STANDARD
                    .decode(&b64)
                    .with_context(|| format!("bad PEM in {}", path.display()))?,
            );
        } else if inside {
            b64.push_str(l.trim());
        }
    }
    if out.is_empty() {
        bail!("no certificate in {}", path.display());
    }
    Ok(out)
}

async fn key_manager(k: &CaKey) -> Result<Arc<dyn KeyManager>> {
    if let Some(path) = &k.keys_path {
        return Ok(Arc::new(kame_keymanager::disk::DiskKeyManager::open(path)?));
    }
    if let (Some(module), Some(token), Some(pin)) = (&k.pkcs11_module, &k.token_label, &k.pin_file)
    {
        let pin = std::fs::read_to_string(pin)
            .with_context(|| format!("reading PIN file {}", pin.display()))?;
        let km = kame_keymanager::pkcs11::Pkcs11KeyManager::open(
            kame_keymanager::pkcs11::Pkcs11Config {
                module_path: module.clone(),
                token_label: token.clone(),
                user_pin: pin.trim().into(),
                server_id: "kame-devid".into(),
            },
        )
        .await?;
        return Ok(Arc::new(km));
    }
    bail!("name the CA key: --keys-path FILE, or --pkcs11-module with --token-label and --pin-file")
}

/// The CA certificates a device trusts beforehand (`--trust-ca`). None is refused unless the
/// operator chose `--insecure-bootstrap`; then what the CA sends is only checked against the
/// CA certificate sent with it, and a warning says so.
fn trusted_cas(t: &TrustArgs) -> Result<Ders> {
    let v = read_all_pems(&t.trust_ca)?;
    if v.is_empty() {
        if !t.insecure_bootstrap {
            bail!(
                "name the CA this device trusts with --trust-ca FILE, or pass --insecure-bootstrap to accept whatever CA answers"
            );
        }
        eprintln!(
            "warning: --insecure-bootstrap: the CA's certificates are checked against the CA certificate it sent, not one trusted beforehand"
        );
    }
    Ok(v)
}

fn now() -> Result<u64> {
    Ok(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs())
}

/// Checks what a manufacturer CA issued ([`kame_devid::issued::check`], against the IAK's and
/// IDevID's public areas in this TPM) and writes iak.pub (the IAK's TPMT_PUBLIC, for
/// tpm_devid's attestation_key_pub_path), ca.pem, iak.pem and idevid.pem, each atomically;
/// nothing is written unless both certificates pass.
fn write_manufactured(
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
fn tcg_publics(d: &mut Device, iak: u32, idevid: u32) -> Result<(Vec<u8>, Vec<u8>)> {
    Ok((d.persistent_public(iak)?, d.persistent_public(idevid)?))
}

/// DER certificates.
type Ders = Vec<Vec<u8>>;

/// The EK roots and intermediates from PEM files.
fn ek_cas(v: &VendorArgs) -> Result<(Ders, Ders)> {
    Ok((
        read_all_pems(&v.ek_root)?,
        read_all_pems(&v.ek_intermediate)?,
    ))
}

/// Every certificate of every file, in order.
fn read_all_pems(paths: &[PathBuf]) -> Result<Ders> {
    let mut v = vec![];
    for p in paths {
        v.extend(read_pems(p)?);
    }
    Ok(v)
}

/// A client of the enrollment endpoint: over TLS (the server checked against `tls_ca`) for
/// https, plain HTTP/2 for http. An https endpoint without `tls_ca`, or `tls_ca` for http, is
/// refused rather than guessed at.
async fn enrollment_client(
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
const STAGED_PUB: &str = ".devid.pub.next";

/// Whether the persistent handle `h` holds this --out-dir's LDevID key (its devid.pub, or one
/// staged by an interrupted run): Ok(true); is free: Ok(false); holds anything else: refused.
fn handle_holds_ours(d: &mut Device, h: u32, out_dir: &Path) -> Result<bool> {
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
fn persist_ldevid(
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
fn restore_ldevid(tcti: &str, h: u32, previous: &kame_tpm::device::KeyBlob) -> Result<()> {
    let mut d = Device::open(tcti)?;
    d.evict_persistent(h)?;
    d.persist_key(previous, h)?;
    Ok(())
}

/// Writes a public file (a certificate, a public area) atomically, 0644.
fn write_public(path: &Path, data: &[u8]) -> Result<()> {
    kame_keymanager::disk::write_file_atomic(path, data, 0o644)
        .with_context(|| format!("writing {}", path.display()))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Tpm(TpmCmd::CreateIak { tpm, handle, ecc }) => {
            let mut d = Device::open(&tpm.tcti)?;
            let public = d.provision_tcg_key(DevIdKey::Iak, ecc, handle)?;
            println!(
                "{}",
                public
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            );
        }
        Cmd::Tpm(TpmCmd::CreateIdevid { tpm, handle, ecc }) => {
            let mut d = Device::open(&tpm.tcti)?;
            let public = d.provision_tcg_key(DevIdKey::IDevId, ecc, handle)?;
            println!(
                "{}",
                public
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            );
        }
        Cmd::Csr {
            tpm,
            iak_handle,
            idevid_handle,
            model,
            serial,
            out,
        } => {
            // The CA refuses it too; say so before touching the TPM.
            kame_devid::profile::check_serial_number(&serial).context("--serial")?;
            let mut d = Device::open(&tpm.tcti)?;
            let ek_cert = d
                .ek_certificate(EkAlg::Rsa2048)?
                .context("the TPM has no RSA EK certificate in NV")?;
            let (certify, certify_sig) =
                d.certify_tcg(idevid_handle, DevIdKey::IDevId, iak_handle, &[])?;
            let req = IdevidRequest {
                hash_alg: wire::alg::SHA256,
                prod_model: model,
                prod_serial: serial,
                ek_cert,
                attest_pub: d.persistent_public(iak_handle)?,
                signing_pub: d.persistent_public(idevid_handle)?,
                sgn_certify_info: certify,
                sgn_certify_info_sig: certify_sig,
                ..Default::default()
            };
            let sig = d.sign_persistent(idevid_handle, &req.content()?)?;
            write_public(&out, &req.encode(&sig)?)?;
        }
        Cmd::EnrollIdevid {
            tpm,
            ca,
            request,
            iak_handle,
            idevid_handle,
            trust,
            tls_ca,
            out_dir,
        } => {
            let pinned = trusted_cas(&trust)?;
            let bytes = std::fs::read(&request)
                .with_context(|| format!("reading {}", request.display()))?;
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
        }
        Cmd::Enroll {
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
        } => {
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
                kame_keymanager::disk::write_secret_file(
                    &out_dir.join("devid.priv"),
                    &key.private,
                )?;
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
        }
        Cmd::Activate {
            tpm,
            iak_handle,
            idevid_handle,
            sealed,
            trust,
            out_dir,
        } => {
            let pinned = trusted_cas(&trust)?;
            let bytes =
                std::fs::read(&sealed).with_context(|| format!("reading {}", sealed.display()))?;
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
        }
        Cmd::Ca(CaCmd::Init {
            key,
            subject,
            ttl_days,
            out,
        }) => {
            let km = key_manager(&key).await?;
            let ca = DevIdCa::init(
                km,
                CA_KEY_ID,
                kame_keymanager::KeyType::EcP256,
                &subject,
                ttl_days.saturating_mul(86400),
            )
            .await?;
            write_public(&out, pem(ca.certificate()).as_bytes())?;
        }
        Cmd::Ca(CaCmd::Issue {
            key,
            ca_cert,
            vendor,
            request,
            out,
        }) => {
            let (ek_roots, ek_intermediates) = ek_cas(&vendor)?;
            let bytes = std::fs::read(&request)
                .with_context(|| format!("reading {}", request.display()))?;
            // Every check before anything is issued.
            let verified = kame_devid::enroll::verify_idevid_request(
                &bytes,
                &ek_roots,
                &ek_intermediates,
                now()?,
            )?;
            if let Some(r) = registry(&vendor)? {
                // Sealed: nothing proves yet that the requester holds the EK.
                r.claim(
                    &verified.request.prod_serial,
                    &verified.ek.spki_der()?,
                    false,
                )?;
            }
            let km = key_manager(&key).await?;
            let cert = read_pems(&ca_cert)?.remove(0);
            let ca = DevIdCa::open(km, CA_KEY_ID, cert).await?;
            let (iak, idevid) = ca.issue_manufactured(&verified, &vendor.subject).await?;
            let sealed =
                kame_devid::enroll::Sealed::seal(&verified, &[&iak, &idevid, ca.certificate()])?;
            write_public(&out, &sealed.encode()?)?;
            println!(
                "issued for {}: sealed to its TPM in {}",
                verified.request.prod_serial,
                out.display()
            );
        }
        Cmd::Ca(CaCmd::Serve {
            key,
            ca_cert,
            vendor,
            idevid_ca,
            listen,
            tls_cert,
            tls_key,
            max_pending,
            max_pending_per_peer,
        }) => {
            if max_pending == 0 || max_pending_per_peer == 0 {
                bail!("--max-pending and --max-pending-per-peer must be at least 1");
            }
            let limits = kame_devid::enroll::PendingLimits {
                total: max_pending,
                per_peer: max_pending_per_peer,
            };
            let km = key_manager(&key).await?;
            let cert = read_pems(&ca_cert)?.remove(0);
            let ca = DevIdCa::open(km, CA_KEY_ID, cert).await?;
            let (ek_roots, ek_intermediates) = ek_cas(&vendor)?;
            let svc = kame_devid::service::EnrollmentService {
                registry: registry(&vendor)?,
                ca,
                ek_roots,
                ek_intermediates,
                subject: vendor.subject,
                challenges: Challenges::with_limits(std::time::Duration::from_secs(300), limits),
                manufacturer_roots: read_all_pems(&idevid_ca)?,
                nonces: kame_devid::enroll::Nonces::new(std::time::Duration::from_secs(300))?,
            };
            let mut server = tonic::transport::Server::builder();
            if let (Some(cert), Some(key)) = (&tls_cert, &tls_key) {
                let cert =
                    std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
                let key =
                    std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
                server = server
                    .tls_config(
                        tonic::transport::ServerTlsConfig::new()
                            .identity(tonic::transport::Identity::from_pem(cert, key)),
                    )
                    .context("the TLS certificate or key")?;
            }
            let listener = tokio::net::TcpListener::bind(listen).await?;
            println!("listening on {}", listener.local_addr()?);
            use std::io::Write;
            std::io::stdout().flush()?;
            server
                .add_service(kame_api::pb::devid::enrollment_server::EnrollmentServer::new(svc))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = tokio::signal::ctrl_c().await;
                    },
                )
                .await?;
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tss_esapi=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}
