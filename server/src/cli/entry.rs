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

/// SPIRE's `printEntry`: labels in 24 columns, in its order, optional lines only when set.
pub(super) fn entry_pretty(e: &types::Entry) -> String {
    let ttl = |t: i32| {
        if t == 0 {
            "default".to_string()
        } else {
            t.to_string()
        }
    };
    let id = if e.id.is_empty() { "(none)" } else { &e.id };
    let mut s = format!(
        "Entry ID                : {id}\nSPIFFE ID               : {}\nParent ID               : {}\nRevision                : {}\n",
        id_str(&e.spiffe_id),
        id_str(&e.parent_id),
        e.revision_number,
    );
    if e.downstream {
        s += "Downstream              : true\n";
    }
    s += &format!(
        "X509-SVID TTL           : {}\nJWT-SVID TTL            : {}\n",
        ttl(e.x509_svid_ttl),
        ttl(e.jwt_svid_ttl)
    );
    if e.expires_at != 0 {
        s += &format!(
            "Expiration time         : {}\n",
            kame_api::timefmt::utc(e.expires_at)
        );
    }
    for sel in &e.selectors {
        s += &format!("Selector                : {}:{}\n", sel.r#type, sel.value);
    }
    for f in &e.federates_with {
        s += &format!("FederatesWith           : {f}\n");
    }
    for d in &e.dns_names {
        s += &format!("DNS name                : {d}\n");
    }
    if e.admin {
        s += "Admin                   : true\n";
    }
    if e.store_svid {
        s += "StoreSvid               : true\n";
    }
    if !e.hint.is_empty() {
        s += &format!("Hint                    : {}\n", e.hint);
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
    /// Deletes registration entries: one by `--entry-id`, or those in SPIRE's JSON file
    /// (`{"ids": ["…"]}`) with `--file` (`-` for stdin).
    ///
    /// Example: kame-server entry delete --entry-id 9c3e…
    Delete {
        /// The ID of the entry to delete.
        #[arg(long, required_unless_present = "file", conflicts_with = "file")]
        entry_id: Option<String>,
        /// SPIRE's JSON file of IDs to delete (`-`: stdin).
        #[arg(long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Counts registration entries (all, or those the filters match).
    Count {
        #[command(flatten)]
        filter: EntryFilterArgs,
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
    /// X509-SVID TTL: seconds or a duration such as 1h (0 = server default).
    #[arg(long, value_parser = ttl_value)]
    pub x509_svid_ttl: Option<i64>,
    /// JWT-SVID TTL: seconds or a duration such as 5m (0 = server default).
    #[arg(long, value_parser = ttl_value)]
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
    /// SPIRE's JSON file of entries (`{"entries": [ … ]}`; `-`: stdin), created in one batch;
    /// the entry flags are not given with it.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct EntryUpdate {
    /// The ID of the entry to update (required unless --data is given).
    #[arg(long, required_unless_present = "data")]
    pub entry_id: Option<String>,
    #[command(flatten)]
    pub fields: EntryFields,
    /// SPIRE's JSON file of entries, each with its `entry_id` (`-`: stdin).
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

impl EntryFields {
    /// Whether any entry flag was given (they do not go with `--data`).
    fn any(&self) -> bool {
        self.spiffe_id.is_some()
            || self.parent_id.is_some()
            || !self.selectors.is_empty()
            || self.x509_svid_ttl.is_some()
            || self.jwt_svid_ttl.is_some()
            || !self.dns_names.is_empty()
            || !self.federates_with.is_empty()
            || self.admin
            || self.downstream
            || self.store_svid
            || self.entry_expiry.is_some()
            || self.hint.is_some()
    }
}

/// `path`'s bytes, or stdin's for `-` (read off the async threads, so `--timeout` holds).
async fn read_input(path: &Path) -> Result<String, CliError> {
    if path == Path::new("-") {
        return tokio::task::spawn_blocking(|| {
            use std::io::Read;
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map(|_| text)
                .map_err(|source| CliError::Io {
                    what: "cannot read",
                    path: "stdin".into(),
                    source,
                })
        })
        .await
        .map_err(|e| CliError::Failed(format!("reading stdin: {e}")))?;
    }
    std::fs::read_to_string(path).map_err(|source| CliError::Io {
        what: "cannot read",
        path: path.display().to_string(),
        source,
    })
}

/// The member `k` of a JSON object, its name matched as Go's encoding/json matches it
/// (ignoring case).
fn member<'a>(v: &'a Value, k: &str) -> Option<&'a Value> {
    v.as_object()?
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(k))
        .map(|(_, v)| v)
        .filter(|v| !v.is_null())
}

/// One entry of SPIRE's JSON format (`proto/spire/common` RegistrationEntry: snake_case keys,
/// `entryExpiry`, IDs as strings, `federates_with` as trust domains with or without
/// `spiffe://`); unknown keys are ignored, as SPIRE ignores them.
fn entry_from_json(v: &Value) -> Result<types::Entry, String> {
    if !v.is_object() {
        return Err("expected an object".into());
    }
    let text = |k: &str| -> Result<String, String> {
        match member(v, k) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(format!("{k}: expected a string")),
        }
    };
    let int = |k: &str| -> Result<i64, String> {
        match member(v, k) {
            None => Ok(0),
            Some(n) => n
                .as_i64()
                .ok_or_else(|| format!("{k}: expected an integer")),
        }
    };
    let flag = |k: &str| -> Result<bool, String> {
        match member(v, k) {
            None => Ok(false),
            Some(b) => b
                .as_bool()
                .ok_or_else(|| format!("{k}: expected true or false")),
        }
    };
    let strings = |k: &str| -> Result<Vec<String>, String> {
        match member(v, k) {
            None => Ok(vec![]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(String::from)
                        .ok_or_else(|| format!("{k}: expected strings"))
                })
                .collect(),
            Some(_) => Err(format!("{k}: expected a list of strings")),
        }
    };
    let id = |k: &str| -> Result<Option<types::Spiffeid>, String> {
        let s = text(k)?;
        if s.is_empty() {
            return Err(format!("{k}: missing"));
        }
        loose_id(k, &s).map(Some).map_err(|e| e.to_string())
    };
    let selectors = match member(v, "selectors") {
        None => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| match (member(s, "type"), member(s, "value")) {
                (Some(Value::String(t)), Some(Value::String(val))) => Ok(types::Selector {
                    r#type: t.clone(),
                    value: val.clone(),
                }),
                _ => Err("selectors: each needs a type and a value".to_string()),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("selectors: expected a list".into()),
    };
    let ttl = |k: &str| -> Result<i32, String> {
        i32::try_from(int(k)?).map_err(|_| format!("{k}: out of range"))
    };
    let mut x509_svid_ttl = ttl("x509_svid_ttl")?;
    if x509_svid_ttl == 0 {
        // SPIRE's older name for it.
        x509_svid_ttl = ttl("ttl")?;
    }
    Ok(types::Entry {
        id: text("entry_id")?,
        spiffe_id: id("spiffe_id")?,
        parent_id: id("parent_id")?,
        selectors,
        x509_svid_ttl,
        jwt_svid_ttl: ttl("jwt_svid_ttl")?,
        federates_with: strings("federates_with")?
            .into_iter()
            .map(|t| t.trim_start_matches("spiffe://").to_string())
            .collect(),
        admin: flag("admin")?,
        downstream: flag("downstream")?,
        expires_at: int("entryExpiry")?,
        dns_names: strings("dns_names")?,
        revision_number: int("revision_number")?,
        store_svid: flag("store_svid")?,
        hint: text("hint")?,
        created_at: 0,
        additional_attributes: None,
    })
}

/// The entries of SPIRE's `-data` file.
async fn entries_from_file(path: &Path) -> Result<Vec<types::Entry>, CliError> {
    let shown = path.display().to_string();
    let v: Value = serde_json::from_str(&read_input(path).await?)
        .map_err(|e| CliError::Usage(format!("--data {shown}: not JSON: {e}")))?;
    let list = member(&v, "entries")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            CliError::Usage(format!("--data {shown}: expected {{\"entries\": [ … ]}}"))
        })?;
    list.iter()
        .enumerate()
        .map(|(i, e)| {
            entry_from_json(e)
                .map_err(|m| CliError::Usage(format!("--data {shown}: entries[{i}]: {m}")))
        })
        .collect()
}

