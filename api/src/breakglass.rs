//! The break-glass record's format, shared by the agent that writes it and the server that
//! checks it: one JSON object per line, `{"body": "<JSON text>", "sig": "<base64>"}`, where the
//! body carries its sequence number, the SHA-256 (hex) of the previous line's body text, the
//! time, the agent, the signing key (base64 SubjectPublicKeyInfo) and the event; the
//! signature is ECDSA (SHA-256, ASN.1 DER) by that key over the body text's bytes. An `open`
//! event names the certificate chain of its key; the lines after it, up to the next `open`,
//! are signed by the same key. Pure: nothing here signs, reads files or keeps state.

use crate::keys::verify_x509_signature;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

/// The longest line a record may hold (bytes).
pub const MAX_LINE: usize = 64 * 1024;
/// The longest reason an operator may give (characters).
pub const MAX_REASON: usize = 1024;
/// The `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// The glass was broken on the node.
    Open {
        reason: String,
        duration_secs: u64,
        closes_at: u64,
        /// The `jti` or hash of the break-glass token given, if any.
        token: Option<String>,
        /// The signing key's certificate chain (base64 DER, leaf first).
        signer_chain: Vec<String>,
    },
    /// A reserve SVID was delivered to a workload.
    Deliver {
        entry_id: String,
        spiffe_id: String,
        serial: String,
        not_before: u64,
        not_after: u64,
        /// The workload's attested selectors (`type:value`).
        selectors: Vec<String>,
    },
    /// The glass closed.
    Close { cause: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    pub seq: u64,
    pub prev: String,
    pub time: u64,
    pub agent: String,
    pub key: String,
    pub event: Event,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Line {
    pub body: String,
    pub sig: String,
}

/// Why a record does not verify; `line` counts from 1 among the lines given.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordError {
    #[error("line {line}: longer than {MAX_LINE} bytes")]
    TooLong { line: usize },
    #[error("line {line}: not a record line: {msg}")]
    Malformed { line: usize, msg: String },
    #[error("line {line}: sequence number {got}, expected {expected}")]
    Sequence {
        line: usize,
        expected: u64,
        got: u64,
    },
    #[error("line {line}: does not chain to the line before it (prev hash differs)")]
    Chain { line: usize },
    #[error("line {line}: signed by a key other than its opening line's")]
    Key { line: usize },
    #[error("line {line}: the signature does not verify")]
    Signature { line: usize },
    #[error("line {line}: event before any open")]
    NotOpened { line: usize },
    #[error("line {line}: written by {got}, not {expected}")]
    Agent {
        line: usize,
        expected: String,
        got: String,
    },
}

/// The hex SHA-256 of a body's text: the next line's `prev`.
pub fn body_hash(body: &str) -> String {
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        body.as_bytes(),
    ))
}

/// Where a verified record ends: the next line's sequence number and `prev`, and the key and
/// agent of the opening in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tip {
    pub next_seq: u64,
    pub prev: String,
    pub key: Option<String>,
    pub agent: Option<String>,
}

impl Default for Tip {
    fn default() -> Self {
        Tip {
            next_seq: 1,
            prev: GENESIS.to_string(),
            key: None,
            agent: None,
        }
    }
}

