//! `kame-server x509 mint` and `kame-server jwt mint`: SVIDs minted through the SVID API for
//! an operator (SPIRE's flags and output files). Keys for X509-SVIDs are made here and
//! written 0600; nothing else is kept.

use super::*;

#[derive(Debug, Subcommand)]
pub enum X509Cmd {
    /// Mints an X509-SVID (the key is generated here and never leaves this process).
    Mint {
        /// The SPIFFE ID of the SVID.
        #[arg(long)]
        spiffe_id: String,
        /// TTL: a duration such as 1h, or seconds (0 = server default).
        #[arg(long, default_value = "0", value_parser = ttl_value)]
        ttl: i64,
        /// A DNS name for the SVID; repeat for several.
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
        /// Write svid.pem, key.pem (0600) and bundle.pem into this directory.
        #[arg(long)]
        write: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Subcommand)]
pub enum JwtCmd {
    /// Mints a JWT-SVID and prints the token.
    Mint {
        /// The SPIFFE ID of the token.
        #[arg(long)]
        spiffe_id: String,
        /// An audience; repeat for several.
        #[arg(long = "audience", required = true)]
        audience: Vec<String>,
        /// TTL: a duration such as 1h, or seconds (0 = server default).
        #[arg(long, default_value = "0", value_parser = ttl_value)]
        ttl: i64,
        /// Write the token to this file instead of standard output.
        #[arg(long)]
        write: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
}

pub async fn x509(cmd: X509Cmd) -> Result<(), CliError> {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
    let X509Cmd::Mint {
        spiffe_id,
        ttl,
        dns_names,
        write,
        common,
    } = cmd;
    let id = parse_id("--spiffe-id", &spiffe_id)?;
    let ttl = ttl_arg("--ttl", Some(ttl))?;
    let kp = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
        .map_err(|_| CliError::Failed("key generation failed".into()))?;
    let spki = kp
        .public_key()
        .as_der()
        .map_err(|_| CliError::Failed("key encoding failed".into()))?;
    let info = kame_api::csr::request_info(spki.as_ref(), &[id.to_string()], &dns_names)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let sig = kp
        .sign(&aws_lc_rs::rand::SystemRandom::new(), &info)
        .map_err(|_| CliError::Failed("signing the CSR failed".into()))?;
    let alg = kame_api::keys::KeyInfo::from_spki_der(spki.as_ref())
        .map_err(|e| CliError::Failed(e.to_string()))?
        .x509_signature_algorithm();
    let csr = kame_api::x509svid::assemble(&info, &alg, sig.as_ref())
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let channel = common.connect().await?;
    let svid = pb::svid::svid_client::SvidClient::new(channel.clone())
        .mint_x509svid(pb::svid::MintX509svidRequest { csr, ttl })
        .await?
        .into_inner()
        .svid
        .ok_or_else(|| CliError::Failed("no SVID returned".into()))?;
    let bundle = pb::bundle::bundle_client::BundleClient::new(channel)
        .get_bundle(pb::bundle::GetBundleRequest { output_mask: None })
        .await?
        .into_inner();
    let svid_pem: String = svid
        .cert_chain
        .iter()
        .map(|c| codec::pem_block("CERTIFICATE", c))
        .collect();
    let pkcs8 = kp
        .to_pkcs8v1()
        .map_err(|_| CliError::Failed("key encoding failed".into()))?;
    let key_pem = zeroize::Zeroizing::new(codec::pem_block("PRIVATE KEY", pkcs8.as_ref()));
    let bundle_pem = codec::x509_to_pem(&bundle);
    match write {
        Some(dir) => {
            std::fs::create_dir_all(&dir).map_err(|source| CliError::Io {
                what: "cannot create",
                path: dir.display().to_string(),
                source,
            })?;
            let w = |name: &str, data: &[u8], secret: bool| -> Result<(), CliError> {
                let p = dir.join(name);
                if secret {
                    kame_keymanager::fs::write_secret(&p, data)
                        .map_err(|e| CliError::Failed(e.to_string()))
                } else {
                    std::fs::write(&p, data).map_err(|source| CliError::Io {
                        what: "cannot write",
                        path: p.display().to_string(),
                        source,
                    })
                }
            };
            w("svid.pem", svid_pem.as_bytes(), false)?;
            w("key.pem", key_pem.as_bytes(), true)?;
            w("bundle.pem", bundle_pem.as_bytes(), false)?;
            print(
                common.output,
                json!({"spiffe_id": id.to_string(), "expires_at": svid.expires_at, "dir": dir.display().to_string()}),
                format!("X509-SVID for {id} written to {}\n", dir.display()),
            );
        }
        None => print(
            common.output,
            json!({"spiffe_id": id.to_string(), "expires_at": svid.expires_at, "svid": svid_pem, "key": key_pem.as_str(), "bundle": bundle_pem}),
            format!(
                "X509-SVID:\n{svid_pem}\nPrivate key:\n{}\nRoot CAs:\n{bundle_pem}",
                key_pem.as_str()
            ),
        ),
    }
    Ok(())
}

pub async fn jwt(cmd: JwtCmd) -> Result<(), CliError> {
    let JwtCmd::Mint {
        spiffe_id,
        audience,
        ttl,
        write,
        common,
    } = cmd;
    let id = parse_id("--spiffe-id", &spiffe_id)?;
    let ttl = ttl_arg("--ttl", Some(ttl))?;
    let svid = pb::svid::svid_client::SvidClient::new(common.connect().await?)
        .mint_jwtsvid(pb::svid::MintJwtsvidRequest {
            id: Some(id_proto(&id)),
            audience,
            ttl,
        })
        .await?
        .into_inner()
        .svid
        .ok_or_else(|| CliError::Failed("no SVID returned".into()))?;
    match write {
        Some(p) => kame_keymanager::fs::write_secret(&p, svid.token.as_bytes())
            .map_err(|e| CliError::Failed(e.to_string()))?,
        None => print(
            common.output,
            json!({"token": svid.token, "expires_at": svid.expires_at, "issued_at": svid.issued_at}),
            format!("{}\n", svid.token),
        ),
    }
    Ok(())
}
