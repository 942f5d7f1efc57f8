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
