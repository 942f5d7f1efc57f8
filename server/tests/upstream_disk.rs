//! UpstreamAuthority "disk" on a running server: the server's CA becomes an intermediate of an
//! openssl-made root (the root itself as upstream, or an upstream intermediate with a bundle
//! file). Minted X509-SVIDs verify with openssl against the root alone; the bundle holds
//! exactly the upstream roots; the CA's lifetime stops at the upstream's; the CA survives a
//! restart from its journal; local X.509 taint and revoke are refused (SPIRE's rule); bad
//! upstream files refuse the configuration and say why.

mod common;

use common::upstream::*;
use common::*;
use kame_api::pb::localauthority as la;
use kame_api::x509svid::ParsedCert;
use la::local_authority_client::LocalAuthorityClient;
use std::path::{Path, PathBuf};
use tonic::Code;

const CA_EXT: &str = "basicConstraints=critical,CA:true\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n";

/// A self-signed P-256 root valid for `days`: (root.pem, root.key).
fn root(dir: &Path, days: &str) -> (PathBuf, PathBuf) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "root.key",
            "-out",
            "root.pem",
            "-subj",
            "/O=Upstream/CN=root",
            "-days",
            days,
            "-addext",
            "basicConstraints=critical,CA:true",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    (dir.join("root.pem"), dir.join("root.key"))
}

/// `name`.pem / `name`.key: a P-256 certificate signed by root.pem, a CA when `ca`.
fn issued(dir: &Path, name: &str, ca: bool) -> (PathBuf, PathBuf) {
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let pem = format!("{name}.pem");
    let ext = format!("{name}.ext");
    let text = match (ca, name.contains("pathlen0")) {
        (true, true) => CA_EXT.replace("CA:true", "CA:true,pathlen:0"),
        (true, false) => CA_EXT.to_string(),
        (false, _) => {
            "basicConstraints=critical,CA:false\nkeyUsage=critical,digitalSignature\n".to_string()
        }
    };
    std::fs::write(dir.join(&ext), text).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/O=Upstream/CN={name}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "root.pem",
            "-CAkey",
            "root.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "1",
            "-extfile",
            &ext,
        ],
    );
    (dir.join(pem), dir.join(key))
}

