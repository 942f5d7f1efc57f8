//! Minting: X509-SVIDs signed by the active X.509 authority (directly, or through an in-memory
//! intermediate it certifies in `kms_rooted` mode; with an upstream authority the chain goes on
//! with the CA and the upstream's chain) and JWT-SVIDs signed by the active JWT key.
//! Every signature goes through the KeyManager.

use super::*;

impl Ca {
    /// Mints an X509-SVID for `spki_der` with the given identity. `ttl` is capped at the CA's
    /// notAfter. Returns the chain, leaf first.
    pub async fn sign_x509_svid(
        &self,
        spki_der: &[u8],
        id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<Vec<Vec<u8>>, CaError> {
        if ttl.is_zero() {
            return Err(CaError::InvalidTtl("TTL must be positive".into()));
        }
        let now = now_secs();
        self.sign_leaf(
            spki_der,
            id,
            dns_names,
            now.saturating_sub(x509svid::BACKDATE.as_secs()),
            now.saturating_add(ttl.as_secs().max(1)),
            &[],
        )
        .await
    }

    /// Mints a reserve X509-SVID (break-glass): valid from `not_before` to `not_after` (capped
    /// at the CA's notAfter), both possibly in the future, with the break-glass certificate
    /// policy. The caller checks the agent's authorization and the window.
    pub async fn sign_reserve_x509_svid(
        &self,
        spki_der: &[u8],
        id: &SpiffeId,
        dns_names: &[String],
        not_before: u64,
        not_after: u64,
    ) -> Result<Vec<Vec<u8>>, CaError> {
        let policy = x509svid::break_glass_policy_ext()?;
        self.sign_leaf(spki_der, id, dns_names, not_before, not_after, &[policy])
            .await
    }

    /// Signs a leaf for a SPIFFE ID of the trust domain with the active X.509 authority,
    /// `extra` extensions (DER) after the profile's (and before the SCT list).
    async fn sign_leaf(
        &self,
        spki_der: &[u8],
        id: &SpiffeId,
        dns_names: &[String],
        not_before: u64,
        not_after: u64,
        extra: &[Vec<u8>],
    ) -> Result<Vec<Vec<u8>>, CaError> {
        if !id.is_member_of(&self.settings.trust_domain) {
            return Err(CaError::Profile(kame_api::Error::BadSvid(format!(
                "{id} is not in trust domain {}",
                self.settings.trust_domain
            ))));
        }
        let ca = self.current_x509().ok_or(CaError::NotReady("X.509"))?;
        let serial = random_serial()?;
        let params = x509svid::LeafParams {
            id,
            dns_names,
            spki_der,
            serial: &serial,
            not_before,
            not_after,
        };
        if let SigningMode::KmsRooted { intermediate_ttl } = self.settings.signing_mode {
            let inter = self.intermediate(&ca, intermediate_ttl).await?;
            let tbs = self
                .logged_leaf_tbs(&params, &inter.issuer, &inter.key.spki_der, extra)
                .await?;
            let sig = sign_checked(
                &inter.km,
                &inter.key,
                &tbs,
                SignOpts::for_key(inter.key.key_type),
            )
            .await?;
            let mut chain = vec![
                x509svid::assemble_der(&tbs, &inter.issuer.signature_algorithm_der, &sig)?,
                inter.cert_der.clone(),
            ];
            chain.extend(ca.chain_tail());
            self.metrics.svid_issued(crate::metrics::SvidKind::X509);
            return Ok(chain);
        }
        let tbs = self
            .logged_leaf_tbs(&params, &ca.issuer, &ca.key.spki_der, extra)
            .await?;
        let sig = sign_checked(
            self.km.as_ref(),
            &ca.key,
            &tbs,
            SignOpts::for_key(ca.key.key_type),
        )
        .await?;
        let mut chain = vec![x509svid::assemble_der(
            &tbs,
            &ca.issuer.signature_algorithm_der,
            &sig,
        )?];
        chain.extend(ca.chain_tail());
        self.metrics.svid_issued(crate::metrics::SvidKind::X509);
        Ok(chain)
    }

    /// The TBSCertificate of an X509-SVID. With a transparency log: the TBS without an SCT is
    /// recorded there as a precertificate entry, and the TBS returned carries the log's SCT
    /// (the SCT list extension, last). When the log cannot record, issuance fails if the log
    /// is `required`, else the SVID goes without an SCT and the failure is logged.
    async fn logged_leaf_tbs(
        &self,
        params: &x509svid::LeafParams<'_>,
        issuer: &x509svid::IssuerInfo,
        issuer_spki_der: &[u8],
        extra: &[Vec<u8>],
    ) -> Result<Vec<u8>, CaError> {
        let precert = x509svid::leaf_tbs_with(params, issuer, extra)?;
        let Some(log) = &self.settings.transparency else {
            return Ok(precert);
        };
        let entry = kame_api::ct::Entry::Precert {
            issuer_key_hash: kame_api::ct::key_hash(issuer_spki_der),
            tbs: precert,
        };
        match log.record(&entry, vec![]).await {
            Ok((_, sct)) => {
                let value = kame_api::ct::sct_list_extension_value(&[sct])
                    .map_err(crate::transparency::LogError::from)?;
                let mut exts = extra.to_vec();
                exts.push(x509svid::raw_ext_der(
                    kame_api::ct::SCT_LIST_OID,
                    false,
                    &value,
                )?);
                Ok(x509svid::leaf_tbs_with(params, issuer, &exts)?)
            }
            Err(e) if log.settings().required => Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, "transparency log cannot record; SVID issued without an SCT");
                match entry {
                    kame_api::ct::Entry::Precert { tbs, .. } => Ok(tbs),
                    _ => Ok(x509svid::leaf_tbs_with(params, issuer, extra)?),
                }
            }
        }
    }

    /// The signing input of a JWT-SVID. With a transparency log: the input is recorded there
    /// and the log's SCT added as the last claim ([`kame_api::ct::jwt_input_with_scts`]);
    /// when the log cannot record, as for X509-SVIDs.
    async fn logged_jwt_input(&self, input: String) -> Result<String, CaError> {
        let Some(log) = &self.settings.transparency else {
            return Ok(input);
        };
        match log.record(&kame_api::ct::jwt_entry(&input), vec![]).await {
            // The input is ours: failing to add the claim is a bug, not the log's trouble.
            Ok((_, sct)) => kame_api::ct::jwt_input_with_scts(&input, &[sct])
                .map_err(|e| CaError::Internal(format!("adding the SCT claim: {e}"))),
            Err(e) if log.settings().required => Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, "transparency log cannot record; JWT-SVID issued without an SCT");
                Ok(input)
            }
        }
    }

    /// Records an event (`kind`: an authority change or an attestation) in the transparency
    /// log, when there is one. With `fail_closed` and a `required` log, a failure to record is
    /// returned (the caller must not go on); else it is logged and the caller goes on.
    pub async fn log_event(
        &self,
        kind: kame_api::ct::EntryType,
        body: serde_json::Value,
        fail_closed: bool,
    ) -> Result<(), CaError> {
        let Some(log) = &self.settings.transparency else {
            return Ok(());
        };
        match log.record_event(kind, &body).await {
            Ok(_) => Ok(()),
            Err(e) if fail_closed && log.settings().required => Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, event = %body, "transparency log cannot record an event");
                Ok(())
            }
        }
    }

    /// Records an authority change (`event`: activate, taint, revoke) best-effort, in a task
    /// of its own: the change (and the rotation lock) never waits for the log.
    pub(super) fn log_authority_change(&self, event: &str, kind: &str, id: &str) {
        let Some(log) = self.settings.transparency.clone() else {
            return;
        };
        let body = serde_json::json!({
            "event": event,
            "kind": kind,
            "authority_id": id,
            "trust_domain": self.settings.trust_domain.as_str(),
        });
        tokio::spawn(async move {
            if let Err(e) = log
                .record_event(kame_api::ct::EntryType::Authority, &body)
                .await
            {
                tracing::warn!(error = %e, event = %body, "transparency log cannot record an event");
            }
        });
    }

    /// The `kms_rooted` intermediate under the current authority: the cached one while it has
    /// more than half of its lifetime left and the authority is the same, else a new one (a
    /// P-256 key made in memory, certified by one signature of the authority key). While one
    /// is being made, or when making one fails, the cached one serves as long as it is valid
    /// for another minute: the backend's trouble does not stop issuance before it must.
    pub(super) async fn intermediate(
        &self,
        ca: &X509Authority,
        ttl: Duration,
    ) -> Result<Arc<Intermediate>, CaError> {
        let cached = || {
            self.intermediate
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .filter(|i| i.parent == ca.authority_id)
        };
        let fresh = |i: &Arc<Intermediate>| {
            let half = i.not_after.saturating_sub(i.issued_at) / 2;
            now_secs() + half < i.not_after
        };
        let usable = |i: &Arc<Intermediate>| now_secs() + 60 < i.not_after;
        if let Some(i) = cached().filter(fresh) {
            return Ok(i);
        }
        let _g = match self.minting.try_lock() {
            Ok(g) => g,
            Err(_) => {
                if let Some(i) = cached().filter(usable) {
                    return Ok(i);
                }
                self.minting.lock().await
            }
        };
        if let Some(i) = cached().filter(fresh) {
            return Ok(i);
        }
        match self.mint_intermediate(ca, ttl).await {
            Ok(i) => Ok(i),
            Err(e) => match cached().filter(usable) {
                Some(i) => {
                    warn!(error = %e, "cannot make a new kms_rooted intermediate; the current one serves");
                    Ok(i)
                }
                None => Err(e),
            },
        }
    }

    /// A CA certificate for `spki_der` (this trust domain's ID as URI SAN) signed by `ca`'s
    /// key through the KeyManager, from `now` (backdated) to `not_after`, checked against
    /// that key before it is returned.
    pub(super) async fn certify_ca(
        &self,
        ca: &X509Authority,
        subject: &x509_cert::name::Name,
        spki_der: &[u8],
        now: u64,
        not_after: u64,
    ) -> Result<Vec<u8>, CaError> {
        let serial = random_serial()?;
        let tbs = x509svid::ca_tbs(
            &x509svid::CaParams {
                trust_domain: &self.settings.trust_domain,
                subject,
                spki_der,
                serial: &serial,
                not_before: now.saturating_sub(x509svid::BACKDATE.as_secs()),
                not_after,
            },
            Some(&ca.issuer),
        )?;
        let sig = sign_checked(
            self.km.as_ref(),
            &ca.key,
            &tbs,
            SignOpts::for_key(ca.key.key_type),
        )
        .await?;
        let cert_der = x509svid::assemble_der(&tbs, &ca.issuer.signature_algorithm_der, &sig)?;
        x509svid::ParsedCert::parse(&cert_der)?.check_signed_by(&ca.key.spki_der)?;
        Ok(cert_der)
    }

    pub(super) async fn mint_intermediate(
        &self,
        ca: &X509Authority,
        ttl: Duration,
    ) -> Result<Arc<Intermediate>, CaError> {
        let km = kame_keymanager::memory::MemoryKeyManager::new();
        let key = km
            .generate_key("kms-rooted-intermediate", KeyType::EcP256)
            .await?;
        let now = now_secs();
        let not_after = now.saturating_add(ttl.as_secs().max(1)).min(ca.not_after);
        // A subject of its own: an intermediate named like its issuer is self-issued to a
        // path builder.
        let subject = x509svid::parse_name(&format!(
            "{}, OU=kms_rooted intermediate",
            self.settings.ca_subject_dn
        ))?;
        let cert_der = self
            .certify_ca(ca, &subject, &key.spki_der, now, not_after)
            .await?;
        let issuer = IssuerInfo::from_cert_der(&cert_der)?;
        let inter = Arc::new(Intermediate {
            parent: ca.authority_id.clone(),
            km,
            key,
            cert_der,
            issuer,
            issued_at: now,
            not_after,
        });
        info!(parent = %ca.authority_id, not_after, "new kms_rooted intermediate");
        *self.intermediate.write().unwrap_or_else(|p| p.into_inner()) = Some(inter.clone());
        Ok(inter)
    }

    /// Mints a JWT-SVID. Returns (token, issued_at, expires_at); expiry is capped at the key's.
    pub async fn sign_jwt_svid(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
    ) -> Result<(String, u64, u64), CaError> {
        if !id.is_member_of(&self.settings.trust_domain) {
            return Err(CaError::Profile(kame_api::Error::BadSvid(format!(
                "{id} is not in trust domain {}",
                self.settings.trust_domain
            ))));
        }
        if ttl.is_zero() {
            return Err(CaError::InvalidTtl("TTL must be positive".into()));
        }
        let key = self.current_jwt().ok_or(CaError::NotReady("JWT"))?;
        let iat = now_secs();
        let exp = iat.saturating_add(ttl.as_secs().max(1)).min(key.not_after);
        let input = jwtsvid::signing_input(
            &key.key_info,
            &key.kid,
            &jwtsvid::Claims {
                sub: id,
                aud: audience,
                exp,
                iat,
                iss: self.settings.jwt_issuer.as_deref(),
            },
        )?;
        let input = self.logged_jwt_input(input).await?;
        let sig = sign_checked(
            self.km.as_ref(),
            &key.key,
            input.as_bytes(),
            SignOpts::for_key(key.key.key_type),
        )
        .await?;
        let token = jwtsvid::assemble(&key.key_info, &input, &sig)?;
        self.metrics.svid_issued(crate::metrics::SvidKind::Jwt);
        Ok((token, iat, exp))
    }
}
