//! The `tpm_devid` node-attestation messages, byte-compatible with SPIRE's Go agent and server
//! (`tpm_devid.md` §1.1–1.6): JSON objects whose keys are the Go field names, byte fields as
//! standard padded base64, absent values as `null`. Decoding is as lenient as Go's
//! `encoding/json`: key names match case-insensitively and unknown keys are ignored. Kame's
//! optional `Version` field (2 = bound certify and a quote) is only written when set, so Go
//! peers never see it. Pure data: no checks beyond shape, no I/O.

use crate::Error;
use crate::gojson::{bad, bytes, enc, field, object, ordered};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value};

/// Most certificates a list of message 1 (`DevIDCert`, `EKCertChain`, `AKCert`) may hold: a
/// leaf and its intermediates, with room to spare (path validation takes at most 8
/// intermediates). Larger lists are refused before anything in them is decoded.
pub const MAX_LIST_CERTS: usize = 16;

fn bytes_list(m: &Map<String, Value>, name: &str) -> Result<Vec<Vec<u8>>, Error> {
    crate::gojson::bytes_list(m, name, MAX_LIST_CERTS)
}

fn version(m: &Map<String, Value>) -> Result<Option<u32>, Error> {
    match field(m, "Version") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => Ok(Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad("Version is not a small unsigned integer"))?,
        )),
    }
}

/// Message 1, agent → server (`AttestationRequest`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttestationRequest {
    /// DER certificates, the DevID leaf first.
    pub devid_cert: Vec<Vec<u8>>,
    /// TPMT_PUBLIC (no TPM2B size) of the DevID key.
    pub devid_pub: Option<Vec<u8>>,
    pub ek_cert: Option<Vec<u8>>,
    pub ek_pub: Option<Vec<u8>>,
    pub ak_pub: Option<Vec<u8>>,
    /// TPMS_ATTEST of TPM2_Certify(DevID) by the AK.
    pub certified_devid: Option<Vec<u8>>,
    /// TPMT_SIGNATURE over `certified_devid`.
    pub certification_signature: Option<Vec<u8>>,
    /// Kame's protocol version (absent: SPIRE's, 1).
    pub version: Option<u32>,
    /// Kame: EK issuer certificates from the TPM's NV (written only when non-empty; SPIRE's
    /// server ignores the field and needs vendor intermediates in its bundle).
    pub ek_cert_chain: Vec<Vec<u8>>,
    /// Kame: the certificate chain (leaf first) of a persistent attestation key, a TCG IAK or
    /// LAK, whose issuer already verified that it is a restricted key resident with a genuine
    /// EK. With it the agent sends no EK and answers no credential activation: the server
    /// checks the certificate and a certify and quote by that key bound to its nonce (v2).
    /// Written only when non-empty.
    pub ak_cert: Vec<Vec<u8>>,
}

impl AttestationRequest {
    pub fn encode(&self) -> Vec<u8> {
        let certs = if self.devid_cert.is_empty() {
            Value::Null
        } else {
            Value::Array(
                self.devid_cert
                    .iter()
                    .map(|c| Value::String(STANDARD.encode(c)))
                    .collect(),
            )
        };
        let mut m = vec![
            ("DevIDCert", certs),
            ("DevIDPub", enc(&self.devid_pub)),
            ("EKCert", enc(&self.ek_cert)),
            ("EKPub", enc(&self.ek_pub)),
            ("AKPub", enc(&self.ak_pub)),
            ("CertifiedDevID", enc(&self.certified_devid)),
            ("CertificationSignature", enc(&self.certification_signature)),
        ];
        if let Some(v) = self.version {
            m.push(("Version", v.into()));
        }
        for (name, list) in [
            ("EKCertChain", &self.ek_cert_chain),
            ("AKCert", &self.ak_cert),
        ] {
            if !list.is_empty() {
                m.push((
                    name,
                    Value::Array(
                        list.iter()
                            .map(|c| Value::String(STANDARD.encode(c)))
                            .collect(),
                    ),
                ));
            }
        }
        ordered(m)
    }

    pub fn decode(data: &[u8]) -> Result<Self, Error> {
        let m = object(data, "attestation request")?;
        let version = version(&m)?;
        Ok(AttestationRequest {
            devid_cert: bytes_list(&m, "DevIDCert")?,
            devid_pub: bytes(&m, "DevIDPub")?,
            ek_cert: bytes(&m, "EKCert")?,
            ek_pub: bytes(&m, "EKPub")?,
            ak_pub: bytes(&m, "AKPub")?,
            certified_devid: bytes(&m, "CertifiedDevID")?,
            certification_signature: bytes(&m, "CertificationSignature")?,
            version,
            ek_cert_chain: bytes_list(&m, "EKCertChain")?,
            ak_cert: bytes_list(&m, "AKCert")?,
        })
    }
}

/// The credential-activation challenge: TPM2_MakeCredential outputs without TPM2B sizes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CredActivation {
    pub credential: Vec<u8>,
    pub secret: Vec<u8>,
}

