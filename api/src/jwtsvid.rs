//! The JWT-SVID profile (JWT-SVID.md, rules JWT-01..JWT-10) in one place: the issuer builds the
//! signing input with [`signing_input`] and finishes the token with [`assemble`]; validators
//! call [`validate`]. **JWT-04 decision:** `kid` is required, as in go-spiffe and rust-spiffe,
//! since keys are selected by it. `exp` is required; `exp` and `nbf` get [`LEEWAY_SECS`] of
//! leeway (JWT-08 allows "a small amount"). No I/O: bundles come in through a lookup function.

use crate::Error;
use crate::keys::{KeyInfo, ecdsa_der_to_fixed};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value, json};

/// Clock-skew allowance for `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 30;

/// Algorithms a JWT-SVID may use (JWT-03).
pub const ALLOWED_ALGS: [&str; 9] = [
    "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512",
];

/// Claims of a JWT-SVID to issue.
pub struct Claims<'a> {
    pub sub: &'a SpiffeId,
    pub aud: &'a [String],
    pub exp: u64,
    pub iat: u64,
    pub iss: Option<&'a str>,
}

/// The JWS signing input `b64(header).b64(claims)` for a key of `key` type and id `kid`.
pub fn signing_input(key: &KeyInfo, kid: &str, c: &Claims<'_>) -> Result<String, Error> {
    if c.aud.is_empty() || c.aud.iter().any(|a| a.is_empty()) {
        return Err(Error::BadSvid(
            "a JWT-SVID needs at least one non-empty audience (JWT-07)".into(),
        ));
    }
    c.sub.check_issuable()?;
    let header = json!({"alg": key.jws_alg(), "kid": kid, "typ": "JWT"});
    let aud = if c.aud.len() == 1 {
        Value::String(c.aud[0].clone())
    } else {
        json!(c.aud)
    };
    let mut claims = json!({"aud": aud, "exp": c.exp, "iat": c.iat, "sub": c.sub.to_string()});
    if let (Some(iss), Some(m)) = (c.iss, claims.as_object_mut()) {
        m.insert("iss".into(), iss.into());
    }
    Ok(format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    ))
}

/// Finishes a token from its signing input and the key's signature (ECDSA in DER, as a
/// KeyManager returns it; converted here to the fixed-width JWS form).
pub fn assemble(key: &KeyInfo, input: &str, signature: &[u8]) -> Result<String, Error> {
    let sig = match key {
        KeyInfo::EcP256(_) => ecdsa_der_to_fixed(signature, 32)?,
        KeyInfo::EcP384(_) => ecdsa_der_to_fixed(signature, 48)?,
        KeyInfo::Rsa { .. } => signature.to_vec(),
    };
    Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

/// A JWT authority as validators see it.
#[derive(Debug, Clone)]
pub struct JwtAuthority {
    pub kid: String,
    pub spki_der: Vec<u8>,
}

/// A validated token.
#[derive(Debug, Clone)]
pub struct Validated {
    pub sub: SpiffeId,
    pub claims: Map<String, Value>,
}

fn b64_json(part: &str, what: &str) -> Result<Map<String, Value>, Error> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| Error::BadJwt(format!("{what} is not base64url")))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Error::BadJwt(format!("{what} is not a JSON object"))),
    }
}

fn verification_alg(alg: &str, key: &KeyInfo) -> Option<&'static dyn VerificationAlgorithm> {
    Some(match (alg, key) {
        ("ES256", KeyInfo::EcP256(_)) => &signature::ECDSA_P256_SHA256_FIXED,
        ("ES384", KeyInfo::EcP384(_)) => &signature::ECDSA_P384_SHA384_FIXED,
        ("RS256", KeyInfo::Rsa { .. }) => &signature::RSA_PKCS1_2048_8192_SHA256,
        ("RS384", KeyInfo::Rsa { .. }) => &signature::RSA_PKCS1_2048_8192_SHA384,
        ("RS512", KeyInfo::Rsa { .. }) => &signature::RSA_PKCS1_2048_8192_SHA512,
        ("PS256", KeyInfo::Rsa { .. }) => &signature::RSA_PSS_2048_8192_SHA256,
        ("PS384", KeyInfo::Rsa { .. }) => &signature::RSA_PSS_2048_8192_SHA384,
        ("PS512", KeyInfo::Rsa { .. }) => &signature::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

fn num_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, Error> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|f| *f >= 0.0)
            .map(|f| Some(f as u64))
            .ok_or_else(|| Error::BadJwt(format!("claim {name:?} is not a number"))),
    }
}

