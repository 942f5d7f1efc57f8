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

#[path = "cmd/ca.rs"]
mod ca_cmd;
#[path = "cmd/device.rs"]
mod device_cmd;
#[path = "cmd/tpm.rs"]
mod tpm_cmd;
use ca_cmd::*;
use device_cmd::*;
use tpm_cmd::*;

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
    #[command(
        subcommand,
        after_help = "Examples:\n  kame-devid tpm create-iak --tcti swtpm:port=2321\n  kame-devid tpm create-idevid --tcti swtpm:port=2321 --ecc"
    )]
    Tpm(TpmCmd),
    /// Builds the TCG-CSR-IDEVID enrollment request (signed by the IDevID key in the TPM).
    Csr(CsrArgs),
    /// Enrolls with the manufacturer CA: sends the request, answers the challenge with the
    /// TPM, writes iak.pem, idevid.pem, ca.pem and iak.pub (the IAK's public area) to --out-dir.
    EnrollIdevid(EnrollIdevidArgs),
    /// Enrolls an LDevID with the owner CA: a new signing key in the TPM (under the SRK, as
    /// tpm_devid loads it) certified by the IAK over the CA's nonce, the IDevID signing the
    /// certify. Writes devid.pem, devid-ca.pem, devid.pub and devid.priv (0600) to --out-dir:
    /// the files tpm_devid's devid_cert_path, devid_pub_path and devid_priv_path name; and
    /// iak.pub, the IAK's public area (attestation_key_pub_path).
    Enroll(EnrollArgs),
    /// Opens certificates sealed by `ca issue` (offline issuance): the IAK recovers the key by
    /// credential activation under the EK, so only the TPM that made the request can. Writes
    /// iak.pem, idevid.pem, ca.pem and iak.pub to --out-dir.
    Activate(ActivateArgs),
    /// The manufacturer CA (or an owner CA).
    #[command(
        subcommand,
        after_help = "Examples:\n  kame-devid ca init --keys-path ca-keys.json --out ca.pem\n  kame-devid ca serve --keys-path ca-keys.json --ca-cert ca.pem --ek-root ek-root.pem --listen 0.0.0.0:8443"
    )]
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
    CreateIak(CreateIakArgs),
    /// Creates the IDevID key (TCG template, unrestricted signing) and persists it.
    CreateIdevid(CreateIdevidArgs),
}

#[derive(clap::Args, Clone)]
struct CaKey {
    /// The CA key in a key file (the `disk` KeyManager, 0600).
    #[arg(long, conflicts_with = "pkcs11_module")]
    keys_path: Option<PathBuf>,
    /// The CA key in a PKCS#11 token: the module, token label and a file with the user PIN.
    #[arg(long, requires_all = ["token_label", "pin_file"])]
    pkcs11_module: Option<PathBuf>,
    /// The PKCS#11 token's label (with --pkcs11-module).
    #[arg(long)]
    token_label: Option<String>,
    /// A file holding the token's user PIN (with --pkcs11-module).
    #[arg(long)]
    pin_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CaCmd {
    /// Makes the CA key and its self-signed certificate (PEM at --out).
    Init(InitArgs),
    /// Offline issuance: checks a TCG-CSR-IDEVID as `serve` does, issues the IAK and IDevID
    /// certificates and seals them to the requesting TPM (`kame-devid activate` opens them
    /// there), instead of a challenge round.
    Issue(IssueArgs),
    /// Serves enrollment (kame.devid.v1.Enrollment) over gRPC, TLS with --tls-cert and
    /// --tls-key; prints the address.
    Serve(ServeArgs),
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

/// Writes a public file (a certificate, a public area) atomically, 0644.
fn write_public(path: &Path, data: &[u8]) -> Result<()> {
    kame_keymanager::fs::write_atomic(path, data, 0o644)
        .with_context(|| format!("writing {}", path.display()))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Tpm(TpmCmd::CreateIak(a)) => create_iak(a).await,
        Cmd::Tpm(TpmCmd::CreateIdevid(a)) => create_idevid(a).await,
        Cmd::Csr(a) => csr(a).await,
        Cmd::EnrollIdevid(a) => enroll_idevid(a).await,
        Cmd::Enroll(a) => enroll(a).await,
        Cmd::Activate(a) => activate(a).await,
        Cmd::Ca(CaCmd::Init(a)) => ca_init(a).await,
        Cmd::Ca(CaCmd::Issue(a)) => ca_issue(a).await,
        Cmd::Ca(CaCmd::Serve(a)) => ca_serve(a).await,
    }
}

#[tokio::main]
async fn main() {
    // Each TPM error printed once, by us (not also by the C library).
    kame_tpm::device::quiet_esys_stderr();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // tss-esapi logs each failed TPM command itself; the error this command
                // returns says it again with its context, so the library's copy is off
                // (RUST_LOG=tss_esapi=debug brings it back).
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tss_esapi=off")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()).await {
        // The error and its causes, each said once.
        eprintln!("Error: {}", kame_api::errors::chain(e.as_ref()));
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every command says what it does, every flag has help text, every group an example.
    #[test]
    fn cli_every_command_and_flag_has_help() {
        let cmd = Cli::command();
        let missing = kame_api::spire_cli::missing_help(&cmd);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
        cmd.debug_assert();
    }
}