/// Prints a batch's results as SPIRE does: each entry made, then each failure on stderr with
/// its code and message (for a duplicate, the entry that exists, with its ID); an error when
/// any failed.
fn print_batch(
    verb: &str,
    out: Output,
    results: Vec<(Option<types::Status>, Option<types::Entry>)>,
    sent: &[types::Entry],
) -> Result<(), CliError> {
    let mut failed = 0;
    let mut json_results = vec![];
    let mut pretty = String::new();
    for (i, (status, entry)) in results.into_iter().enumerate() {
        let (code, message) = status
            .map(|s| (s.code, s.message))
            .unwrap_or((2, "no status".into()));
        let shown = entry.or_else(|| sent.get(i).cloned()).unwrap_or_default();
        json_results.push(json!({
            "status": {"code": code, "message": message},
            "entry": entry_json(&shown),
        }));
        if code == 0 {
            pretty += &entry_pretty(&shown);
            pretty.push('\n');
        } else {
            failed += 1;
            eprint!(
                "Failed to {verb} the following entry (code: {:?}, msg: {message:?}):\n{}\n",
                tonic::Code::from_i32(code),
                entry_pretty(&shown)
            );
        }
    }
    // One entry made from flags prints as the entry; a batch as its results.
    let json_v = match json_results.as_slice() {
        [one] if failed == 0 && sent.len() == 1 => one["entry"].clone(),
        _ => json!({ "results": json_results }),
    };
    print(out, json_v, pretty);
    if failed > 0 {
        return Err(CliError::Failed(format!(
            "failed to {verb} one or more entries"
        )));
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct EntryShow {
    /// Only the entry with this ID (no other filter goes with it).
    #[arg(long)]
    pub entry_id: Option<String>,
    #[command(flatten)]
    pub filter: EntryFilterArgs,
    #[command(flatten)]
    pub common: Common,
}

/// SPIRE's `entry show` / `entry count` filters.
#[derive(Debug, Args)]
pub struct EntryFilterArgs {
    /// Only entries with this SPIFFE ID.
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// Only entries with this parent.
    #[arg(long)]
    pub parent_id: Option<String>,
    /// A selector `type:value`; repeat for several (matched per --match-selectors-on).
    #[arg(long = "selector")]
    pub selectors: Vec<String>,
    /// How the selectors match: exact, any, superset (the entry has all of them, the default)
    /// or subset.
    #[arg(long, default_value = "superset")]
    pub match_selectors_on: String,
    /// A trust domain; repeat for several (matched per --match-federates-with-on).
    #[arg(long = "federates-with")]
    pub federates_with: Vec<String>,
    /// How the trust domains match: exact, any, superset (the default) or subset.
    #[arg(long, default_value = "superset")]
    pub match_federates_with_on: String,
    /// Only downstream entries.
    #[arg(long)]
    pub downstream: bool,
    /// Only entries with this hint.
    #[arg(long)]
    pub hint: Option<String>,
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
        EntryCmd::Delete {
            entry_id,
            file,
            common,
        } => delete(entry_id, file, common).await,
        EntryCmd::Count { filter, common } => {
            let filter = show_filter(&filter)?;
            let mut client = Client::new(common.connect().await?);
            let n = client
                .count_entries(pb::entry::CountEntriesRequest {
                    filter: Some(filter),
                })
                .await?
                .into_inner()
                .count;
            print(
                common.output,
                json!({"count": n}),
                format!(
                    "{n} registration {}\n",
                    if n == 1 { "entry" } else { "entries" }
                ),
            );
            Ok(())
        }
        EntryCmd::Show(s) => show(s).await,
    }
}

async fn create(c: EntryCreate) -> Result<(), CliError> {
    let entries = match &c.data {
        Some(path) => {
            if c.fields.any() || c.node || c.entry_id.is_some() {
                return Err(CliError::Usage(
                    "give --data or the entry flags, not both".into(),
                ));
            }
            entries_from_file(path).await?
        }
        None => {
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
            vec![entry_from_fields(
                &c.fields,
                c.entry_id.clone().unwrap_or_default(),
                parent,
            )?]
        }
    };
    let mut client = Client::new(c.common.connect().await?);
    let resp = client
        .batch_create_entry(pb::entry::BatchCreateEntryRequest {
            entries: entries.clone(),
            output_mask: None,
        })
        .await?
        .into_inner();
    print_batch(
        "create",
        c.common.output,
        resp.results
            .into_iter()
            .map(|r| (r.status, r.entry))
            .collect(),
        &entries,
    )
}

async fn update(u: EntryUpdate) -> Result<(), CliError> {
    let entries = match (&u.data, &u.entry_id) {
        (Some(path), None) if !u.fields.any() => entries_from_file(path).await?,
        (Some(_), _) => {
            return Err(CliError::Usage(
                "give --data or the entry flags, not both".into(),
            ));
        }
        (None, Some(id)) => vec![entry_from_fields(&u.fields, id.clone(), None)?],
        (None, None) => return Err(CliError::Usage("--entry-id is required".into())),
    };
    if let Some(i) = entries.iter().position(|e| e.id.is_empty()) {
        return Err(CliError::Usage(format!(
            "entries[{i}]: entry_id is required to update"
        )));
    }
    let mut client = Client::new(u.common.connect().await?);
    let resp = client
        .batch_update_entry(pb::entry::BatchUpdateEntryRequest {
            entries: entries.clone(),
            input_mask: None,
            output_mask: None,
        })
        .await?
        .into_inner();
    print_batch(
        "update",
        u.common.output,
        resp.results
            .into_iter()
            .map(|r| (r.status, r.entry))
            .collect(),
        &entries,
    )
}

async fn delete(
    entry_id: Option<String>,
    file: Option<PathBuf>,
    common: Common,
) -> Result<(), CliError> {
    let ids = match (entry_id, file) {
        (Some(id), None) => vec![id],
        (None, Some(path)) => {
            let shown = path.display().to_string();
            let v: Value = serde_json::from_str(&read_input(&path).await?)
                .map_err(|e| CliError::Usage(format!("--file {shown}: not JSON: {e}")))?;
            member(&v, "ids")
                .and_then(Value::as_array)
                .and_then(|a| {
                    a.iter()
                        .map(|x| x.as_str().map(String::from))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| {
                    CliError::Usage(format!("--file {shown}: expected {{\"ids\": [\"…\"]}}"))
                })?
        }
        _ => {
            return Err(CliError::Usage("give --entry-id or --file".into()));
        }
    };
    let mut client = Client::new(common.connect().await?);
    let resp = client
        .batch_delete_entry(pb::entry::BatchDeleteEntryRequest { ids: ids.clone() })
        .await?
        .into_inner();
    if resp.results.len() != ids.len() {
        return Err(CliError::Failed(format!(
            "the server answered {} results for {} IDs",
            resp.results.len(),
            ids.len()
        )));
    }
    let (mut pretty, mut done, mut failed, mut results) = (String::new(), 0, 0, vec![]);
    for (i, r) in resp.results.iter().enumerate() {
        let id = if r.id.is_empty() {
            &ids[i.min(ids.len() - 1)]
        } else {
            &r.id
        };
        let (code, message) = r
            .status
            .as_ref()
            .map(|s| (s.code, s.message.clone()))
            .unwrap_or((2, "no status".into()));
        results.push(json!({"id": id, "status": {"code": code, "message": message}}));
        if code == 0 {
            done += 1;
            pretty += &format!("Deleted entry with ID: {id}\n");
        } else {
            failed += 1;
            eprintln!(
                "Failed to delete entry with ID {id} (code: {:?}, msg: {message:?})",
                tonic::Code::from_i32(code)
            );
        }
    }
    if ids.len() > 1 {
        pretty += &format!("\nDeleted {done} entries successfully\n");
    }
    let json_v = match ids.as_slice() {
        [one] if failed == 0 => json!({ "id": one }),
        _ => json!({ "results": results }),
    };
    print(common.output, json_v, pretty);
    if failed > 0 {
        return Err(CliError::Failed(
            "failed to delete one or more entries".into(),
        ));
    }
    Ok(())
}

/// `entry show`'s filter flags as the API's filter.
/// SPIRE's match names (`exact`, `any`, `superset`, `subset`) as the wire's numbers, which
/// differ between selector and federation matches.
fn match_on(flag: &str, v: &str, numbers: [i32; 4]) -> Result<i32, CliError> {
    Ok(match v {
        "exact" => numbers[0],
        "any" => numbers[1],
        "superset" => numbers[2],
        "subset" => numbers[3],
        other => {
            return Err(CliError::Usage(format!(
                "{flag}: {other:?} is not exact, any, superset or subset"
            )));
        }
    })
}

/// The filter flags as the API's filter.
fn show_filter(s: &EntryFilterArgs) -> Result<pb::entry::EntryFilter, CliError> {
    use types::federates_with_match::MatchBehavior as F;
    use types::selector_match::MatchBehavior as S;
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
                r#match: match_on(
                    "--match-selectors-on",
                    &s.match_selectors_on,
                    [
                        S::MatchExact as i32,
                        S::MatchAny as i32,
                        S::MatchSuperset as i32,
                        S::MatchSubset as i32,
                    ],
                )?,
            })
        },
        by_federates_with: if s.federates_with.is_empty() {
            None
        } else {
            Some(types::FederatesWithMatch {
                trust_domains: s
                    .federates_with
                    .iter()
                    .map(|t| t.trim_start_matches("spiffe://").to_string())
                    .collect(),
                r#match: match_on(
                    "--match-federates-with-on",
                    &s.match_federates_with_on,
                    [
                        F::MatchExact as i32,
                        F::MatchAny as i32,
                        F::MatchSuperset as i32,
                        F::MatchSubset as i32,
                    ],
                )?,
            })
        },
        by_hint: s.hint.clone(),
        by_downstream: s.downstream.then_some(true),
    })
}

async fn show(s: EntryShow) -> Result<(), CliError> {
    let f = &s.filter;
    let filtered = f.spiffe_id.is_some()
        || f.parent_id.is_some()
        || !f.selectors.is_empty()
        || !f.federates_with.is_empty()
        || f.downstream
        || f.hint.is_some();
    if s.entry_id.is_some() && filtered {
        return Err(CliError::Usage(
            "--entry-id cannot be combined with other filters".into(),
        ));
    }
    let mut client = Client::new(s.common.connect().await?);
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
        let filter = show_filter(&s.filter)?;
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
