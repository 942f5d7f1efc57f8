//! `kame-server log sth|proof|consistency|get|verify|monitor`: a client of the transparency log's
//! RFC 6962 read API (`server.transparency { bind_port }`), checking everything it is given
//! with the log's public key (`transparency_log_key.pem` in the server's data_dir): tree head
//! signatures, SCTs, inclusion and consistency proofs, and with `verify` every entry of the
//! signed tree. It trusts nothing the server says without a check, and writes nothing but the
//! tree head files it is asked to save.

use super::{CliError, Output, print};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Args, Subcommand};
use kame_api::ct::{self, Hash, SignedTreeHead, TreeHead};
use serde_json::json;
use std::path::PathBuf;

/// Where the log is and how to check it.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// The log's read API, e.g. http://127.0.0.1:8085 (`server.transparency` bind address and
    /// port).
    #[arg(long)]
    pub url: String,
    /// The log's public key, PEM (`transparency_log_key.pem` in the server's data_dir).
    #[arg(long)]
    pub log_key: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "pretty")]
    pub output: Output,
}

#[derive(Debug, Subcommand)]
pub enum LogCmd {
    /// Prints the log's latest signed tree head, once its signature verifies.
    Sth {
        #[command(flatten)]
        log: LogArgs,
        /// Also save it (JSON, as get-sth returns it), for `consistency --from-sth`.
        #[arg(long)]
        save: Option<PathBuf>,
    },
    /// Checks that an X509-SVID is in the log: its SCT's signature, then its inclusion proof
    /// in the latest signed tree head.
    Proof {
        #[command(flatten)]
        log: LogArgs,
        /// The SVID, PEM, followed by the certificate that issued it.
        #[arg(long)]
        cert: PathBuf,
    },
    /// Checks that the latest signed tree head extends a saved one (`sth --save`).
    Consistency {
        #[command(flatten)]
        log: LogArgs,
        /// A tree head saved earlier.
        #[arg(long)]
        from_sth: PathBuf,
    },
    /// Prints entries `start..=end` (at most 256 per call to the server).
    Get {
        #[command(flatten)]
        log: LogArgs,
        /// The first entry's index (from 0).
        #[arg(long)]
        start: u64,
        /// The last entry's index (included).
        #[arg(long)]
        end: u64,
    },
    /// Re-checks the whole log: every entry of the latest signed tree, re-hashed, must give
    /// its root.
    Verify {
        #[command(flatten)]
        log: LogArgs,
    },
    /// Watches the log: each pass checks that the latest signed tree head extends the saved
    /// one (consistency proof), re-hashes every new entry into the saved tree (its root must
    /// be the signed one), reports each new SVID or attestation whose SPIFFE ID is under a
    /// watched prefix and every change of a signing authority, then saves the new tree head.
    /// Fails, saving nothing, when the log does not extend what was seen.
    Monitor {
        #[command(flatten)]
        log: LogArgs,
        /// The state file: a tree head saved by `sth --save` or by an earlier pass (which adds
        /// the tree's frontier, so a pass reads only new entries). Absent: the first pass
        /// starts from the empty tree and creates it.
        #[arg(long)]
        from_sth: PathBuf,
        /// A SPIFFE ID prefix to report (repeatable): the ID itself and everything under it
        /// (`spiffe://example.org/ns/prod` matches `.../ns/prod/db`, not `.../ns/production`).
        #[arg(long = "watch", required = true)]
        watch: Vec<String>,
        /// Run a pass every this long (at least 1s, e.g. 30s) until stopped, instead of once;
        /// a pass that cannot reach the log is reported and retried at the next.
        #[arg(long, value_parser = interval_arg)]
        interval: Option<std::time::Duration>,
        /// The most new entries one pass reads; a log that has grown more is refused (a log
        /// claiming an absurd size cannot keep the monitor busy).
        #[arg(long, default_value_t = 1_000_000)]
        max_entries: u64,
    },
}

