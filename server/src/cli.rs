//! `kame-server` admin commands in SPIRE's tree (`entry create`, `bundle show`, `token generate`,
//! `agent list`, `x509 mint`, `jwt mint`, `healthcheck`), talking to the server's admin Unix
//! socket. Output is `pretty` (SPIRE-like text) or `json`. Errors carry the gRPC code and message.

use crate::config::DEFAULT_SOCKET_PATH;
use clap::{Args, Subcommand, ValueEnum};
use kame_api::bundle as codec;
use kame_api::pb::{self, types};
use kame_api::{SpiffeId, TrustDomain};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use tonic::transport::{Channel, Endpoint};

mod authority;
pub use authority::{
    AuthorityCmd, LocalAuthorityCmd, UpstreamAuthorityCmd, localauthority, upstreamauthority,
};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot connect to the server at {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("server error ({code:?}): {message}")]
    Rpc { code: tonic::Code, message: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        CliError::Rpc {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Path to the server's admin API socket.
    #[arg(long, default_value = DEFAULT_SOCKET_PATH)]
    pub socket_path: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "pretty")]
    pub output: Output,
}

/// Connects to the admin socket (`/path` or `unix:///path`).
pub async fn connect(socket: &Path) -> Result<Channel, CliError> {
    let s = socket.to_string_lossy();
    let path = PathBuf::from(s.strip_prefix("unix://").unwrap_or(&s));
    let p2 = path.clone();
    Endpoint::from_static("http://kame.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p2.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .map_err(|source| CliError::Connect {
            path: path.display().to_string(),
            source,
        })
}

fn parse_id(flag: &str, s: &str) -> Result<SpiffeId, CliError> {
    SpiffeId::parse(s)
        .map_err(|e| CliError::Usage(format!("{flag}: {s:?} is not a valid SPIFFE ID: {e}")))
}

