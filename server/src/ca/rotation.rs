//! Rotation: on each tick, prepare the next authority of a kind when SPIRE's prepare time has
//! come and activate it at its activation time, with the rotation lock held only against other
//! rotations (never across another caller's signing).

use super::*;

impl Ca {
    /// One rotation step for both kinds (run at start-up and on every tick).
    pub async fn rotate(&self) -> Result<(), CaError> {
        let _g = self.rotation.lock().await;
        let now = now_ms();
        // Each kind rotates even when the other fails (an upstream that cannot sign must not
        // stop the JWT key from rotating).
        let x509 = self
            .rotate_kind(
                now,
                |st| &mut st.x509,
                |slot, status| self.prepare_x509(slot, status),
            )
            .await;
        let jwt = self
            .rotate_kind(
                now,
                |st| &mut st.jwt,
                |slot, status| self.prepare_jwt(slot, status),
            )
            .await;
        let changed = matches!(x509, Ok(true)) || matches!(jwt, Ok(true));
        if changed && self.save_journal().await {
            self.clear_saved_intents().await;
        }
        x509?;
        jwt?;
        Ok(())
    }

    /// The rotation state machine of one kind; returns whether anything changed.
    pub(super) async fn rotate_kind<T, F, Fut>(
        &self,
        now: u64,
        slots: fn(&mut State) -> &mut Slots<T>,
        prepare: F,
    ) -> Result<bool, CaError>
    where
        T: Authority,
        F: Fn(&'static str, SlotStatus) -> Fut,
        Fut: std::future::Future<Output = Result<Arc<T>, CaError>>,
    {
        let (cur, next) = {
            let mut st = self.write();
            let s = slots(&mut st);
            (s.current.clone(), s.next.clone())
        };
        let live = |a: &T| a.not_after() * 1000 > now;
        let prepared = |a: &T| a.status() == SlotStatus::Prepared;
        let Some(c) = cur.filter(|c| live(c)) else {
            let replaced = next.as_ref().filter(|n| prepared(n) && live(n)).cloned();
            let a = match replaced {
                // The server was down past the activation point: the prepared authority
                // (already in the bundle) takes over.
                Some(n) => Arc::new(n.with_status(SlotStatus::Active)),
                None => {
                    let slot = next.as_ref().map(|n| other_slot(n.slot())).unwrap_or("A");
                    prepare(slot, SlotStatus::Active).await?
                }
            };
            info!(kind = T::KIND, authority_id = %a.authority_id(), slot = %a.slot(), "authority activated");
            let id = a.authority_id().to_string();
            {
                let mut st = self.write();
                let s = slots(&mut st);
                s.current = Some(a);
                if let Some(n) = s.next.take()
                    && n.status() == SlotStatus::Old
                {
                    s.remember(n);
                }
            }
            self.log_authority_change("activate", T::KIND, &id);
            return Ok(true);
        };
        let mut changed = false;
        let mut next = next;
        if next.as_ref().is_none_or(|n| n.status() == SlotStatus::Old) && c.should_prepare_next(now)
        {
            let a = prepare(other_slot(c.slot()), SlotStatus::Prepared).await?;
            info!(kind = T::KIND, authority_id = %a.authority_id(), slot = %a.slot(), "authority prepared");
            slots(&mut self.write()).install_next(a.clone());
            next = Some(a);
            changed = true;
        }
        if let Some(n) = next.filter(|n| prepared(n))
            && c.should_activate_next(now)
        {
            {
                let mut st = self.write();
                let s = slots(&mut st);
                s.current = Some(Arc::new(n.with_status(SlotStatus::Active)));
                s.next = Some(Arc::new(c.with_status(SlotStatus::Old)));
            }
            info!(kind = T::KIND, authority_id = %n.authority_id(), slot = %n.slot(), "authority activated");
            self.log_authority_change("activate", T::KIND, n.authority_id());
            changed = true;
        }
        Ok(changed)
    }

    pub(super) async fn prepare_x509(
        &self,
        slot: &str,
        status: SlotStatus,
    ) -> Result<Arc<X509Authority>, CaError> {
        let key = self
            .new_key(&x509_key_id(slot), self.settings.ca_key_type)
            .await?;
        let issued_at_ms = now_ms();
        let now = issued_at_ms / 1000;
        // The configured ca_subject, as SPIRE names its X.509 authorities.
        let subject = x509svid::parse_name(&self.settings.ca_subject_dn)?;
        let (cert_der, upstream_chain, roots) = match &self.settings.upstream {
            None => {
                let cert_der = self.self_signed_ca(&key, &subject, now).await?;
                (cert_der.clone(), vec![], vec![cert_der])
            }
            Some(up) => self.upstream_signed_ca(up.as_ref(), &key, &subject).await?,
        };
        let parsed = x509svid::ParsedCert::parse(&cert_der)?;
        // Signed by an upstream when it is not itself one of the roots. Its upstream
        // authority ID is its AKID, or (without one) the SKID of the certificate that issued
        // it: the next in the chain, else the root it verifies under.
        let upstream_signed = !roots.contains(&cert_der);
        let upstream_authority_id = if !upstream_signed {
            String::new()
        } else if let Some(aki) = parsed.authority_key_id()? {
            hex::encode(aki)
        } else {
            let mut chain = vec![cert_der.clone()];
            chain.extend(upstream_chain.iter().cloned());
            let issuer_der = match upstream_chain.first() {
                Some(c) => Some(c.clone()),
                None => x509svid::verify_ca_chain(&chain, &roots, now, 0)
                    .ok()
                    .and_then(|i| roots.get(i).cloned()),
            };
            issuer_der
                .and_then(|d| IssuerInfo::from_cert_der(&d).ok())
                .map(|i| hex::encode(i.key_id))
                .unwrap_or_default()
        };
        let not_after = parsed.not_after();
        let issuer = IssuerInfo::from_cert_der(&cert_der)?;
        // Logged before it is published: a CA the log cannot record does not go out.
        self.log_event(
            kame_api::ct::EntryType::Authority,
            serde_json::json!({
                "event": "prepare",
                "kind": "X.509",
                "authority_id": hex::encode(&issuer.key_id),
                "trust_domain": self.settings.trust_domain.as_str(),
                "certificate": STANDARD.encode(&cert_der),
                "upstream_authority_id": upstream_authority_id,
                "not_after": not_after,
            }),
            true,
        )
        .await?;
        let bundle = self
            .ds
            .append_bundle(&Bundle {
                trust_domain: self.settings.trust_domain.as_str().to_string(),
                x509_authorities: roots
                    .into_iter()
                    .map(|asn1| X509Certificate {
                        asn1,
                        tainted: false,
                    })
                    .collect(),
                ..Default::default()
            })
            .await?;
        *self.bundle.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(bundle);
        Ok(Arc::new(X509Authority {
            slot: slot.to_string(),
            status,
            authority_id: hex::encode(&issuer.key_id),
            key,
            cert_der,
            issuer,
            issued_at_ms,
            not_after,
            upstream_chain,
            upstream_authority_id,
            upstream_signed,
        }))
    }

    /// A self-signed CA certificate for `key` (no upstream authority).
    async fn self_signed_ca(
        &self,
        key: &PublicKey,
        subject: &x509_cert::name::Name,
        now: u64,
    ) -> Result<Vec<u8>, CaError> {
        let not_after = now + self.settings.ca_ttl.as_secs().max(1);
        let serial = random_serial()?;
        let tbs = x509svid::ca_tbs(
            &x509svid::CaParams {
                trust_domain: &self.settings.trust_domain,
                subject,
                spki_der: &key.spki_der,
                serial: &serial,
                not_before: now.saturating_sub(x509svid::BACKDATE.as_secs()),
                not_after,
            },
            None,
        )?;
        let info = KeyInfo::from_spki_der(&key.spki_der)?;
        let sig = sign_checked(
            self.km.as_ref(),
            key,
            &tbs,
            SignOpts::for_key(self.settings.ca_key_type),
        )
        .await?;
        let cert_der = x509svid::assemble(&tbs, &info.x509_signature_algorithm(), &sig)?;
        // Self-check: the new certificate verifies with its own key before anyone trusts it.
        x509svid::ParsedCert::parse(&cert_der)?.check_signed_by(&key.spki_der)?;
        Ok(cert_der)
    }

    /// The CA certificate for `key` as `up` signs it from a CSR (SPIRE's: the ca_subject and
    /// the trust domain ID, signed by `key` through the KeyManager), checked before it is
    /// used: the CA certificate, the chain after it, and the upstream roots.
    async fn upstream_signed_ca(
        &self,
        up: &dyn kame_upstream::UpstreamAuthority,
        key: &PublicKey,
        subject: &x509_cert::name::Name,
    ) -> Result<(Vec<u8>, Vec<Vec<u8>>, Vec<Vec<u8>>), CaError> {
        use der::Encode;
        let subject_der = subject
            .to_der()
            .map_err(|e| CaError::Profile(kame_api::Error::BadName(e.to_string())))?;
        let info = kame_api::csr::request_info_for(
            &subject_der,
            &key.spki_der,
            &[self.settings.trust_domain.id_string()],
            &[],
        )?;
        let sig = sign_checked(
            self.km.as_ref(),
            key,
            &info,
            SignOpts::for_key(self.settings.ca_key_type),
        )
        .await?;
        let alg = KeyInfo::from_spki_der(&key.spki_der)?.x509_signature_algorithm();
        let csr = x509svid::assemble(&info, &alg, &sig)?;
        let (minted, _updates) = up.mint_x509_ca(&csr, self.settings.ca_ttl).await?;
        self.check_upstream_ca(key, &minted.chain, &minted.upstream_roots)
            .await?;
        let mut chain = minted.chain;
        let cert_der = chain.remove(0);
        Ok((cert_der, chain, minted.upstream_roots))
    }

    /// SPIRE's checks of an upstream-signed CA: the chain and roots are present, the CA is
    /// ours (our key), a CA (cA, keyCertSign, only CA key usages), for this trust domain (no
    /// URI SAN, or the trust domain ID), valid now, and a throwaway leaf it signs verifies
    /// through the chain to the upstream roots.
    pub(super) async fn check_upstream_ca(
        &self,
        key: &PublicKey,
        chain: &[Vec<u8>],
        roots: &[Vec<u8>],
    ) -> Result<(), CaError> {
        let bad = |m: String| CaError::BadUpstreamCa(m);
        let first = chain
            .first()
            .ok_or_else(|| bad("plugin response missing X.509 CA chain".into()))?;
        if roots.is_empty() {
            return Err(bad("plugin response missing upstream X.509 roots".into()));
        }
        for (i, r) in roots.iter().enumerate() {
            x509svid::ParsedCert::parse(r)
                .map_err(|e| bad(format!("upstream X.509 root {i} is malformed: {e}")))?;
        }
        let ca = x509svid::ParsedCert::parse(first)
            .map_err(|e| bad(format!("malformed X.509 CA: {e}")))?;
        let ca_key = ca
            .spki_der()
            .and_then(|s| KeyInfo::from_spki_der(&s))
            .map_err(|e| bad(format!("X.509 CA key: {e}")))?;
        if ca_key != KeyInfo::from_spki_der(&key.spki_der)? {
            return Err(bad(
                "the X.509 CA does not hold the key this server asked to certify".into(),
            ));
        }
        x509svid::check_signing_cert(&ca).map_err(|e| bad(format!("invalid X509 CA: {e}")))?;
        if let Some((_, ku)) = ca.key_usage()? {
            let extra = ku.0.bits()
                & !(x509_cert::ext::pkix::KeyUsages::KeyCertSign
                    | x509_cert::ext::pkix::KeyUsages::CRLSign
                    | x509_cert::ext::pkix::KeyUsages::DigitalSignature)
                    .bits();
            if extra != 0 {
                return Err(bad(
                    "invalid X509 CA: only keyCertSign, cRLSign, or digitalSignature key usage can be set"
                        .into(),
                ));
            }
        }
        if let Some((_, uris, _)) = ca.sans()? {
            let want = self.settings.trust_domain.id_string();
            if !uris.is_empty() && uris != [want.clone()] {
                return Err(bad(format!(
                    "invalid X509 CA: expected URI SAN {want:?} but got {uris:?}"
                )));
            }
        }
        // A throwaway leaf signed by the new CA key must verify through the chain.
        let now = now_secs();
        let issuer = IssuerInfo::from_cert_der(first)?;
        let throwaway = SpiffeId::parse(&format!(
            "{}/spire/throwaway",
            self.settings.trust_domain.id_string()
        ))
        .map_err(|e| bad(e.to_string()))?;
        let leaf_spki = {
            use aws_lc_rs::encoding::AsDer;
            use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
            EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
                .ok()
                .and_then(|k| k.public_key().as_der().ok().map(|d| d.as_ref().to_vec()))
                .ok_or(CaError::Random)?
        };
        let tbs = x509svid::leaf_tbs(
            &x509svid::LeafParams {
                id: &throwaway,
                dns_names: &[],
                spki_der: &leaf_spki,
                serial: &[1],
                not_before: ca.not_before(),
                not_after: ca.not_after(),
            },
            &issuer,
        )?;
        let sig = sign_checked(
            self.km.as_ref(),
            key,
            &tbs,
            SignOpts::for_key(self.settings.ca_key_type),
        )
        .await?;
        let leaf = x509svid::assemble_der(&tbs, &issuer.signature_algorithm_der, &sig)?;
        let mut full = vec![leaf];
        full.extend(chain.iter().cloned());
        x509svid::verify_chain(&full, roots, now)
            .map_err(|e| bad(format!("X509 CA produced an invalid X509-SVID chain: {e}")))?;
        // kms_rooted puts one more CA below it: the upstream's path length must allow it.
        if let SigningMode::KmsRooted { .. } = self.settings.signing_mode {
            x509svid::verify_ca_chain(chain, roots, now, 1).map_err(|e| {
                bad(format!(
                    "X509 CA cannot certify the kms_rooted intermediate: {e}"
                ))
            })?;
        }
        Ok(())
    }

    pub(super) async fn prepare_jwt(
        &self,
        slot: &str,
        status: SlotStatus,
    ) -> Result<Arc<JwtAuthority>, CaError> {
        let key = self
            .new_key(&jwt_key_id(slot), self.settings.jwt_key_type)
            .await?;
        let key_info = KeyInfo::from_spki_der(&key.spki_der)?;
        let issued_at_ms = now_ms();
        let not_after = issued_at_ms / 1000 + self.settings.ca_ttl.as_secs().max(1);
        let kid = random_kid()?;
        self.log_event(
            kame_api::ct::EntryType::Authority,
            serde_json::json!({
                "event": "prepare",
                "kind": "JWT",
                "authority_id": kid,
                "trust_domain": self.settings.trust_domain.as_str(),
                "public_key": STANDARD.encode(&key.spki_der),
                "not_after": not_after,
            }),
            true,
        )
        .await?;
        // Into the local bundle, and up the topology when the upstream takes JWT keys.
        self.publish_jwt_key(
            JwtKey {
                public_key: key.spki_der.clone(),
                key_id: kid.clone(),
                expires_at: not_after as i64,
                tainted: false,
            },
            false,
        )
        .await?;
        Ok(Arc::new(JwtAuthority {
            slot: slot.to_string(),
            status,
            key,
            key_info,
            kid,
            issued_at_ms,
            not_after,
        }))
    }

    /// How often the rotator should tick for this CA TTL (10 s, faster for short TTLs).
    pub fn tick_interval(&self) -> Duration {
        (self.settings.ca_ttl / 24).clamp(Duration::from_millis(100), Duration::from_secs(10))
    }
}

/// Newest ACTIVE becomes current; the newest other entry in the other slot becomes next. With no
/// ACTIVE entry, a PREPARED one is kept as next for the rotator to activate; otherwise the
/// rotator prepares and activates a new authority.
pub(super) fn pick_slots<T: Authority>(mut all: Vec<Arc<T>>) -> Slots<T> {
    all.sort_by_key(|a| std::cmp::Reverse(a.issued_at_ms()));
    let current = all
        .iter()
        .find(|a| a.status() == SlotStatus::Active)
        .cloned();
    match current {
        Some(c) => {
            let next = all
                .iter()
                .find(|a| a.slot() != c.slot() && a.status() != SlotStatus::Active)
                .cloned();
            let older = all
                .iter()
                .filter(|a| a.status() == SlotStatus::Old)
                .filter(|a| {
                    next.as_ref()
                        .is_none_or(|n| n.authority_id() != a.authority_id())
                })
                .take(MAX_OLDER)
                .cloned()
                .collect();
            Slots {
                current: Some(c),
                next,
                older,
            }
        }
        None => Slots {
            // The active authority expired while the server was down: a prepared one (already
            // published) is kept as next, and the rotator activates it.
            current: None,
            next: all
                .iter()
                .find(|a| a.status() == SlotStatus::Prepared)
                .cloned(),
            older: all
                .iter()
                .filter(|a| a.status() == SlotStatus::Old)
                .take(MAX_OLDER)
                .cloned()
                .collect(),
        },
    }
}
