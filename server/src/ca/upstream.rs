//! The CA and its upstream beyond minting: downstream CAs signed for nested servers, JWT keys
//! published up the topology, and the upstream's view of this trust domain's bundle kept in
//! the local bundle (SPIRE's bundle updater): new roots and keys appended, taints applied
//! after a forced rotation away from a tainted root, and tainted authorities the upstream no
//! longer lists removed. It never writes the bundle of another trust domain.

use super::*;
use kame_upstream::{LocalBundle, UpstreamError};

/// Most unexpired JWT keys the bundle may hold before downstream publications are refused.
pub const MAX_JWT_KEYS: usize = 1000;

/// How long after it expires a JWT key stays in the bundle (tokens it signed are past their
/// expiry by then, give or take clock skew).
pub const JWT_PRUNE_AFTER: Duration = Duration::from_secs(3600);

/// What an upstream update changes in the local bundle.
#[derive(Debug, Default, PartialEq)]
pub struct UpstreamDiff {
    /// Upstream roots (DER) the local bundle lacks, with the upstream's taint flag.
    pub new_roots: Vec<X509Certificate>,
    /// Roots the upstream tainted that are untainted here.
    pub tainted_roots: Vec<Vec<u8>>,
    /// Roots tainted here that the upstream no longer lists (revoked upstream).
    pub revoked_roots: Vec<Vec<u8>>,
    /// JWT keys the local bundle lacks (by key ID).
    pub new_keys: Vec<JwtKey>,
    /// Key IDs the upstream tainted that are untainted here.
    pub tainted_keys: Vec<String>,
    /// Key IDs tainted here that the upstream no longer lists.
    pub revoked_keys: Vec<String>,
}

impl UpstreamDiff {
    pub fn of(local: &Bundle, up: &LocalBundle) -> UpstreamDiff {
        let mut d = UpstreamDiff::default();
        for r in &up.x509_roots {
            match local.x509_authorities.iter().find(|c| c.asn1 == r.asn1) {
                None => d.new_roots.push(r.clone()),
                Some(c) if r.tainted && !c.tainted => d.tainted_roots.push(r.asn1.clone()),
                Some(_) => {}
            }
        }
        for c in local.x509_authorities.iter().filter(|c| c.tainted) {
            if !up.x509_roots.iter().any(|r| r.asn1 == c.asn1) {
                d.revoked_roots.push(c.asn1.clone());
            }
        }
        for k in &up.jwt_keys {
            match local.jwt_authorities.iter().find(|x| x.key_id == k.key_id) {
                None => d.new_keys.push(k.clone()),
                Some(x) if k.tainted && !x.tainted => d.tainted_keys.push(k.key_id.clone()),
                Some(_) => {}
            }
        }
        for x in local.jwt_authorities.iter().filter(|x| x.tainted) {
            if !up.jwt_keys.iter().any(|k| k.key_id == x.key_id) {
                d.revoked_keys.push(x.key_id.clone());
            }
        }
        d
    }

    pub fn is_empty(&self) -> bool {
        *self == UpstreamDiff::default()
    }

    /// Applies the diff to `b`; whether anything changed.
    fn apply(&self, b: &mut Bundle) -> bool {
        let mut changed = false;
        for r in &self.new_roots {
            match b.x509_authorities.iter_mut().find(|c| c.asn1 == r.asn1) {
                None => {
                    b.x509_authorities.push(r.clone());
                    changed = true;
                }
                // Added meanwhile (by a rotation): the upstream's taint flag still applies.
                Some(c) if r.tainted && !c.tainted => {
                    c.tainted = true;
                    changed = true;
                }
                Some(_) => {}
            }
        }
        for c in b.x509_authorities.iter_mut() {
            if !c.tainted && self.tainted_roots.contains(&c.asn1) {
                c.tainted = true;
                changed = true;
            }
        }
        let before = b.x509_authorities.len();
        b.x509_authorities
            .retain(|c| !(c.tainted && self.revoked_roots.contains(&c.asn1)));
        changed |= b.x509_authorities.len() != before;
        for k in &self.new_keys {
            if !b.jwt_authorities.iter().any(|x| x.key_id == k.key_id) {
                b.jwt_authorities.push(k.clone());
                changed = true;
            }
        }
        for x in b.jwt_authorities.iter_mut() {
            if !x.tainted && self.tainted_keys.contains(&x.key_id) {
                x.tainted = true;
                changed = true;
            }
        }
        let before = b.jwt_authorities.len();
        b.jwt_authorities
            .retain(|x| !(x.tainted && self.revoked_keys.contains(&x.key_id)));
        changed |= b.jwt_authorities.len() != before;
        changed
    }
}

