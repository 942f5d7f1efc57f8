//! Trust bundles: the SPIFFE bundle format (a JWK Set with `x509-svid` / `jwt-svid` keys,
//! `spiffe_sequence`, `spiffe_refresh_hint`; SPIFFE_Trust_Domain_and_Bundle.md, X509-17/18,
//! JWT-13/14, BUN-01..08), PEM for X.509 authorities, and the JWKS the Workload API serves.
//! The in-memory model is `spire.api.types.Bundle`. Taint bits are not part of the SPIFFE format
//! and are dropped there. No I/O.

use crate::Error;
use crate::keys::KeyInfo;
use crate::pb::types::{Bundle, JwtKey, X509Certificate};
use crate::spiffe_id::TrustDomain;
use crate::x509svid::ParsedCert;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value, json};

pub const USE_X509: &str = "x509-svid";
pub const USE_JWT: &str = "jwt-svid";

/// Encodes `bundle` in the SPIFFE bundle format.
pub fn to_spiffe_json(bundle: &Bundle) -> Result<String, Error> {
    let mut keys = vec![];
    for ca in &bundle.x509_authorities {
        let p = ParsedCert::parse(&ca.asn1)?;
        let mut m = KeyInfo::from_spki_der(&p.spki_der()?)?.jwk_members();
        m.insert("use".into(), USE_X509.into());
        m.insert("x5c".into(), json!([STANDARD.encode(&ca.asn1)]));
        keys.push(Value::Object(m));
    }
    for k in &bundle.jwt_authorities {
        let mut m = KeyInfo::from_spki_der(&k.public_key)?.jwk_members();
        m.insert("use".into(), USE_JWT.into());
        m.insert("kid".into(), k.key_id.clone().into());
        keys.push(Value::Object(m));
    }
    let mut doc = Map::new();
    doc.insert("keys".into(), Value::Array(keys));
    if bundle.refresh_hint > 0 {
        doc.insert("spiffe_refresh_hint".into(), bundle.refresh_hint.into());
    }
    doc.insert("spiffe_sequence".into(), bundle.sequence_number.into());
    serde_json::to_string_pretty(&Value::Object(doc)).map_err(|source| Error::Json {
        what: "encoding failed",
        source,
    })
}

/// Decodes a SPIFFE bundle for trust domain `td`. JWKs with an unknown `kty` or `use`, and
/// `x509-svid` JWKs without `x5c`, are ignored; the first `x5c` value is used (X509-18).
pub fn from_spiffe_json(td: &TrustDomain, data: &[u8]) -> Result<Bundle, Error> {
    let doc: Map<String, Value> = match serde_json::from_slice(data) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(Error::BadBundle("bundle is not a JSON object".into())),
        Err(source) => {
            return Err(Error::Json {
                what: "bad bundle: bundle is not JSON",
                source,
            });
        }
    };
    let keys = match doc.get("keys") {
        Some(Value::Array(k)) => k,
        Some(_) => return Err(Error::BadBundle("\"keys\" is not an array".into())),
        None => {
            return Err(Error::BadBundle(
                "bundle has no \"keys\" member (BUN-05)".into(),
            ));
        }
    };
    let mut bundle = Bundle {
        trust_domain: td.as_str().to_string(),
        ..Default::default()
    };
    match doc.get("spiffe_sequence") {
        None => {}
        Some(v) => {
            bundle.sequence_number = v.as_u64().ok_or_else(|| {
                Error::BadBundle("spiffe_sequence is not an unsigned integer".into())
            })?
        }
    }
    match doc.get("spiffe_refresh_hint") {
        None => {}
        Some(v) => {
            bundle.refresh_hint = v
                .as_i64()
                .ok_or_else(|| Error::BadBundle("spiffe_refresh_hint is not an integer".into()))?
        }
    }
    for key in keys {
        let Value::Object(jwk) = key else {
            return Err(Error::BadBundle("a key is not a JSON object".into()));
        };
        let Some(Value::String(use_)) = jwk.get("use") else {
            continue; // BUN-08: no use => ignore
        };
        match use_.as_str() {
            USE_X509 => {
                let first = match jwk.get("x5c") {
                    Some(Value::Array(a)) => a.first(),
                    _ => None,
                };
                let Some(first) = first else { continue };
                let der = first
                    .as_str()
                    .and_then(|s| STANDARD.decode(s).ok())
                    .ok_or_else(|| Error::BadBundle("x5c value is not base64".into()))?;
                ParsedCert::parse(&der)?;
                bundle.x509_authorities.push(X509Certificate {
                    asn1: der,
                    tainted: false,
                });
            }
            USE_JWT => {
                let Some(info) = KeyInfo::from_jwk(jwk)? else {
                    continue;
                };
                let kid = match jwk.get("kid") {
                    Some(Value::String(k)) if !k.is_empty() => k.clone(),
                    _ => return Err(Error::BadBundle("jwt-svid key without kid (JWT-13)".into())),
                };
                bundle.jwt_authorities.push(JwtKey {
                    public_key: info.to_spki_der()?,
                    key_id: kid,
                    expires_at: 0,
                    tainted: false,
                });
            }
            _ => continue,
        }
    }
    Ok(bundle)
}

