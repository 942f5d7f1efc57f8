//! SPIRE's own configuration files (`tests/spire-configs`, each naming where it came from and
//! what was changed) load with Kame's server and agent configuration readers: HCL as SPIRE
//! writes it, SPIRE's keys and defaults, its plugin samples as its docs print them.

use std::path::Path;

fn openssl(dir: &Path, args: &[&str]) {
    let o = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The files the corpus names, under `d`: a CA certificate and key wherever a certificate is
/// expected, and the directories.
fn fixtures(d: &Path) {
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/C=US/O=SPIFFE/CN=corpus upstream",
            "-days",
            "2",
            "-addext",
            "basicConstraints=critical,CA:true",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    for dir in [
        "conf/server",
        "conf/agent",
        ".data",
        "data/server",
        "data/agent",
        "opt/spire/.data",
        "opt/spire/conf/server",
        "tmp",
    ] {
        std::fs::create_dir_all(d.join(dir)).unwrap();
    }
    for cert in [
        "conf/server/dummy_upstream_ca.crt",
        "conf/agent/dummy_root_ca.crt",
        "opt/spire/conf/initial_bundle.crt",
        "opt/spire/conf/server/agent-cacert.pem",
        "opt/spire/conf/server/devid-cacert.pem",
        "opt/spire/conf/server/endorsement-cacert.pem",
    ] {
        std::fs::copy(d.join("ca.crt"), d.join(cert)).unwrap();
    }
    std::fs::copy(
        d.join("ca.key"),
        d.join("conf/server/dummy_upstream_ca.key"),
    )
    .unwrap();
}

#[test]
fn spire_config_corpus_loads_unchanged_but_for_paths() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("spire-configs");
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fixtures(d);
    let mut seen = 0;
    let mut names: Vec<_> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "conf"))
        .collect();
    names.sort();
    for path in names {
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("@DIR@", &d.display().to_string());
        assert!(
            text.starts_with("# SPIRE ef8527ec") || text.starts_with("# The server of SPIRE"),
            "{} does not say where it came from",
            path.display()
        );
        // As SPIRE's test reads it: with expand-env and its variable set.
        let text = kame_api::conf::expand_env(&text, |k| {
            (k == "SPIRE_SERVER_TEST_DATA_CONNECTION")
                .then(|| format!("{}/ds.sqlite3", d.display()))
        });
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if text.contains("\nagent {") {
            kame_agent::config::Config::parse(&text, false)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        } else {
            kame_server::config::Config::parse(&text, false)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        seen += 1;
    }
    assert_eq!(seen, 8, "every file of the corpus is read");
}
