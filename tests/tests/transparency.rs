//! Issuance transparency end to end: a server with `transparency { }`, an agent, and
//! X509-SVIDs served to a workload, checked as an outsider would: `openssl x509 -text` shows
//! the embedded SCT from the log, and a verifier written from RFC 6962 / RFC 9162 in Python
//! (`cryptography` and the standard library, none of Kame's code) checks each SCT's signature
//! with the log's public key, each SVID's inclusion in the signed tree head through the read
//! API, the tree head's signature, and consistency between an earlier and a later tree head.
//! The same verifier checks a JWT-SVID's SCT (its `kame_scts` claim). The agent requires the
//! server's SVID to carry the log's SCT (`transparency_log_keys`), and its ValidateJWTSVID
//! refuses a token signed with a stolen copy of the JWT key outside the log; the
//! `kame-server log` commands check the same with Kame's verifier, `log monitor` reports the
//! SVIDs of a watched ID, authority changes and attestations pass by pass, and `log verify`
//! and a monitor without a saved frontier find an entry altered in the database.

mod common;

use common::{Env, Opts, free_port, my_uid, stolen_key};
use std::path::Path;
use std::time::Duration;

fn pem(der: &[u8]) -> String {
    kame_api::bundle::pem_block("CERTIFICATE", der)
}

fn python() -> std::path::PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(p.exists(), "{} is missing: run scripts/test", p.display());
    p
}

async fn ct_check(env: &Env, base: &str, certs: &[std::path::PathBuf]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/transparency/ct_check.py");
    let out = tokio::process::Command::new(python())
        .arg(script)
        .arg(env.dir.path().join("srv/transparency_log_key.pem"))
        .arg(base)
        .arg(env.dir.path().join("sth.json"))
        .args(certs)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ct_check.py failed:\n{text}");
    text
}

/// Writes each SVID the workload holds, with the certificate that issued it, to a PEM file.
fn write_svids(
    env: &Env,
    m: &kame_api::pb::workload::X509svidResponse,
    tag: &str,
) -> Vec<std::path::PathBuf> {
    m.svids
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let chain = kame_agent::cli::certs(&s.x509_svid);
            let issuer = if chain.len() > 1 {
                chain[1].clone()
            } else {
                kame_agent::cli::certs(&s.bundle)[0].clone()
            };
            let p = env.dir.path().join(format!("svid-{tag}-{i}.pem"));
            std::fs::write(&p, format!("{}{}", pem(&chain[0]), pem(&issuer))).unwrap();
            p
        })
        .collect()
}

/// A JWT-SVID for `path` with audience "db", from the Workload API.
async fn fetch_jwt(env: &Env, path: &str) -> String {
    use kame_agent::cli::with_header as h;
    let mut c = env.workload_client().await;
    c.fetch_jwtsvid(h(kame_api::pb::workload::JwtsvidRequest {
        audience: vec!["db".into()],
        spiffe_id: format!("spiffe://{}{path}", env.td),
    }))
    .await
    .unwrap()
    .into_inner()
    .svids[0]
        .svid
        .clone()
}

