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
    serde_json::to_string_pretty(&Value::Object(doc)).map_err(|e| Error::Encode(e.to_string()))
}

/// Decodes a SPIFFE bundle for trust domain `td`. JWKs with an unknown `kty` or `use`, and
/// `x509-svid` JWKs without `x5c`, are ignored; the first `x5c` value is used (X509-18).
pub fn from_spiffe_json(td: &TrustDomain, data: &[u8]) -> Result<Bundle, Error> {
    let doc: Map<String, Value> = match serde_json::from_slice(data) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(Error::BadBundle("bundle is not a JSON object".into())),
        Err(e) => return Err(Error::BadBundle(format!("bundle is not JSON: {e}"))),
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
    serde_json::to_vec(&json!({ "keys": keys })).map_err(|e| Error::Encode(e.to_string()))
}