impl Ca {
    /// Signs a CA for a downstream (nested) server's key, as SPIRE does: this server's CA
    /// subject with `OU=DOWNSTREAM-<n>` (n: the length of this CA's chain), the trust domain
    /// ID as URI SAN, `ttl` (zero: `ca_ttl`) capped at this CA's notAfter, signed by the
    /// active X.509 authority's key. Returns the downstream CA followed by this CA's chain.
    pub async fn sign_downstream_ca(
        &self,
        spki_der: &[u8],
        ttl: Duration,
    ) -> Result<Vec<Vec<u8>>, CaError> {
        let ca = self.current_x509().ok_or(CaError::NotReady("X.509"))?;
        let tail = ca.chain_tail();
        let subject = x509svid::parse_name(&format!(
            "{}, OU=DOWNSTREAM-{}",
            self.settings.ca_subject_dn,
            tail.len().max(1)
        ))?;
        let ttl = if ttl.is_zero() {
            self.settings.ca_ttl
        } else {
            ttl
        };
        let now = now_secs();
        let not_after = now.saturating_add(ttl.as_secs().max(1)).min(ca.not_after);
        let cert = self
            .certify_ca(&ca, &subject, spki_der, now, not_after)
            .await?;
        let mut chain = vec![cert];
        chain.extend(tail);
        Ok(chain)
    }

