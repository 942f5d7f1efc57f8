//! Key objects in the token: labels (`kame/<server id>/<key id>`), reading a public key,
//! scanning this server's keys, generating a key pair (sensitive, never extractable), destroying
//! one, and signing with it (ECDSA, RSA PKCS#1 v1.5 and PSS).

use super::*;

impl Inner {
    pub(super) fn label(&self, id: &str) -> String {
        format!("{}{id}", self.prefix)
    }

    /// Reads a key pair's public half and type from the token.
    pub(super) fn read_public(
        &self,
        s: &Session,
        id: &str,
        private: ObjectHandle,
    ) -> Result<(KeyType, Vec<u8>)> {
        let cka_id = attr_bytes(s, private, AttributeType::Id)?;
        let found = s
            .find_objects(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::Label(self.label(id).into_bytes()),
                Attribute::Id(cka_id),
            ])
            .map_err(p11("C_FindObjects(public key)"))?;
        let public = *found
            .first()
            .ok_or_else(|| Error::Backend(format!("key {id:?} has no public key object")))?;
        let kt = s
            .get_attributes(public, &[AttributeType::KeyType])
            .map_err(p11("C_GetAttributeValue(CKA_KEY_TYPE)"))?;
        match kt.first() {
            Some(Attribute::KeyType(k)) if *k == cryptoki::object::KeyType::EC => {
                let params = attr_bytes(s, public, AttributeType::EcParams)?;
                let kt = if params == OID_P256 {
                    KeyType::EcP256
                } else if params == OID_P384 {
                    KeyType::EcP384
                } else {
                    return Err(Error::Backend(format!(
                        "key {id:?} is on an unsupported curve"
                    )));
                };
                let point = unwrap_octet_string(&attr_bytes(s, public, AttributeType::EcPoint)?);
                Ok((kt, encoding::ec_spki(kt, &point)?))
            }
            Some(Attribute::KeyType(k)) if *k == cryptoki::object::KeyType::RSA => {
                let n = attr_bytes(s, public, AttributeType::Modulus)?;
                let e = attr_bytes(s, public, AttributeType::PublicExponent)?;
                let kt = match n.iter().skip_while(|b| **b == 0).count() {
                    256 => KeyType::Rsa2048,
                    512 => KeyType::Rsa4096,
                    other => {
                        return Err(Error::Backend(format!(
                            "key {id:?} is RSA with a {}-bit modulus",
                            other * 8
                        )));
                    }
                };
                Ok((kt, encoding::rsa_spki(&n, &e)))
            }
            _ => Err(Error::Backend(format!(
                "key {id:?} is of an unsupported type"
            ))),
        }
    }

    /// Every private key of this server in the token: (key id, handle, CKA_ID).
    pub(super) fn scan(&self, s: &Session) -> Result<Vec<(String, ObjectHandle, Vec<u8>)>> {
        let handles = s
            .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
            .map_err(p11("C_FindObjects(private keys)"))?;
        let mut out = vec![];
        for h in handles {
            let label =
                String::from_utf8(attr_bytes(s, h, AttributeType::Label)?).unwrap_or_default();
            if let Some(id) = label.strip_prefix(&self.prefix) {
                out.push((id.to_string(), h, attr_bytes(s, h, AttributeType::Id)?));
            }
        }
        Ok(out)
    }

    /// Generates a key pair for `id`, its CKA_ID the intent (a UUID's 16 bytes) or random.
    pub(super) fn generate(&self, id: &str, kt: KeyType, intent: Option<&str>) -> Result<Entry> {
        let mut tag = [0u8; 16];
        match intent {
            Some(i) => {
                tag = *uuid_bytes(i)?;
            }
            None => aws_lc_rs::rand::fill(&mut tag).map_err(|_| Error::Generate(id.into()))?,
        }
        let label = self.label(id).into_bytes();
        let (mech, mut pub_t) = match kt {
            KeyType::EcP256 => (
                Mechanism::EccKeyPairGen,
                vec![Attribute::EcParams(OID_P256.to_vec())],
            ),
            KeyType::EcP384 => (
                Mechanism::EccKeyPairGen,
                vec![Attribute::EcParams(OID_P384.to_vec())],
            ),
            KeyType::Rsa2048 | KeyType::Rsa4096 => (
                Mechanism::RsaPkcsKeyPairGen,
                vec![
                    Attribute::ModulusBits(
                        if kt == KeyType::Rsa2048 {
                            2048u64
                        } else {
                            4096
                        }
                        .into(),
                    ),
                    Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                ],
            ),
        };
        pub_t.extend([
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::Label(label.clone()),
            Attribute::Id(tag.to_vec()),
        ]);
        let priv_t = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Label(label),
            Attribute::Id(tag.to_vec()),
        ];
        self.with_session(|s| {
            let (public_h, private) = s
                .generate_key_pair(&mech, &pub_t, &priv_t)
                .map_err(p11("C_GenerateKeyPair"))?;
            let read = self.read_public(s, id, private).and_then(|(got, spki)| {
                if got == kt {
                    Ok(spki)
                } else {
                    Err(Error::Generate(id.into()))
                }
            });
            let spki_der = match read {
                Ok(spki) => spki,
                Err(e) => {
                    // Nothing may stay in the token that no id names.
                    let _ = s.destroy_object(private);
                    let _ = s.destroy_object(public_h);
                    return Err(e);
                }
            };
            Ok(Entry {
                public: PublicKey {
                    id: id.to_string(),
                    key_type: kt,
                    fingerprint: fingerprint(&spki_der),
                    spki_der,
                },
                private,
                instance: hex::encode(tag),
                epoch: self.epoch(),
            })
        })
    }

    /// Destroys the key pair tagged `instance` under `id` (both halves).
    pub(super) fn destroy(&self, id: &str, instance: &str) -> Result<()> {
        let tag = hex::decode(instance)
            .map_err(|_| Error::Backend(format!("bad instance {instance:?}")))?;
        self.with_session(|s| {
            let objects = s
                .find_objects(&[
                    Attribute::Label(self.label(id).into_bytes()),
                    Attribute::Id(tag.clone()),
                ])
                .map_err(p11("C_FindObjects"))?;
            for o in objects {
                s.destroy_object(o).map_err(p11("C_DestroyObject"))?;
            }
            Ok(())
        })
    }

    pub(super) fn sign(&self, e: &Entry, message: &[u8], opts: SignOpts) -> Result<Vec<u8>> {
        let kt = e.public.key_type;
        let unsupported = || Error::UnsupportedSignOpts {
            id: e.public.id.clone(),
            key_type: kt,
            hash: opts.hash,
            pss: opts.pss,
        };
        let digest = encoding::digest(opts.hash, message);
        let (mech, data) = match kt {
            KeyType::EcP256 | KeyType::EcP384 => {
                if opts.pss || opts.hash != kt.default_hash() {
                    return Err(unsupported());
                }
                (Mechanism::Ecdsa, digest)
            }
            _ if opts.pss => {
                let (hash_alg, mgf) = match opts.hash {
                    HashAlgorithm::Sha256 => (
                        cryptoki::mechanism::MechanismType::SHA256,
                        PkcsMgfType::MGF1_SHA256,
                    ),
                    HashAlgorithm::Sha384 => (
                        cryptoki::mechanism::MechanismType::SHA384,
                        PkcsMgfType::MGF1_SHA384,
                    ),
                    HashAlgorithm::Sha512 => (
                        cryptoki::mechanism::MechanismType::SHA512,
                        PkcsMgfType::MGF1_SHA512,
                    ),
                };
                let params = PkcsPssParams {
                    hash_alg,
                    mgf,
                    s_len: (digest.len() as u64).into(),
                };
                (Mechanism::RsaPkcsPss(params), digest)
            }
            _ => (
                Mechanism::RsaPkcs,
                encoding::digest_info(opts.hash, &digest),
            ),
        };
        let id = &e.public.id;
        let sig = self.with_session_retrying(|s| {
            let handle_gone = |err: &cryptoki::error::Error| {
                matches!(
                    err,
                    cryptoki::error::Error::Pkcs11(
                        cryptoki::error::RvError::KeyHandleInvalid
                            | cryptoki::error::RvError::ObjectHandleInvalid
                            | cryptoki::error::RvError::UserNotLoggedIn,
                        _
                    )
                )
            };
            let with_id = |err: Error| match err {
                Error::Unavailable(m) => Error::Unavailable(format!("{m} (key {id:?})")),
                Error::Backend(m) => Error::Backend(format!("{m} (key {id:?})")),
                other => other,
            };
            // A handle found before the token lost its sessions may name another object now:
            // find the key again by its label and tag first.
            let epoch = self.epoch();
            let private = if e.epoch == epoch {
                e.private
            } else {
                self.login(s)?;
                let h = self.relocate(s, e)?;
                self.refresh(e, h, epoch);
                h
            };
            match s.sign(&mech, private, &data) {
                Ok(sig) => Ok(sig),
                Err(err) if handle_gone(&err) => {
                    // Logged out (private objects are invisible then) or the handle moved:
                    // log in again and find the key by its label and tag.
                    let epoch = self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    self.login(s)?;
                    let private = self.relocate(s, e)?;
                    let sig = s
                        .sign(&mech, private, &data)
                        .map_err(|err| with_id(p11("C_Sign")(err)))?;
                    self.refresh(e, private, epoch);
                    Ok(sig)
                }
                Err(err) => Err(with_id(p11("C_Sign")(err))),
            }
        })?;
        match kt {
            KeyType::EcP256 | KeyType::EcP384 => encoding::ecdsa_fixed_to_der(&sig),
            _ => Ok(sig),
        }
    }
}