fn interval_arg(s: &str) -> Result<std::time::Duration, String> {
    let d = kame_api::conf::parse_duration(s)?;
    if d < std::time::Duration::from_secs(1) {
        return Err("the interval is at least 1s".into());
    }
    Ok(d)
}

fn failed(m: impl std::fmt::Display) -> CliError {
    CliError::Failed(m.to_string())
}

/// The largest answer read from the log (256 entries of X509-SVIDs are about 300 KiB).
const MAX_ANSWER: usize = 16 << 20;

async fn get(
    url: &str,
    path: &str,
    query: &[(&str, String)],
) -> Result<serde_json::Value, CliError> {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(failed)?;
    let mut target = format!("{}{path}", url.trim_end_matches('/'));
    for (i, (k, v)) in query.iter().enumerate() {
        target.push(if i == 0 { '?' } else { '&' });
        target.push_str(k);
        target.push('=');
        for b in v.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                target.push(b as char);
            } else {
                target.push_str(&format!("%{b:02X}"));
            }
        }
    }
    let unreachable = |e: String| CliError::Unreachable(format!("the log at {url}: {e}"));
    let mut r = client
        .get(target)
        .send()
        .await
        .map_err(|e| unreachable(format!("cannot reach it: {e}")))?;
    let status = r.status();
    if status.is_server_error() {
        return Err(unreachable(format!("{path}: {status}")));
    }
    let too_big = || {
        failed(format!(
            "{path}: the answer is larger than {MAX_ANSWER} bytes"
        ))
    };
    if r.content_length().is_some_and(|n| n > MAX_ANSWER as u64) {
        return Err(too_big());
    }
    let mut body = Vec::new();
    while let Some(chunk) = r
        .chunk()
        .await
        .map_err(|e| unreachable(format!("{path}: {e}")))?
    {
        if body.len() + chunk.len() > MAX_ANSWER {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| failed(format!("{path}: the answer is not JSON: {e}")))?;
    if !status.is_success() {
        return Err(failed(format!("{path}: {status}: {}", v["error"])));
    }
    Ok(v)
}

fn b64_field(v: &serde_json::Value, k: &str) -> Result<Vec<u8>, CliError> {
    v[k].as_str()
        .and_then(|s| B64.decode(s).ok())
        .ok_or_else(|| failed(format!("{k} is missing or not base64")))
}

fn u64_field(v: &serde_json::Value, k: &str) -> Result<u64, CliError> {
    v[k].as_u64()
        .ok_or_else(|| failed(format!("{k} is missing or not a number")))
}

fn hash_of(b: Vec<u8>, what: &str) -> Result<Hash, CliError> {
    b.try_into()
        .map_err(|_| failed(format!("{what} is not a SHA-256 hash")))
}

fn read_key(p: &std::path::Path) -> Result<Vec<u8>, CliError> {
    let text = std::fs::read_to_string(p).map_err(|source| CliError::Io {
        what: "cannot read the log key",
        path: p.display().to_string(),
        source,
    })?;
    ct::log_key_from_pem(&text).map_err(|e| failed(format!("{}: {e}", p.display())))
}

/// A tree head from get-sth's JSON, once its signature verifies with `key`.
fn checked_sth(v: &serde_json::Value, key: &[u8]) -> Result<SignedTreeHead, CliError> {
    let sth = SignedTreeHead {
        head: TreeHead {
            tree_size: u64_field(v, "tree_size")?,
            timestamp: u64_field(v, "timestamp")?,
            root_hash: hash_of(b64_field(v, "sha256_root_hash")?, "sha256_root_hash")?,
        },
        signature: SignedTreeHead::decode_signature(&b64_field(v, "tree_head_signature")?)
            .map_err(failed)?,
    };
    sth.verify(key)
        .map_err(|e| failed(format!("the tree head's signature: {e}")))?;
    Ok(sth)
}