/// PEM of the X.509 authorities, one CERTIFICATE block each.
pub fn x509_to_pem(bundle: &Bundle) -> String {
    bundle
        .x509_authorities
        .iter()
        .map(|c| pem_block("CERTIFICATE", &c.asn1))
        .collect()
}

pub fn pem_block(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Reads every CERTIFICATE block of a PEM text. Other blocks are an error.
pub fn certs_from_pem(text: &str) -> Result<Vec<Vec<u8>>, Error> {
    let mut out = vec![];
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        else {
            return Err(Error::BadBundle("text outside a PEM block".into()));
        };
        if label != "CERTIFICATE" {
            return Err(Error::BadBundle(format!("unexpected PEM block {label:?}")));
        }
        let mut b64 = String::new();
        let mut closed = false;
        for l in lines.by_ref() {
            let l = l.trim();
            if l == "-----END CERTIFICATE-----" {
                closed = true;
                break;
            }
            b64.push_str(l);
        }
        if !closed {
            return Err(Error::BadBundle("unterminated PEM block".into()));
        }
        let der = STANDARD
            .decode(b64.as_bytes())
            .map_err(|_| Error::BadBundle("PEM body is not base64".into()))?;
        ParsedCert::parse(&der)?;
        out.push(der);
    }
    if out.is_empty() {
        return Err(Error::BadBundle("no certificates in PEM".into()));
    }
    Ok(out)
}