/// Message 2, server → agent (`ChallengeRequest`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChallengeRequest {
    /// The nonce the DevID key must sign.
    pub devid: Option<Vec<u8>>,
    pub cred_activation: Option<CredActivation>,
    /// Kame v2 (sent only to agents that announced it): certify and quote are bound to the
    /// nonce, and the quote covers these SHA-256 PCRs.
    pub version: Option<u32>,
    pub pcrs: Vec<u32>,
}

impl ChallengeRequest {
    pub fn encode(&self) -> Vec<u8> {
        let cred = match &self.cred_activation {
            None => Value::Null,
            Some(c) => Value::Object(Map::from_iter([
                ("Credential".to_string(), enc(&Some(c.credential.clone()))),
                ("Secret".to_string(), enc(&Some(c.secret.clone()))),
            ])),
        };
        let mut m = vec![("DevID", enc(&self.devid)), ("CredActivation", cred)];
        if let Some(v) = self.version {
            m.push(("Version", v.into()));
            m.push(("PCRs", self.pcrs.clone().into()));
        }
        ordered(m)
    }

    pub fn decode(data: &[u8]) -> Result<Self, Error> {
        let m = object(data, "challenge")?;
        let cred_activation = match field(&m, "CredActivation") {
            None | Some(Value::Null) => None,
            Some(Value::Object(cm)) => Some(CredActivation {
                credential: bytes(cm, "Credential")?.unwrap_or_default(),
                secret: bytes(cm, "Secret")?.unwrap_or_default(),
            }),
            Some(_) => return Err(bad("CredActivation is not an object")),
        };
        let pcrs = match field(&m, "PCRs") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .filter(|n| *n < 24)
                        .map(|n| n as u32)
                        .ok_or_else(|| bad("PCRs holds something that is not a PCR index"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad("PCRs is not an array")),
        };
        Ok(ChallengeRequest {
            devid: bytes(&m, "DevID")?,
            cred_activation,
            version: version(&m)?,
            pcrs,
        })
    }
}

/// Message 3, agent → server (`ChallengeResponse`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChallengeResponse {
    /// The DevID key's signature over the nonce (RSA raw, ECDSA DER).
    pub devid: Option<Vec<u8>>,
    /// The secret recovered by TPM2_ActivateCredential.
    pub cred_activation: Option<Vec<u8>>,
    /// v2: TPM2_Certify of the DevID by the AK with the nonce as qualifying data.
    pub certified_devid: Option<Vec<u8>>,
    pub certification_signature: Option<Vec<u8>>,
    /// v2: TPM2_Quote by the AK over the requested PCRs with the nonce.
    pub quote: Option<Vec<u8>>,
    pub quote_signature: Option<Vec<u8>>,
    /// v2: the SHA-256 PCR values the quote covers, by index.
    pub pcr_values: Vec<(u32, Vec<u8>)>,
}

impl ChallengeResponse {
    pub fn encode(&self) -> Vec<u8> {
        let mut m = vec![
            ("DevID", enc(&self.devid)),
            ("CredActivation", enc(&self.cred_activation)),
        ];
        if self.quote.is_some() || self.certified_devid.is_some() {
            m.push(("CertifiedDevID", enc(&self.certified_devid)));
            m.push(("CertificationSignature", enc(&self.certification_signature)));
            m.push(("Quote", enc(&self.quote)));
            m.push(("QuoteSignature", enc(&self.quote_signature)));
            let mut pcrs = Map::new();
            for (i, v) in &self.pcr_values {
                pcrs.insert(i.to_string(), Value::String(STANDARD.encode(v)));
            }
            m.push(("PCRValues", Value::Object(pcrs)));
        }
        ordered(m)
    }

