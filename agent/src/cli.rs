//! `kame-agent api …` and `healthcheck`: a Workload API client over the agent's Unix socket
//! (a path or a `unix:///path` address, as in `SPIFFE_ENDPOINT_SOCKET`) that sends the
//! `workload.spiffe.io: true` header and prints or writes what it gets. Files it writes: SPIRE's
//! `svid.N.pem`, `svid.N.key` (0600) and `bundle.N.pem`.

use kame_api::pb::workload as wl;
use std::path::{Path, PathBuf};
use tonic::transport::Channel;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    #[error("bad socket address {0:?} (expected a path or unix:///path)")]
    BadAddress(String),
    #[error("cannot connect to the Workload API at {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("Workload API error ({code:?}): {message}")]
    Api { code: tonic::Code, message: String },
    #[error("SVID is not valid: {0}")]
    InvalidSvid(String),
    #[error("{0}")]
    Failed(String),
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        CliError::Api {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// The socket path of a `--socket-path` value: a path, or `unix:///path` / `unix:/path`.
pub fn socket_path(addr: &str) -> Result<PathBuf, CliError> {
    let p = if let Some(rest) = addr.strip_prefix("unix://") {
        rest
    } else if let Some(rest) = addr.strip_prefix("unix:") {
        rest
    } else if addr.contains("://") {
        return Err(CliError::BadAddress(addr.into()));
    } else {
        addr
    };
    if !p.starts_with('/') {
        return Err(CliError::BadAddress(addr.into()));
    }
    Ok(PathBuf::from(p))
}

/// A channel to the Workload API socket.
pub async fn connect(addr: &str) -> Result<Channel, CliError> {
    let path = socket_path(addr)?;
    kame_api::channel::unix(&path).await.map_err(|e| match e {
        kame_api::channel::ClientError::Unix { path, source } => CliError::Connect { path, source },
        other => CliError::Failed(other.to_string()),
    })
}

pub use kame_api::channel::with_workload_header as with_header;

fn client(ch: Channel) -> wl::spiffe_workload_api_client::SpiffeWorkloadApiClient<Channel> {
    wl::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(ch)
}

fn split_ders(mut b: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![];
    while !b.is_empty() {
        let len = match kame_api::x509svid::ParsedCert::parse(b) {
            Ok(_) => b.len(),
            Err(_) => der_len(b).unwrap_or(b.len()),
        };
        out.push(b[..len].to_vec());
        b = &b[len..];
    }
    out
}

/// The length of the DER TLV at the start of `b`.
fn der_len(b: &[u8]) -> Option<usize> {
    let first = *b.get(1)?;
    let (len, hdr) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let mut l = 0usize;
        for i in 0..n {
            l = (l << 8) | *b.get(2 + i)? as usize;
        }
        (l, 2 + n)
    };
    (hdr + len <= b.len()).then_some(hdr + len)
}

/// Concatenated DER certificates, one by one.
pub fn certs(concat: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![];
    let mut b = concat;
    while !b.is_empty() {
        let Some(n) = der_len(b) else {
            out.extend(split_ders(b));
            break;
        };
        out.push(b[..n].to_vec());
        b = &b[n..];
    }
    out
}

fn pem_certs(concat: &[u8]) -> String {
    certs(concat)
        .iter()
        .map(|c| kame_api::bundle::pem_block("CERTIFICATE", c))
        .collect()
}

fn write(path: &Path, data: &[u8], mode: u32) -> Result<(), CliError> {
    crate::storage::write_atomic(path, data, mode).map_err(|e| CliError::Failed(e.to_string()))
}

