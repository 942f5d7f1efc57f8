//! The CA journal: this server's authorities (slots, statuses, key ids) saved in the datastore
//! under its server id and loaded at start, and the clean-up of keys a failed preparation left
//! behind. It never holds a private key: the journal names keys, the KeyManager holds them.

use super::*;

impl Ca {
    pub(super) async fn load_journal(&self) -> Result<(), CaError> {
        let Some(data) = self.ds.fetch_ca_journal(&self.settings.server_id).await? else {
            return Ok(());
        };
        let journal: Journal = serde_json::from_slice(&data).map_err(CaError::Journal)?;
        let bundle = self.bundle();
        let now = now_secs();
        let mut x509: Vec<Arc<X509Authority>> = vec![];
        for e in journal.x509 {
            let Ok(cert_der) = STANDARD.decode(&e.cert) else {
                continue;
            };
            let upstream_chain: Vec<Vec<u8>> = e
                .upstream_chain
                .iter()
                .filter_map(|c| STANDARD.decode(c).ok())
                .collect();
            // A self-signed authority is in the bundle; an upstream-signed one chains to a
            // root in it.
            let in_bundle = if !e.upstream_signed {
                bundle.x509_authorities.iter().any(|c| c.asn1 == cert_der)
            } else {
                let roots: Vec<Vec<u8>> = bundle
                    .x509_authorities
                    .iter()
                    .map(|c| c.asn1.clone())
                    .collect();
                let mut chain = vec![cert_der.clone()];
                chain.extend(upstream_chain.iter().cloned());
                x509svid::verify_ca_chain(&chain, &roots, now, 0).is_ok()
            };
            if e.not_after <= now || !in_bundle {
                // Expired, or revoked while this server was down: its key serves nothing.
                self.dispose_unused(&x509_key_id(&e.slot), &e.key_fingerprint)
                    .await;
                continue;
            }
            let Ok(p) = x509svid::ParsedCert::parse(&cert_der) else {
                continue;
            };
            let key = match self
                .km
                .select(&x509_key_id(&e.slot), &e.key_fingerprint)
                .await
            {
                Ok(Some(key)) => key,
                // An OLD authority signs nothing: its key may be gone (its slot was prepared
                // again); it is remembered so that it can still be tainted and revoked.
                _ if e.status == SlotStatus::Old => match p.spki_der() {
                    Ok(spki_der) => {
                        released_key(&x509_key_id(&e.slot), spki_der, e.key_fingerprint.clone())
                    }
                    Err(_) => continue,
                },
                _ => continue,
            };
            if p.spki_der().ok().as_deref() != Some(key.spki_der.as_slice()) {
                continue;
            }
            let issuer = IssuerInfo::from_cert_der(&cert_der)?;
            x509.push(Arc::new(X509Authority {
                authority_id: hex::encode(&issuer.key_id),
                slot: e.slot,
                status: e.status,
                key,
                cert_der,
                issuer,
                issued_at_ms: e.issued_at_ms,
                not_after: e.not_after,
                upstream_chain,
                upstream_authority_id: e.upstream_authority_id,
                upstream_signed: e.upstream_signed,
            }));
        }
        let mut jwt: Vec<Arc<JwtAuthority>> = vec![];
        for e in journal.jwt {
            if e.not_after <= now || !bundle.jwt_authorities.iter().any(|k| k.key_id == e.kid) {
                self.dispose_unused(&jwt_key_id(&e.slot), &e.key_fingerprint)
                    .await;
                continue;
            }
            let key = match self
                .km
                .select(&jwt_key_id(&e.slot), &e.key_fingerprint)
                .await
            {
                Ok(Some(key)) => key,
                _ if e.status == SlotStatus::Old => match STANDARD.decode(&e.public_key) {
                    Ok(spki_der) => {
                        released_key(&jwt_key_id(&e.slot), spki_der, e.key_fingerprint.clone())
                    }
                    Err(_) => continue,
                },
                _ => continue,
            };
            let key_info = KeyInfo::from_spki_der(&key.spki_der)?;
            jwt.push(Arc::new(JwtAuthority {
                slot: e.slot,
                status: e.status,
                key,
                key_info,
                kid: e.kid,
                issued_at_ms: e.issued_at_ms,
                not_after: e.not_after,
            }));
        }
        let mut st = self.write();
        st.x509 = pick_slots(x509);
        st.jwt = pick_slots(jwt);
        if let Some(c) = &st.x509.current {
            info!(authority_id = %c.authority_id, slot = %c.slot, "loaded X.509 authority from journal");
        }
        Ok(())
    }

    /// Disposes of the key instance an unloadable journal entry names (the fingerprint check
    /// leaves a newer key under the same id alone). Failures are logged; the slot's next
    /// preparation replaces the key anyway.
    pub(super) async fn dispose_unused(&self, key_id: &str, fingerprint: &str) {
        match self.km.delete_key(key_id, fingerprint).await {
            Ok(true) => {
                info!(
                    key_id,
                    "disposed of the key of an expired or revoked authority"
                );
                self.refresh_key_gauge().await;
            }
            Ok(false) => {}
            Err(e) => {
                warn!(key_id, error = %e, "cannot dispose of an expired or revoked authority's key")
            }
        }
    }

    pub(super) async fn save_journal(&self) -> bool {
        let journal = {
            let st = self.read();
            let mut j = Journal::default();
            for a in st.x509.all() {
                j.x509.push(JournalX509 {
                    slot: a.slot.clone(),
                    status: a.status,
                    cert: STANDARD.encode(&a.cert_der),
                    key_fingerprint: a.key.fingerprint.clone(),
                    issued_at_ms: a.issued_at_ms,
                    not_after: a.not_after,
                    upstream_chain: a
                        .upstream_chain
                        .iter()
                        .map(|c| STANDARD.encode(c))
                        .collect(),
                    upstream_authority_id: a.upstream_authority_id.clone(),
                    upstream_signed: a.upstream_signed,
                });
            }
            for a in st.jwt.all() {
                j.jwt.push(JournalJwt {
                    slot: a.slot.clone(),
                    status: a.status,
                    kid: a.kid.clone(),
                    public_key: STANDARD.encode(&a.key.spki_der),
                    key_fingerprint: a.key.fingerprint.clone(),
                    issued_at_ms: a.issued_at_ms,
                    not_after: a.not_after,
                });
            }
            j.x509.truncate(JOURNAL_MAX_PER_KIND);
            j.jwt.truncate(JOURNAL_MAX_PER_KIND);
            j
        };
        match serde_json::to_vec(&journal) {
            Ok(data) => {
                if let Err(e) = self
                    .ds
                    .set_ca_journal(&self.settings.server_id, &data)
                    .await
                {
                    // In-memory state stays authoritative; the next save retries.
                    warn!(error = %e, "failed to save CA journal");
                    return false;
                }
                true
            }
            Err(e) => {
                warn!(error = %e, "failed to encode CA journal");
                false
            }
        }
    }

    /// The journal now names the keys made since it was last saved: their intents are done.
    pub(super) async fn clear_saved_intents(&self) {
        let done: Vec<String> = std::mem::take(
            &mut *self
                .unsaved_intents
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for i in done {
            if let Err(e) = self.ds.delete_key_intent(&i).await {
                warn!(intent = %i, error = %e, "could not clear a key intent");
            }
        }
    }
}