/// The body text and line (JSON text, no newline) for `body` signed with `sign`.
pub fn seal(body: &Body, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> Result<String, RecordError> {
    let text = serde_json::to_string(body).map_err(|e| RecordError::Malformed {
        line: 0,
        msg: e.to_string(),
    })?;
    let sig = STANDARD.encode(sign(text.as_bytes()));
    serde_json::to_string(&Line { body: text, sig }).map_err(|e| RecordError::Malformed {
        line: 0,
        msg: e.to_string(),
    })
}

/// Checks `lines` as the continuation of a record at `tip` (the default tip: from its start):
/// each line's sequence number and chain to the one before, one agent throughout (`agent`, if
/// given), a key fixed by each `open`, and every signature. Returns the bodies and the new tip.
pub fn verify(
    lines: &[String],
    mut tip: Tip,
    agent: Option<&str>,
) -> Result<(Vec<Body>, Tip), RecordError> {
    let mut out = Vec::with_capacity(lines.len());
    for (i, text) in lines.iter().enumerate() {
        let n = i + 1;
        if text.len() > MAX_LINE {
            return Err(RecordError::TooLong { line: n });
        }
        let bad = |msg: String| RecordError::Malformed { line: n, msg };
        let line: Line = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let body: Body = serde_json::from_str(&line.body).map_err(|e| bad(e.to_string()))?;
        if body.seq > i64::MAX as u64 || body.time > i64::MAX as u64 {
            return Err(bad("sequence number or time out of range".into()));
        }
        if body.seq != tip.next_seq {
            return Err(RecordError::Sequence {
                line: n,
                expected: tip.next_seq,
                got: body.seq,
            });
        }
        if body.prev != tip.prev {
            return Err(RecordError::Chain { line: n });
        }
        let expected = agent.map(str::to_string).or_else(|| tip.agent.clone());
        if let Some(a) = expected
            && a != body.agent
        {
            return Err(RecordError::Agent {
                line: n,
                expected: a,
                got: body.agent.clone(),
            });
        }
        match &body.event {
            Event::Open { reason, .. } => {
                if reason.chars().count() > MAX_REASON {
                    return Err(bad(format!("reason longer than {MAX_REASON} characters")));
                }
                tip.key = Some(body.key.clone());
            }
            _ => match &tip.key {
                None => return Err(RecordError::NotOpened { line: n }),
                Some(k) if *k != body.key => return Err(RecordError::Key { line: n }),
                Some(_) => {}
            },
        }
        let spki = STANDARD
            .decode(&body.key)
            .map_err(|e| bad(format!("key: {e}")))?;
        let sig = STANDARD
            .decode(&line.sig)
            .map_err(|e| bad(format!("sig: {e}")))?;
        verify_x509_signature(
            &spki,
            &const_oid::db::rfc5912::ECDSA_WITH_SHA_256,
            None,
            line.body.as_bytes(),
            &sig,
        )
        .map_err(|_| RecordError::Signature { line: n })?;
        tip.next_seq += 1;
        tip.prev = body_hash(&line.body);
        tip.agent = Some(body.agent.clone());
        out.push(body);
    }
    Ok((out, tip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};

    fn key() -> EcdsaKeyPair {
        EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap()
    }

    fn write(k: &EcdsaKeyPair, tip: &Tip, event: Event) -> String {
        let body = Body {
            seq: tip.next_seq,
            prev: tip.prev.clone(),
            time: 1_000,
            agent: "spiffe://example.org/spire/agent/x".into(),
            key: STANDARD.encode(k.public_key().as_der().unwrap().as_ref()),
            event,
        };
        seal(&body, |m| {
            k.sign(&SystemRandom::new(), m).unwrap().as_ref().to_vec()
        })
        .unwrap()
    }

    fn record(k: &EcdsaKeyPair) -> Vec<String> {
        let mut lines = vec![];
        let mut tip = Tip::default();
        for e in [
            Event::Open {
                reason: "INC-1".into(),
                duration_secs: 60,
                closes_at: 1_060,
                token: None,
                signer_chain: vec![],
            },
            Event::Deliver {
                entry_id: "e".into(),
                spiffe_id: "spiffe://example.org/w".into(),
                serial: "01".into(),
                not_before: 1_000,
                not_after: 2_000,
                selectors: vec!["unix:uid:0".into()],
            },
            Event::Close {
                cause: "servers answered".into(),
            },
        ] {
            let l = write(k, &tip, e);
            tip = verify(std::slice::from_ref(&l), tip, None).unwrap().1;
            lines.push(l);
        }
        lines
    }

    /// A record verifies whole and in pieces; editing a body, dropping or reordering a line,
    /// a signature by another key and a line from another agent are each caught.
    #[test]
    fn break_glass_record_detects_tampering() {
        let k = key();
        let lines = record(&k);
        let (bodies, tip) = verify(&lines, Tip::default(), None).unwrap();
        assert_eq!(bodies.len(), 3);
        assert_eq!(tip.next_seq, 4);
        let (_, t1) = verify(&lines[..1], Tip::default(), None).unwrap();
        assert_eq!(verify(&lines[1..], t1, None).unwrap().1, tip);

        // An edited reason: the signature fails.
        let edited = lines[0].replace("INC-1", "INC-2");
        assert_ne!(edited, lines[0]);
        assert_eq!(
            verify(&[edited], Tip::default(), None).unwrap_err(),
            RecordError::Signature { line: 1 }
        );
        // A dropped line: the sequence breaks.
        assert!(matches!(
            verify(&[lines[0].clone(), lines[2].clone()], Tip::default(), None),
            Err(RecordError::Sequence { line: 2, .. })
        ));
        // A line from a record re-signed by another key after the open.
        let other = key();
        let (_, t1) = verify(&lines[..1], Tip::default(), None).unwrap();
        let forged = write(&other, &t1, Event::Close { cause: "x".into() });
        assert_eq!(
            verify(&[lines[0].clone(), forged], Tip::default(), None).unwrap_err(),
            RecordError::Key { line: 2 }
        );
        // A wholly re-written record verifies on its own, but not as another agent's.
        assert!(matches!(
            verify(
                &lines,
                Tip::default(),
                Some("spiffe://example.org/spire/agent/y")
            ),
            Err(RecordError::Agent { line: 1, .. })
        ));
        // A first line that is not an open.
        let t = Tip::default();
        let close = write(&k, &t, Event::Close { cause: "x".into() });
        assert_eq!(
            verify(&[close], t, None).unwrap_err(),
            RecordError::NotOpened { line: 1 }
        );
    }
}
