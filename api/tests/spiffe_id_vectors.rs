//! Every row of the SPIFFE ID, trust domain and path vectors gives its expected result
//! (rules ID-01..ID-13; ID-12 rows follow Kame's documented choice: upper case is rejected).

use kame_api::spiffe_id::{SpiffeId, TrustDomain, validate_path, validate_path_segment};

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1] == b'x' {
            let h = std::str::from_utf8(&b[i + 2..i + 4]).unwrap();
            out.push(u8::from_str_radix(h, 16).unwrap());
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    // Inputs with invalid UTF-8 cannot reach a &str API; they are invalid by construction.
    String::from_utf8(out).unwrap_or_else(|_| "\u{0}invalid-utf8".to_string())
}

fn rows(name: &str) -> Vec<Vec<String>> {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .skip(1)
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

#[test]
fn id_01_to_13_every_spiffe_id_vector_gives_expected_result() {
    let mut n = 0;
    for r in rows("spiffe_ids.tsv") {
        let input = unescape(&r[0]);
        let got = SpiffeId::parse(&input);
        match r[1].as_str() {
            "valid" => {
                let id = got.unwrap_or_else(|e| panic!("{:?} must be valid: {e}", r[0]));
                assert_eq!(id.trust_domain().as_str(), r[3], "{:?}", r[0]);
                assert_eq!(id.path(), r[4], "{:?}", r[0]);
                assert_eq!(id.to_string(), input, "IDs round-trip and stay lowercase");
            }
            "invalid" => assert!(got.is_err(), "{:?} must be invalid", r[0]),
            other => panic!("unknown expectation {other}"),
        }
        n += 1;
    }
    assert!(n > 500, "read {n} rows");
}

#[test]
fn id_13_every_trust_domain_vector_gives_expected_result() {
    let mut n = 0;
    for r in rows("trust_domains.tsv") {
        let input = unescape(&r[0]);
        let got = TrustDomain::parse(&input);
        match r[1].as_str() {
            "valid" => {
                let td = got.unwrap_or_else(|e| panic!("{:?} must be valid: {e}", r[0]));
                assert_eq!(td.as_str(), r[3], "{:?}", r[0]);
            }
            "invalid" => assert!(got.is_err(), "{:?} must be invalid", r[0]),
            other => panic!("unknown expectation {other}"),
        }
        n += 1;
    }
    assert!(n > 300, "read {n} rows");
}

#[test]
fn id_08_09_10_every_path_vector_gives_expected_result() {
    let td = TrustDomain::parse("trustdomain").unwrap();
    for r in rows("spiffe_id_paths.tsv") {
        let args: Vec<String> = serde_json::from_str(&r[2]).unwrap();
        let base = &r[1];
        let ok = r[3] == "valid";
        let result: Result<String, String> = match r[0].as_str() {
            "validate_path" => validate_path(&args[0])
                .map(|_| args[0].clone())
                .map_err(|e| e.to_string()),
            "validate_segment" => validate_path_segment(&args[0])
                .map(|_| args[0].clone())
                .map_err(|e| e.to_string()),
            "join_segments" => {
                let segs: Vec<&str> = args.iter().map(String::as_str).collect();
                td.id_from_segments(&segs)
                    .map(|id| id.path().to_string())
                    .map_err(|e| e.to_string())
            }
            "from_path" => td
                .id_from_path(&args[0])
                .map(|id| id.to_string())
                .map_err(|e| e.to_string()),
            "from_segments" | "append_segments" => {
                let segs: Vec<&str> = args.iter().map(String::as_str).collect();
                td.id_from_segments(&segs)
                    .and_then(|id| td.id_from_path(&format!("{base}{}", id.path())))
                    .map(|id| id.to_string())
                    .map_err(|e| e.to_string())
            }
            "append_path" => validate_path(&args[0])
                .and_then(|_| td.id_from_path(&format!("{base}{}", args[0])))
                .map(|id| id.to_string())
                .map_err(|e| e.to_string()),
            other => panic!("unknown operation {other}"),
        };
        match result {
            Ok(v) => {
                assert!(ok, "{r:?} must fail");
                if !r[4].is_empty() {
                    assert_eq!(v, r[4], "{r:?}");
                }
            }
            Err(e) => {
                assert!(!ok, "{r:?} must succeed: {e}");
                assert_eq!(e, r[4], "{r:?}: error text matches go-spiffe");
            }
        }
    }
}