fn disk_block(cert: &Path, key: &Path, bundle: Option<&Path>) -> String {
    let b = bundle
        .map(|b| format!("bundle_file_path = \"{}\"", b.display()))
        .unwrap_or_default();
    format!(
        "UpstreamAuthority \"disk\" {{\n        plugin_data {{\n            cert_file_path = \"{}\"\n            key_file_path = \"{}\"\n            {b}\n        }}\n    }}",
        cert.display(),
        key.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_disk_self_signed_root_signs_the_ca_and_is_the_only_bundle_root() {
    let up = tempfile::tempdir().unwrap();
    let (root_pem, root_key) = root(up.path(), "1");
    let root_der = der_of(&root_pem);
    let root_skid = hex::encode(
        ParsedCert::parse(&root_der)
            .unwrap()
            .subject_key_id()
            .unwrap()
            .unwrap(),
    );
    // ca_ttl longer than the root: the CA stops with the root.
    let mut s = TestServer::start(Opts {
        ca_ttl: "72h",
        extra_plugins: disk_block(&root_pem, &root_key, None),
        ..Default::default()
    })
    .await;

    let out = s.dir.path().join("out");
    let chain = mint(&s, &out).await;
    assert_eq!(chain.len(), 2, "leaf and the server's CA, never the root");
    assert!(!chain.contains(&root_der));
    verify_with_openssl(&root_pem, &out.join("svid.pem"));
    verify_with_openssl(&out.join("bundle.pem"), &out.join("svid.pem"));

    let bundle = s.bundle().await;
    let roots: Vec<Vec<u8>> = bundle
        .x509_authorities
        .iter()
        .map(|c| c.asn1.clone())
        .collect();
    assert_eq!(
        roots,
        vec![root_der.clone()],
        "the bundle holds exactly the upstream root"
    );

    let st = x509_state(&s).await;
    let active = st.active.unwrap();
    assert_eq!(active.upstream_authority_subject_key_id, root_skid);
    let root_not_after = ParsedCert::parse(&root_der).unwrap().not_after() as i64;
    assert_eq!(
        active.expires_at, root_not_after,
        "capped at the upstream's notAfter"
    );
    let ca = ParsedCert::parse(&chain[1]).unwrap();
    assert_eq!(ca.not_after() as i64, root_not_after);

    // SPIRE's rule: with an upstream, X.509 authorities are tainted and revoked upstream.
    let e = LocalAuthorityClient::new(s.admin().await)
        .taint_x509_authority(la::TaintX509AuthorityRequest {
            authority_id: active.authority_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        e.message(),
        "local authority can't be tainted if there is an upstream authority"
    );
    let e = LocalAuthorityClient::new(s.admin().await)
        .revoke_x509_authority(la::RevokeX509AuthorityRequest {
            authority_id: active.authority_id.clone(),
            force: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        e.message(),
        "local authority can't be revoked if there is an upstream authority"
    );

    // A prepared authority is upstream-signed too, and stays (it is not "gone" from the
    // bundle because only the root is there).
    let prepared = LocalAuthorityClient::new(s.admin().await)
        .prepare_x509_authority(la::PrepareX509AuthorityRequest { force: false })
        .await
        .unwrap()
        .into_inner()
        .prepared_authority
        .unwrap();
    assert_eq!(prepared.upstream_authority_subject_key_id, root_skid);
    s.running().ctx.ca.reconcile_authorities().await;

    // Restart: the CA and the prepared one come back from the journal, nothing is re-minted.
    let seq = s.bundle().await.sequence_number;
    s.restart().await;
    let st = x509_state(&s).await;
    assert_eq!(st.active.unwrap().authority_id, active.authority_id);
    assert_eq!(st.prepared.unwrap().authority_id, prepared.authority_id);
    let after = s.bundle().await;
    assert_eq!(after.sequence_number, seq);
    assert_eq!(after.x509_authorities.len(), 1);
    let out2 = s.dir.path().join("out2");
    mint(&s, &out2).await;
    verify_with_openssl(&root_pem, &out2.join("svid.pem"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_disk_intermediate_with_bundle_file_is_carried_in_svid_chains() {
    let up = tempfile::tempdir().unwrap();
    let (root_pem, _) = root(up.path(), "2");
    let (int_pem, int_key) = issued(up.path(), "intermediate", true);
    let s = TestServer::start(Opts {
        extra_plugins: disk_block(&int_pem, &int_key, Some(&root_pem)),
        ..Default::default()
    })
    .await;
    let out = s.dir.path().join("out");
    let chain = mint(&s, &out).await;
    assert_eq!(
        chain.len(),
        3,
        "leaf, the server's CA, the upstream intermediate"
    );
    assert_eq!(chain[2], der_of(&int_pem));
    verify_with_openssl(&root_pem, &out.join("svid.pem"));
    let roots: Vec<Vec<u8>> = s
        .bundle()
        .await
        .x509_authorities
        .iter()
        .map(|c| c.asn1.clone())
        .collect();
    assert_eq!(roots, vec![der_of(&root_pem)]);
    s.stop().await;
}

#[test]
fn upstream_disk_refuses_bad_files_with_the_reason() {
    let up = tempfile::tempdir().unwrap();
    let d = up.path();
    let (root_pem, root_key) = root(d, "1");
    let (int_pem, int_key) = issued(d, "intermediate", true);
    let (leaf_pem, leaf_key) = issued(d, "leaf", false);
    // Another root, for a bundle the intermediate does not chain to.
    let other = d.join("other");
    std::fs::create_dir(&other).unwrap();
    let (other_root, _) = root(&other, "1");
    let both = d.join("both.pem");
    std::fs::write(
        &both,
        [
            std::fs::read_to_string(&int_pem).unwrap(),
            std::fs::read_to_string(&root_pem).unwrap(),
        ]
        .concat(),
    )
    .unwrap();
    let (p0_pem, p0_key) = issued(d, "pathlen0", true);
    let missing_key =
        "UpstreamAuthority \"disk\" {\n plugin_data {\n cert_file_path = \"/x\"\n }\n }"
            .to_string();
    let cases: Vec<(String, &str)> = vec![
        (
            disk_block(&root_pem, &int_key, None),
            "certificate and private key do not match",
        ),
        (
            disk_block(&both, &int_key, None),
            "with no bundle_file_path configured only self-signed CAs are supported",
        ),
        (disk_block(&int_pem, &int_key, None), "not self-signed"),
        (
            disk_block(&leaf_pem, &leaf_key, Some(&root_pem)),
            "is not a CA certificate",
        ),
        (
            disk_block(&int_pem, &int_key, Some(&other_root)),
            "cannot be validated with the provided bundle",
        ),
        (disk_block(&root_pem, &d.join("nope.key"), None), "nope.key"),
        (
            missing_key,
            "plugins.UpstreamAuthority.disk.plugin_data.key_file_path: missing",
        ),
        // An issuing CA limited to leaves (pathlen:0) cannot sign the server's CA.
        (
            disk_block(&p0_pem, &p0_key, Some(&root_pem)),
            "pathLenConstraint",
        ),
    ];
    let _ = root_key;
    for (block, says) in cases {
        let text = config_text(
            d,
            free_port(),
            &Opts {
                extra_plugins: block.clone(),
                ..Default::default()
            },
        );
        let e = kame_server::config::Config::parse(&text, false)
            .err()
            .unwrap_or_else(|| panic!("{block} must be refused"))
            .to_string();
        assert!(e.contains(says), "{block}: {e:?} lacks {says:?}");
    }
}

/// TaintX509UpstreamAuthority (`taint`) or RevokeX509UpstreamAuthority of `id`.
async fn upstream_call(s: &TestServer, id: String, taint: bool) -> Result<String, tonic::Status> {
    let mut c = LocalAuthorityClient::new(s.admin().await);
    if taint {
        c.taint_x509_upstream_authority(la::TaintX509UpstreamAuthorityRequest {
            subject_key_id: id,
        })
        .await
        .map(|r| r.into_inner().upstream_authority_subject_key_id)
    } else {
        c.revoke_x509_upstream_authority(la::RevokeX509UpstreamAuthorityRequest {
            subject_key_id: id,
            force: false,
        })
        .await
        .map(|r| r.into_inner().upstream_authority_subject_key_id)
    }
}

/// SPIRE's upstream rotation: the operator replaces the upstream CA files (root A → root B),
/// prepares and activates a CA signed by B, then taints and revokes A. Each refusal on the way
/// says which rule, and nothing changes in the bundle when refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_authority_taint_and_revoke_after_moving_to_a_new_root() {
    let up = tempfile::tempdir().unwrap();
    let a_dir = up.path().join("a");
    let b_dir = up.path().join("b");
    std::fs::create_dir(&a_dir).unwrap();
    std::fs::create_dir(&b_dir).unwrap();
    let (a_pem, a_key) = root(&a_dir, "1");
    let (b_pem, b_key) = root(&b_dir, "1");
    let (cur_pem, cur_key) = (up.path().join("ca.pem"), up.path().join("ca.key"));
    std::fs::copy(&a_pem, &cur_pem).unwrap();
    std::fs::copy(&a_key, &cur_key).unwrap();
    let (a, b) = (skid_of(&a_pem), skid_of(&b_pem));
    let s = TestServer::start(Opts {
        extra_plugins: disk_block(&cur_pem, &cur_key, None),
        ..Default::default()
    })
    .await;
    let la = || async { LocalAuthorityClient::new(s.admin().await) };
    let taint = |id: String| upstream_call(&s, id, true);
    let revoke = |id: String| upstream_call(&s, id, false);
    let refused = |r: Result<String, tonic::Status>, code: Code, says: &str| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), code, "{}", e.message());
        assert_eq!(e.message(), says);
    };

    // Only A so far: A signed the active authority.
    refused(
        taint(a.clone()).await,
        Code::InvalidArgument,
        "provided subject key id is not valid: unable to use upstream authority singing current authority",
    );
    // The operator moves to root B; the next CA is signed by it.
    std::fs::copy(&b_pem, &cur_pem).unwrap();
    std::fs::copy(&b_key, &cur_key).unwrap();
    let prepared = la()
        .await
        .prepare_x509_authority(la::PrepareX509AuthorityRequest { force: false })
        .await
        .unwrap()
        .into_inner()
        .prepared_authority
        .unwrap();
    assert_eq!(prepared.upstream_authority_subject_key_id, b);
    let roots = |bundle: kame_api::pb::types::Bundle| -> Vec<(Vec<u8>, bool)> {
        bundle
            .x509_authorities
            .into_iter()
            .map(|c| (c.asn1, c.tainted))
            .collect()
    };
    assert_eq!(
        roots(s.bundle().await),
        vec![(der_of(&a_pem), false), (der_of(&b_pem), false)]
    );
    refused(
        taint(a.clone()).await,
        Code::InvalidArgument,
        "provided subject key id is not valid: unable to use upstream authority singing current authority",
    );
    la().await
        .activate_x509_authority(la::ActivateX509AuthorityRequest {
            authority_id: prepared.authority_id.clone(),
        })
        .await
        .unwrap();
    let before = s.bundle().await;
    refused(
        taint(String::new()).await,
        Code::InvalidArgument,
        "provided subject key id is not valid: no subject key ID provided",
    );
    refused(
        taint(b.clone()).await,
        Code::InvalidArgument,
        "provided subject key id is not valid: unable to use upstream authority singing current authority",
    );
    refused(
        taint("0123".into()).await,
        Code::InvalidArgument,
        "provided subject key id is not valid: upstream authority didn't sign the old local authority",
    );
    refused(
        revoke(a.clone()).await,
        Code::FailedPrecondition,
        "failed to revoke X.509 upstream authority: it is not possible to revoke an untainted root CA",
    );
    assert_eq!(s.bundle().await, before, "refusals change nothing");

    // Taint A (any case), once.
    assert_eq!(taint(a.to_uppercase()).await.unwrap(), a);
    assert_eq!(
        roots(s.bundle().await),
        vec![(der_of(&a_pem), true), (der_of(&b_pem), false)]
    );
    refused(
        taint(a.clone()).await,
        Code::FailedPrecondition,
        "failed to taint upstream authority: root CA is already tainted",
    );
    // The CLI prints SPIRE's text.
    let o = s
        .cli(&["upstreamauthority", "revoke", "--subject-key-id", &a])
        .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("Revoked X.509 upstream authority:\n  Subject Key ID: {a}\n")
    );
    assert_eq!(roots(s.bundle().await), vec![(der_of(&b_pem), false)]);
    let out = s.dir.path().join("out");
    mint(&s, &out).await;
    verify_with_openssl(&b_pem, &out.join("svid.pem"));
    s.stop().await;
}

/// `kms_rooted` under an upstream: SVIDs carry leaf, the in-memory intermediate, the server's
/// CA (upstream-signed), and verify with openssl against the upstream root alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_disk_with_kms_rooted_signing_chains_through_both_intermediates() {
    let up = tempfile::tempdir().unwrap();
    let (root_pem, root_key) = root(up.path(), "1");
    let s = TestServer::start(Opts {
        extra_server: "signing_mode = \"kms_rooted\"",
        extra_plugins: disk_block(&root_pem, &root_key, None),
        ..Default::default()
    })
    .await;
    let out = s.dir.path().join("out");
    let chain = mint(&s, &out).await;
    assert_eq!(
        chain.len(),
        3,
        "leaf, kms_rooted intermediate, the server's CA"
    );
    assert!(!chain.contains(&der_of(&root_pem)));
    verify_with_openssl(&root_pem, &out.join("svid.pem"));
    s.stop().await;
}

/// A root as `openssl req -x509` makes it with the stock configuration (basicConstraints, no
/// key usage extension) is accepted, as Go and SPIRE accept it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_disk_accepts_a_root_without_key_usage() {
    let up = tempfile::tempdir().unwrap();
    openssl(
        up.path(),
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "root.key",
            "-out",
            "root.pem",
            "-subj",
            "/CN=plain-root",
            "-days",
            "1",
            "-addext",
            "basicConstraints=critical,CA:true",
        ],
    );
    let (root_pem, root_key) = (up.path().join("root.pem"), up.path().join("root.key"));
    assert!(
        ParsedCert::parse(&der_of(&root_pem))
            .unwrap()
            .key_usage()
            .unwrap()
            .is_none(),
        "the test root must carry no key usage"
    );
    let s = TestServer::start(Opts {
        extra_plugins: disk_block(&root_pem, &root_key, None),
        ..Default::default()
    })
    .await;
    let out = s.dir.path().join("out");
    mint(&s, &out).await;
    verify_with_openssl(&root_pem, &out.join("svid.pem"));
    s.stop().await;
}