    /// Publishes a JWT key of this trust domain (SPIRE's `PublishJWTKey`): with an upstream
    /// that takes keys, the key goes up and the upstream's keys come back into the local
    /// bundle; otherwise (no upstream, or one that does not take keys: warned once) the key
    /// is appended to the local bundle. Keys that expired more than [`JWT_PRUNE_AFTER`] ago
    /// leave the bundle on the way. A key a downstream server publishes (`from_downstream`)
    /// is refused, before anything is sent upstream, while the bundle holds
    /// [`MAX_JWT_KEYS`] unexpired keys; this server's own keys are never refused. Returns the
    /// bundle's JWT keys.
    pub async fn publish_jwt_key(
        &self,
        key: JwtKey,
        from_downstream: bool,
    ) -> Result<Vec<JwtKey>, CaError> {
        let now = now_secs() as i64;
        if from_downstream {
            let live = self
                .bundle()
                .jwt_authorities
                .iter()
                .filter(|k| k.expires_at == 0 || k.expires_at > now)
                .count();
            let known = self
                .bundle()
                .jwt_authorities
                .iter()
                .any(|k| k.key_id == key.key_id);
            if live >= MAX_JWT_KEYS && !known {
                return Err(CaError::TooManyJwtKeys(MAX_JWT_KEYS));
            }
        }
        let mut add = vec![key.clone()];
        if let Some(up) = &self.settings.upstream {
            match up.publish_jwt_key(key.clone()).await {
                Ok(keys) => add.extend(keys.into_iter().filter(|k| k.key_id != key.key_id)),
                Err(UpstreamError::Unimplemented) => {
                    if !self
                        .jwt_unpublished_warned
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        warn!(
                            "UpstreamAuthority plugin does not support JWT-SVIDs: JWT keys stay in this server's bundle, and workloads outside it may not validate its JWT-SVIDs"
                        );
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        let td = self.settings.trust_domain.as_str().to_string();
        let prune_before = now - JWT_PRUNE_AFTER.as_secs() as i64;
        let adding = &add;
        let r = self
            .ds
            .modify_bundle(&td, &move |b| {
                let before = b.jwt_authorities.len();
                b.jwt_authorities
                    .retain(|k| k.expires_at == 0 || k.expires_at >= prune_before);
                let mut changed = b.jwt_authorities.len() != before;
                for k in adding {
                    if !b.jwt_authorities.iter().any(|x| x.key_id == k.key_id) {
                        b.jwt_authorities.push(k.clone());
                        changed = true;
                    }
                }
                Ok(changed)
            })
            .await;
        let b = match r {
            Ok(b) => b,
            // No bundle yet (the first X.509 authority could not be made): create it.
            Err(DsError::NotFound(_)) => {
                self.ds
                    .append_bundle(&Bundle {
                        trust_domain: td,
                        jwt_authorities: add,
                        ..Default::default()
                    })
                    .await?
            }
            Err(e) => return Err(e.into()),
        };
        let keys = b.jwt_authorities.clone();
        *self.bundle.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(b);
        Ok(keys)
    }

    /// Brings the upstream's view of this trust domain's bundle into the local bundle. When
    /// the upstream tainted a root the active X.509 authority chains to, a new authority is
    /// minted and activated first (so what this server signs, and what its downstreams get
    /// from it, no longer chains to the tainted root by the time anyone sees the taint here).
    /// Returns what changed.
    pub async fn sync_upstream_bundle(&self, up: &LocalBundle) -> Result<UpstreamDiff, CaError> {
        // What cannot be parsed never enters the bundle (agents and the bundle endpoint
        // would choke on it).
        let checked = LocalBundle {
            x509_roots: up
                .x509_roots
                .iter()
                .filter(|c| x509svid::ParsedCert::parse(&c.asn1).is_ok())
                .cloned()
                .collect(),
            jwt_keys: up
                .jwt_keys
                .iter()
                .filter(|k| !k.key_id.is_empty() && KeyInfo::from_spki_der(&k.public_key).is_ok())
                .cloned()
                .collect(),
        };
        if checked != *up {
            warn!(
                "the upstream's bundle holds authorities that cannot be parsed; they are left out"
            );
        }
        let up = &checked;
        let local = self.refresh_bundle().await?;
        let diff = UpstreamDiff::of(&local, up);
        if diff.is_empty() {
            return Ok(diff);
        }
        let mut tainted: Vec<Vec<u8>> = diff.tainted_roots.clone();
        tainted.extend(
            diff.new_roots
                .iter()
                .filter(|r| r.tainted)
                .map(|r| r.asn1.clone()),
        );
        if !tainted.is_empty() && self.active_chains_to(&tainted) {
            info!(
                "the upstream tainted the root this server's CA chains to: rotating the X.509 authority now"
            );
            self.force_x509_rotation().await?;
        }
        let d = &diff;
        let b = self
            .ds
            .modify_bundle(
                self.settings.trust_domain.as_str(),
                &move |b| Ok(d.apply(b)),
            )
            .await?;
        *self.bundle.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(b);
        if !tainted.is_empty() || !diff.tainted_keys.is_empty() {
            self.taint_notify.notify_one();
        }
        info!(
            new_roots = diff.new_roots.len(),
            tainted_roots = tainted.len(),
            revoked_roots = diff.revoked_roots.len(),
            new_jwt_keys = diff.new_keys.len(),
            tainted_jwt_keys = diff.tainted_keys.len(),
            revoked_jwt_keys = diff.revoked_keys.len(),
            "bundle updated from the upstream authority"
        );
        Ok(diff)
    }

    /// Whether the active X.509 authority's chain ends at one of `roots`.
    fn active_chains_to(&self, roots: &[Vec<u8>]) -> bool {
        let Some(ca) = self.current_x509() else {
            return false;
        };
        let mut chain = vec![ca.cert_der.clone()];
        chain.extend(ca.upstream_chain.iter().cloned());
        x509svid::verify_ca_chain(&chain, roots, now_secs(), 0).is_ok()
    }

    /// A new X.509 authority prepared and activated at once (the active one becomes OLD).
    async fn force_x509_rotation(&self) -> Result<(), CaError> {
        let prepared = self
            .prepare_authority(Kind::X509, true)
            .await
            .map_err(authority_to_ca)?;
        self.activate_authority(Kind::X509, &prepared.authority_id)
            .await
            .map_err(authority_to_ca)?;
        Ok(())
    }
}

fn authority_to_ca(e: AuthorityError) -> CaError {
    match e {
        AuthorityError::Ca(e) => e,
        e => CaError::Rotation(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(b: u8, tainted: bool) -> X509Certificate {
        X509Certificate {
            asn1: vec![b],
            tainted,
        }
    }

    fn key(kid: &str, tainted: bool) -> JwtKey {
        JwtKey {
            public_key: vec![1],
            key_id: kid.into(),
            expires_at: 0,
            tainted,
        }
    }

    #[test]
    fn upstream_bundle_diff_adds_taints_and_removes_only_what_the_upstream_dropped_tainted() {
        let mut local = Bundle {
            trust_domain: "example.org".into(),
            x509_authorities: vec![cert(1, false), cert(2, true), cert(3, false)],
            jwt_authorities: vec![key("own", false), key("gone", true), key("t", false)],
            ..Default::default()
        };
        let up = LocalBundle {
            // 1 tainted upstream, 2 dropped (tainted here: revoked), 3 dropped but not
            // tainted here (kept), 4 new and already tainted.
            x509_roots: vec![cert(1, true), cert(4, true)],
            // "own" is not listed upstream and stays; "gone" was tainted and goes; "t" is
            // tainted upstream; "new" arrives.
            jwt_keys: vec![key("t", true), key("new", false)],
        };
        let d = UpstreamDiff::of(&local, &up);
        assert_eq!(d.new_roots, vec![cert(4, true)]);
        assert_eq!(d.tainted_roots, vec![vec![1]]);
        assert_eq!(d.revoked_roots, vec![vec![2]]);
        assert_eq!(d.new_keys, vec![key("new", false)]);
        assert_eq!(d.tainted_keys, vec!["t".to_string()]);
        assert_eq!(d.revoked_keys, vec!["gone".to_string()]);
        assert!(d.apply(&mut local));
        assert_eq!(
            local.x509_authorities,
            vec![cert(1, true), cert(3, false), cert(4, true)]
        );
        assert_eq!(
            local.jwt_authorities,
            vec![key("own", false), key("t", true), key("new", false)]
        );
        // Applied: nothing left to do.
        assert!(UpstreamDiff::of(&local, &up).is_empty());
        assert!(!d.apply(&mut local));
        // A new root added meanwhile (by a forced rotation) untainted takes the upstream's flag.
        let mut rotated = local.clone();
        rotated.x509_authorities.push(cert(5, false));
        let late = UpstreamDiff {
            new_roots: vec![cert(5, true)],
            ..Default::default()
        };
        assert!(late.apply(&mut rotated));
        assert!(rotated.x509_authorities.contains(&cert(5, true)));
    }
}