async fn latest(
    log: &LogArgs,
    key: &[u8],
) -> Result<(serde_json::Value, SignedTreeHead), CliError> {
    let v = get(&log.url, "/ct/v1/get-sth", &[]).await?;
    let sth = checked_sth(&v, key)?;
    Ok((v, sth))
}

fn hashes(v: &serde_json::Value, k: &str) -> Result<Vec<Hash>, CliError> {
    v[k].as_array()
        .ok_or_else(|| failed(format!("{k} is missing")))?
        .iter()
        .map(|h| {
            h.as_str()
                .and_then(|s| B64.decode(s).ok())
                .ok_or_else(|| failed(format!("{k} holds a value that is not base64")))
                .and_then(|b| hash_of(b, k))
        })
        .collect()
}

fn describe(leaf_input: &[u8]) -> serde_json::Value {
    match ct::Leaf::decode(leaf_input) {
        Err(e) => json!({ "error": e.to_string() }),
        Ok(l) => {
            let kind = l.entry.entry_type();
            let detail = match &l.entry {
                ct::Entry::Precert { tbs, .. } => svid_of(tbs),
                ct::Entry::X509(c) => json!({ "certificate_bytes": c.len() }),
                ct::Entry::Kame {
                    kind: ct::EntryType::JwtSvid,
                    body,
                } => json!({ "claims": jwt_claims(body) }),
                ct::Entry::Kame { body, .. } => serde_json::from_slice(body)
                    .unwrap_or_else(|_| json!({ "body": String::from_utf8_lossy(body) })),
            };
            json!({ "timestamp": l.timestamp, "type": format!("{kind:?}"), "entry": detail })
        }
    }
}

/// The SPIFFE ID an entry is about: an SVID's (the URI SAN of an X509-SVID, `sub` of a
/// JWT-SVID), the attested agent's; none for other entries.
fn subject_of(entry: &ct::Entry) -> Option<String> {
    match entry {
        ct::Entry::Precert { tbs, .. } => svid_of(tbs)["spiffe_id"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        ct::Entry::Kame {
            kind: ct::EntryType::JwtSvid,
            body,
        } => jwt_claims(body)["sub"].as_str().map(str::to_string),
        ct::Entry::Kame {
            kind: ct::EntryType::Attestation | ct::EntryType::BreakGlass,
            body,
        } => serde_json::from_slice::<serde_json::Value>(body).ok()?["agent_id"]
            .as_str()
            .map(str::to_string),
        _ => None,
    }
}

/// The claims of a logged JWT-SVID (its signing input, `header.claims`).
fn jwt_claims(body: &[u8]) -> serde_json::Value {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    std::str::from_utf8(body)
        .ok()
        .and_then(|s| s.split('.').nth(1))
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| json!({ "error": "not a JWT signing input" }))
}

