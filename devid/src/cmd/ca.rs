//! `kame-devid ca init|issue|serve`: the manufacturer (or owner) CA: its key in a key file
//! or a PKCS#11 token, offline issuance sealed to the requesting TPM, and the enrollment
//! service. Every check runs before anything is issued.

use super::*;

// `init`'s flags.
#[derive(clap::Args)]
pub(super) struct InitArgs {
    #[command(flatten)]
    key: CaKey,
    /// The CA certificate's subject.
    #[arg(long, default_value = "O=Kame, CN=Kame Manufacturer CA")]
    subject: String,
    /// The CA certificate's lifetime in days.
    #[arg(long, default_value_t = 3650)]
    ttl_days: u64,
    /// Where to write the CA certificate (PEM).
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing CA: a new key in place of the one held, and a new certificate over
    /// `--out`. Everything the old CA issued stops chaining to the new one.
    #[arg(long)]
    force: bool,
}

// `issue`'s flags.
#[derive(clap::Args)]
pub(super) struct IssueArgs {
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
}

// `serve`'s flags.
#[derive(clap::Args)]
pub(super) struct ServeArgs {
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
    /// Where the enrollment service listens (port 0: any free port, printed).
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
}

pub(super) async fn key_manager(k: &CaKey) -> Result<Arc<dyn KeyManager>> {
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

pub(super) async fn ca_init(args: InitArgs) -> Result<()> {
    let InitArgs {
        key,
        subject,
        ttl_days,
        out,
        force,
    } = args;
    let km = key_manager(&key).await?;
    if !force {
        if out.exists() {
            bail!(
                "{} exists: a CA is already initialised there (--force replaces it, and what it issued stops chaining)",
                out.display()
            );
        }
        if km.public_key(CA_KEY_ID).await.is_ok() {
            bail!(
                "the key store already holds a CA key ({CA_KEY_ID}); --force replaces it, and what it issued stops chaining"
            );
        }
    }
    let ca = DevIdCa::init(
        km,
        CA_KEY_ID,
        kame_keymanager::KeyType::EcP256,
        &subject,
        ttl_days.saturating_mul(86400),
    )
    .await?;
    write_public(&out, pem(ca.certificate()).as_bytes())?;
    println!(
        "CA initialised: key {CA_KEY_ID} in the key store, certificate in {}",
        out.display()
    );
    Ok(())
}

pub(super) async fn ca_issue(args: IssueArgs) -> Result<()> {
    let IssueArgs {
        key,
        ca_cert,
        vendor,
        request,
        out,
    } = args;
    let (ek_roots, ek_intermediates) = ek_cas(&vendor)?;
    let bytes =
        std::fs::read(&request).with_context(|| format!("reading {}", request.display()))?;
    // Every check before anything is issued.
    let verified =
        kame_devid::enroll::verify_idevid_request(&bytes, &ek_roots, &ek_intermediates, now()?)?;
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
    let sealed = kame_devid::enroll::Sealed::seal(&verified, &[&iak, &idevid, ca.certificate()])?;
    write_public(&out, &sealed.encode()?)?;
    println!(
        "issued for {}: sealed to its TPM in {}",
        verified.request.prod_serial,
        out.display()
    );
    Ok(())
}

pub(super) async fn ca_serve(args: ServeArgs) -> Result<()> {
    let ServeArgs {
        key,
        ca_cert,
        vendor,
        idevid_ca,
        listen,
        tls_cert,
        tls_key,
        max_pending,
        max_pending_per_peer,
    } = args;
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
        let cert = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
        let key = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
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
    Ok(())
}