/// A duration as Go prints one (`3.210123ms`, `1.5s`, `2m3s`): SPIRE's response times.
pub fn go_duration(d: std::time::Duration) -> String {
    fn frac(whole: u128, rem: u128, digits: u32) -> String {
        let mut s = whole.to_string();
        if rem != 0 {
            let f = format!("{rem:0width$}", width = digits as usize);
            s.push('.');
            s.push_str(f.trim_end_matches('0'));
        }
        s
    }
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".into();
    }
    if ns < 1_000 {
        return format!("{ns}ns");
    }
    if ns < 1_000_000 {
        return format!("{}\u{b5}s", frac(ns / 1_000, ns % 1_000, 3));
    }
    if ns < 1_000_000_000 {
        return format!("{}ms", frac(ns / 1_000_000, ns % 1_000_000, 6));
    }
    let secs = ns / 1_000_000_000;
    let s = frac(secs % 60, ns % 1_000_000_000, 9);
    match (secs / 3600, secs / 60 % 60) {
        (0, 0) => format!("{s}s"),
        (0, m) => format!("{m}m{s}s"),
        (h, m) => format!("{h}h{m}m{s}s"),
    }
}

/// SPIRE's `printX509SVIDResponse`: the count and the response time, then per SVID its ID,
/// hint, validity, intermediates' and CAs' validity (federated CAs marked with their trust
/// domain, in name order), dates in UTC.
pub fn x509_report(msg: &wl::X509svidResponse, took: std::time::Duration) -> String {
    use kame_api::timefmt::utc;
    use kame_api::x509svid::ParsedCert;
    let n = msg.svids.len();
    let mut out = format!(
        "Received {n} svid{} after {}\n",
        if n == 1 { "" } else { "s" },
        go_duration(took)
    );
    let validity = |out: &mut String, label: &str, der: &[u8]| {
        if let Ok(c) = ParsedCert::parse(der) {
            out.push_str(&format!(
                "{label} Valid After:\t{}\n{label} Valid Until:\t{}\n",
                utc(c.not_before() as i64),
                utc(c.not_after() as i64)
            ));
        }
    };
    let mut federated: Vec<(&String, &Vec<u8>)> = msg.federated_bundles.iter().collect();
    federated.sort();
    for svid in &msg.svids {
        out.push('\n');
        out.push_str(&format!("SPIFFE ID:\t\t{}\n", svid.spiffe_id));
        if !svid.hint.is_empty() {
            out.push_str(&format!("Hint:\t\t\t{}\n", svid.hint));
        }
        let chain = certs(&svid.x509_svid);
        if let Some(leaf) = chain.first() {
            validity(&mut out, "SVID", leaf);
        }
        for (i, c) in chain.iter().skip(1).enumerate() {
            validity(&mut out, &format!("Intermediate #{}", i + 1), c);
        }
        for (i, c) in certs(&svid.bundle).iter().enumerate() {
            validity(&mut out, &format!("CA #{}", i + 1), c);
        }
        for (td, b) in &federated {
            let td = td.trim_start_matches("spiffe://");
            for (i, c) in certs(b).iter().enumerate() {
                validity(&mut out, &format!("[{td}] CA #{}", i + 1), c);
            }
        }
    }
    out.push('\n');
    out
}

