//! Bad input through the real server: every case returns a clear error with the right gRPC code
//! (or exit status) and persists nothing.

mod common;

use common::*;
use kame_api::pb;
use tonic::Code;

fn entry(
    spiffe: pb::types::Spiffeid,
    parent: pb::types::Spiffeid,
    selectors: &[(&str, &str)],
) -> pb::types::Entry {
    pb::types::Entry {
        spiffe_id: Some(spiffe),
        parent_id: Some(parent),
        selectors: selectors
            .iter()
            .map(|(t, v)| pb::types::Selector {
                r#type: t.to_string(),
                value: v.to_string(),
            })
            .collect(),
        ..Default::default()
    }
}

async fn create(s: &TestServer, e: pb::types::Entry) -> pb::entry::EntryResult {
    pb::entry::entry_client::EntryClient::new(s.admin().await)
        .batch_create_entry(pb::entry::BatchCreateEntryRequest {
            entries: vec![e],
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0)
}

async fn count(s: &TestServer) -> i32 {
    pb::entry::entry_client::EntryClient::new(s.admin().await)
        .count_entries(pb::entry::CountEntriesRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_create_invalid_id_or_trust_domain_is_invalid_argument_and_creates_nothing() {
    let s = TestServer::start(Opts::default()).await;
    let parent = spiffe_id(TD, "/spire/agent/x");
    let cases = [
        spiffe_id("Example.org", "/w"), // ID-05/ID-12: upper case trust domain
        spiffe_id(TD, "/a//b"),         // ID-09 empty segment
        spiffe_id(TD, "/a/"),           // ID-10 trailing slash
        spiffe_id(TD, "/a/../b"),       // ID-09 dot segment
        spiffe_id(TD, "no-slash"),      // path must start with /
        spiffe_id("other.org", "/w"),   // another trust domain
        spiffe_id("", "/w"),            // ID-02
        spiffe_id("td:8080", "/w"),     // ID-04
        spiffe_id(TD, "/%41"),          // ID-06
        spiffe_id(TD, ""),              // root ID has no SVID
    ];
    for id in cases {
        let r = create(&s, entry(id.clone(), parent.clone(), &[("unix", "uid:0")])).await;
        assert_eq!(
            r.status.as_ref().unwrap().code,
            Code::InvalidArgument as i32,
            "{id:?}: {:?}",
            r.status
        );
        assert!(r.entry.is_none());
        let r = create(
            &s,
            entry(spiffe_id(TD, "/w"), id.clone(), &[("unix", "uid:0")]),
        )
        .await;
        let want = if id.trust_domain == TD && id.path.is_empty() {
            Code::Ok
        } else {
            Code::InvalidArgument
        };
        assert_eq!(
            r.status.as_ref().unwrap().code,
            want as i32,
            "parent {id:?}: {:?}",
            r.status
        );
        if want == Code::Ok {
            let id = r.entry.unwrap().id;
            pb::entry::entry_client::EntryClient::new(s.admin().await)
                .batch_delete_entry(pb::entry::BatchDeleteEntryRequest { ids: vec![id] })
                .await
                .unwrap();
        }
    }
    assert_eq!(count(&s).await, 0, "nothing persisted");
    // The CLI reports the same error with a failing exit status.
    let o = s
        .cli(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://EXAMPLE.org/w",
            "--parent-id",
            "spiffe://example.org/spire/agent/x",
            "--selector",
            "unix:uid:0",
        ])
        .await;
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("InvalidArgument"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(count(&s).await, 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_without_selectors_and_bad_fields_are_invalid_argument() {
    let s = TestServer::start(Opts::default()).await;
    let base = || {
        entry(
            spiffe_id(TD, "/w"),
            spiffe_id(TD, "/spire/agent/x"),
            &[("unix", "uid:0")],
        )
    };
    let mut no_sel = base();
    no_sel.selectors.clear();
    let mut bad_sel = base();
    bad_sel.selectors[0].value.clear();
    let mut neg_ttl = base();
    neg_ttl.x509_svid_ttl = -1;
    let mut bad_dns = base();
    bad_dns.dns_names = vec!["not a name".into()];
    let mut bad_fed = base();
    bad_fed.federates_with = vec!["Bad TD".into()];
    for e in [no_sel, bad_sel, neg_ttl, bad_dns, bad_fed] {
        let r = create(&s, e.clone()).await;
        assert_eq!(
            r.status.unwrap().code,
            Code::InvalidArgument as i32,
            "{e:?}"
        );
    }
    let mut unknown_fed = base();
    unknown_fed.federates_with = vec!["other.org".into()];
    assert_eq!(
        create(&s, unknown_fed).await.status.unwrap().code,
        Code::FailedPrecondition as i32
    );
    assert_eq!(count(&s).await, 0);
    let o = s
        .cli(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/w",
            "--parent-id",
            "spiffe://example.org/spire/agent/x",
        ])
        .await;
    assert!(!o.status.success());
    assert_eq!(count(&s).await, 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_entry_is_already_exists_with_existing_entry() {
    let s = TestServer::start(Opts::default()).await;
    let e = entry(
        spiffe_id(TD, "/w"),
        spiffe_id(TD, "/spire/agent/x"),
        &[("unix", "uid:0"), ("unix", "gid:0")],
    );
    let first = create(&s, e.clone()).await;
    assert_eq!(first.status.unwrap().code, 0);
    // Same selectors in another order are the same entry.
    let mut again = e.clone();
    again.selectors.reverse();
    let dup = create(&s, again).await;
    assert_eq!(dup.status.unwrap().code, Code::AlreadyExists as i32);
    assert_eq!(dup.entry.unwrap().id, first.entry.unwrap().id);
    assert_eq!(count(&s).await, 1);
    let o = s
        .cli(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/w",
            "--parent-id",
            "spiffe://example.org/spire/agent/x",
            "--selector",
            "unix:uid:0",
            "--selector",
            "unix:gid:0",
        ])
        .await;
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("AlreadyExists"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mint_x509_bad_csr_wrong_key_type_other_trust_domain_and_ttl() {
    let s = TestServer::start(Opts::default()).await;
    let mut c = pb::svid::svid_client::SvidClient::new(s.admin().await);
    let key = TestKey::new();
    // malformed CSR
    let e = c
        .mint_x509svid(pb::svid::MintX509svidRequest {
            csr: b"not a csr".to_vec(),
            ttl: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    // CSR whose signature does not match its key
    let mut forged = key.csr(&["spiffe://example.org/w"], &[]);
    let n = forged.len();
    forged[n - 5] ^= 0xff;
    let e = c
        .mint_x509svid(pb::svid::MintX509svidRequest {
            csr: forged,
            ttl: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    // CSR for an Ed25519 key: a key type Kame does not issue for
    let ed = aws_lc_rs::signature::Ed25519KeyPair::generate().unwrap();
    let spki = {
        use aws_lc_rs::encoding::AsDer;
        use aws_lc_rs::signature::KeyPair;
        ed.public_key().as_der().unwrap().as_ref().to_vec()
    };
    let info = kame_api::csr::request_info(&spki, &["spiffe://example.org/w".into()], &[]).unwrap();
    let sig = ed.sign(&info);
    let alg = spki::AlgorithmIdentifierOwned {
        oid: const_oid::db::rfc8410::ID_ED_25519,
        parameters: None,
    };
    let csr = kame_api::x509svid::assemble(&info, &alg, sig.as_ref()).unwrap();
    let e = c
        .mint_x509svid(pb::svid::MintX509svidRequest { csr, ttl: 0 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("unsupported key algorithm"), "{e}");
    // SPIFFE ID of another trust domain
    let e = c
        .mint_x509svid(pb::svid::MintX509svidRequest {
            csr: key.csr(&["spiffe://other.org/w"], &[]),
            ttl: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // two URI SANs
    let e = c
        .mint_x509svid(pb::svid::MintX509svidRequest {
            csr: key.csr(&["spiffe://example.org/a", "spiffe://example.org/b"], &[]),
            ttl: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // negative TTL
    let e = c
        .mint_x509svid(pb::svid::MintX509svidRequest {
            csr: key.csr(&["spiffe://example.org/w"], &[]),
            ttl: -5,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // JWT: other trust domain, no audience, negative TTL
    let j = |id: pb::types::Spiffeid, aud: Vec<String>, ttl: i32| {
        let mut c = c.clone();
        async move {
            c.mint_jwtsvid(pb::svid::MintJwtsvidRequest {
                id: Some(id),
                audience: aud,
                ttl,
            })
            .await
            .unwrap_err()
            .code()
        }
    };
    assert_eq!(
        j(spiffe_id("other.org", "/w"), vec!["a".into()], 0).await,
        Code::InvalidArgument
    );
    assert_eq!(
        j(spiffe_id(TD, "/w"), vec![], 0).await,
        Code::InvalidArgument
    );
    assert_eq!(
        j(spiffe_id(TD, "/w"), vec!["a".into()], -1).await,
        Code::InvalidArgument
    );
    // TTL overflow at the CLI: more seconds than the API can carry.
    let o = s
        .cli(&[
            "jwt",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/w",
            "--audience",
            "a",
            "--ttl",
            "99999999999",
        ])
        .await;
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("too large"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = s
        .cli(&[
            "x509",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/w",
            "--ttl",
            "-1",
        ])
        .await;
    assert!(!o.status.success());
    // token generate without a positive TTL
    let o = s.cli(&["token", "generate", "--ttl", "0"]).await;
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("InvalidArgument"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_rejected_and_nothing_persisted() {
    let s = TestServer::start(Opts::default()).await;
    let mut e = entry(
        spiffe_id(TD, "/w"),
        spiffe_id(TD, "/spire/agent/x"),
        &[("unix", "uid:0")],
    );
    e.hint = "x".repeat(5 * 1024 * 1024);
    let err = pb::entry::entry_client::EntryClient::new(s.admin().await)
        .max_encoding_message_size(64 * 1024 * 1024)
        .batch_create_entry(pb::entry::BatchCreateEntryRequest {
            entries: vec![e],
            output_mask: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    // A hint under the message limit but over the SPIFFE hint limit is InvalidArgument (WA-09).
    let mut e = entry(
        spiffe_id(TD, "/w"),
        spiffe_id(TD, "/spire/agent/x"),
        &[("unix", "uid:0")],
    );
    e.hint = "x".repeat(2000);
    assert_eq!(
        create(&s, e).await.status.unwrap().code,
        Code::InvalidArgument as i32
    );
    assert_eq!(count(&s).await, 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_typo_fails_validate_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = config_text(dir.path(), 1, &Opts::default());
    let p = dir.path().join("server.conf");
    std::fs::write(&p, &good).unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kame-server"))
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&["validate", "--config", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::write(&p, good.replace("ca_ttl", "ca_tll")).unwrap();
    let o = run(&["validate", "--config", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("server.ca_tll: unknown key"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::write(&p, good.replace("\"24h\"", "\"24 hours\"")).unwrap();
    let o = run(&["validate", "--config", p.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("server.ca_ttl"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // run refuses the bad file too, and creates nothing
    let o = run(&["run", "--config", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        !dir.path().join("data").exists(),
        "validate/run on a bad config has no side effects"
    );
}

/// Issue 20: every plugin type owns its `plugin_data`; `kame-server validate` names the full
/// key path of a typo in any of them, and the key and the file of a file that is missing.
#[test]
fn validate_names_the_full_path_in_every_plugin_type() {
    let dir = tempfile::tempdir().unwrap();
    let good = config_text(dir.path(), 1, &Opts::default());
    let p = dir.path().join("server.conf");
    let validate = |text: &str| {
        std::fs::write(&p, text).unwrap();
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_kame-server"))
            .args(["validate", "--config", p.to_str().unwrap()])
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    assert_eq!(validate(&good).0, Some(0));
    let d = dir.path().display().to_string();
    let x509pop = "NodeAttestor \"x509pop\" {\n plugin_data {\n ca_bundle_path = \"/nonexistent/ca.pem\"\n }\n }\n NodeAttestor \"join_token\"";
    let pkcs11 = "KeyManager \"pkcs11\" {\n plugin_data {\n module_path = \"/nonexistent/libsofthsm2.so\"\n token_label = \"t\"\n user_pin = \"1\"\n }\n }";
    let disk_block = format!(
        "KeyManager \"disk\" {{\n        plugin_data {{\n            keys_path = \"{d}/data/keys.json\"\n        }}\n    }}"
    );
    assert!(good.contains(&disk_block));
    for (text, want) in [
        (
            good.replace("database_type", "database_typ"),
            "plugins.DataStore.sql.plugin_data.database_typ: unknown key",
        ),
        (
            good.replace("keys_path", "keys_pth"),
            "plugins.KeyManager.disk.plugin_data.keys_pth: unknown key",
        ),
        (
            good.replace(
                &format!("{d}/data/keys.json"),
                &format!("{d}/dta/keys.json"),
            ),
            "plugins.KeyManager.disk.plugin_data.keys_path: ",
        ),
        (
            good.replace(
                &format!("{d}/data/datastore"),
                &format!("{d}/dta/datastore"),
            ),
            "plugins.DataStore.sql.plugin_data.connection_string: ",
        ),
        (
            good.replace(&disk_block, pkcs11),
            "plugins.KeyManager.pkcs11.plugin_data.module_path: /nonexistent/libsofthsm2.so: No such file",
        ),
        (
            good.replace("NodeAttestor \"join_token\"", x509pop),
            "plugins.NodeAttestor.x509pop.plugin_data.ca_bundle_path: /nonexistent/ca.pem: No such file",
        ),
        (
            good.replace(
                "NodeAttestor \"join_token\"",
                &x509pop.replace("ca_bundle_path", "ca_bundle_pth"),
            ),
            "plugins.NodeAttestor.x509pop.plugin_data.ca_bundle_pth: unknown key",
        ),
    ] {
        let (code, err) = validate(&text);
        assert_eq!(code, Some(1), "{want}: {err}");
        assert!(err.contains(want), "{want}: {err}");
    }
    assert!(
        !dir.path().join("data").exists(),
        "validate creates nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_apis_refuse_tls_callers_without_admin_svid() {
    let s = TestServer::start(Opts::default()).await;
    let roots: Vec<Vec<u8>> = s
        .bundle()
        .await
        .x509_authorities
        .iter()
        .map(|c| c.asn1.clone())
        .collect();
    let ch = tls_channel(s.tcp_port, roots, None).await.unwrap();
    // The bundle is public.
    pb::bundle::bundle_client::BundleClient::new(ch.clone())
        .get_bundle(pb::bundle::GetBundleRequest { output_mask: None })
        .await
        .unwrap();
    let e = pb::entry::entry_client::EntryClient::new(ch.clone())
        .count_entries(pb::entry::CountEntriesRequest { filter: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = pb::svid::svid_client::SvidClient::new(ch)
        .mint_jwtsvid(pb::svid::MintJwtsvidRequest {
            id: Some(spiffe_id(TD, "/w")),
            audience: vec!["a".into()],
            ttl: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    s.stop().await;
}
