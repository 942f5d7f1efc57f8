use super::*;

const GOOD: &str = r#"
server {
    bind_address = "127.0.0.1"
    bind_port = "8081"
    socket_path = "/tmp/kame-test/api.sock"
    trust_domain = "example.org"
    data_dir = "./data"
    log_level = "DEBUG"
    ca_ttl = "168h"
    default_x509_svid_ttl = "1h"
    ca_subject {
        country = ["US"]
        organization = ["SPIFFE"]
        common_name = ""
    }
}

plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "sqlite3"
            connection_string = "./data/datastore.sqlite3"
        }
    }
    KeyManager "disk" {
        plugin_data {
            keys_path = "./data/keys.json"
        }
    }
    NodeAttestor "join_token" {
        plugin_data {}
    }
}
"#;

fn with_km(block: &str) -> String {
    GOOD.replace(
            "KeyManager \"disk\" {\n        plugin_data {\n            keys_path = \"./data/keys.json\"\n        }\n    }",
            block,
        )
}

fn km<T: 'static + Clone>(c: &Config) -> T {
    c.key_manager
        .as_any()
        .downcast_ref::<T>()
        .cloned()
        .expect("the KeyManager configured")
}

fn refusals(cases: impl IntoIterator<Item = (String, &'static str)>) {
    for (block, want) in cases {
        let e = Config::parse(&with_km(&block), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
}

#[test]
fn km_aws_kms_config_spire_keys_and_refusals() {
    use crate::keymanager::{KeyIdentifier, aws_kms::AwsKms};
    let d = tempfile::tempdir().unwrap();
    let id_file = d.path().join("kms-id");
    let policy = d.path().join("policy.json");
    std::fs::write(&policy, "{\"Version\": \"2012-10-17\"}").unwrap();
    let aws = format!(
        "KeyManager \"aws_kms\" {{\n plugin_data {{\n region = \"us-east-1\"\n key_identifier_file = {:?}\n key_policy_file = {:?}\n key_tags = {{\n team = \"kame\"\n }}\n enable_tag_based_key_discovery = true\n }}\n }}",
        id_file.display().to_string(),
        policy.display().to_string()
    );
    let c: AwsKms = km(&Config::parse(&with_km(&aws), false).unwrap());
    assert_eq!(c.region, "us-east-1");
    assert_eq!(c.access_key_id, None, "the default credential chain");
    assert_eq!(c.key_identifier, KeyIdentifier::File(id_file.clone()));
    assert_eq!(
        c.key_policy.as_deref(),
        Some("{\"Version\": \"2012-10-17\"}")
    );
    assert_eq!(c.key_tags, vec![("team".to_string(), "kame".to_string())]);
    assert!(c.enable_tag_based_key_discovery);
    let id_line = format!("key_identifier_file = {:?}", id_file.display().to_string());
    let policy_line = format!("key_policy_file = {:?}", policy.display().to_string());
    refusals([
        (aws.replace("region = \"us-east-1\"", ""), "region: missing"),
        (
            aws.replace("region", "access_key_id = \"AKIA\"\n region"),
            "secret_access_key: give both",
        ),
        (
            aws.replace(
                &id_line,
                "key_identifier_file = \"/x\"\n key_identifier_value = \"v\"",
            ),
            "not both",
        ),
        (
            aws.replace(&id_line, "key_identifier_value = \"bad value!\""),
            "key_identifier_value: only letters",
        ),
        (
            aws.replace(&id_line, "key_identifier_value = \"alias/aws/x\""),
            "must not start with alias/aws/",
        ),
        (
            aws.replace(
                &id_line,
                "key_identifier_file = \"/nonexistent-dir/kms-id\"",
            ),
            "plugins.KeyManager.aws_kms.plugin_data.key_identifier_file: /nonexistent-dir/kms-id: directory /nonexistent-dir does not exist",
        ),
        (
            aws.replace(
                &policy_line,
                "key_policy_file = \"/nonexistent/policy.json\"",
            ),
            "plugins.KeyManager.aws_kms.plugin_data.key_policy_file: /nonexistent/policy.json: No such file",
        ),
        (aws.replace("team =", "spire-team ="), "reserved prefix"),
        (
            aws.replace("region", "regoin = \"x\"\n region"),
            "plugins.KeyManager.aws_kms.plugin_data.regoin: unknown key",
        ),
    ]);
}

#[test]
fn km_hashicorp_vault_config_spire_keys_and_refusals() {
    use crate::keymanager::hashicorp_vault::HashicorpVault;
    use kame_keymanager::hashicorp_vault::VaultAuth;
    let vault = "KeyManager \"hashicorp_vault\" {\n plugin_data {\n vault_addr = \"https://vault:8200\"\n key_identifier_value = \"s1\"\n approle_auth {\n approle_id = \"r\"\n approle_secret_id = \"secret-xyz\"\n }\n }\n }".to_string();
    let parsed = Config::parse(&with_km(&vault), false).unwrap();
    let c: HashicorpVault = km(&parsed);
    assert_eq!(c.transit_engine_path, "transit");
    assert_eq!(
        c.auth,
        VaultAuth::AppRole {
            mount: "approle".into(),
            role_id: "r".into(),
            secret_id: "secret-xyz".into()
        }
    );
    assert!(!format!("{:?}", parsed.key_manager).contains("secret-xyz"));
    refusals([
            (
                vault.replace("approle_auth {", "token_auth {\n token = \"t\"\n }\n approle_auth {"),
                "exactly one of token_auth",
            ),
            (
                vault.replace(
                    "approle_auth {\n approle_id = \"r\"\n approle_secret_id = \"secret-xyz\"\n }",
                    "",
                ),
                "exactly one of token_auth",
            ),
            (
                vault.replace("vault_addr = \"https://vault:8200\"", ""),
                "vault_addr: missing",
            ),
            (vault.replace("approle_id = \"r\"", ""), "approle_id: missing"),
            (
                vault.replace("approle_id", "approle_idd = \"x\"\n approle_id"),
                "plugins.KeyManager.hashicorp_vault.plugin_data.approle_auth.approle_idd: unknown key",
            ),
            (
                vault.replace("vault_addr", "ca_cert_path = \"/nonexistent/ca.pem\"\n vault_addr"),
                "plugins.KeyManager.hashicorp_vault.plugin_data.ca_cert_path: /nonexistent/ca.pem",
            ),
            (
                vault.replace(
                    "approle_auth {\n approle_id = \"r\"\n approle_secret_id = \"secret-xyz\"\n }",
                    "k8s_auth {\n k8s_auth_role_name = \"kame\"\n token_path = \"/nonexistent/token\"\n }",
                ),
                "plugins.KeyManager.hashicorp_vault.plugin_data.k8s_auth.token_path: /nonexistent/token",
            ),
        ]);
}

#[test]
fn km_pkcs11_config_spire_keys_and_refusals() {
    use crate::keymanager::{KeyIdentifier, SecretSource, pkcs11::Pkcs11};
    let d = tempfile::tempdir().unwrap();
    let module = d.path().join("module.so");
    std::fs::write(&module, b"not really a module").unwrap();
    let p11 = format!(
        "KeyManager \"pkcs11\" {{\n plugin_data {{\n module_path = {:?}\n token_label = \"kame\"\n user_pin_env = \"HSM_PIN\"\n }}\n }}",
        module.display().to_string()
    );
    let c: Pkcs11 = km(&Config::parse(&with_km(&p11), false).unwrap());
    assert_eq!(c.user_pin, SecretSource::Env("HSM_PIN".into()));
    assert_eq!(c.key_identifier, KeyIdentifier::ServerId);
    let with_value = p11.replace("user_pin_env = \"HSM_PIN\"", "user_pin = \"1234\"");
    let parsed = Config::parse(&with_km(&with_value), false).unwrap();
    assert!(
        !format!("{:?}", parsed.key_manager).contains("1234"),
        "the PIN is never printed"
    );
    let module_line = format!("module_path = {:?}", module.display().to_string());
    refusals([
        (
            p11.replace("user_pin_env = \"HSM_PIN\"", ""),
            "user_pin: missing",
        ),
        (
            p11.replace("user_pin_env", "user_pin = \"1\"\n user_pin_env"),
            "give one of user_pin, user_pin_file, user_pin_env",
        ),
        (
            p11.replace(
                "user_pin_env = \"HSM_PIN\"",
                "user_pin_file = \"/nonexistent/pin\"",
            ),
            "plugins.KeyManager.pkcs11.plugin_data.user_pin_file: /nonexistent/pin",
        ),
        (
            p11.replace(
                &module_line,
                "module_path = \"/nonexistent/libsofthsm2.so\"",
            ),
            "plugins.KeyManager.pkcs11.plugin_data.module_path: /nonexistent/libsofthsm2.so",
        ),
        (
            p11.replace("token_label = \"kame\"", ""),
            "token_label: missing",
        ),
    ]);
}

/// UpstreamAuthority is optional; an unknown one is refused naming the built-in ones, and
/// `disk` refuses unknown and missing keys by their full path.
#[test]
fn upstream_authority_unknown_name_and_disk_keys() {
    let c = Config::parse(GOOD, false).unwrap();
    assert!(c.upstream_authority.is_none());
    let with = |block: &str| {
        GOOD.replace(
            "    NodeAttestor \"join_token\"",
            &format!("{block}\n    NodeAttestor \"join_token\""),
        )
    };
    let e = Config::parse(
        &with("    UpstreamAuthority \"awssecret\" {\n        plugin_data {}\n    }"),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("unknown UpstreamAuthority \"awssecret\""), "{e}");
    for known in ["disk", "spire", "vault", "aws_pca"] {
        assert!(e.contains(known), "{known}: {e}");
    }
    let e = Config::parse(
        &with("    UpstreamAuthority \"disk\" {\n        plugin_data {\n            cert_file_path = \"/a\"\n            key_file_path = \"/b\"\n            bundle_path = \"/c\"\n        }\n    }"),
        false,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "plugins.UpstreamAuthority.disk.plugin_data.bundle_path: unknown key"
    );
    let e = Config::parse(
        &with("    UpstreamAuthority \"disk\" {\n        plugin_data {\n            key_file_path = \"/b\"\n        }\n    }"),
        false,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "plugins.UpstreamAuthority.disk.plugin_data.cert_file_path: missing required value"
    );
}

#[test]
fn km_disk_and_unknown_names() {
    refusals([
            (
                "KeyManager \"disk\" {\n plugin_data {\n keys_path = \"/nonexistent/keys.json\"\n }\n }".to_string(),
                "plugins.KeyManager.disk.plugin_data.keys_path: /nonexistent/keys.json: directory /nonexistent does not exist",
            ),
            (
                "KeyManager \"memory\" {\n plugin_data {\n keys_path = \"x\"\n }\n }".to_string(),
                "plugins.KeyManager.memory.plugin_data.keys_path: unknown key",
            ),
            (
                "KeyManager \"dsik\" {\n plugin_data {}\n }".to_string(),
                "plugins.KeyManager: unknown KeyManager \"dsik\" (expected one of \"disk\", \"memory\"",
            ),
            (String::new(), "plugins.KeyManager: missing"),
        ]);
    let e = Config::parse(
        &GOOD.replace("DataStore \"sql\"", "DataStore \"sqll\""),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("plugins.DataStore: unknown DataStore \"sqll\" (expected one of \"sql\")"),
        "{e}"
    );
}

#[test]
fn km_signing_mode_direct_by_default_kms_rooted_with_its_ttl() {
    let c = Config::parse(GOOD, false).unwrap();
    assert_eq!(c.signing_mode, crate::ca::SigningMode::Direct);
    let rooted = GOOD.replace(
        "ca_ttl = \"168h\"",
        "ca_ttl = \"168h\"\n    signing_mode = \"kms_rooted\"",
    );
    assert_eq!(
        Config::parse(&rooted, false).unwrap().signing_mode,
        crate::ca::SigningMode::KmsRooted {
            intermediate_ttl: Duration::from_secs(3600)
        }
    );
    let ttl = rooted.replace(
        "signing_mode = \"kms_rooted\"",
        "signing_mode = \"kms_rooted\"\n    signing_intermediate_ttl = \"15m\"",
    );
    assert_eq!(
        Config::parse(&ttl, false).unwrap().signing_mode,
        crate::ca::SigningMode::KmsRooted {
            intermediate_ttl: Duration::from_secs(900)
        }
    );
    for (text, want) in [
        (
            rooted.replace("kms_rooted", "hsm_rooted"),
            "server.signing_mode",
        ),
        (
            GOOD.replace(
                "ca_ttl = \"168h\"",
                "ca_ttl = \"168h\"\n    signing_intermediate_ttl = \"1h\"",
            ),
            "only with signing_mode",
        ),
    ] {
        let e = Config::parse(&text, false).unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
}

#[test]
fn parses_a_spire_style_server_conf() {
    let c = Config::parse(GOOD, false).unwrap();
    assert_eq!(c.trust_domain.as_str(), "example.org");
    assert_eq!(c.bind_port, 8081);
    assert_eq!(c.ca_ttl, Duration::from_secs(168 * 3600));
    assert_eq!(c.default_jwt_svid_ttl, Duration::from_secs(300));
    assert_eq!(c.ca_key_type, KeyType::EcP256);
    assert_eq!(c.jwt_key_type, KeyType::EcP256);
    assert!(c.join_token_attestor);
    let disk: crate::keymanager::disk::Disk = km(&c);
    assert_eq!(disk.keys_path, std::path::PathBuf::from("./data/keys.json"));
    assert_eq!(c.ca_subject.to_dn_string(), "C=US, O=SPIFFE");
}

#[test]
fn config_typo_names_the_key() {
    let bad = GOOD.replace("ca_ttl =", "ca_tll =");
    let e = Config::parse(&bad, false).unwrap_err();
    assert_eq!(e.to_string(), "server.ca_tll: unknown key");
    let bad = GOOD.replace("keys_path", "key_path");
    let e = Config::parse(&bad, false).unwrap_err().to_string();
    assert!(
        e.starts_with("plugins.KeyManager.disk.plugin_data.key"),
        "{e}"
    );
    let bad = GOOD.replace("NodeAttestor \"join_token\"", "NodeAtestor \"join_token\"");
    assert_eq!(
        Config::parse(&bad, false).unwrap_err().to_string(),
        "plugins.NodeAtestor: unknown key"
    );
}

#[test]
fn config_bad_values_name_the_key() {
    for (from, to, key) in [
        ("\"168h\"", "\"168x\"", "server.ca_ttl"),
        ("\"example.org\"", "\"Example.org\"", "server.trust_domain"),
        ("\"8081\"", "\"80811\"", "server.bind_port"),
        ("\"127.0.0.1\"", "\"localhost\"", "server.bind_address"),
        (
            "\"sqlite3\"",
            "\"mysql\"",
            "plugins.DataStore.sql.plugin_data.database_type",
        ),
        ("\"DEBUG\"", "\"LOUD\"", "server.log_level"),
    ] {
        let e = Config::parse(&GOOD.replace(from, to), false)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(key), "{from}->{to}: {e}");
    }
    let e = Config::parse(
        &GOOD.replace("ca_ttl = \"168h\"", "ca_key_type = \"ec-p521\""),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("server.ca_key_type"), "{e}");
}

#[test]
fn expand_env_only_when_asked() {
    let text = GOOD.replace("\"example.org\"", "\"$KAME_TEST_TD\"");
    let c = Config::parse(
        &expand_env(&text, |k| {
            (k == "KAME_TEST_TD").then(|| "env.example".to_string())
        }),
        false,
    )
    .unwrap();
    assert_eq!(c.trust_domain.as_str(), "env.example");
    assert!(Config::parse(&text, false).is_err());
    assert_eq!(
        expand_env("a${X}b$Y-$", |k| Some(k.to_lowercase())),
        "axby-$"
    );
}

#[test]
fn go_durations() {
    assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
    assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert!(parse_duration("10").is_err());
    assert!(parse_duration("h").is_err());
    assert!(parse_duration("99999999h").is_err());
}

/// SPIRE's `audit_log_enabled` and `log_source_location`, off by default; the `run` flags'
/// values win over the file's and are checked as the file's are.
#[test]
fn config_audit_log_source_location_and_run_flag_overrides() {
    let c = Config::parse(GOOD, false).unwrap();
    assert!(!c.audit_log_enabled && !c.log_source_location);
    let on = GOOD.replace(
        "log_level = \"DEBUG\"",
        "log_level = \"DEBUG\"\n    audit_log_enabled = true\n    log_source_location = true",
    );
    let c = Config::parse(&on, false).unwrap();
    assert!(c.audit_log_enabled && c.log_source_location);
    let mut o = Overrides::default();
    o.string("log_level", Some("ERROR"))
        .int("bind_port", Some(9999))
        .string("trust_domain", Some("other.org"));
    let c = Config::parse_with(GOOD, false, &o).unwrap();
    assert_eq!(c.log_level, kame_api::conf::Level::Error);
    assert_eq!(c.bind_port, 9999);
    assert_eq!(c.trust_domain.as_str(), "other.org");
    let mut o = Overrides::default();
    o.string("trust_domain", Some("spiffe://x"));
    let e = Config::parse_with(GOOD, false, &o).unwrap_err().to_string();
    assert!(e.contains("server.trust_domain"), "{e}");
}

/// `server.transparency`: off without the block; its keys read and checked, each refusal
/// naming its key.
#[test]
fn config_transparency_block_keys_and_refusals() {
    assert_eq!(Config::parse(GOOD, false).unwrap().transparency, None);
    let with = |block: &str| {
        GOOD.replace(
            "    default_x509_svid_ttl = \"1h\"\n",
            &format!("    default_x509_svid_ttl = \"1h\"\n    transparency {{\n{block}\n    }}\n"),
        )
    };
    let t = Config::parse(&with(""), false)
        .unwrap()
        .transparency
        .unwrap();
    assert_eq!(t, crate::transparency::Settings::default());
    assert!(t.required, "fails closed by default");
    assert!(
        !t.require_agent_scts,
        "agents' SVIDs from before the log have no SCT"
    );
    let t = Config::parse(
        &with("required = false\nrequire_agent_scts = true\ntree_head_interval = \"5s\"\nbind_port = 8085"),
        false,
    )
    .unwrap()
    .transparency
    .unwrap();
    assert!(!t.required);
    assert!(t.require_agent_scts);
    assert_eq!(t.tree_head_interval, Duration::from_secs(5));
    assert_eq!(t.listen, Some(("127.0.0.1".to_string(), 8085)));
    for (block, key) in [
        (
            "tree_head_interval = \"10ms\"",
            "server.transparency.tree_head_interval",
        ),
        (
            "tree_head_interval = \"2h\"",
            "server.transparency.tree_head_interval",
        ),
        (
            "bind_address = \"0.0.0.0\"",
            "server.transparency.bind_port",
        ),
        ("bind_port = 70000", "server.transparency.bind_port"),
        ("required = \"maybe\"", "required"),
        ("mmd = \"24h\"", "mmd"),
    ] {
        let e = Config::parse(&with(block), false).unwrap_err().to_string();
        assert!(e.contains(key), "{block}: {e}");
    }
}

/// `server.break_glass`: off without the block; defaults (24h, 6h slices, tpm_devid agents);
/// each refusal names its key; refused with `kms_rooted`.
#[test]
fn config_break_glass_block_keys_and_refusals() {
    assert_eq!(Config::parse(GOOD, false).unwrap().break_glass, None);
    let with = |block: &str| {
        GOOD.replace(
            "    default_x509_svid_ttl = \"1h\"\n",
            &format!("    default_x509_svid_ttl = \"1h\"\n    break_glass {{\n{block}\n    }}\n"),
        )
    };
    let b = Config::parse(&with(""), false)
        .unwrap()
        .break_glass
        .unwrap();
    assert_eq!(b, crate::service::breakglass::Settings::default());
    assert_eq!(b.node_attestors, vec!["tpm_devid".to_string()]);
    let b = Config::parse(
        &with("max_extension = \"2h\"\nslice = \"30m\"\nnode_attestors = [\"tpm_devid\", \"x509pop\"]"),
        false,
    )
    .unwrap()
    .break_glass
    .unwrap();
    assert_eq!(b.max_extension, Duration::from_secs(7200));
    assert_eq!(b.slice, Duration::from_secs(1800));
    assert_eq!(b.node_attestors.len(), 2);
    // A max_extension shorter than the default slice takes the slice down with it.
    let b = Config::parse(&with("max_extension = \"1h\""), false)
        .unwrap()
        .break_glass
        .unwrap();
    assert_eq!(b.slice, Duration::from_secs(3600));
    for (block, key) in [
        (
            "max_extension = \"30s\"",
            "server.break_glass.max_extension",
        ),
        (
            "max_extension = \"192h\"",
            "server.break_glass.max_extension",
        ),
        ("slice = \"10s\"", "server.break_glass.slice"),
        (
            "max_extension = \"1h\"\nslice = \"2h\"",
            "server.break_glass.slice",
        ),
        (
            "max_extension = \"168h\"\nslice = \"1m\"",
            "server.break_glass.slice",
        ),
        ("node_attestors = []", "server.break_glass.node_attestors"),
        ("ttl = \"1h\"", "ttl"),
    ] {
        let e = Config::parse(&with(block), false).unwrap_err().to_string();
        assert!(e.contains(key), "{block}: {e}");
    }
    let kms = with("").replace(
        "    default_x509_svid_ttl = \"1h\"\n",
        "    default_x509_svid_ttl = \"1h\"\n    signing_mode = \"kms_rooted\"\n",
    );
    let e = Config::parse(&kms, false).unwrap_err().to_string();
    assert!(
        e.contains("server.break_glass") && e.contains("kms_rooted"),
        "{e}"
    );
}
