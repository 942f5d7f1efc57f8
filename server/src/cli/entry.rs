//! `kame-server entry create|show|update|delete|count`: the Entry API on the admin socket,
//! with SPIRE's flags and output. It only calls the API; every check is the server's.

use super::*;

pub(super) fn entry_json(e: &types::Entry) -> Value {
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

pub(super) fn entry_pretty(e: &types::Entry) -> String {
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

pub(super) fn entry_from_fields(
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

type Client = pb::entry::entry_client::EntryClient<Channel>;

pub async fn entry(cmd: EntryCmd) -> Result<(), CliError> {
    match cmd {
        EntryCmd::Create(c) => create(c).await,
        EntryCmd::Update(u) => update(u).await,
        EntryCmd::Delete { entry_id, common } => delete(entry_id, common).await,
        EntryCmd::Count { common } => {
            let mut client = Client::new(connect(&common.socket_path).await?);
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
            Ok(())
        }
        EntryCmd::Show(s) => show(s).await,
    }
}

/// The one entry of a batch result, or the error its status carries.
fn one_entry(
    results: Vec<(Option<types::Status>, Option<types::Entry>)>,
) -> Result<types::Entry, CliError> {
    let (status, entry) = results
        .into_iter()
        .next()
        .ok_or_else(|| CliError::Failed("no result".into()))?;
    check_status(&status)?;
    entry.ok_or_else(|| CliError::Failed("no entry returned".into()))
}

async fn create(c: EntryCreate) -> Result<(), CliError> {
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
    let mut client = Client::new(connect(&c.common.socket_path).await?);
    let resp = client
        .batch_create_entry(pb::entry::BatchCreateEntryRequest {
            entries: vec![e],
            output_mask: None,
        })
        .await?
        .into_inner();
    let e = one_entry(
        resp.results
            .into_iter()
            .map(|r| (r.status, r.entry))
            .collect(),
    )?;
    print(c.common.output, entry_json(&e), entry_pretty(&e));
    Ok(())
}

async fn update(u: EntryUpdate) -> Result<(), CliError> {
    let e = entry_from_fields(&u.fields, u.entry_id.clone(), None)?;
    let mut client = Client::new(connect(&u.common.socket_path).await?);
    let resp = client
        .batch_update_entry(pb::entry::BatchUpdateEntryRequest {
            entries: vec![e],
            input_mask: None,
            output_mask: None,
        })
        .await?
        .into_inner();
    let e = one_entry(
        resp.results
            .into_iter()
            .map(|r| (r.status, r.entry))
            .collect(),
    )?;
    print(u.common.output, entry_json(&e), entry_pretty(&e));
    Ok(())
}

async fn delete(entry_id: String, common: Common) -> Result<(), CliError> {
    let mut client = Client::new(connect(&common.socket_path).await?);
    let resp = client
        .batch_delete_entry(pb::entry::BatchDeleteEntryRequest {
            ids: vec![entry_id.clone()],
        })
        .await?
        .into_inner();
    check_first(resp.results.iter().map(|x| &x.status))?;
    print(
        common.output,
        json!({"id": entry_id}),
        format!("Deleted entry with ID: {entry_id}\n"),
    );
    Ok(())
}

/// `entry show`'s filter flags as the API's filter.
fn show_filter(s: &EntryShow) -> Result<pb::entry::EntryFilter, CliError> {
    Ok(pb::entry::EntryFilter {
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
    })
}

async fn show(s: EntryShow) -> Result<(), CliError> {
    let mut client = Client::new(connect(&s.common.socket_path).await?);
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
        let filter = show_filter(&s)?;
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
    Ok(())
}