/// The JWKS of a bundle's JWT authorities as the Workload API serves it (WA-14): only
/// `jwt-svid` keys, each with `kid` and `use`.
pub fn jwt_jwks(bundle: &Bundle) -> Result<Vec<u8>, Error> {
    let mut keys = vec![];
    for k in &bundle.jwt_authorities {
        let mut m = KeyInfo::from_spki_der(&k.public_key)?.jwk_members();
        m.insert("use".into(), USE_JWT.into());
        m.insert("kid".into(), k.key_id.clone().into());
        keys.push(Value::Object(m));
    }
    serde_json::to_vec(&json!({ "keys": keys })).map_err(|source| Error::Json {
        what: "encoding failed",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};

    fn td() -> TrustDomain {
        TrustDomain::parse("example.org").unwrap()
    }

    fn ca_cert() -> Vec<u8> {
        let k = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
        let spki = k.public_key().as_der().unwrap().as_ref().to_vec();
        let subject = crate::x509svid::parse_name("C=US, O=SPIFFE").unwrap();
        let tbs = crate::x509svid::ca_tbs(
            &crate::x509svid::CaParams {
                trust_domain: &td(),
                subject: &subject,
                spki_der: &spki,
                serial: &[1],
                not_before: 1,
                not_after: 4_000_000_000,
            },
            None,
        )
        .unwrap();
        let sig = k.sign(&aws_lc_rs::rand::SystemRandom::new(), &tbs).unwrap();
        crate::x509svid::assemble(
            &tbs,
            &KeyInfo::from_spki_der(&spki)
                .unwrap()
                .x509_signature_algorithm(),
            sig.as_ref(),
        )
        .unwrap()
    }

    fn jwt_key() -> Vec<u8> {
        let k = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
        k.public_key().as_der().unwrap().as_ref().to_vec()
    }

    fn sample() -> Bundle {
        Bundle {
            trust_domain: "example.org".into(),
            x509_authorities: vec![X509Certificate {
                asn1: ca_cert(),
                tainted: true,
            }],
            jwt_authorities: vec![JwtKey {
                public_key: jwt_key(),
                key_id: "kid-1".into(),
                expires_at: 5,
                tainted: false,
            }],
            refresh_hint: 300,
            sequence_number: u64::MAX,
            wit_authorities: vec![],
        }
    }

    #[test]
    fn x509_17_jwt_13_bun_03_04_spiffe_format_round_trip() {
        let b = sample();
        let json = to_spiffe_json(&b).unwrap();
        let v: Value = serde_json::from_str(&json).unwrap();
        let keys = v["keys"].as_array().unwrap();
        assert_eq!(keys[0]["use"], USE_X509);
        assert!(
            keys[0].get("kid").is_none(),
            "X509-17: no kid on x509-svid keys"
        );
        assert_eq!(keys[0]["x5c"].as_array().unwrap().len(), 1);
        assert_eq!(keys[1]["use"], USE_JWT);
        assert_eq!(keys[1]["kid"], "kid-1");
        assert_eq!(v["spiffe_sequence"], u64::MAX, "BUN-03: 64-bit sequence");
        assert_eq!(v["spiffe_refresh_hint"], 300);
        let back = from_spiffe_json(&td(), json.as_bytes()).unwrap();
        assert_eq!(back.x509_authorities[0].asn1, b.x509_authorities[0].asn1);
        assert!(
            !back.x509_authorities[0].tainted,
            "taint bits are not part of the SPIFFE format"
        );
        assert_eq!(
            back.jwt_authorities[0].public_key,
            b.jwt_authorities[0].public_key
        );
        assert_eq!(back.sequence_number, u64::MAX);
        assert_eq!(back.refresh_hint, 300);
    }

    #[test]
    fn bun_05_keys_member_required_but_may_be_empty() {
        assert!(matches!(
            from_spiffe_json(&td(), br#"{"spiffe_sequence": 1}"#),
            Err(Error::BadBundle(_))
        ));
        let b = from_spiffe_json(&td(), br#"{"keys": [], "unknown_member": true}"#).unwrap();
        assert!(
            b.x509_authorities.is_empty() && b.jwt_authorities.is_empty(),
            "BUN-02/06"
        );
    }

    #[test]
    fn bun_07_08_x509_18_unknown_kty_use_and_missing_x5c_are_ignored() {
        let cert = ca_cert();
        let other = ca_cert();
        let doc = serde_json::json!({"keys": [
            {"kty": "OKP", "use": "jwt-svid", "kid": "ed", "crv": "Ed25519", "x": "AAAA"},
            {"kty": "EC", "use": "wit-svid-unknown", "crv": "P-256", "x": "AA", "y": "AA"},
            {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"},
            {"kty": "EC", "use": "x509-svid", "crv": "P-256", "x": "AA", "y": "AA"},
            {"kty": "EC", "use": "x509-svid", "x5c": []},
            {"kty": "EC", "use": "x509-svid", "x5c": [STANDARD.encode(&cert), STANDARD.encode(&other)]}
        ]});
        let b = from_spiffe_json(&td(), doc.to_string().as_bytes()).unwrap();
        assert_eq!(b.x509_authorities.len(), 1);
        assert_eq!(
            b.x509_authorities[0].asn1, cert,
            "X509-18: first x5c value is used"
        );
        assert!(b.jwt_authorities.is_empty());
    }

    #[test]
    fn jwt_13_jwt_key_without_kid_is_rejected() {
        let mut m = KeyInfo::from_spki_der(&jwt_key()).unwrap().jwk_members();
        m.insert("use".into(), USE_JWT.into());
        let doc = serde_json::json!({ "keys": [Value::Object(m)] });
        assert!(from_spiffe_json(&td(), doc.to_string().as_bytes()).is_err());
    }

    #[test]
    fn pem_round_trip_and_garbage() {
        let b = sample();
        let pem = x509_to_pem(&b);
        assert_eq!(
            certs_from_pem(&pem).unwrap(),
            vec![b.x509_authorities[0].asn1.clone()]
        );
        assert!(certs_from_pem("").is_err());
        assert!(
            certs_from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
                .is_err()
        );
        assert!(certs_from_pem("-----BEGIN CERTIFICATE-----\nAAAA\n").is_err());
    }

    #[test]
    fn wa_14_workload_jwks_has_only_jwt_keys_with_kid() {
        let v: Value = serde_json::from_slice(&jwt_jwks(&sample()).unwrap()).unwrap();
        let keys = v["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0]["kid"], "kid-1");
    }
}