/// `api fetch x509`: SPIRE's report, and with `--write` SPIRE's files (`svid.N.pem`,
/// `svid.N.key`, `bundle.N.pem`, `federated_bundle.N.M.pem`), each one announced.
pub async fn fetch_x509(addr: &str, write_dir: Option<&Path>, json: bool) -> Result<(), CliError> {
    let start = std::time::Instant::now();
    let mut s = client(connect(addr).await?)
        .fetch_x509svid(with_header(wl::X509svidRequest {}))
        .await?
        .into_inner();
    let msg = s
        .message()
        .await?
        .ok_or_else(|| CliError::Failed("the stream ended without an SVID".into()))?;
    if json {
        println!("{}", x509_json(&msg));
    } else {
        print!("{}", x509_report(&msg, start.elapsed()));
    }
    let Some(dir) = write_dir else {
        return Ok(());
    };
    let mut federated: Vec<(&String, &Vec<u8>)> = msg.federated_bundles.iter().collect();
    federated.sort();
    for (i, svid) in msg.svids.iter().enumerate() {
        let path = dir.join(format!("svid.{i}.pem"));
        println!("Writing SVID #{i} to file {}.", path.display());
        write(&path, pem_certs(&svid.x509_svid).as_bytes(), 0o644)?;
        let path = dir.join(format!("svid.{i}.key"));
        println!("Writing key #{i} to file {}.", path.display());
        let key = zeroize::Zeroizing::new(kame_api::bundle::pem_block(
            "PRIVATE KEY",
            &svid.x509_svid_key,
        ));
        write(&path, key.as_bytes(), 0o600)?;
        let path = dir.join(format!("bundle.{i}.pem"));
        println!("Writing bundle #{i} to file {}.", path.display());
        write(&path, pem_certs(&svid.bundle).as_bytes(), 0o644)?;
        for (j, (td, b)) in federated.iter().enumerate() {
            let path = dir.join(format!("federated_bundle.{i}.{j}.pem"));
            println!(
                "Writing federated bundle #{j} for trust domain {} to file {}.",
                td.trim_start_matches("spiffe://"),
                path.display()
            );
            write(&path, pem_certs(b).as_bytes(), 0o644)?;
        }
    }
    Ok(())
}

/// Bytes as protobuf JSON writes them (standard padded base64).
fn b64(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// The X509-SVID response in SPIRE's `-output json` shape (protobuf JSON with field names
/// as in the proto and every field present).
pub fn x509_json(msg: &wl::X509svidResponse) -> serde_json::Value {
    use serde_json::json;
    let federated: serde_json::Map<String, serde_json::Value> = msg
        .federated_bundles
        .iter()
        .map(|(td, b)| (td.clone(), json!(b64(b))))
        .collect();
    json!({
        "svids": msg.svids.iter().map(|s| json!({
            "spiffe_id": s.spiffe_id,
            "x509_svid": b64(&s.x509_svid),
            "x509_svid_key": b64(&s.x509_svid_key),
            "bundle": b64(&s.bundle),
            "hint": s.hint,
        })).collect::<Vec<_>>(),
        "crl": msg.crl.iter().map(|c| b64(c)).collect::<Vec<_>>(),
        "federated_bundles": federated,
    })
}

/// A protobuf `Struct` value as JSON.
fn proto_value(v: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::StructValue(st)) => proto_struct(st),
        Some(Kind::ListValue(l)) => l.values.iter().map(proto_value).collect(),
    }
}

fn proto_struct(st: &prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        st.fields
            .iter()
            .map(|(k, v)| (k.clone(), proto_value(v)))
            .collect(),
    )
}

/// `api fetch jwt`: each token, then the JWT bundles (SPIRE's report); with `json`, the two
/// responses as SPIRE prints them with `-output json`.
pub async fn fetch_jwt(
    addr: &str,
    audience: &[String],
    spiffe_id: Option<&str>,
    json: bool,
) -> Result<(), CliError> {
    let mut c = client(connect(addr).await?);
    let bundles = c
        .fetch_jwt_bundles(with_header(wl::JwtBundlesRequest {}))
        .await?
        .into_inner()
        .message()
        .await?
        .ok_or_else(|| CliError::Failed("the JWT bundle stream ended without bundles".into()))?;
    let r = c
        .fetch_jwtsvid(with_header(wl::JwtsvidRequest {
            audience: audience.to_vec(),
            spiffe_id: spiffe_id.unwrap_or_default().to_string(),
        }))
        .await?
        .into_inner();
    let mut tds: Vec<(&String, &Vec<u8>)> = bundles.bundles.iter().collect();
    tds.sort();
    if json {
        let v = serde_json::json!([
            {"svids": r.svids.iter().map(|s| serde_json::json!({
                "spiffe_id": s.spiffe_id, "svid": s.svid, "hint": s.hint,
            })).collect::<Vec<_>>()},
            {"bundles": tds.iter().map(|(td, b)| ((*td).clone(), serde_json::json!(b64(b))))
                .collect::<serde_json::Map<_, _>>()},
        ]);
        println!("{v}");
        return Ok(());
    }
    for s in &r.svids {
        println!("token({}):\n\t{}", s.spiffe_id, s.svid);
        if !s.hint.is_empty() {
            println!("hint({}):\n\t{}", s.spiffe_id, s.hint);
        }
    }
    for (td, jwks) in tds {
        println!("bundle({td}):\n\t{}", String::from_utf8_lossy(jwks));
    }
    Ok(())
}