/// Validates a JWT-SVID for `audience` at `now` with the JWT authorities of the subject's
/// trust domain, as returned by `authorities_for`. Each failed rule has its own error text.
pub fn validate(
    token: &str,
    audience: &str,
    now: u64,
    authorities_for: impl Fn(&TrustDomain) -> Option<Vec<JwtAuthority>>,
) -> Result<Validated, Error> {
    if audience.is_empty() {
        return Err(Error::BadJwt(
            "an audience to validate against is required (JWT-07)".into(),
        ));
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(Error::BadJwt(
            "token is not in JWS compact serialization (JWT-01)".into(),
        ));
    }
    let header = b64_json(parts[0], "header")?;
    if let Some(k) = header
        .keys()
        .find(|k| !matches!(k.as_str(), "alg" | "kid" | "typ"))
    {
        return Err(Error::BadJwt(format!(
            "header {k:?} is not allowed (JWT-02)"
        )));
    }
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    if !ALLOWED_ALGS.contains(&alg) {
        return Err(Error::BadJwt(format!(
            "algorithm {alg:?} is not allowed (JWT-03)"
        )));
    }
    let kid = match header.get("kid") {
        Some(Value::String(k)) if !k.is_empty() => k.clone(),
        _ => return Err(Error::BadJwt("token has no key ID (JWT-04)".into())),
    };
    match header.get("typ") {
        None => {}
        Some(Value::String(t)) if t == "JWT" || t == "JOSE" => {}
        Some(_) => return Err(Error::BadJwt("typ must be JWT or JOSE (JWT-05)".into())),
    }
    let claims = b64_json(parts[1], "payload")?;
    let sub = match claims.get("sub") {
        Some(Value::String(s)) => SpiffeId::parse(s)
            .map_err(|e| Error::BadJwt(format!("sub is not a SPIFFE ID: {e} (JWT-06)")))?,
        _ => return Err(Error::BadJwt("token has no sub (JWT-06)".into())),
    };
    let auds: Vec<&str> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if auds.is_empty() || auds.iter().any(|a| a.is_empty()) {
        return Err(Error::BadJwt("token has no audience (JWT-07)".into()));
    }
    if !auds.contains(&audience) {
        return Err(Error::BadJwt(format!(
            "audience {audience:?} is not in the token (JWT-07)"
        )));
    }
    let exp = num_claim(&claims, "exp")?
        .ok_or_else(|| Error::BadJwt("token has no exp (JWT-08)".into()))?;
    if now > exp.saturating_add(LEEWAY_SECS) {
        return Err(Error::BadJwt("token has expired (JWT-08)".into()));
    }
    if let Some(nbf) = num_claim(&claims, "nbf")?
        && nbf > now.saturating_add(LEEWAY_SECS)
    {
        return Err(Error::BadJwt("token is not valid yet (nbf, JWT-09)".into()));
    }
    let authorities = authorities_for(sub.trust_domain()).ok_or_else(|| {
        Error::BadJwt(format!(
            "no bundle for trust domain {} (JWT-10)",
            sub.trust_domain()
        ))
    })?;
    let authority = authorities
        .iter()
        .find(|a| a.kid == kid)
        .ok_or_else(|| Error::BadJwt(format!("key {kid:?} is not in the bundle (JWT-10)")))?;
    let key = KeyInfo::from_spki_der(&authority.spki_der)?;
    let va = verification_alg(alg, &key).ok_or_else(|| {
        Error::BadJwt(format!("algorithm {alg} does not fit key {kid:?} (JWT-10)"))
    })?;
    let sig = URL_SAFE_NO_PAD
        .decode(parts[2])
        .map_err(|_| Error::BadJwt("signature is not base64url".into()))?;
    let input_len = parts[0].len() + 1 + parts[1].len();
    UnparsedPublicKey::new(va, &authority.spki_der)
        .verify(&token.as_bytes()[..input_len], &sig)
        .map_err(|_| Error::BadJwt("signature does not verify (JWT-10)".into()))?;
    Ok(Validated { sub, claims })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};

    const NOW: u64 = 1_800_000_000;

    struct Signer(EcdsaKeyPair, Vec<u8>);

    fn signer() -> Signer {
        let k = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
        let spki = k.public_key().as_der().unwrap().as_ref().to_vec();
        Signer(k, spki)
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    /// A token with arbitrary header and claims, signed with ES256.
    fn raw(s: &Signer, header: Value, claims: Value) -> String {
        let input = format!("{}.{}", b64(&header), b64(&claims));
        let sig = s.0.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
        let fixed = ecdsa_der_to_fixed(sig.as_ref(), 32).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(fixed))
    }

    fn good_claims() -> Value {
        json!({"sub": "spiffe://example.org/w", "aud": "receiver", "exp": NOW + 60, "iat": NOW})
    }

    fn check(s: &Signer, token: &str) -> Result<Validated, Error> {
        let spki = s.1.clone();
        validate(token, "receiver", NOW, move |td| {
            (td.as_str() == "example.org").then(|| {
                vec![JwtAuthority {
                    kid: "k1".into(),
                    spki_der: spki.clone(),
                }]
            })
        })
    }

    fn hdr() -> Value {
        json!({"alg": "ES256", "kid": "k1", "typ": "JWT"})
    }

    #[test]
    fn issued_tokens_validate() {
        let s = signer();
        let info = KeyInfo::from_spki_der(&s.1).unwrap();
        let sub = SpiffeId::parse("spiffe://example.org/w").unwrap();
        let aud = vec!["receiver".to_string(), "other".to_string()];
        let input = signing_input(
            &info,
            "k1",
            &Claims {
                sub: &sub,
                aud: &aud,
                exp: NOW + 10,
                iat: NOW,
                iss: None,
            },
        )
        .unwrap();
        let sig = s.0.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
        let token = assemble(&info, &input, sig.as_ref()).unwrap();
        assert_eq!(check(&s, &token).unwrap().sub, sub);
        assert!(
            signing_input(
                &info,
                "k1",
                &Claims {
                    sub: &sub,
                    aud: &[],
                    exp: 1,
                    iat: 0,
                    iss: None
                }
            )
            .is_err()
        );
    }

    #[test]
    fn jwt_01_compact_serialization_only() {
        let s = signer();
        let t = raw(&s, hdr(), good_claims());
        assert!(check(&s, &format!("{t}.x")).is_err());
        assert!(check(&s, t.rsplit_once('.').unwrap().0).is_err());
        assert!(check(&s, "{\"payload\":\"x\"}").is_err());
    }

    #[test]
    fn jwt_02_03_04_05_header_rules() {
        let s = signer();
        assert!(
            check(
                &s,
                &raw(
                    &s,
                    json!({"alg": "ES256", "kid": "k1", "jku": "x"}),
                    good_claims()
                )
            )
            .is_err()
        );
        assert!(
            check(
                &s,
                &raw(&s, json!({"alg": "none", "kid": "k1"}), good_claims())
            )
            .is_err()
        );
        assert!(
            check(
                &s,
                &raw(&s, json!({"alg": "HS256", "kid": "k1"}), good_claims())
            )
            .is_err()
        );
        assert!(
            check(&s, &raw(&s, json!({"alg": "ES256"}), good_claims())).is_err(),
            "JWT-04: kid required"
        );
        assert!(
            check(
                &s,
                &raw(
                    &s,
                    json!({"alg": "ES256", "kid": "k1", "typ": "jwt+x"}),
                    good_claims()
                )
            )
            .is_err()
        );
        assert!(
            check(
                &s,
                &raw(
                    &s,
                    json!({"alg": "ES256", "kid": "k1", "typ": "JOSE"}),
                    good_claims()
                )
            )
            .is_ok()
        );
        assert!(
            check(
                &s,
                &raw(&s, json!({"alg": "ES256", "kid": "k1"}), good_claims())
            )
            .is_ok()
        );
        assert!(
            check(
                &s,
                &raw(&s, json!({"alg": "ES384", "kid": "k1"}), good_claims())
            )
            .is_err(),
            "alg must fit the key"
        );
    }

    #[test]
    fn jwt_06_07_08_09_claim_rules() {
        let s = signer();
        let with = |f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
            let mut c = good_claims();
            f(c.as_object_mut().unwrap());
            raw(&s, hdr(), c)
        };
        assert!(
            check(
                &s,
                &with(&|c| {
                    c.remove("sub");
                })
            )
            .is_err()
        );
        assert!(
            check(
                &s,
                &with(&|c| {
                    c.insert("sub".into(), "spiffe://example.org/".into());
                })
            )
            .is_err()
        );
        assert!(
            check(
                &s,
                &with(&|c| {
                    c.remove("aud");
                })
            )
            .is_err()
        );
        assert!(
            check(
                &s,
                &with(&|c| {
                    c.insert("aud".into(), json!([]));
                })
            )
            .is_err()
        );
        assert!(
            check(
                &s,
                &with(&|c| {
                    c.insert("aud".into(), "someone-else".into());
                })
            )
            .is_err()
        );
        assert!(
            check(
                &s,
                &with(&|c| {
                    c.insert("aud".into(), json!(["x", "receiver"]));
                })
            )
            .is_ok()
        );
        assert!(
            check(
                &s,
                &with(&|c| {
                    c.remove("exp");
                })
            )
            .is_err()
        );
        assert!(
            check(
                &s,
                &with(&|c| {
                    c.insert("exp".into(), (NOW - LEEWAY_SECS - 1).into());
                })
            )
            .is_err()
        );
        assert!(
            check(
                &s,
                &with(&|c| {
                    c.insert("exp".into(), (NOW - 5).into());
                })
            )
            .is_ok(),
            "small leeway"
        );
        assert!(
            check(
                &s,
                &with(&|c| {
                    c.insert("nbf".into(), (NOW + 3600).into());
                })
            )
            .is_err()
        );
        assert!(
            check(
                &s,
                &with(&|c| {
                    c.insert("x-extra".into(), "ok".into());
                })
            )
            .is_ok()
        );
    }

    #[test]
    fn jwt_10_signature_and_bundle_of_subject_trust_domain() {
        let s = signer();
        let other = signer();
        // signed by a key not in the bundle
        assert!(check(&s, &raw(&other, hdr(), good_claims())).is_err());
        // unknown kid
        assert!(
            check(
                &s,
                &raw(&s, json!({"alg": "ES256", "kid": "nope"}), good_claims())
            )
            .is_err()
        );
        // subject in a trust domain without a bundle
        let mut c = good_claims();
        c["sub"] = "spiffe://other.org/w".into();
        assert!(check(&s, &raw(&s, hdr(), c)).is_err());
        // tampered payload
        let t = raw(&s, hdr(), good_claims());
        let parts: Vec<&str> = t.split('.').collect();
        let mut c = good_claims();
        c["sub"] = "spiffe://example.org/admin".into();
        assert!(check(&s, &format!("{}.{}.{}", parts[0], b64(&c), parts[2])).is_err());
        // an empty audience to validate against is refused
        assert!(validate(&t, "", NOW, |_| None).is_err());
    }
}