/// The 16 bytes of a UUID.
pub(super) fn uuid_bytes(s: &str) -> Result<Box<[u8; 16]>> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    let v = hex::decode(&hex)
        .ok()
        .filter(|v| v.len() == 16 && s.len() == 36)
        .ok_or_else(|| Error::Backend(format!("intent {s:?} is not a UUID")))?;
    let mut out = [0u8; 16];
    out.copy_from_slice(&v);
    Ok(Box::new(out))
}

/// A UUID's text from 16 bytes.
pub(super) fn uuid_text(b: &[u8]) -> Option<String> {
    (b.len() == 16).then(|| {
        let h = hex::encode(b);
        format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    })
}

pub(super) fn attr_bytes(s: &Session, h: ObjectHandle, t: AttributeType) -> Result<Vec<u8>> {
    let attrs = s
        .get_attributes(h, &[t])
        .map_err(p11("C_GetAttributeValue"))?;
    match attrs.into_iter().next() {
        Some(Attribute::Id(b))
        | Some(Attribute::Label(b))
        | Some(Attribute::EcParams(b))
        | Some(Attribute::EcPoint(b))
        | Some(Attribute::Modulus(b))
        | Some(Attribute::PublicExponent(b)) => Ok(b),
        _ => Err(Error::Backend(format!("the token did not return {t:?}"))),
    }
}

/// CKA_EC_POINT is a DER OCTET STRING around the point (PKCS#11 2.40 §2.3.3); some tokens
/// return the bare point.
pub(super) fn unwrap_octet_string(b: &[u8]) -> Vec<u8> {
    // Only when the inner length is a P-256 or P-384 point: a bare point can look like an
    // OCTET STRING header by chance.
    match b {
        [0x04, n, rest @ ..] if *n as usize == rest.len() && matches!(rest.len(), 65 | 97) => {
            rest.to_vec()
        }
        [0x04, 0x81, n, rest @ ..] if *n as usize == rest.len() && rest.len() == 97 => {
            rest.to_vec()
        }
        _ => b.to_vec(),
    }
}