/// `api validate jwt`: SPIRE's report (the claims as JSON), or the response as JSON.
pub async fn validate_jwt(
    addr: &str,
    audience: &str,
    svid: &str,
    json: bool,
) -> Result<(), CliError> {
    let r = client(connect(addr).await?)
        .validate_jwtsvid(with_header(wl::ValidateJwtsvidRequest {
            audience: audience.into(),
            svid: svid.into(),
        }))
        .await
        .map_err(|s| match s.code() {
            tonic::Code::InvalidArgument => CliError::InvalidSvid(s.message().to_string()),
            _ => s.into(),
        })?
        .into_inner();
    let claims = r
        .claims
        .as_ref()
        .map_or(serde_json::json!({}), proto_struct);
    if json {
        println!(
            "{}",
            serde_json::json!({"spiffe_id": r.spiffe_id, "claims": claims})
        );
        return Ok(());
    }
    println!("SVID is valid.");
    println!("SPIFFE ID : {}", r.spiffe_id);
    println!("Claims    : {claims}");
    Ok(())
}

/// `api watch`: prints every X509-SVID update (SPIRE's report) until interrupted or the
/// stream ends.
pub async fn watch(addr: &str) -> Result<(), CliError> {
    let mut s = client(connect(addr).await?)
        .fetch_x509svid(with_header(wl::X509svidRequest {}))
        .await?
        .into_inner();
    // As SPIRE's: each update's report, timed from the previous one.
    let mut since = std::time::Instant::now();
    while let Some(msg) = s.message().await? {
        print!("{}", x509_report(&msg, since.elapsed()));
        since = std::time::Instant::now();
    }
    Ok(())
}

/// `healthcheck`: the Workload API answers (any gRPC status from the agent counts).
pub async fn healthcheck(addr: &str) -> Result<(), CliError> {
    let r = client(connect(addr).await?)
        .fetch_x509_bundles(with_header(wl::X509BundlesRequest {}))
        .await;
    match r {
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::PermissionDenied => {}
        Err(s) => return Err(s.into()),
    }
    println!("Agent is healthy.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_durations_print_as_go_prints_them() {
        use std::time::Duration;
        assert_eq!(go_duration(Duration::from_nanos(3_210_123)), "3.210123ms");
        assert_eq!(go_duration(Duration::from_micros(850)), "850\u{b5}s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_secs(123)), "2m3s");
        assert_eq!(go_duration(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(go_duration(Duration::from_nanos(12)), "12ns");
    }

    #[test]
    fn cli_socket_addresses_accept_paths_and_unix_urls() {
        assert_eq!(
            socket_path("/tmp/a.sock").unwrap(),
            PathBuf::from("/tmp/a.sock")
        );
        assert_eq!(
            socket_path("unix:///tmp/a.sock").unwrap(),
            PathBuf::from("/tmp/a.sock")
        );
        assert_eq!(
            socket_path("unix:/tmp/a.sock").unwrap(),
            PathBuf::from("/tmp/a.sock")
        );
        assert!(socket_path("tcp://127.0.0.1:1").is_err());
        assert!(socket_path("relative.sock").is_err());
    }

    #[test]
    fn cli_splits_concatenated_der() {
        let a = vec![0x30, 0x03, 1, 2, 3];
        let b = vec![0x30, 0x81, 0x02, 9, 9];
        let both = [a.clone(), b.clone()].concat();
        assert_eq!(certs(&both), vec![a, b]);
    }
}