async fn validate_jwt(
    env: &Env,
    token: String,
) -> Result<kame_api::pb::workload::ValidateJwtsvidResponse, tonic::Status> {
    use kame_agent::cli::with_header as h;
    let mut c = env.workload_client().await;
    c.validate_jwtsvid(h(kame_api::pb::workload::ValidateJwtsvidRequest {
        audience: "db".into(),
        svid: token,
    }))
    .await
    .map(|r| r.into_inner())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A JWT-SVID for `path` signed with a copy of the server's JWT key (the one that signed
/// `genuine`), outside the log: what a thief of the key file could make.
async fn forge_jwt(env: &Env, genuine: &str, path: &str) -> String {
    use base64::Engine;
    use kame_keymanager::KeyManager;
    let header: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(genuine.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    let kid = header["kid"].as_str().unwrap().to_string();
    let bundle = env.bundle().await;
    let spki = &bundle
        .jwt_authorities
        .iter()
        .find(|k| k.key_id == kid)
        .unwrap()
        .public_key;
    let (stolen, key) = stolen_key(env, spki).await;
    let info = kame_api::keys::KeyInfo::from_spki_der(&key.spki_der).unwrap();
    let now = now_secs();
    let sub = kame_api::SpiffeId::parse(&format!("spiffe://{}{path}", env.td)).unwrap();
    let input = kame_api::jwtsvid::signing_input(
        &info,
        &kid,
        &kame_api::jwtsvid::Claims {
            sub: &sub,
            aud: &["db".to_string()],
            exp: now + 300,
            iat: now,
            iss: None,
        },
    )
    .unwrap();
    let sig = stolen
        .sign(
            &key.id,
            input.as_bytes(),
            kame_keymanager::SignOpts::for_key(key.key_type),
        )
        .await
        .unwrap();
    kame_api::jwtsvid::assemble(&info, &input, &sig.bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparency_svids_carry_an_sct_that_an_independent_rfc6962_verifier_accepts() {
    let port = free_port();
    let extra: &'static str = Box::leak(
        format!(
            "transparency {{\n        bind_address = \"127.0.0.1\"\n        bind_port = {port}\n        tree_head_interval = \"200ms\"\n    }}"
        )
        .into_boxed_str(),
    );
    // The agent requires the server's SVID to carry an SCT from this log.
    let env = Env::start(Opts {
        extra_server: extra,
        extra_agent: "transparency_log_keys = [\"$DIR/srv/transparency_log_key.pem\"]",
        ..Default::default()
    })
    .await;
    let base = format!("http://127.0.0.1:{port}");
    let uid = format!("unix:uid:{}", my_uid());
    env.register("/first", &[&uid], |_| {}).await;
    let m = env.wait_for_svids(&["/first"]).await;
    let first = write_svids(&env, &m, "a");
    // Let a tree head cover them.
    tokio::time::sleep(Duration::from_millis(800)).await;

    // openssl sees the SCT, from this log.
    let key_pem =
        std::fs::read_to_string(env.dir.path().join("srv/transparency_log_key.pem")).unwrap();
    let key_der = kame_api::ct::log_key_from_pem(&key_pem).unwrap();
    let log_id = kame_api::ct::log_id(&key_der);
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&first[0])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("CT Precertificate SCTs"), "{text}");
    let id_hex: Vec<String> = log_id.iter().map(|b| format!("{b:02X}")).collect();
    let compact: String = text.split_whitespace().collect();
    assert!(
        compact.contains(&id_hex.join(":")),
        "the SCT names log {}:\n{text}",
        id_hex.join(":")
    );

    // A JWT-SVID carries the log's SCT as its last claim; the independent verifier checks it
    // and its inclusion.
    let token = fetch_jwt(&env, "/first").await;
    let jwt_file = env.dir.path().join("first.jwt");
    std::fs::write(&jwt_file, &token).unwrap();
    // The SCT promises inclusion by the next tree head (every 200 ms here), not at once.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut checked = first.clone();
    checked.push(jwt_file);
    let report = ct_check(&env, &base, &checked).await;
    assert!(report.contains("sct ok"), "{report}");
    assert!(report.contains("jwt sct ok"), "{report}");

    // The agent (transparency_log_keys) validates the token, and refuses one signed with a
    // copy of the server's JWT key outside the log (no SCT).
    let v = validate_jwt(&env, token.clone()).await.unwrap();
    assert_eq!(v.spiffe_id, format!("spiffe://{}/first", env.td));
    let forged = forge_jwt(&env, &token, "/first").await;
    let e = validate_jwt(&env, forged).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("no valid SCT"), "{}", e.message());

    // A monitor watching /first: its first pass reads the log from the start and reports the
    // X509- and JWT-SVIDs of /first and the authorities prepared, nothing of other IDs.
    let margs = kame_server::cli::LogArgs {
        url: base.clone(),
        log_key: env.dir.path().join("srv/transparency_log_key.pem"),
        output: kame_server::cli::Output::Json,
    };
    let state = env.dir.path().join("monitor.json");
    let watch = vec![format!("spiffe://{}/first", env.td)];
    let r = kame_server::cli::monitor_pass(&margs, &state, &watch, 1_000_000)
        .await
        .unwrap();
    let kinds = |r: &serde_json::Value| -> Vec<String> {
        r["matches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                format!(
                    "{} {}",
                    m["type"].as_str().unwrap(),
                    m["spiffe_id"].as_str().unwrap_or("")
                )
            })
            .collect()
    };
    let seen = kinds(&r);
    let first_id = format!("spiffe://{}/first", env.td);
    assert!(seen.contains(&format!("Precert {first_id}")), "{seen:?}");
    assert!(seen.contains(&format!("JwtSvid {first_id}")), "{seen:?}");
    assert!(
        seen.iter().filter(|k| k.starts_with("Authority")).count() >= 2,
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|k| k.starts_with("Authority") || k.ends_with(&first_id)),
        "{seen:?}"
    );
    assert_eq!(r["from"], 0, "{r}");
    let first_size = r["to"].as_u64().unwrap();
    // A pass may read at most --max-entries new entries; a trailing slash of a watched
    // prefix changes nothing.
    let e = kame_server::cli::monitor_pass(&margs, &env.dir.path().join("small.json"), &watch, 1)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("--max-entries"), "{e}");
    let slash = vec![format!("spiffe://{}/first/", env.td)];
    let r2 = kame_server::cli::monitor_pass(
        &margs,
        &env.dir.path().join("slash.json"),
        &slash,
        1_000_000,
    )
    .await
    .unwrap();
    assert_eq!(kinds(&r2), seen);
    // The agent's attestation is in the log too: a monitor watching agents sees it.
    let agents = vec![format!("spiffe://{}/spire/agent", env.td)];
    let state_agents = env.dir.path().join("monitor-agents.json");
    let r = kame_server::cli::monitor_pass(&margs, &state_agents, &agents, 1_000_000)
        .await
        .unwrap();
    assert!(
        kinds(&r)
            .iter()
            .any(|k| k.starts_with("Attestation spiffe://")),
        "{r}"
    );

    // More SVIDs: the later tree head is consistent with the earlier one, and every SVID is in
    // it.
    env.register("/second", &[&uid], |_| {}).await;
    env.register("/third", &[&uid], |_| {}).await;
    let m = env.wait_for_svids(&["/first", "/second", "/third"]).await;
    let all = write_svids(&env, &m, "b");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let report = ct_check(&env, &base, &all).await;
    assert!(report.contains("consistency ok"), "{report}");
    assert_eq!(report.matches("sct ok").count(), 3, "{report}");

    // The CLI checks the same, with Kame's own verifier.
    use kame_server::cli::{LogArgs, LogCmd, log};
    let args = LogArgs {
        url: base.clone(),
        log_key: env.dir.path().join("srv/transparency_log_key.pem"),
        output: kame_server::cli::Output::Json,
    };
    let saved = env.dir.path().join("sth-cli.json");
    log(LogCmd::Sth {
        log: args.clone(),
        save: Some(saved.clone()),
    })
    .await
    .unwrap();
    let saved_copy = env.dir.path().join("sth-cli-copy.json");
    std::fs::copy(&saved, &saved_copy).unwrap();
    for cert in &all {
        log(LogCmd::Proof {
            log: args.clone(),
            cert: cert.clone(),
        })
        .await
        .unwrap();
    }
    env.register("/fourth", &[&uid], |_| {}).await;
    env.wait_for_svids(&["/first", "/fourth", "/second", "/third"])
        .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    log(LogCmd::Consistency {
        log: args.clone(),
        from_sth: saved,
    })
    .await
    .unwrap();
    log(LogCmd::Verify { log: args.clone() }).await.unwrap();
    // The monitor's next pass goes on from its saved frontier: only the new entries, none of
    // them under /first.
    let r = kame_server::cli::monitor_pass(&margs, &state, &watch, 1_000_000)
        .await
        .unwrap();
    assert_eq!(r["from"].as_u64().unwrap(), first_size, "{r}");
    assert!(r["to"].as_u64().unwrap() > first_size, "{r}");
    assert!(kinds(&r).iter().all(|k| k.starts_with("Authority")), "{r}");
    // A certificate not from this log is refused.
    let other = env.dir.path().join("other.pem");
    let bundle = kame_agent::cli::certs(&m.svids[0].bundle);
    std::fs::write(&other, format!("{}{}", pem(&bundle[0]), pem(&bundle[0]))).unwrap();
    let e = log(LogCmd::Proof {
        log: args.clone(),
        cert: other,
    })
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("no SCT"), "{e}");

    // An entry changed in the database: `log verify` finds that the entries no longer give
    // the signed root.
    let db = env.dir.path().join("srv/datastore.sqlite3");
    let out = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg(
            "UPDATE ct_log_entries SET leaf_input = substr(leaf_input, 1, 9) || \
             CASE WHEN substr(leaf_input, 10, 1) = X'FF' THEN X'FE' ELSE X'FF' END || \
             substr(leaf_input, 11) WHERE seq = 1",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = log(LogCmd::Verify { log: args })
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("altered"), "{e}");
    // A monitor starting from a tree head without its frontier finds the change too (the
    // consistency proof, made from the altered entries, fails; else re-hashing the entries
    // would); its state file is left as it was.
    let bare = env.dir.path().join("bare-sth.json");
    std::fs::copy(&saved_copy, &bare).unwrap();
    let e = kame_server::cli::monitor_pass(&margs, &bare, &watch, 1_000_000)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("does not extend") || e.contains("altered"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(&bare).unwrap(),
        std::fs::read(&saved_copy).unwrap()
    );
    env.stop().await;
}