/// The CA key in the `memory` KeyManager and in a PKCS#11 token (SoftHSM2): the CSR is signed
/// through the KeyManager, and the SVIDs chain to the upstream root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_disk_signs_a_ca_whose_key_is_in_memory_or_in_a_pkcs11_token() {
    let Some(hsm) = kame_keymanager::testing::SoftHsm::child(
        "upstream_disk_signs_a_ca_whose_key_is_in_memory_or_in_a_pkcs11_token",
    ) else {
        return;
    };
    let up = tempfile::tempdir().unwrap();
    let (root_pem, root_key) = root(up.path(), "1");
    let pkcs11 = format!(
        "KeyManager \"pkcs11\" {{\n plugin_data {{\n module_path = \"{}\"\n token_label = \"{}\"\n user_pin = \"{}\"\n key_identifier_value = \"upstream-hsm\"\n }}\n }}",
        hsm.module.display(),
        hsm.token_label,
        hsm.pin
    );
    for (name, opts) in [
        (
            "memory",
            Opts {
                key_manager: "memory",
                extra_plugins: disk_block(&root_pem, &root_key, None),
                ..Default::default()
            },
        ),
        (
            "pkcs11",
            Opts {
                key_manager_block: pkcs11,
                extra_plugins: disk_block(&root_pem, &root_key, None),
                ..Default::default()
            },
        ),
    ] {
        let s = TestServer::start(opts).await;
        let out = s.dir.path().join("out");
        let chain = mint(&s, &out).await;
        assert_eq!(chain.len(), 2, "{name}");
        verify_with_openssl(&root_pem, &out.join("svid.pem"));
        let roots: Vec<Vec<u8>> = s
            .bundle()
            .await
            .x509_authorities
            .iter()
            .map(|c| c.asn1.clone())
            .collect();
        assert_eq!(roots, vec![der_of(&root_pem)], "{name}");
        s.stop().await;
    }
}