/// Whether `id` is `prefix` or under it, path segment by segment (a trailing `/` of the
/// prefix does not count).
fn under(id: &str, prefix: &str) -> bool {
    match id.strip_prefix(prefix.trim_end_matches('/')) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The serial number and SPIFFE ID (the URI SAN) of a precertificate entry's TBS.
fn svid_of(tbs: &[u8]) -> serde_json::Value {
    use der::Decode;
    use x509_cert::ext::pkix::{SubjectAltName, name::GeneralName};
    let tbs = match x509_cert::TbsCertificate::from_der(tbs) {
        Ok(t) => t,
        Err(e) => return json!({ "error": e.to_string() }),
    };
    let uri = tbs
        .extensions()
        .into_iter()
        .flatten()
        .filter(|e| e.extn_id == const_oid::db::rfc5280::ID_CE_SUBJECT_ALT_NAME)
        .filter_map(|e| SubjectAltName::from_der(e.extn_value.as_bytes()).ok())
        .flat_map(|s| s.0)
        .find_map(|n| match n {
            GeneralName::UniformResourceIdentifier(u) => Some(u.to_string()),
            _ => None,
        })
        .unwrap_or_default();
    json!({
        "spiffe_id": uri,
        "serial": hex::encode(tbs.serial_number().as_bytes()),
    })
}

/// A monitor's saved state: the last tree head it checked (get-sth's JSON) and that tree's
/// frontier.
struct Seen {
    sth: Option<(serde_json::Value, SignedTreeHead)>,
    frontier: ct::Frontier,
}

fn read_seen(path: &std::path::Path, key: &[u8]) -> Result<Option<Seen>, CliError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CliError::Io {
                what: "cannot read",
                path: path.display().to_string(),
                source,
            });
        }
    };
    let v: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| failed(format!("{}: {e}", path.display())))?;
    let sth = checked_sth(&v, key)?;
    let frontier = match v.get("frontier") {
        None => ct::Frontier::default(),
        Some(_) => {
            let f = ct::Frontier::from_parts(sth.head.tree_size, hashes(&v, "frontier")?)
                .map_err(|e| failed(format!("{}: {e}", path.display())))?;
            if f.root() != sth.head.root_hash {
                return Err(failed(format!(
                    "{}: the saved frontier does not give the saved root",
                    path.display()
                )));
            }
            f
        }
    };
    Ok(Some(Seen {
        sth: Some((v, sth)),
        frontier,
    }))
}

/// Entries `start..end` of the log, each as (index, leaf input), read through get-entries in
/// as many calls as the server needs.
async fn read_entries(
    url: &str,
    start: u64,
    end: u64,
    mut each: impl FnMut(u64, Vec<u8>) -> Result<(), CliError>,
) -> Result<(), CliError> {
    let mut next = start;
    while next < end {
        let v = get(
            url,
            "/ct/v1/get-entries",
            &[("start", next.to_string()), ("end", (end - 1).to_string())],
        )
        .await?;
        let entries = v["entries"]
            .as_array()
            .filter(|e| !e.is_empty())
            .ok_or_else(|| failed(format!("no entries from {next}")))?;
        for e in entries.iter().take((end - next) as usize) {
            each(next, b64_field(e, "leaf_input")?)?;
            next += 1;
        }
    }
    Ok(())
}

/// One `log monitor` pass with the state in `state`; returns its report as `--output json`
/// prints it: `from`, `to` (tree sizes), `matches` (the entries reported).
pub async fn monitor_pass(
    log: &LogArgs,
    state: &std::path::Path,
    watch: &[String],
    max_entries: u64,
) -> Result<serde_json::Value, CliError> {
    let key = read_key(&log.log_key)?;
    check_watches(watch)?;
    monitor_pass_with(log, &key, state, watch, max_entries).await
}

/// Each watched prefix must be a SPIFFE ID (a trailing `/` allowed).
fn check_watches(watch: &[String]) -> Result<(), CliError> {
    for w in watch {
        kame_api::SpiffeId::parse(w.trim_end_matches('/')).map_err(|e| {
            CliError::Usage(format!("--watch {w:?} is not a SPIFFE ID prefix: {e}"))
        })?;
    }
    Ok(())
}