/// An X509-SVID for `id` with serial number `serial` signed with a copy of the server's CA
/// key, outside the log, with a new key: (chain, PKCS#8 key).
async fn forge_svid(env: &Env, id: &str, serial: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
    use kame_api::x509svid::{IssuerInfo, LeafParams, ParsedCert, assemble_der, leaf_tbs};
    use kame_keymanager::KeyManager;
    let root = env.bundle().await.x509_authorities[0].asn1.clone();
    let root_spki = ParsedCert::parse(&root).unwrap().spki_der().unwrap();
    let (stolen, key) = stolen_key(env, &root_spki).await;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref()).unwrap();
    let spki = kame_api::keys::KeyInfo::EcP256(pair.public_key().as_ref().to_vec())
        .to_spki_der()
        .unwrap();
    let issuer = IssuerInfo::from_cert_der(&root).unwrap();
    let now = now_secs();
    let tbs = leaf_tbs(
        &LeafParams {
            id: &kame_api::SpiffeId::parse(id).unwrap(),
            dns_names: &[],
            spki_der: &spki,
            serial,
            not_before: now - 60,
            not_after: now + 600,
        },
        &issuer,
    )
    .unwrap();
    let sig = stolen
        .sign(
            &key.id,
            &tbs,
            kame_keymanager::SignOpts::for_key(key.key_type),
        )
        .await
        .unwrap();
    let leaf = assemble_der(&tbs, &issuer.signature_algorithm_der, &sig.bytes).unwrap();
    // It is a valid SVID of the trust domain in every way but the log.
    kame_api::x509svid::verify_chain(std::slice::from_ref(&leaf), &[root], now).unwrap();
    (vec![leaf], pkcs8.as_ref().to_vec())
}

