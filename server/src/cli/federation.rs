//! `kame-server federation create|list|show|update|delete|refresh`: federation relationships
//! through the TrustDomain API, printed as SPIRE's CLI prints them. It only calls the API.

use super::bundle::{BundleFormat, read_bundle};
use super::*;
use kame_api::pb::trustdomain::trust_domain_client::TrustDomainClient;
use kame_api::pb::types::federation_relationship::BundleEndpointProfile as P;
use kame_api::pb::types::{
    FederationRelationship, FederationRelationshipMask, HttpsWebProfile, HttpsspiffeProfile,
};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum EndpointProfileArg {
    #[value(name = "https_web")]
    HttpsWeb,
    #[value(name = "https_spiffe")]
    HttpsSpiffe,
}

/// What create and update take.
#[derive(Debug, clap::Args)]
pub struct RelationshipArgs {
    /// The federated trust domain.
    #[arg(long)]
    pub trust_domain: String,
    /// Its bundle endpoint (`https://…`).
    #[arg(long)]
    pub bundle_endpoint_url: Option<String>,
    /// How the endpoint is authenticated.
    #[arg(long, value_enum)]
    pub bundle_endpoint_profile: Option<EndpointProfileArg>,
    /// With https_spiffe: the SPIFFE ID the endpoint must present.
    #[arg(long)]
    pub endpoint_spiffe_id: Option<String>,
    /// The trust domain's bundle, stored now (an https_spiffe relationship needs one).
    #[arg(long)]
    pub trust_domain_bundle_path: Option<PathBuf>,
    /// pem or spiffe: the format of --trust-domain-bundle-path.
    #[arg(long, value_enum, default_value = "pem")]
    pub trust_domain_bundle_format: BundleFormat,
}

#[derive(Debug, Subcommand)]
pub enum FederationCmd {
    /// Creates a relationship with a trust domain.
    Create {
        #[command(flatten)]
        rel: RelationshipArgs,
        #[command(flatten)]
        common: Common,
    },
    /// Updates a relationship (the flags given replace what is stored).
    Update {
        #[command(flatten)]
        rel: RelationshipArgs,
        #[command(flatten)]
        common: Common,
    },
    /// Lists the relationships made through the API.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Shows one relationship.
    Show {
        /// The trust domain (SPIRE's `-trustDomain`).
        #[arg(long, alias = "trust-domain")]
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Deletes a relationship (the federated bundle stays).
    Delete {
        /// The federated trust domain.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Fetches a federated trust domain's bundle now.
    Refresh {
        /// The federated trust domain.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        common: Common,
    },
}

fn relationship(
    a: &RelationshipArgs,
) -> Result<(FederationRelationship, FederationRelationshipMask), CliError> {
    let td = TrustDomain::parse(&a.trust_domain)
        .map_err(|e| CliError::Usage(format!("--trust-domain: {e}")))?;
    let profile = match (a.bundle_endpoint_profile, &a.endpoint_spiffe_id) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(CliError::Usage(
                "--endpoint-spiffe-id goes with --bundle-endpoint-profile https_spiffe".into(),
            ));
        }
        (Some(EndpointProfileArg::HttpsWeb), None) => Some(P::HttpsWeb(HttpsWebProfile {})),
        (Some(EndpointProfileArg::HttpsWeb), Some(_)) => {
            return Err(CliError::Usage(
                "--endpoint-spiffe-id is only for https_spiffe".into(),
            ));
        }
        (Some(EndpointProfileArg::HttpsSpiffe), id) => {
            let id = id
                .clone()
                .ok_or_else(|| CliError::Usage("https_spiffe needs --endpoint-spiffe-id".into()))?;
            parse_id("--endpoint-spiffe-id", &id)?;
            Some(P::HttpsSpiffe(HttpsspiffeProfile {
                endpoint_spiffe_id: id,
            }))
        }
    };
    let bundle = match &a.trust_domain_bundle_path {
        None => None,
        Some(p) => Some(read_bundle(&td, Some(p), a.trust_domain_bundle_format)?),
    };
    let mask = FederationRelationshipMask {
        bundle_endpoint_url: a.bundle_endpoint_url.is_some(),
        bundle_endpoint_profile: profile.is_some(),
        trust_domain_bundle: bundle.is_some(),
    };
    Ok((
        FederationRelationship {
            trust_domain: td.as_str().to_string(),
            bundle_endpoint_url: a.bundle_endpoint_url.clone().unwrap_or_default(),
            bundle_endpoint_profile: profile,
            trust_domain_bundle: bundle,
        },
        mask,
    ))
}