/// Splits `spiffe://td/path` into the wire message without judging it: the server validates IDs
/// and answers InvalidArgument, so the CLI and API agree on what is valid.
fn loose_id(flag: &str, s: &str) -> Result<types::Spiffeid, CliError> {
    let rest = s
        .strip_prefix("spiffe://")
        .ok_or_else(|| CliError::Usage(format!("{flag}: {s:?} must start with spiffe://")))?;
    let (td, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    Ok(types::Spiffeid {
        trust_domain: td.to_string(),
        path: path.to_string(),
    })
}

fn id_proto(id: &SpiffeId) -> types::Spiffeid {
    types::Spiffeid {
        trust_domain: id.trust_domain().as_str().to_string(),
        path: id.path().to_string(),
    }
}

fn id_str(id: &Option<types::Spiffeid>) -> String {
    match id {
        Some(i) => format!("spiffe://{}{}", i.trust_domain, i.path),
        None => String::new(),
    }
}

fn parse_selector(s: &str) -> Result<types::Selector, CliError> {
    match s.split_once(':') {
        Some((t, v)) if !t.is_empty() && !v.is_empty() => Ok(types::Selector {
            r#type: t.to_string(),
            value: v.to_string(),
        }),
        _ => Err(CliError::Usage(format!(
            "--selector: {s:?} is not of the form type:value"
        ))),
    }
}

fn check_status(s: &Option<types::Status>) -> Result<(), CliError> {
    match s {
        Some(st) if st.code != 0 => Err(CliError::Rpc {
            code: tonic::Code::from_i32(st.code),
            message: st.message.clone(),
        }),
        None => Err(CliError::Failed("server returned no status".into())),
        _ => Ok(()),
    }
}

fn entry_json(e: &types::Entry) -> Value {
    json!({
        "id": e.id,
        "spiffe_id": id_str(&e.spiffe_id),
        "parent_id": id_str(&e.parent_id),
        "selectors": e.selectors.iter().map(|s| json!({"type": s.r#type, "value": s.value})).collect::<Vec<_>>(),
        "x509_svid_ttl": e.x509_svid_ttl,
        "jwt_svid_ttl": e.jwt_svid_ttl,
        "federates_with": e.federates_with,
        "admin": e.admin,
        "downstream": e.downstream,
        "expires_at": e.expires_at,
        "dns_names": e.dns_names,
        "revision_number": e.revision_number,
        "store_svid": e.store_svid,
        "hint": e.hint,
        "created_at": e.created_at,
    })
}

fn entry_pretty(e: &types::Entry) -> String {
    let ttl = |t: i32| {
        if t == 0 {
            "default".to_string()
        } else {
            t.to_string()
        }
    };
    let mut s = format!(
        "Entry ID         : {}\nSPIFFE ID        : {}\nParent ID        : {}\nRevision         : {}\nX509-SVID TTL    : {}\nJWT-SVID TTL     : {}\n",
        e.id,
        id_str(&e.spiffe_id),
        id_str(&e.parent_id),
        e.revision_number,
        ttl(e.x509_svid_ttl),
        ttl(e.jwt_svid_ttl)
    );
    if e.expires_at != 0 {
        s += &format!("Expiration time  : {}\n", e.expires_at);
    }
    for sel in &e.selectors {
        s += &format!("Selector         : {}:{}\n", sel.r#type, sel.value);
    }
    for f in &e.federates_with {
        s += &format!("FederatesWith    : {f}\n");
    }
    for d in &e.dns_names {
        s += &format!("DNS name         : {d}\n");
    }
    if e.admin {
        s += "Admin            : true\n";
    }
    if e.downstream {
        s += "Downstream       : true\n";
    }
    if e.store_svid {
        s += "StoreSvid        : true\n";
    }
    if !e.hint.is_empty() {
        s += &format!("Hint             : {}\n", e.hint);
    }
    s
}

fn agent_json(a: &types::Agent) -> Value {
    json!({
        "id": id_str(&a.id),
        "attestation_type": a.attestation_type,
        "x509svid_serial_number": a.x509svid_serial_number,
        "x509svid_expires_at": a.x509svid_expires_at,
        "selectors": a.selectors.iter().map(|s| json!({"type": s.r#type, "value": s.value})).collect::<Vec<_>>(),
        "banned": a.banned,
        "can_reattest": a.can_reattest,
        "agent_version": a.agent_version,
    })
}

fn agent_pretty(a: &types::Agent) -> String {
    let mut s = format!(
        "SPIFFE ID         : {}\nAttestation type  : {}\nExpiration time   : {}\nSerial number     : {}\nCan re-attest     : {}\n",
        id_str(&a.id),
        a.attestation_type,
        a.x509svid_expires_at,
        a.x509svid_serial_number,
        a.can_reattest
    );
    if a.banned {
        s += "Banned            : true\n";
    }
    for sel in &a.selectors {
        s += &format!("Selector          : {}:{}\n", sel.r#type, sel.value);
    }
    s
}

fn print(out: Output, json_v: Value, pretty: String) {
    match out {
        Output::Json => println!("{json_v}"),
        Output::Pretty => print!("{pretty}"),
    }
}

fn ttl_arg(flag: &str, v: Option<i64>) -> Result<i32, CliError> {
    match v {
        None => Ok(0),
        Some(t) if t < 0 => Err(CliError::Usage(format!("{flag}: must not be negative"))),
        Some(t) => i32::try_from(t).map_err(|_| {
            CliError::Usage(format!(
                "{flag}: {t} is too large (at most {} seconds)",
                i32::MAX
            ))
        }),
    }
}

// ---------------------------------------------------------------- entry

#[derive(Debug, Subcommand)]
pub enum EntryCmd {
    /// Creates a registration entry.
    Create(EntryCreate),
    /// Shows registration entries (all, or filtered).
    Show(EntryShow),
    /// Updates a registration entry (every field is replaced by the flags given).
    Update(EntryUpdate),
    /// Deletes a registration entry.
    Delete {
        #[arg(long)]
        entry_id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Counts registration entries.
    Count {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Args)]
pub struct EntryFields {
    /// The SPIFFE ID of the workload.
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// The SPIFFE ID of the parent (an agent, or another entry).
    #[arg(long)]
    pub parent_id: Option<String>,
    /// A selector `type:value`; repeat for several.
    #[arg(long = "selector")]
    pub selectors: Vec<String>,
    /// X509-SVID TTL in seconds (0 = server default).
    #[arg(long)]
    pub x509_svid_ttl: Option<i64>,
    /// JWT-SVID TTL in seconds (0 = server default).
    #[arg(long)]
    pub jwt_svid_ttl: Option<i64>,
    /// A DNS name for the X509-SVID; repeat for several.
    #[arg(long = "dns-name")]
    pub dns_names: Vec<String>,
    /// A trust domain whose bundle the workload gets; repeat for several.
    #[arg(long = "federates-with")]
    pub federates_with: Vec<String>,
    /// The workload may use the server's admin APIs.
    #[arg(long)]
    pub admin: bool,
    /// The workload is a downstream server.
    #[arg(long)]
    pub downstream: bool,
    /// The SVID is stored by the agent's SVID store plugins.
    #[arg(long)]
    pub store_svid: bool,
    /// Entry expiry (unix seconds).
    #[arg(long)]
    pub entry_expiry: Option<i64>,
    /// A hint for workloads choosing among several SVIDs.
    #[arg(long)]
    pub hint: Option<String>,
}

#[derive(Debug, Args)]
pub struct EntryCreate {
    #[command(flatten)]
    pub fields: EntryFields,
    /// Register a node entry: the parent is the server, and agents whose selectors match alias to it.
    #[arg(long)]
    pub node: bool,
    /// A custom entry ID.
    #[arg(long)]
    pub entry_id: Option<String>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct EntryUpdate {
    #[arg(long)]
    pub entry_id: String,
    #[command(flatten)]
    pub fields: EntryFields,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct EntryShow {
    #[arg(long)]
    pub entry_id: Option<String>,
    #[arg(long)]
    pub spiffe_id: Option<String>,
    #[arg(long)]
    pub parent_id: Option<String>,
    #[arg(long = "selector")]
    pub selectors: Vec<String>,
    #[arg(long)]
    pub hint: Option<String>,
    #[command(flatten)]
    pub common: Common,
}

fn entry_from_fields(
    f: &EntryFields,
    id: String,
    parent_override: Option<String>,
) -> Result<types::Entry, CliError> {
    let spiffe_id = f
        .spiffe_id
        .as_deref()
        .ok_or_else(|| CliError::Usage("--spiffe-id is required".into()))?;
    let spiffe_id = loose_id("--spiffe-id", spiffe_id)?;
    let parent = match (parent_override, &f.parent_id) {
        (Some(p), None) => p,
        (Some(_), Some(_)) => {
            return Err(CliError::Usage(
                "--node and --parent-id are mutually exclusive".into(),
            ));
        }
        (None, Some(p)) => p.clone(),
        (None, None) => {
            return Err(CliError::Usage(
                "--parent-id (or --node) is required".into(),
            ));
        }
    };
    let parent = loose_id("--parent-id", &parent)?;
    if f.selectors.is_empty() {
        return Err(CliError::Usage(
            "at least one --selector is required".into(),
        ));
    }
    Ok(types::Entry {
        id,
        spiffe_id: Some(spiffe_id),
        parent_id: Some(parent),
        selectors: f
            .selectors
            .iter()
            .map(|s| parse_selector(s))
            .collect::<Result<_, _>>()?,
        x509_svid_ttl: ttl_arg("--x509-svid-ttl", f.x509_svid_ttl)?,
        jwt_svid_ttl: ttl_arg("--jwt-svid-ttl", f.jwt_svid_ttl)?,
        federates_with: f.federates_with.clone(),
        admin: f.admin,
        downstream: f.downstream,
        expires_at: f.entry_expiry.unwrap_or(0),
        dns_names: f.dns_names.clone(),
        revision_number: 0,
        store_svid: f.store_svid,
        hint: f.hint.clone().unwrap_or_default(),
        created_at: 0,
        additional_attributes: None,
    })
}

pub async fn entry(cmd: EntryCmd) -> Result<(), CliError> {
    use pb::entry::entry_client::EntryClient;
    match cmd {
        EntryCmd::Create(c) => {
            let parent = if c.node {
                let id = c
                    .fields
                    .spiffe_id
                    .as_deref()
                    .ok_or_else(|| CliError::Usage("--spiffe-id is required".into()))?;
                let td = loose_id("--spiffe-id", id)?.trust_domain;
                Some(format!("spiffe://{td}/spire/server"))
            } else {
                None
            };
            let e = entry_from_fields(&c.fields, c.entry_id.clone().unwrap_or_default(), parent)?;
            let mut client = EntryClient::new(connect(&c.common.socket_path).await?);
            let resp = client
                .batch_create_entry(pb::entry::BatchCreateEntryRequest {
                    entries: vec![e],
                    output_mask: None,
                })
                .await?
                .into_inner();
            let r = resp
                .results
                .first()
                .ok_or_else(|| CliError::Failed("no result".into()))?;
            check_status(&r.status)?;
            let e = r
                .entry
                .as_ref()
                .ok_or_else(|| CliError::Failed("no entry returned".into()))?;
            print(c.common.output, entry_json(e), entry_pretty(e));
        }
        EntryCmd::Update(u) => {
            let e = entry_from_fields(&u.fields, u.entry_id.clone(), None)?;
            let mut client = EntryClient::new(connect(&u.common.socket_path).await?);
            let resp = client
                .batch_update_entry(pb::entry::BatchUpdateEntryRequest {
                    entries: vec![e],
                    input_mask: None,
                    output_mask: None,
                })
                .await?
                .into_inner();
            let r = resp
                .results
                .first()
                .ok_or_else(|| CliError::Failed("no result".into()))?;
            check_status(&r.status)?;
            let e = r
                .entry
                .as_ref()
                .ok_or_else(|| CliError::Failed("no entry returned".into()))?;
            print(u.common.output, entry_json(e), entry_pretty(e));
        }
        EntryCmd::Delete { entry_id, common } => {
            let mut client = EntryClient::new(connect(&common.socket_path).await?);
            let resp = client
                .batch_delete_entry(pb::entry::BatchDeleteEntryRequest {
                    ids: vec![entry_id.clone()],
                })
                .await?
                .into_inner();
            let r = resp
                .results
                .first()
                .ok_or_else(|| CliError::Failed("no result".into()))?;
            check_status(&r.status)?;
            print(
                common.output,
                json!({"id": entry_id}),
                format!("Deleted entry with ID: {entry_id}\n"),
            );
        }
        EntryCmd::Count { common } => {
            let mut client = EntryClient::new(connect(&common.socket_path).await?);
            let n = client
                .count_entries(pb::entry::CountEntriesRequest { filter: None })
                .await?
                .into_inner()
                .count;
            print(
                common.output,
                json!({"count": n}),
                format!("{n} registration entries\n"),
            );
        }
        EntryCmd::Show(s) => {
            let mut client = EntryClient::new(connect(&s.common.socket_path).await?);
            let entries = if let Some(id) = &s.entry_id {
                vec![
                    client
                        .get_entry(pb::entry::GetEntryRequest {
                            id: id.clone(),
                            output_mask: None,
                        })
                        .await?
                        .into_inner(),
                ]
            } else {
                let filter = pb::entry::EntryFilter {
                    by_spiffe_id: s
                        .spiffe_id
                        .as_deref()
                        .map(|x| parse_id("--spiffe-id", x).map(|i| id_proto(&i)))
                        .transpose()?,
                    by_parent_id: s
                        .parent_id
                        .as_deref()
                        .map(|x| parse_id("--parent-id", x).map(|i| id_proto(&i)))
                        .transpose()?,
                    by_selectors: if s.selectors.is_empty() {
                        None
                    } else {
                        Some(types::SelectorMatch {
                            selectors: s
                                .selectors
                                .iter()
                                .map(|x| parse_selector(x))
                                .collect::<Result<_, _>>()?,
                            r#match: types::selector_match::MatchBehavior::MatchSuperset as i32,
                        })
                    },
                    by_federates_with: None,
                    by_hint: s.hint.clone(),
                    by_downstream: None,
                };
                let mut out = vec![];
                let mut token = String::new();
                loop {
                    let r = client
                        .list_entries(pb::entry::ListEntriesRequest {
                            filter: Some(filter.clone()),
                            output_mask: None,
                            page_size: 500,
                            page_token: token.clone(),
                        })
                        .await?
                        .into_inner();
                    out.extend(r.entries);
                    if r.next_page_token.is_empty() {
                        break;
                    }
                    token = r.next_page_token;
                }
                out
            };
            let pretty = format!(
                "Found {} entr{}\n{}",
                entries.len(),
                if entries.len() == 1 { "y" } else { "ies" },
                entries
                    .iter()
                    .map(|e| format!("{}\n", entry_pretty(e)))
                    .collect::<String>()
            );
            print(
                s.common.output,
                json!({"entries": entries.iter().map(entry_json).collect::<Vec<_>>()}),
                pretty,
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- bundle

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
        #[arg(long, value_enum, default_value = "pem")]
        format: BundleFormat,
        #[command(flatten)]
        common: Common,
    },
    /// Lists federated bundles (or one with --id).
    List {
        #[arg(long)]
        id: Option<String>,
        #[arg(long, value_enum, default_value = "pem")]
        format: BundleFormat,
        #[command(flatten)]
        common: Common,
    },
    /// Creates or replaces a federated bundle (from --path, else standard input).
    Set {
        #[arg(long)]
        id: String,
        #[arg(long)]
        path: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "pem")]
        format: BundleFormat,
        #[command(flatten)]
        common: Common,
    },
    /// Deletes a federated bundle.
    Delete {
        #[arg(long)]
        id: String,
        #[arg(long, value_enum, default_value = "restrict")]
        mode: DeleteMode,
        #[command(flatten)]
        common: Common,
    },
}

fn render_bundle(b: &types::Bundle, format: BundleFormat) -> Result<String, CliError> {
    Ok(match format {
        BundleFormat::Pem => codec::x509_to_pem(b),
        BundleFormat::Spiffe => {
            codec::to_spiffe_json(b).map_err(|e| CliError::Failed(e.to_string()))? + "\n"
        }
    })
}

pub async fn bundle(cmd: BundleCmd) -> Result<(), CliError> {
    use pb::bundle::bundle_client::BundleClient;
    match cmd {
        BundleCmd::Show { format, common } => {
            let mut c = BundleClient::new(connect(&common.socket_path).await?);
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
            let mut c = BundleClient::new(connect(&common.socket_path).await?);
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
            let data = match &path {
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
                BundleFormat::Spiffe => codec::from_spiffe_json(&td, &data)
                    .map_err(|e| CliError::Usage(e.to_string()))?,
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
            let mut c = BundleClient::new(connect(&common.socket_path).await?);
            let r = c
                .batch_set_federated_bundle(pb::bundle::BatchSetFederatedBundleRequest {
                    bundle: vec![bundle],
                    output_mask: None,
                })
                .await?
                .into_inner();
            let r = r
                .results
                .first()
                .ok_or_else(|| CliError::Failed("no result".into()))?;
            check_status(&r.status)?;
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
            let mut c = BundleClient::new(connect(&common.socket_path).await?);
            let r = c
                .batch_delete_federated_bundle(pb::bundle::BatchDeleteFederatedBundleRequest {
                    trust_domains: vec![td.as_str().into()],
                    mode: mode as i32,
                })
                .await?
                .into_inner();
            let r = r
                .results
                .first()
                .ok_or_else(|| CliError::Failed("no result".into()))?;
            check_status(&r.status)?;
            print(
                common.output,
                json!({"trust_domain": td.as_str()}),
                "bundle deleted.\n".into(),
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- token, agent

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Generates a join token.
    Generate {
        /// Also register this SPIFFE ID for the agent that uses the token.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Token lifetime in seconds.
        #[arg(long, default_value_t = 600)]
        ttl: i64,
        #[command(flatten)]
        common: Common,
    },
}

pub async fn token(cmd: TokenCmd) -> Result<(), CliError> {
    let TokenCmd::Generate {
        spiffe_id,
        ttl,
        common,
    } = cmd;
    let ttl = ttl_arg("--ttl", Some(ttl))?;
    let agent_id = spiffe_id
        .as_deref()
        .map(|s| parse_id("--spiffe-id", s).map(|i| id_proto(&i)))
        .transpose()?;
    let mut c = pb::agent::agent_client::AgentClient::new(connect(&common.socket_path).await?);
    let t = c
        .create_join_token(pb::agent::CreateJoinTokenRequest {
            ttl,
            token: String::new(),
            agent_id,
        })
        .await?
        .into_inner();
    print(
        common.output,
        json!({"value": t.value, "expires_at": t.expires_at}),
        format!("Token: {}\n", t.value),
    );
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// Lists attested agents.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Shows one agent.
    Show {
        #[arg(long)]
        spiffe_id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Deletes an agent's attestation record; it must attest again.
    Evict {
        #[arg(long)]
        spiffe_id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Bans an agent: it can neither renew nor attest again until evicted.
    Ban {
        #[arg(long)]
        spiffe_id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Counts attested agents.
    Count {
        #[command(flatten)]
        common: Common,
    },
}

pub async fn agent(cmd: AgentCmd) -> Result<(), CliError> {
    use pb::agent::agent_client::AgentClient;
    match cmd {
        AgentCmd::List { common } => {
            let mut c = AgentClient::new(connect(&common.socket_path).await?);
            let r = c
                .list_agents(pb::agent::ListAgentsRequest {
                    filter: None,
                    output_mask: None,
                    page_size: 0,
                    page_token: String::new(),
                })
                .await?
                .into_inner();
            let pretty = format!(
                "Found {} attested agent{}:\n\n{}",
                r.agents.len(),
                if r.agents.len() == 1 { "" } else { "s" },
                r.agents
                    .iter()
                    .map(|a| format!("{}\n", agent_pretty(a)))
                    .collect::<String>()
            );
            print(
                common.output,
                json!({"agents": r.agents.iter().map(agent_json).collect::<Vec<_>>()}),
                pretty,
            );
        }
        AgentCmd::Show { spiffe_id, common } => {
            let id = parse_id("--spiffe-id", &spiffe_id)?;
            let mut c = AgentClient::new(connect(&common.socket_path).await?);
            let a = c
                .get_agent(pb::agent::GetAgentRequest {
                    id: Some(id_proto(&id)),
                    output_mask: None,
                })
                .await?
                .into_inner();
            print(common.output, agent_json(&a), agent_pretty(&a));
        }
        AgentCmd::Evict { spiffe_id, common } => {
            let id = parse_id("--spiffe-id", &spiffe_id)?;
            let mut c = AgentClient::new(connect(&common.socket_path).await?);
            c.delete_agent(pb::agent::DeleteAgentRequest {
                id: Some(id_proto(&id)),
            })
            .await?;
            print(
                common.output,
                json!({"evicted": spiffe_id}),
                "Agent evicted successfully\n".into(),
            );
        }
        AgentCmd::Ban { spiffe_id, common } => {
            let id = parse_id("--spiffe-id", &spiffe_id)?;
            let mut c = AgentClient::new(connect(&common.socket_path).await?);
            c.ban_agent(pb::agent::BanAgentRequest {
                id: Some(id_proto(&id)),
            })
            .await?;
            print(
                common.output,
                json!({"banned": spiffe_id}),
                "Agent banned successfully\n".into(),
            );
        }
        AgentCmd::Count { common } => {
            let mut c = AgentClient::new(connect(&common.socket_path).await?);
            let n = c
                .count_agents(pb::agent::CountAgentsRequest { filter: None })
                .await?
                .into_inner()
                .count;
            print(
                common.output,
                json!({"count": n}),
                format!("{n} attested agent{}\n", if n == 1 { "" } else { "s" }),
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- x509 / jwt mint

#[derive(Debug, Subcommand)]
pub enum X509Cmd {
    /// Mints an X509-SVID (the key is generated here and never leaves this process).
    Mint {
        #[arg(long)]
        spiffe_id: String,
        /// TTL in seconds (0 = server default).
        #[arg(long, default_value_t = 0)]
        ttl: i64,
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
        #[arg(long)]
        spiffe_id: String,
        /// An audience; repeat for several.
        #[arg(long = "audience", required = true)]
        audience: Vec<String>,
        /// TTL in seconds (0 = server default).
        #[arg(long, default_value_t = 0)]
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
    let channel = connect(&common.socket_path).await?;
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
                    kame_keymanager::disk::write_secret_file(&p, data)
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
    let svid = pb::svid::svid_client::SvidClient::new(connect(&common.socket_path).await?)
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
        Some(p) => kame_keymanager::disk::write_secret_file(&p, svid.token.as_bytes())
            .map_err(|e| CliError::Failed(e.to_string()))?,
        None => print(
            common.output,
            json!({"token": svid.token, "expires_at": svid.expires_at, "issued_at": svid.issued_at}),
            format!("{}\n", svid.token),
        ),
    }
    Ok(())
}

/// `healthcheck`: the server answers on its admin socket and has a bundle.
pub async fn healthcheck(socket: &Path, verbose: bool) -> Result<(), CliError> {
    let mut c = pb::bundle::bundle_client::BundleClient::new(connect(socket).await?);
    let b = c
        .get_bundle(pb::bundle::GetBundleRequest { output_mask: None })
        .await?
        .into_inner();
    if b.x509_authorities.is_empty() {
        return Err(CliError::Failed("server has no X.509 authority yet".into()));
    }
    if verbose {
        eprintln!("Server is healthy (bundle sequence {}).", b.sequence_number);
    }
    println!("Server is healthy.");
    Ok(())
}