/// GetAuthorizedEntries as the client `identity` (an agent's RPC).
async fn authorized_entries(
    env: &Env,
    identity: (Vec<Vec<u8>>, Vec<u8>),
) -> Result<usize, tonic::Status> {
    let roots: Vec<Vec<u8>> = env
        .bundle()
        .await
        .x509_authorities
        .iter()
        .map(|c| c.asn1.clone())
        .collect();
    let ch = kame_agent::client::connect(
        "127.0.0.1",
        env.tcp_port,
        &kame_api::SpiffeId::parse(&format!("spiffe://{}/spire/server", env.td)).unwrap(),
        std::sync::Arc::new(std::sync::RwLock::new(roots)),
        Some(identity),
    )
    .await
    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    kame_api::pb::entry::entry_client::EntryClient::new(ch)
        .get_authorized_entries(kame_api::pb::entry::GetAuthorizedEntriesRequest::default())
        .await
        .map(|r| r.into_inner().entries.len())
}

/// With `require_agent_scts`, the server serves the agent (its SVID was minted in the log and
/// carries the SCT) and refuses a client presenting an SVID for the same agent ID and serial
/// number minted with a copy of the CA key outside the log; without it, the server takes that
/// SVID (so it is the SCT that is missing, nothing else).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparency_server_requiring_agent_scts_refuses_svids_minted_outside_the_log() {
    for require in [true, false] {
        let extra: &'static str = Box::leak(
            format!("transparency {{\n        require_agent_scts = {require}\n    }}")
                .into_boxed_str(),
        );
        agent_with_forged_svid(
            Env::start(Opts {
                extra_server: extra,
                ..Default::default()
            })
            .await,
            require,
        )
        .await;
    }
}

async fn agent_with_forged_svid(env: Env, require: bool) {
    let uid = format!("unix:uid:{}", my_uid());
    env.register("/w", &[&uid], |_| {}).await;
    env.wait_for_svids(&["/w"]).await;
    let data = env.dir.path().join("agent/data");
    let agent = kame_agent::storage::Storage::new(data.clone(), Some(data))
        .load_agent()
        .unwrap()
        .unwrap();
    let n = authorized_entries(&env, (agent.chain.clone(), agent.key_pkcs8.to_vec()))
        .await
        .unwrap();
    assert_eq!(n, 1);
    let serial = kame_api::x509svid::ParsedCert::parse(&agent.chain[0])
        .unwrap()
        .serial_hex();
    let forged = forge_svid(&env, &env.agent_id, &hex::decode(serial).unwrap()).await;
    let r = authorized_entries(&env, forged).await;
    if require {
        assert!(r.is_err(), "{r:?}");
    } else {
        assert_eq!(r.unwrap(), 1);
    }
    // The agent itself goes on: a new entry still reaches the workload.
    env.register("/w2", &[&uid], |_| {}).await;
    env.wait_for_svids(&["/w", "/w2"]).await;
    env.stop().await;
}