    pub fn decode(data: &[u8]) -> Result<Self, Error> {
        let m = object(data, "challenge response")?;
        let pcr_values = match field(&m, "PCRValues") {
            None | Some(Value::Null) => vec![],
            Some(Value::Object(o)) => {
                o.iter()
                    .map(|(k, v)| {
                        let i: u32 = k.parse().ok().filter(|i| *i < 24).ok_or_else(|| {
                            bad(format!("PCRValues key {k:?} is not a PCR index"))
                        })?;
                        let v = v
                            .as_str()
                            .and_then(|s| STANDARD.decode(s).ok())
                            .ok_or_else(|| bad(format!("PCRValues[{k}] is not base64")))?;
                        Ok((i, v))
                    })
                    .collect::<Result<_, Error>>()?
            }
            Some(_) => return Err(bad("PCRValues is not an object")),
        };
        Ok(ChallengeResponse {
            devid: bytes(&m, "DevID")?,
            cred_activation: bytes(&m, "CredActivation")?,
            certified_devid: bytes(&m, "CertifiedDevID")?,
            certification_signature: bytes(&m, "CertificationSignature")?,
            quote: bytes(&m, "Quote")?,
            quote_signature: bytes(&m, "QuoteSignature")?,
            pcr_values,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpm_devid_messages_use_go_field_names_padded_base64_and_null() {
        let r = AttestationRequest {
            devid_cert: vec![vec![0x30, 0x01], vec![0x30]],
            devid_pub: Some(vec![0, 1, 0, 0x0b]),
            ek_cert: None,
            ..Default::default()
        };
        let s = String::from_utf8(r.encode()).unwrap();
        assert_eq!(
            s,
            r#"{"DevIDCert":["MAE=","MA=="],"DevIDPub":"AAEACw==","EKCert":null,"EKPub":null,"AKPub":null,"CertifiedDevID":null,"CertificationSignature":null}"#
        );
        assert_eq!(AttestationRequest::decode(s.as_bytes()).unwrap(), r);
        let c = ChallengeRequest {
            devid: Some(vec![1; 4]),
            cred_activation: Some(CredActivation {
                credential: vec![2],
                secret: vec![3],
            }),
            ..Default::default()
        };
        let s = String::from_utf8(c.encode()).unwrap();
        assert_eq!(
            s,
            r#"{"DevID":"AQEBAQ==","CredActivation":{"Credential":"Ag==","Secret":"Aw=="}}"#
        );
        assert_eq!(ChallengeRequest::decode(s.as_bytes()).unwrap(), c);
    }

    #[test]
    fn tpm_devid_decoding_is_as_lenient_as_go_and_strict_on_types() {
        // Case-insensitive names, unknown fields ignored, Kame's Version read.
        let r = AttestationRequest::decode(
            br#"{"devidcert":["MAE="],"akpub":"AA==","Unknown":1,"Version":2}"#,
        )
        .unwrap();
        assert_eq!(r.devid_cert, vec![vec![0x30, 0x01]]);
        assert_eq!(r.ak_pub, Some(vec![0]));
        assert_eq!(r.version, Some(2));
        for bad in [
            &br#"[]"#[..],
            br#"{"DevIDPub":"not base64!"}"#,
            br#"{"DevIDCert":"MAE="}"#,
            br#"{"Version":-1}"#,
            b"\xff",
        ] {
            assert!(AttestationRequest::decode(bad).is_err());
        }
        let v = ChallengeResponse::decode(br#"{"devid":"AQ==","credactivation":null}"#).unwrap();
        assert_eq!(v.devid, Some(vec![1]));
        assert_eq!(v.cred_activation, None);
        assert!(ChallengeRequest::decode(br#"{"CredActivation":"x"}"#).is_err());
        // v2 round trip: fields appear only in v2.
        let c = ChallengeRequest {
            devid: Some(vec![1]),
            version: Some(2),
            pcrs: vec![0, 7],
            ..Default::default()
        };
        let text = String::from_utf8(c.encode()).unwrap();
        assert!(text.ends_with(r#""Version":2,"PCRs":[0,7]}"#), "{text}");
        assert_eq!(ChallengeRequest::decode(text.as_bytes()).unwrap(), c);
        let r = ChallengeResponse {
            devid: Some(vec![1]),
            quote: Some(vec![2]),
            pcr_values: vec![(7, vec![9; 32])],
            ..Default::default()
        };
        assert_eq!(ChallengeResponse::decode(&r.encode()).unwrap(), r);
        assert!(
            !String::from_utf8(ChallengeResponse::default().encode())
                .unwrap()
                .contains("Quote")
        );
        assert!(ChallengeResponse::decode(br#"{"PCRValues":{"99":"AA=="}}"#).is_err());
        // Certificate lists are capped before anything in them is decoded.
        for name in ["DevIDCert", "EKCertChain", "AKCert"] {
            let list = vec![Value::String("MAE=".into()); MAX_LIST_CERTS + 1];
            let msg = serde_json::to_vec(&Value::Object(Map::from_iter([(
                name.to_string(),
                Value::Array(list),
            )])))
            .unwrap();
            let e = AttestationRequest::decode(&msg).unwrap_err().to_string();
            assert!(e.contains(&format!("{name} holds 17 certificates")), "{e}");
        }
        // A v1 message never carries Version, nor Kame's EKCertChain or AKCert when empty.
        let plain = String::from_utf8(AttestationRequest::default().encode()).unwrap();
        for k in ["Version", "EKCertChain", "AKCert"] {
            assert!(!plain.contains(k), "{plain}");
        }
        // A certified AK (IAK/LAK) round-trips, after SPIRE's fields.
        let r = AttestationRequest {
            ak_cert: vec![vec![0x30, 0x02], vec![0x30, 0x03]],
            version: Some(2),
            ..Default::default()
        };
        let text = String::from_utf8(r.encode()).unwrap();
        assert!(
            text.ends_with(r#""Version":2,"AKCert":["MAI=","MAM="]}"#),
            "{text}"
        );
        assert_eq!(AttestationRequest::decode(text.as_bytes()).unwrap(), r);
    }
}
