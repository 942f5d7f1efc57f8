//! The `x509pop` node-attestation messages, byte-compatible with SPIRE's agent and server
//! (`pkg/common/plugin/x509pop`): JSON with Go's field tags, byte fields as standard padded
//! base64, a nil pointer or slice as `null`. The agent sends its certificate chain; the server
//! challenges it with a 32-byte nonce, in the member named for the leaf key's type; the agent
//! adds its own 32-byte nonce and signs SHA-256(challenge nonce ‖ its nonce) as a digest
//! (RSA-PSS with SHA-256, or ECDSA with r and s as minimal big-endian integers). Pure data and
//! the combined nonce: no I/O, no key handling.

use crate::Error;
use crate::gojson::{bad, bytes, enc, field, object, ordered};
use serde_json::Value;

/// The length of each nonce.
pub const NONCE_LEN: usize = 32;

/// Message 1 (`AttestationData`): DER certificates, the leaf first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttestationData {
    pub certificates: Vec<Vec<u8>>,
}

impl AttestationData {
    pub fn encode(&self) -> Vec<u8> {
        let certs = if self.certificates.is_empty() {
            Value::Null
        } else {
            Value::Array(
                self.certificates
                    .iter()
                    .map(|c| enc(&Some(c.clone())))
                    .collect(),
            )
        };
        ordered(vec![("certificates", certs)])
    }

    /// Decodes message 1, refusing more than `max_certificates` before decoding any.
    pub fn decode(data: &[u8], max_certificates: usize) -> Result<Self, Error> {
        let m = object(data, "attestation data")?;
        Ok(AttestationData {
            certificates: crate::gojson::bytes_list(&m, "certificates", max_certificates)?,
        })
    }
}

/// The server's challenge: a nonce in the member for the leaf key's type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Challenge {
    /// `rsa_signature.nonce`
    pub rsa_nonce: Option<Vec<u8>>,
    /// `ecdsa_signature.nonce`
    pub ecdsa_nonce: Option<Vec<u8>>,
}

fn nonce_object(nonce: &Option<Vec<u8>>) -> Value {
    match nonce {
        None => Value::Null,
        Some(n) => Value::Object(serde_json::Map::from_iter([(
            "nonce".to_string(),
            enc(&Some(n.clone())),
        )])),
    }
}

/// The object under `name`, None when absent or `null`.
fn member<'a>(
    m: &'a serde_json::Map<String, Value>,
    name: &str,
) -> Result<Option<&'a serde_json::Map<String, Value>>, Error> {
    match field(m, name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(_) => Err(bad(format!("{name} is not an object"))),
    }
}

impl Challenge {
    pub fn encode(&self) -> Vec<u8> {
        ordered(vec![
            ("rsa_signature", nonce_object(&self.rsa_nonce)),
            ("ecdsa_signature", nonce_object(&self.ecdsa_nonce)),
        ])
    }

    pub fn decode(data: &[u8]) -> Result<Self, Error> {
        let m = object(data, "challenge")?;
        let nonce = |name: &str| -> Result<Option<Vec<u8>>, Error> {
            Ok(match member(&m, name)? {
                None => None,
                Some(o) => Some(bytes(o, "nonce")?.unwrap_or_default()),
            })
        };
        Ok(Challenge {
            rsa_nonce: nonce("rsa_signature")?,
            ecdsa_nonce: nonce("ecdsa_signature")?,
        })
    }
}

/// The agent's answer with an RSA key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RsaResponse {
    pub nonce: Vec<u8>,
    /// RSA-PSS (SHA-256) over the combined nonce.
    pub signature: Vec<u8>,
}

/// The agent's answer with an ECDSA key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EcdsaResponse {
    pub nonce: Vec<u8>,
    /// Big-endian, without leading zeros (Go's `big.Int.Bytes`).
    pub r: Vec<u8>,
    pub s: Vec<u8>,
}