async fn monitor_pass_with(
    log: &LogArgs,
    key: &[u8],
    state: &std::path::Path,
    watch: &[String],
    max_entries: u64,
) -> Result<serde_json::Value, CliError> {
    let seen = read_seen(state, key)?.unwrap_or(Seen {
        sth: None,
        frontier: ct::Frontier::default(),
    });
    let (new_v, new) = latest(log, key).await?;
    let mut frontier = seen.frontier;
    let from = match &seen.sth {
        None => 0,
        Some((_, old)) => {
            let (o, n) = (old.head.tree_size, new.head.tree_size);
            if n < o {
                return Err(failed(format!(
                    "the log's latest tree head has {n} entries, fewer than the {o} seen: the log was rolled back"
                )));
            }
            if new.head.timestamp < old.head.timestamp {
                return Err(failed(format!(
                    "the log's latest tree head (timestamp {}) is older than the one seen ({})",
                    new.head.timestamp, old.head.timestamp
                )));
            }
            if n - o > max_entries {
                return Err(failed(format!(
                    "the log grew by {} entries since the tree head seen, more than --max-entries {max_entries}",
                    n - o
                )));
            }
            if o == n && old.head.root_hash != new.head.root_hash {
                return Err(failed(format!(
                    "the log signed two different roots for a tree of {n} entries: it has forked"
                )));
            }
            // Nothing to prove from the empty tree or to the same size.
            if o > 0 && o < n {
                let v = get(
                    &log.url,
                    "/ct/v1/get-sth-consistency",
                    &[("first", o.to_string()), ("second", n.to_string())],
                )
                .await?;
                ct::verify_consistency(
                    o,
                    n,
                    &old.head.root_hash,
                    &new.head.root_hash,
                    &hashes(&v, "consistency")?,
                )
                .map_err(|e| {
                    failed(format!(
                        "the log's tree of {n} entries does not extend the seen one of {o}: {e}"
                    ))
                })?;
            }
            // A tree head saved without its frontier: rebuild the frontier from the entries,
            // which must give the saved root.
            if frontier.size() < o {
                if o > max_entries {
                    return Err(failed(format!(
                        "rebuilding the saved tree of {o} entries is more than --max-entries {max_entries}"
                    )));
                }
                read_entries(&log.url, 0, o, |_, input| {
                    frontier.push(ct::leaf_hash(&input));
                    Ok(())
                })
                .await?;
                if frontier.root() != old.head.root_hash {
                    return Err(failed(format!(
                        "the log's first {o} entries do not give the saved tree head's root: the log has been altered"
                    )));
                }
            }
            o
        }
    };
    if seen.sth.is_none() && new.head.tree_size > max_entries {
        return Err(failed(format!(
            "the log has {} entries, more than --max-entries {max_entries}",
            new.head.tree_size
        )));
    }
    let mut matches = vec![];
    read_entries(&log.url, from, new.head.tree_size, |index, input| {
        frontier.push(ct::leaf_hash(&input));
        let leaf = ct::Leaf::decode(&input)
            .map_err(|e| failed(format!("entry {index} cannot be read: {e}")))?;
        if leaf.timestamp > new.head.timestamp {
            return Err(failed(format!(
                "entry {index} (timestamp {}) is newer than the tree head that covers it ({})",
                leaf.timestamp, new.head.timestamp
            )));
        }
        let subject = subject_of(&leaf.entry);
        // Authority changes and break-glass use are always reported.
        let authority = matches!(
            leaf.entry.entry_type(),
            ct::EntryType::Authority | ct::EntryType::BreakGlass
        );
        if authority
            || subject
                .as_deref()
                .is_some_and(|id| watch.iter().any(|p| under(id, p)))
        {
            let mut d = describe(&input);
            d["index"] = json!(index);
            if let Some(id) = subject {
                d["spiffe_id"] = json!(id);
            }
            matches.push(d);
        }
        Ok(())
    })
    .await?;
    if frontier.root() != new.head.root_hash {
        return Err(failed(format!(
            "the log's entries do not give the signed tree head's root: the log has been altered (tree of {} entries)",
            new.head.tree_size
        )));
    }
    let mut save = new_v;
    save["frontier"] = json!(
        frontier
            .hashes()
            .iter()
            .map(|h| B64.encode(h))
            .collect::<Vec<_>>()
    );
    kame_keymanager::fs::write_atomic(state, save.to_string().as_bytes(), 0o644).map_err(|e| {
        CliError::Io {
            what: "cannot save the tree head",
            path: state.display().to_string(),
            source: e.source,
        }
    })?;
    Ok(json!({
        "from": from,
        "to": new.head.tree_size,
        "consistent": true,
        "matches": matches,
    }))
}

