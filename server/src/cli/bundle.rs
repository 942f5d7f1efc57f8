//! `kame-server bundle show|list|set|delete`: the trust domain's bundle and federated
//! bundles, in PEM or SPIFFE bundle form, as SPIRE's CLI prints them. It only calls the API.

use super::*;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum BundleFormat {
    Pem,
    Spiffe,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DeleteMode {
    Restrict,
    Delete,
    Dissociate,
}

#[derive(Debug, Subcommand)]
pub enum BundleCmd {
    /// Prints the server's own bundle.
    Show {
        /// pem (certificates) or spiffe (the SPIFFE bundle JSON).
        #[arg(long, value_enum, default_value = "pem")]
        format: BundleFormat,
        #[command(flatten)]
        common: Common,
    },
    /// Lists federated bundles (or one with --id).
    List {
        /// Only this trust domain's bundle.
        #[arg(long)]
        id: Option<String>,
        /// pem (certificates) or spiffe (the SPIFFE bundle JSON).
        #[arg(long, value_enum, default_value = "pem")]
        format: BundleFormat,
        #[command(flatten)]
        common: Common,
    },
    /// Creates or replaces a federated bundle (from --path, else standard input).
    Set {
        /// The federated trust domain.
        #[arg(long)]
        id: String,
        /// The bundle file (default: standard input).
        #[arg(long)]
        path: Option<PathBuf>,
        /// pem (certificates) or spiffe (the SPIFFE bundle JSON).
        #[arg(long, value_enum, default_value = "pem")]
        format: BundleFormat,
        #[command(flatten)]
        common: Common,
    },
    /// Counts bundles (the server's own and the federated ones).
    Count {
        #[command(flatten)]
        common: Common,
    },
    /// Deletes a federated bundle.
    Delete {
        /// The federated trust domain.
        #[arg(long)]
        id: String,
        /// restrict: refuse while entries federate with it; delete: delete those entries too;
        /// dissociate: remove it from those entries.
        #[arg(long, value_enum, default_value = "restrict")]
        mode: DeleteMode,
        #[command(flatten)]
        common: Common,
    },
}

pub(super) fn render_bundle(b: &types::Bundle, format: BundleFormat) -> Result<String, CliError> {
    Ok(match format {
        BundleFormat::Pem => codec::x509_to_pem(b),
        BundleFormat::Spiffe => {
            codec::to_spiffe_json(b).map_err(|e| CliError::Failed(e.to_string()))? + "\n"
        }
    })
}

/// The bundle for `td` from `path` (or standard input) in `format`.
pub(super) fn read_bundle(
    td: &TrustDomain,
    path: Option<&Path>,
    format: BundleFormat,
) -> Result<types::Bundle, CliError> {
    let data = match path {
        Some(p) => std::fs::read(p).map_err(|source| CliError::Io {
            what: "cannot read",
            path: p.display().to_string(),
            source,
        })?,
        None => {
            use std::io::Read;
            let mut v = vec![];
            std::io::stdin()
                .read_to_end(&mut v)
                .map_err(|source| CliError::Io {
                    what: "cannot read",
                    path: "stdin".into(),
                    source,
                })?;
            v
        }
    };
    let bundle = match format {
        BundleFormat::Spiffe => {
            codec::from_spiffe_json(td, &data).map_err(|e| CliError::Usage(e.to_string()))?
        }
        BundleFormat::Pem => {
            let text = String::from_utf8(data)
                .map_err(|_| CliError::Usage("bundle is not UTF-8 PEM".into()))?;
            types::Bundle {
                trust_domain: td.as_str().into(),
                x509_authorities: codec::certs_from_pem(&text)
                    .map_err(|e| CliError::Usage(e.to_string()))?
                    .into_iter()
                    .map(|asn1| types::X509Certificate {
                        asn1,
                        tainted: false,
                    })
                    .collect(),
                ..Default::default()
            }
        }
    };
    Ok(bundle)
}

pub async fn bundle(cmd: BundleCmd) -> Result<(), CliError> {
    use pb::bundle::bundle_client::BundleClient;
    match cmd {
        BundleCmd::Count { common } => {
            let mut c = BundleClient::new(common.connect().await?);
            let n = c
                .count_bundles(pb::bundle::CountBundlesRequest {})
                .await?
                .into_inner()
                .count;
            print(
                common.output,
                json!({"count": n}),
                format!("{n} bundle{}\n", if n == 1 { "" } else { "s" }),
            );
        }
        BundleCmd::Show { format, common } => {
            let mut c = BundleClient::new(common.connect().await?);
            let b = c
                .get_bundle(pb::bundle::GetBundleRequest { output_mask: None })
                .await?
                .into_inner();
            let text = render_bundle(&b, format)?;
            print(
                common.output,
                json!({"trust_domain": b.trust_domain, "bundle": text}),
                text,
            );
        }
        BundleCmd::List { id, format, common } => {
            let mut c = BundleClient::new(common.connect().await?);
            let bundles = match id {
                Some(id) => {
                    let td = TrustDomain::parse(&id)
                        .map_err(|e| CliError::Usage(format!("--id: {e}")))?;
                    vec![
                        c.get_federated_bundle(pb::bundle::GetFederatedBundleRequest {
                            trust_domain: td.as_str().into(),
                            output_mask: None,
                        })
                        .await?
                        .into_inner(),
                    ]
                }
                None => {
                    c.list_federated_bundles(pb::bundle::ListFederatedBundlesRequest {
                        output_mask: None,
                        page_size: 0,
                        page_token: String::new(),
                    })
                    .await?
                    .into_inner()
                    .bundles
                }
            };
            let mut pretty = String::new();
            let mut js = vec![];
            for b in &bundles {
                let text = render_bundle(b, format)?;
                pretty += &format!(
                    "****************************************\n* spiffe://{}\n****************************************\n{text}\n",
                    b.trust_domain
                );
                js.push(json!({"trust_domain": b.trust_domain, "bundle": text}));
            }
            print(common.output, json!({"bundles": js}), pretty);
        }
        BundleCmd::Set {
            id,
            path,
            format,
            common,
        } => {
            let td = TrustDomain::parse(&id).map_err(|e| CliError::Usage(format!("--id: {e}")))?;
            let bundle = read_bundle(&td, path.as_deref(), format)?;
            let mut c = BundleClient::new(common.connect().await?);
            let r = c
                .batch_set_federated_bundle(pb::bundle::BatchSetFederatedBundleRequest {
                    bundle: vec![bundle],
                    output_mask: None,
                })
                .await?
                .into_inner();
            check_first(r.results.iter().map(|x| &x.status))?;
            print(
                common.output,
                json!({"trust_domain": td.as_str()}),
                "bundle set.\n".into(),
            );
        }
        BundleCmd::Delete { id, mode, common } => {
            let td = TrustDomain::parse(&id).map_err(|e| CliError::Usage(format!("--id: {e}")))?;
            use pb::bundle::batch_delete_federated_bundle_request::Mode;
            let mode = match mode {
                DeleteMode::Restrict => Mode::Restrict,
                DeleteMode::Delete => Mode::Delete,
                DeleteMode::Dissociate => Mode::Dissociate,
            };
            let mut c = BundleClient::new(common.connect().await?);
            let r = c
                .batch_delete_federated_bundle(pb::bundle::BatchDeleteFederatedBundleRequest {
                    trust_domains: vec![td.as_str().into()],
                    mode: mode as i32,
                })
                .await?
                .into_inner();
            check_first(r.results.iter().map(|x| &x.status))?;
            print(
                common.output,
                json!({"trust_domain": td.as_str()}),
                "bundle deleted.\n".into(),
            );
        }
    }
    Ok(())
}