/// Message 3 (`Response`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    pub rsa: Option<RsaResponse>,
    pub ecdsa: Option<EcdsaResponse>,
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        // Inner members in Go's order, which is also their sorted order (serde_json's map).
        let obj = |members: Vec<(&str, &Vec<u8>)>| {
            Value::Object(
                members
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), enc(&Some(v.clone()))))
                    .collect(),
            )
        };
        let rsa = self.rsa.as_ref().map_or(Value::Null, |r| {
            obj(vec![("nonce", &r.nonce), ("signature", &r.signature)])
        });
        let ecdsa = self.ecdsa.as_ref().map_or(Value::Null, |e| {
            obj(vec![("nonce", &e.nonce), ("r", &e.r), ("s", &e.s)])
        });
        ordered(vec![("rsa_signature", rsa), ("ecdsa_signature", ecdsa)])
    }

    pub fn decode(data: &[u8]) -> Result<Self, Error> {
        let m = object(data, "challenge response")?;
        let rsa = match member(&m, "rsa_signature")? {
            None => None,
            Some(o) => Some(RsaResponse {
                nonce: bytes(o, "nonce")?.unwrap_or_default(),
                signature: bytes(o, "signature")?.unwrap_or_default(),
            }),
        };
        let ecdsa = match member(&m, "ecdsa_signature")? {
            None => None,
            Some(o) => Some(EcdsaResponse {
                nonce: bytes(o, "nonce")?.unwrap_or_default(),
                r: bytes(o, "r")?.unwrap_or_default(),
                s: bytes(o, "s")?.unwrap_or_default(),
            }),
        };
        Ok(Response { rsa, ecdsa })
    }
}

/// What both sides sign and verify: SHA-256(challenge nonce ‖ response nonce), each nonce
/// exactly [`NONCE_LEN`] bytes.
pub fn combined_nonce(challenge: &[u8], response: &[u8]) -> Result<[u8; 32], Error> {
    if challenge.len() != NONCE_LEN {
        return Err(bad("invalid challenge nonce"));
    }
    if response.len() != NONCE_LEN {
        return Err(bad("invalid response nonce"));
    }
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &[challenge, response].concat());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes Go's encoding/json writes for SPIRE's structs (checked with Go).
    #[test]
    fn x509pop_messages_are_what_go_writes_and_reads() {
        let a = AttestationData {
            certificates: vec![vec![0x30, 0x82], vec![0x30, 0x81]],
        };
        assert_eq!(
            String::from_utf8(a.encode()).unwrap(),
            r#"{"certificates":["MII=","MIE="]}"#
        );
        assert_eq!(AttestationData::decode(&a.encode(), 5).unwrap(), a);
        assert_eq!(
            String::from_utf8(AttestationData::default().encode()).unwrap(),
            r#"{"certificates":null}"#
        );
        let e = AttestationData::decode(&a.encode(), 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 1"), "{e}");
        let c = Challenge {
            rsa_nonce: Some(vec![1, 2]),
            ecdsa_nonce: None,
        };
        assert_eq!(
            String::from_utf8(c.encode()).unwrap(),
            r#"{"rsa_signature":{"nonce":"AQI="},"ecdsa_signature":null}"#
        );
        assert_eq!(Challenge::decode(&c.encode()).unwrap(), c);
        let r = Response {
            rsa: None,
            ecdsa: Some(EcdsaResponse {
                nonce: vec![9],
                r: vec![1, 2],
                s: vec![3],
            }),
        };
        assert_eq!(
            String::from_utf8(r.encode()).unwrap(),
            r#"{"rsa_signature":null,"ecdsa_signature":{"nonce":"CQ==","r":"AQI=","s":"Aw=="}}"#
        );
        assert_eq!(Response::decode(&r.encode()).unwrap(), r);
        let r = Response {
            rsa: Some(RsaResponse {
                nonce: vec![9],
                signature: vec![7],
            }),
            ecdsa: None,
        };
        assert_eq!(
            String::from_utf8(r.encode()).unwrap(),
            r#"{"rsa_signature":{"nonce":"CQ==","signature":"Bw=="},"ecdsa_signature":null}"#
        );
        // Go reads case-insensitively and ignores unknown keys; null objects are absent.
        let c = Challenge::decode(br#"{"RSA_Signature":{"Nonce":"AQI="},"x":1}"#).unwrap();
        assert_eq!(c.rsa_nonce, Some(vec![1, 2]));
        for bad in [
            &b"[]"[..],
            br#"{"rsa_signature":"x"}"#,
            br#"{"certificates":"MII="}"#,
        ] {
            assert!(Challenge::decode(bad).is_err() || AttestationData::decode(bad, 5).is_err());
        }
        assert_eq!(
            combined_nonce(&[0; 31], &[0; 32]).unwrap_err().to_string(),
            Error::BadAttestation("invalid challenge nonce".into()).to_string()
        );
        assert!(combined_nonce(&[0; 32], &[0; 33]).is_err());
    }
}
