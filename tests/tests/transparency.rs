//! Issuance transparency end to end: a server with `transparency { }`, an agent, and
//! X509-SVIDs served to a workload, checked as an outsider would: `openssl x509 -text` shows
//! the embedded SCT from the log, and a verifier written from RFC 6962 / RFC 9162 in Python
//! (`cryptography` and the standard library, none of Kame's code) checks each SCT's signature
//! with the log's public key, each SVID's inclusion in the signed tree head through the read
//! API, the tree head's signature, and consistency between an earlier and a later tree head.
//! The agent requires the server's SVID to carry the log's SCT (`transparency_log_keys`); the
//! `kame-server log` commands check the same with Kame's verifier, and `log verify` finds an
//! entry altered in the database.

mod common;

use common::{Env, Opts, free_port, my_uid};
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

    let report = ct_check(&env, &base, &first).await;
    assert!(report.contains("sct ok"), "{report}");

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
    env.stop().await;
}
