//! `kame-devid tpm create-iak|create-idevid` and `kame-devid csr`: TCG device identity keys
//! made and persisted in the TPM, and the TCG-CSR-IDEVID they sign. Nothing leaves the TPM
//! but public areas and signatures.

use super::*;

// `create-iak`'s flags.
#[derive(clap::Args)]
pub(super) struct CreateIakArgs {
    #[command(flatten)]
    tpm: TpmArgs,
    /// The persistent handle to create the IAK at (hex).
    #[arg(long, default_value = IAK_HANDLE, value_parser = handle)]
    handle: u32,
    /// ECC NIST P-256 instead of RSA 2048.
    #[arg(long)]
    ecc: bool,
}

// `create-idevid`'s flags.
#[derive(clap::Args)]
pub(super) struct CreateIdevidArgs {
    #[command(flatten)]
    tpm: TpmArgs,
    /// The persistent handle to create the IDevID key at (hex).
    #[arg(long, default_value = IDEVID_HANDLE, value_parser = handle)]
    handle: u32,
    /// ECC NIST P-256 instead of RSA 2048.
    #[arg(long)]
    ecc: bool,
}

// `csr`'s flags.
#[derive(clap::Args)]
pub(super) struct CsrArgs {
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
}

pub(super) async fn create_iak(args: CreateIakArgs) -> Result<()> {
    let CreateIakArgs { tpm, handle, ecc } = args;
    provision(&tpm, DevIdKey::Iak, ecc, handle)
}

pub(super) async fn create_idevid(args: CreateIdevidArgs) -> Result<()> {
    let CreateIdevidArgs { tpm, handle, ecc } = args;
    provision(&tpm, DevIdKey::IDevId, ecc, handle)
}

/// Creates and persists `key` at `handle` and prints its public area (hex).
fn provision(tpm: &TpmArgs, key: DevIdKey, ecc: bool, handle: u32) -> Result<()> {
    let mut d = Device::open(&tpm.tcti)?;
    let public = d.provision_tcg_key(key, ecc, handle)?;
    println!(
        "{}",
        public
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    Ok(())
}

pub(super) async fn csr(args: CsrArgs) -> Result<()> {
    let CsrArgs {
        tpm,
        iak_handle,
        idevid_handle,
        model,
        serial,
        out,
    } = args;
    // The CA refuses it too; say so before touching the TPM.
    kame_devid::profile::check_serial_number(&serial).context("--serial")?;
    let mut d = Device::open(&tpm.tcti)?;
    let ek_cert = d
        .ek_certificate(EkAlg::Rsa2048)?
        .context("the TPM has no RSA EK certificate in NV")?;
    let (certify, certify_sig) = d.certify_tcg(idevid_handle, DevIdKey::IDevId, iak_handle, &[])?;
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
    Ok(())
}