fn rel_json(r: &FederationRelationship) -> Value {
    let (profile, id) = match &r.bundle_endpoint_profile {
        Some(P::HttpsWeb(_)) => ("https_web", None),
        Some(P::HttpsSpiffe(p)) => ("https_spiffe", Some(p.endpoint_spiffe_id.clone())),
        None => ("", None),
    };
    json!({
        "trust_domain": r.trust_domain,
        "bundle_endpoint_url": r.bundle_endpoint_url,
        "bundle_endpoint_profile": profile,
        "endpoint_spiffe_id": id,
        "trust_domain_bundle_sequence": r.trust_domain_bundle.as_ref().map(|b| b.sequence_number),
    })
}

/// SPIRE's pretty form of one relationship.
fn rel_pretty(r: &FederationRelationship) -> String {
    let mut out = format!(
        "Trust domain              : {}\nBundle endpoint URL       : {}\n",
        r.trust_domain, r.bundle_endpoint_url
    );
    match &r.bundle_endpoint_profile {
        Some(P::HttpsWeb(_)) => out.push_str("Bundle endpoint profile   : https_web\n"),
        Some(P::HttpsSpiffe(p)) => out.push_str(&format!(
            "Bundle endpoint profile   : https_spiffe\nEndpoint SPIFFE ID        : {}\n",
            p.endpoint_spiffe_id
        )),
        None => {}
    }
    out
}

pub async fn federation(cmd: FederationCmd) -> Result<(), CliError> {
    match cmd {
        FederationCmd::Create { rel, common } => {
            let (r, _) = relationship(&rel)?;
            if r.bundle_endpoint_url.is_empty() || r.bundle_endpoint_profile.is_none() {
                return Err(CliError::Usage(
                    "create needs --bundle-endpoint-url and --bundle-endpoint-profile".into(),
                ));
            }
            let mut c = TrustDomainClient::new(common.connect().await?);
            let res = c
                .batch_create_federation_relationship(
                    pb::trustdomain::BatchCreateFederationRelationshipRequest {
                        federation_relationships: vec![r],
                        output_mask: None,
                    },
                )
                .await?
                .into_inner();
            check_first(res.results.iter().map(|x| &x.status))?;
            let got = res.results[0]
                .federation_relationship
                .clone()
                .unwrap_or_default();
            print(common.output, rel_json(&got), rel_pretty(&got));
        }
        FederationCmd::Update { rel, common } => {
            let (r, mask) = relationship(&rel)?;
            let mut c = TrustDomainClient::new(common.connect().await?);
            let res = c
                .batch_update_federation_relationship(
                    pb::trustdomain::BatchUpdateFederationRelationshipRequest {
                        federation_relationships: vec![r],
                        input_mask: Some(mask),
                        output_mask: None,
                    },
                )
                .await?
                .into_inner();
            check_first(res.results.iter().map(|x| &x.status))?;
            let got = res.results[0]
                .federation_relationship
                .clone()
                .unwrap_or_default();
            print(common.output, rel_json(&got), rel_pretty(&got));
        }
        FederationCmd::List { common } => {
            let mut c = TrustDomainClient::new(common.connect().await?);
            let mut all = vec![];
            let mut page_token = String::new();
            loop {
                let r = c
                    .list_federation_relationships(
                        pb::trustdomain::ListFederationRelationshipsRequest {
                            output_mask: None,
                            page_size: 0,
                            page_token: page_token.clone(),
                        },
                    )
                    .await?
                    .into_inner();
                all.extend(r.federation_relationships);
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            let mut pretty = format!("Found {} federation relationship(s)\n", all.len());
            for r in &all {
                pretty.push('\n');
                pretty.push_str(&rel_pretty(r));
            }
            print(
                common.output,
                json!({"federation_relationships": all.iter().map(rel_json).collect::<Vec<_>>()}),
                pretty,
            );
        }
        FederationCmd::Show { id, common } => {
            let mut c = TrustDomainClient::new(common.connect().await?);
            let r = c
                .get_federation_relationship(pb::trustdomain::GetFederationRelationshipRequest {
                    trust_domain: id,
                    output_mask: None,
                })
                .await?
                .into_inner();
            print(common.output, rel_json(&r), rel_pretty(&r));
        }
        FederationCmd::Delete { id, common } => {
            let mut c = TrustDomainClient::new(common.connect().await?);
            let r = c
                .batch_delete_federation_relationship(
                    pb::trustdomain::BatchDeleteFederationRelationshipRequest {
                        trust_domains: vec![id.clone()],
                    },
                )
                .await?
                .into_inner();
            check_first(r.results.iter().map(|x| &x.status))?;
            print(
                common.output,
                json!({"trust_domain": id}),
                "federation relationship deleted.\n".into(),
            );
        }
        FederationCmd::Refresh { id, common } => {
            let mut c = TrustDomainClient::new(common.connect().await?);
            c.refresh_bundle(pb::trustdomain::RefreshBundleRequest {
                trust_domain: id.clone(),
            })
            .await?;
            print(
                common.output,
                json!({"trust_domain": id}),
                "bundle refreshed.\n".into(),
            );
        }
    }
    Ok(())
}