pub async fn log(cmd: LogCmd) -> Result<(), CliError> {
    match cmd {
        LogCmd::Sth { log, save } => {
            let key = read_key(&log.log_key)?;
            let (v, sth) = latest(&log, &key).await?;
            if let Some(p) = save {
                std::fs::write(&p, v.to_string()).map_err(|source| CliError::Io {
                    what: "cannot write",
                    path: p.display().to_string(),
                    source,
                })?;
            }
            print(
                log.output,
                v.clone(),
                format!(
                    "Tree size : {}\nTimestamp : {}\nRoot hash : {}\nSignature : verified\n",
                    sth.head.tree_size,
                    sth.head.timestamp,
                    B64.encode(sth.head.root_hash)
                ),
            );
        }
        LogCmd::Proof { log, cert } => {
            let key = read_key(&log.log_key)?;
            let text = std::fs::read_to_string(&cert).map_err(|source| CliError::Io {
                what: "cannot read",
                path: cert.display().to_string(),
                source,
            })?;
            let chain = kame_api::bundle::certs_from_pem(&text)
                .map_err(|e| failed(format!("{}: {e}", cert.display())))?;
            if chain.len() < 2 {
                return Err(CliError::Usage(format!(
                    "{}: give the SVID followed by the certificate that issued it",
                    cert.display()
                )));
            }
            let issuer = kame_api::x509svid::ParsedCert::parse(&chain[1])
                .and_then(|p| p.spki_der())
                .map_err(failed)?;
            let (scts, entry) = ct::precert_entry(&chain[0], &issuer).map_err(failed)?;
            let log_id = ct::log_id(&key);
            let sct = scts
                .iter()
                .find(|s| s.log_id == log_id)
                .ok_or_else(|| failed("the SVID has no SCT from this log"))?;
            sct.verify(&key, &entry)
                .map_err(|e| failed(format!("the SCT: {e}")))?;
            let leaf = ct::leaf_hash(&ct::leaf_input(sct.timestamp, &entry).map_err(failed)?);
            let (_, sth) = latest(&log, &key).await?;
            let v = get(
                &log.url,
                "/ct/v1/get-proof-by-hash",
                &[
                    ("hash", B64.encode(leaf)),
                    ("tree_size", sth.head.tree_size.to_string()),
                ],
            )
            .await?;
            let index = u64_field(&v, "leaf_index")?;
            ct::verify_inclusion(
                &leaf,
                index,
                sth.head.tree_size,
                &hashes(&v, "audit_path")?,
                &sth.head.root_hash,
            )
            .map_err(|e| failed(format!("the inclusion proof: {e}")))?;
            print(
                log.output,
                json!({ "leaf_index": index, "tree_size": sth.head.tree_size, "sct_timestamp": sct.timestamp }),
                format!(
                    "SCT       : verified (timestamp {})\nLeaf index: {index}\nIncluded  : in the tree of {} entries\n",
                    sct.timestamp, sth.head.tree_size
                ),
            );
        }
        LogCmd::Consistency { log, from_sth } => {
            let key = read_key(&log.log_key)?;
            let text = std::fs::read(&from_sth).map_err(|source| CliError::Io {
                what: "cannot read",
                path: from_sth.display().to_string(),
                source,
            })?;
            let old_v: serde_json::Value = serde_json::from_slice(&text)
                .map_err(|e| failed(format!("{}: {e}", from_sth.display())))?;
            let old = checked_sth(&old_v, &key)?;
            let (_, new) = latest(&log, &key).await?;
            let v = get(
                &log.url,
                "/ct/v1/get-sth-consistency",
                &[
                    ("first", old.head.tree_size.to_string()),
                    ("second", new.head.tree_size.to_string()),
                ],
            )
            .await?;
            ct::verify_consistency(
                old.head.tree_size,
                new.head.tree_size,
                &old.head.root_hash,
                &new.head.root_hash,
                &hashes(&v, "consistency")?,
            )
            .map_err(|e| {
                failed(format!(
                    "the log's tree of {} entries does not extend the saved one of {}: {e}",
                    new.head.tree_size, old.head.tree_size
                ))
            })?;
            print(
                log.output,
                json!({ "first": old.head.tree_size, "second": new.head.tree_size, "consistent": true }),
                format!(
                    "Consistent: the tree of {} entries extends the saved one of {}\n",
                    new.head.tree_size, old.head.tree_size
                ),
            );
        }
        LogCmd::Get { log, start, end } => {
            let v = get(
                &log.url,
                "/ct/v1/get-entries",
                &[("start", start.to_string()), ("end", end.to_string())],
            )
            .await?;
            let entries = v["entries"]
                .as_array()
                .ok_or_else(|| failed("entries is missing"))?;
            let mut out = vec![];
            for (i, e) in entries.iter().enumerate() {
                let mut d = describe(&b64_field(e, "leaf_input")?);
                d["index"] = json!(start + i as u64);
                out.push(d);
            }
            let text: String = out.iter().map(|d| format!("{d}\n")).collect();
            print(log.output, json!({ "entries": out }), text);
        }
        LogCmd::Monitor {
            log,
            from_sth,
            watch,
            interval,
            max_entries,
        } => {
            let key = read_key(&log.log_key)?;
            check_watches(&watch)?;
            loop {
                let r = match monitor_pass_with(&log, &key, &from_sth, &watch, max_entries).await {
                    Ok(r) => r,
                    // Watching: a log that does not answer is reported and tried again; a log
                    // that answers wrongly ends the monitor.
                    Err(CliError::Unreachable(e)) if interval.is_some() => {
                        eprintln!("log monitor: {e}; trying again at the next pass");
                        if let Some(d) = interval {
                            tokio::time::sleep(d).await;
                        }
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let mut text = format!(
                    "Consistent: the tree of {} entries extends the one of {} seen\n",
                    r["to"], r["from"]
                );
                for m in r["matches"].as_array().into_iter().flatten() {
                    text.push_str(&format!("{m}\n"));
                }
                print(log.output, r, text);
                match interval {
                    Some(d) => tokio::time::sleep(d).await,
                    None => break,
                }
            }
        }
        LogCmd::Verify { log } => {
            let key = read_key(&log.log_key)?;
            let (_, sth) = latest(&log, &key).await?;
            let mut f = ct::Frontier::default();
            read_entries(&log.url, 0, sth.head.tree_size, |i, input| {
                ct::Leaf::decode(&input).map_err(|err| failed(format!("entry {i}: {err}")))?;
                f.push(ct::leaf_hash(&input));
                Ok(())
            })
            .await?;
            if f.root() != sth.head.root_hash {
                return Err(failed(format!(
                    "the log's entries do not give the signed tree head's root: the log has been altered (tree of {} entries)",
                    sth.head.tree_size
                )));
            }
            print(
                log.output,
                json!({ "tree_size": sth.head.tree_size, "verified": true }),
                format!(
                    "Verified  : all {} entries give the signed root {}\n",
                    sth.head.tree_size,
                    B64.encode(sth.head.root_hash)
                ),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::under;

    /// A watched prefix matches the ID itself and what lies under it, segment by segment; a
    /// trailing slash changes nothing.
    #[test]
    fn log_monitor_watch_prefix_matches_by_path_segment() {
        for p in ["spiffe://td/ns/prod", "spiffe://td/ns/prod/"] {
            assert!(under("spiffe://td/ns/prod", p));
            assert!(under("spiffe://td/ns/prod/db", p));
            assert!(!under("spiffe://td/ns/production", p));
            assert!(!under("spiffe://td/ns", p));
        }
        assert!(under("spiffe://td/x", "spiffe://td"));
        assert!(!under("spiffe://td2/x", "spiffe://td"));
    }
}
