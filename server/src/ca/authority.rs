//! Forced rotation and revocation of local authorities (the LocalAuthority API's half in the
//! CA): prepare, activate, taint and revoke for X.509 and JWT authorities, with SPIRE's state
//! machine (`keys_rotation.md` §3) and its gaps closed: a wrong state is FailedPrecondition, not
//! Internal; Prepare refuses to replace a PREPARED authority unless forced; OLD authorities are
//! remembered beyond the next slot; revoke waits until no recently seen agent holds SVIDs
//! under the authority; and taint and revoke live in the datastore's bundle, which every
//! server reconciles on its rotation tick, so an authority of any server sharing the datastore
//! can be named. It must not decide who may call (the service does) and never holds a lock
//! across KeyManager or datastore calls.

use super::{
    Authority, Ca, CaError, Journal, JwtAuthority, SlotStatus, Slots, X509Authority, now_secs,
    other_slot,
};
use crate::datastore::DsError;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use kame_api::pb::types::Bundle;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Agents seen within this window count for revocation readiness.
pub const READINESS_WINDOW: Duration = Duration::from_secs(60);

/// The two kinds of local authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    X509,
    Jwt,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::X509 => "X.509",
            Kind::Jwt => "JWT",
        })
    }
}

/// Why an authority operation was refused, one variant per check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    #[error("no authority ID provided")]
    NoId,
    #[error("unknown {kind} authority ID {id:?}")]
    Unknown { kind: Kind, id: String },
    #[error("the server is initializing: there is no active {0} authority yet")]
    Initializing(Kind),
    #[error(
        "{kind} authority {id} is already prepared: activate it, or prepare again with force to replace it"
    )]
    AlreadyPrepared { kind: Kind, id: String },
    #[error("{kind} authority {id} is already active")]
    AlreadyActive { kind: Kind, id: String },
    #[error("only a PREPARED authority can be activated; {kind} authority {id} is OLD")]
    NotPrepared { kind: Kind, id: String },
    #[error("{kind} authority {id} is the active authority: prepare and activate another first")]
    IsActive { kind: Kind, id: String },
    #[error("{kind} authority {id} is PREPARED: only OLD authorities can be tainted or revoked")]
    IsPrepared { kind: Kind, id: String },
    #[error("{kind} authority {id} is already tainted")]
    AlreadyTainted { kind: Kind, id: String },
    #[error("{kind} authority {id} is not tainted: taint it before revoking it")]
    NotTainted { kind: Kind, id: String },
    #[error("{kind} authority {id} is no longer in the bundle (revoked or expired)")]
    NotInBundle { kind: Kind, id: String },
    #[error(
        "{count} agent(s) seen in the last {window_secs} s still hold SVIDs under {kind} authority {id}: wait until they have rotated, or revoke with force"
    )]
    AgentsHolding {
        kind: Kind,
        id: String,
        count: usize,
        window_secs: u64,
    },
    #[error("upstream authority is not configured")]
    NoUpstream,
    /// SPIRE's checks of the subject key ID named for an upstream taint or revoke.
    #[error("{prefix}: {reason}")]
    UpstreamId {
        prefix: &'static str,
        reason: &'static str,
    },
    #[error("{0}: no root CA found with provided subject key ID")]
    UpstreamRootUnknown(&'static str),
    #[error("failed to taint upstream authority: root CA is already tainted")]
    UpstreamRootTainted,
    #[error(
        "failed to revoke X.509 upstream authority: it is not possible to revoke an untainted root CA"
    )]
    UpstreamRootNotTainted,
    /// SPIRE's rule: with an upstream, X.509 authorities are tainted and revoked upstream.
    #[error("local authority can't be {0} if there is an upstream authority")]
    LocalWithUpstream(&'static str),
    #[error(transparent)]
    Ca(#[from] CaError),
}

impl From<DsError> for AuthorityError {
    fn from(e: DsError) -> Self {
        AuthorityError::Ca(CaError::Datastore(e))
    }
}

/// One authority as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityView {
    pub authority_id: String,
    pub expires_at: u64,
    pub status: SlotStatus,
    pub tainted: bool,
    /// Agents seen within [`READINESS_WINDOW`] that hold SVIDs under it.
    pub agents_holding: usize,
    /// The SKID (hex) of the upstream CA that signed it; empty when self-signed.
    pub upstream_authority_id: String,
}

/// The state of one kind: active, prepared, and the OLD ones (newest first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindState {
    pub active: Option<AuthorityView>,
    pub prepared: Option<AuthorityView>,
    pub old: Vec<AuthorityView>,
}

/// How an authority is found in the bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BundleKey {
    Cert(Vec<u8>),
    Kid(String),
    /// An upstream-signed CA and the chain after it: in the bundle through the root it
    /// chains to (whose taint it shares); never tainted or removed itself.
    Chain(Vec<Vec<u8>>),
}

impl BundleKey {
    /// Whether it is in `b`, and tainted there.
    fn find(&self, b: &Bundle) -> Option<bool> {
        match self {
            BundleKey::Cert(der) => b
                .x509_authorities
                .iter()
                .find(|c| &c.asn1 == der)
                .map(|c| c.tainted),
            BundleKey::Kid(kid) => b
                .jwt_authorities
                .iter()
                .find(|k| &k.key_id == kid)
                .map(|k| k.tainted),
            BundleKey::Chain(chain) => {
                let roots: Vec<Vec<u8>> =
                    b.x509_authorities.iter().map(|c| c.asn1.clone()).collect();
                kame_api::x509svid::verify_ca_chain(chain, &roots, now_secs(), 0)
                    .ok()
                    .and_then(|i| b.x509_authorities.get(i))
                    .map(|c| c.tainted)
            }
        }
    }

    fn taint(&self, b: &mut Bundle) -> bool {
        let mut changed = false;
        match self {
            BundleKey::Cert(der) => {
                for c in b.x509_authorities.iter_mut().filter(|c| &c.asn1 == der) {
                    changed |= !c.tainted;
                    c.tainted = true;
                }
            }
            BundleKey::Kid(kid) => {
                for k in b.jwt_authorities.iter_mut().filter(|k| &k.key_id == kid) {
                    changed |= !k.tainted;
                    k.tainted = true;
                }
            }
            BundleKey::Chain(_) => {}
        }
        changed
    }

    fn remove(&self, b: &mut Bundle) -> bool {
        let before = (b.x509_authorities.len(), b.jwt_authorities.len());
        match self {
            BundleKey::Cert(der) => b.x509_authorities.retain(|c| &c.asn1 != der),
            BundleKey::Kid(kid) => b.jwt_authorities.retain(|k| &k.key_id != kid),
            BundleKey::Chain(_) => {}
        }
        before != (b.x509_authorities.len(), b.jwt_authorities.len())
    }
}

/// What an operation acts on: an authority of this server or of another one sharing the
/// datastore.
#[derive(Debug, Clone)]
struct Target {
    id: String,
    status: SlotStatus,
    expires_at: u64,
    bundle_key: BundleKey,
    /// This server's key of it (KeyManager id and instance), when this server holds one.
    key: Option<(String, String)>,
    /// This server's authority (else another server's, from its journal).
    local: bool,
    /// The SKID (hex) of the upstream CA that signed it; empty when self-signed.
    upstream_id: String,
}

/// What the operation code needs of an authority of either kind.
trait Managed: Authority {
    fn bundle_key(&self) -> BundleKey;
    fn key_ref(&self) -> (String, String);
    fn upstream_id(&self) -> String {
        String::new()
    }
}

impl Managed for X509Authority {
    fn bundle_key(&self) -> BundleKey {
        if self.is_upstream_signed() {
            return BundleKey::Chain(self.chain_tail());
        }
        BundleKey::Cert(self.cert_der.clone())
    }
    fn key_ref(&self) -> (String, String) {
        (self.key.id.clone(), self.key.fingerprint.clone())
    }
    fn upstream_id(&self) -> String {
        self.upstream_authority_id.clone()
    }
}

impl Managed for JwtAuthority {
    fn bundle_key(&self) -> BundleKey {
        BundleKey::Kid(self.kid.clone())
    }
    fn key_ref(&self) -> (String, String) {
        (self.key.id.clone(), self.key.fingerprint.clone())
    }
}

fn target_of<T: Managed>(a: &T) -> Target {
    Target {
        id: a.authority_id().to_string(),
        status: a.status(),
        expires_at: a.not_after(),
        bundle_key: a.bundle_key(),
        key: Some(a.key_ref()),
        local: true,
        upstream_id: a.upstream_id(),
    }
}

fn local_targets<T: Managed>(s: &Slots<T>) -> Vec<Target> {
    s.all().map(|a| target_of(a.as_ref())).collect()
}

impl Ca {
    fn local_targets(&self, kind: Kind) -> Vec<Target> {
        let st = self.read();
        match kind {
            Kind::X509 => local_targets(&st.x509),
            Kind::Jwt => local_targets(&st.jwt),
        }
    }

    /// Authorities of the other servers sharing the datastore, from their journals.
    async fn remote_targets(&self, kind: Kind) -> Result<Vec<Target>, AuthorityError> {
        let mut out = vec![];
        for (server_id, data) in self.ds.list_ca_journals().await? {
            if server_id == self.settings.server_id {
                continue;
            }
            let Ok(j) = serde_json::from_slice::<Journal>(&data) else {
                warn!(
                    server_id,
                    "unreadable CA journal of another server; skipped"
                );
                continue;
            };
            match kind {
                Kind::X509 => {
                    for e in j.x509 {
                        let Ok(der) = STANDARD.decode(&e.cert) else {
                            continue;
                        };
                        let Ok(issuer) = kame_api::x509svid::IssuerInfo::from_cert_der(&der) else {
                            continue;
                        };
                        let bundle_key = if !e.upstream_signed {
                            BundleKey::Cert(der)
                        } else {
                            let mut chain = vec![der];
                            chain.extend(
                                e.upstream_chain
                                    .iter()
                                    .filter_map(|c| STANDARD.decode(c).ok()),
                            );
                            BundleKey::Chain(chain)
                        };
                        out.push(Target {
                            id: hex::encode(&issuer.key_id),
                            status: e.status,
                            expires_at: e.not_after,
                            bundle_key,
                            key: None,
                            local: false,
                            upstream_id: e.upstream_authority_id,
                        });
                    }
                }
                Kind::Jwt => {
                    for e in j.jwt {
                        out.push(Target {
                            id: e.kid.clone(),
                            status: e.status,
                            expires_at: e.not_after,
                            bundle_key: BundleKey::Kid(e.kid),
                            key: None,
                            local: false,
                            upstream_id: String::new(),
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// The authority named `id`: this server's first, else another server's.
    async fn find(&self, kind: Kind, id: &str) -> Result<Target, AuthorityError> {
        if id.is_empty() {
            return Err(AuthorityError::NoId);
        }
        let id_norm = match kind {
            // SKIDs are compared in lower case, as SPIRE's CLI prints them.
            Kind::X509 => id.to_ascii_lowercase(),
            Kind::Jwt => id.to_string(),
        };
        if let Some(t) = self
            .local_targets(kind)
            .into_iter()
            .find(|t| t.id == id_norm)
        {
            return Ok(t);
        }
        self.remote_targets(kind)
            .await?
            .into_iter()
            .find(|t| t.id == id_norm)
            .ok_or_else(|| AuthorityError::Unknown {
                kind,
                id: id.to_string(),
            })
    }

    /// How many agents seen within [`READINESS_WINDOW`] hold SVIDs under each authority.
    async fn holding(&self) -> Result<std::collections::HashMap<String, usize>, AuthorityError> {
        let since = now_secs().saturating_sub(READINESS_WINDOW.as_secs()) as i64;
        let mut m = std::collections::HashMap::new();
        for a in self.ds.list_agent_authorities(since).await? {
            for id in a.authorities {
                *m.entry(id).or_insert(0) += 1;
            }
        }
        Ok(m)
    }

    /// The active, prepared and OLD authorities of `kind` on this server, with their taint
    /// and readiness.
    pub async fn authority_state(&self, kind: Kind) -> Result<KindState, AuthorityError> {
        let holding = self.holding().await?;
        let bundle = self.refresh_bundle().await?;
        let mut out = KindState::default();
        for t in self.local_targets(kind) {
            let v = AuthorityView {
                tainted: t.bundle_key.find(&bundle).unwrap_or(false),
                // Agents report the root their chains end at: under an upstream, its SKID.
                agents_holding: holding
                    .get(if t.upstream_id.is_empty() {
                        &t.id
                    } else {
                        &t.upstream_id
                    })
                    .copied()
                    .unwrap_or(0),
                upstream_authority_id: t.upstream_id.clone(),
                authority_id: t.id,
                expires_at: t.expires_at,
                status: t.status,
            };
            match t.status {
                SlotStatus::Active => out.active = Some(v),
                SlotStatus::Prepared => out.prepared = Some(v),
                SlotStatus::Old => out.old.push(v),
            }
        }
        if out.active.is_none() {
            return Err(AuthorityError::Initializing(kind));
        }
        Ok(out)
    }

    fn view(t: &Target, status: SlotStatus, tainted: bool) -> AuthorityView {
        AuthorityView {
            authority_id: t.id.clone(),
            expires_at: t.expires_at,
            status,
            tainted,
            agents_holding: 0,
            upstream_authority_id: t.upstream_id.clone(),
        }
    }

    /// Prepares a new authority of `kind` in the next slot and publishes it in the bundle. A
    /// PREPARED authority there is replaced only with `force` (it stays in the bundle as OLD,
    /// so it can still be tainted and revoked).
    pub async fn prepare_authority(
        &self,
        kind: Kind,
        force: bool,
    ) -> Result<AuthorityView, AuthorityError> {
        let _g = self.rotation.lock().await;
        let (cur, next) = match kind {
            Kind::X509 => {
                let st = self.read();
                (
                    st.x509.current.as_ref().map(|a| target_of(a.as_ref())),
                    st.x509.next.as_ref().map(|a| target_of(a.as_ref())),
                )
            }
            Kind::Jwt => {
                let st = self.read();
                (
                    st.jwt.current.as_ref().map(|a| target_of(a.as_ref())),
                    st.jwt.next.as_ref().map(|a| target_of(a.as_ref())),
                )
            }
        };
        let cur = cur.ok_or(AuthorityError::Initializing(kind))?;
        if let Some(n) = next.filter(|n| n.status == SlotStatus::Prepared)
            && !force
        {
            return Err(AuthorityError::AlreadyPrepared { kind, id: n.id });
        }
        let cur_slot = match kind {
            Kind::X509 => self.read().x509.current.as_ref().map(|a| a.slot.clone()),
            Kind::Jwt => self.read().jwt.current.as_ref().map(|a| a.slot.clone()),
        }
        .ok_or(AuthorityError::Initializing(kind))?;
        let slot = other_slot(&cur_slot);
        let t = match kind {
            Kind::X509 => {
                let a = self.prepare_x509(slot, SlotStatus::Prepared).await?;
                let t = target_of(a.as_ref());
                self.write().x509.install_next(a);
                t
            }
            Kind::Jwt => {
                let a = self.prepare_jwt(slot, SlotStatus::Prepared).await?;
                let t = target_of(a.as_ref());
                self.write().jwt.install_next(a);
                t
            }
        };
        info!(kind = %kind, authority_id = %t.id, replaces_prepared = force, active = %cur.id, "authority prepared on request");
        self.journal_changed().await;
        Ok(Self::view(&t, SlotStatus::Prepared, false))
    }

    /// Makes the PREPARED authority `id` active; the active one becomes OLD.
    pub async fn activate_authority(
        &self,
        kind: Kind,
        id: &str,
    ) -> Result<AuthorityView, AuthorityError> {
        let _g = self.rotation.lock().await;
        let t = self.find(kind, id).await?;
        match (t.status, t.local) {
            (SlotStatus::Active, _) => {
                return Err(AuthorityError::AlreadyActive { kind, id: t.id });
            }
            (SlotStatus::Old, _) => return Err(AuthorityError::NotPrepared { kind, id: t.id }),
            // Another server's prepared authority is that server's to activate.
            (SlotStatus::Prepared, false) => {
                return Err(AuthorityError::Unknown {
                    kind,
                    id: id.to_string(),
                });
            }
            (SlotStatus::Prepared, true) => {}
        }
        let swapped = match kind {
            Kind::X509 => swap(&mut self.write().x509, &t.id),
            Kind::Jwt => swap(&mut self.write().jwt, &t.id),
        };
        if !swapped {
            return Err(AuthorityError::NotPrepared { kind, id: t.id });
        }
        info!(kind = %kind, authority_id = %t.id, "authority activated on request");
        self.journal_changed().await;
        self.log_authority_change("activate", &kind.to_string(), &t.id);
        Ok(Self::view(&t, SlotStatus::Active, false))
    }

    /// Marks the OLD authority `id` tainted in the bundle: agents and servers re-issue what it
    /// signed. Any server's OLD authority sharing the datastore can be named.
    pub async fn taint_authority(
        &self,
        kind: Kind,
        id: &str,
    ) -> Result<AuthorityView, AuthorityError> {
        if kind == Kind::X509 && self.settings.upstream.is_some() {
            return Err(AuthorityError::LocalWithUpstream("tainted"));
        }
        let _g = self.rotation.lock().await;
        let t = self.find(kind, id).await?;
        self.check_old(kind, &t)?;
        let bundle = self.refresh_bundle().await?;
        match t.bundle_key.find(&bundle) {
            None => return Err(AuthorityError::NotInBundle { kind, id: t.id }),
            Some(true) => return Err(AuthorityError::AlreadyTainted { kind, id: t.id }),
            Some(false) => {}
        }
        let key = t.bundle_key.clone();
        let td = self.settings.trust_domain.as_str().to_string();
        let b = self
            .ds
            .modify_bundle(&td, &move |b| {
                if key.find(b).is_none() {
                    return Err(DsError::FailedPrecondition(
                        "the authority left the bundle meanwhile".into(),
                    ));
                }
                Ok(key.taint(b))
            })
            .await?;
        self.set_bundle(b);
        self.taint_notify.notify_one();
        info!(kind = %kind, authority_id = %t.id, local = t.local, "authority tainted");
        self.log_authority_change("taint", &kind.to_string(), &t.id);
        Ok(Self::view(&t, SlotStatus::Old, true))
    }

    /// Removes the tainted OLD authority `id` from the bundle and disposes of its key in the
    /// KeyManager (the owning server does it on its next tick when the authority is another
    /// server's). Refused while an agent seen within [`READINESS_WINDOW`] still holds SVIDs
    /// under it, unless `force`.
    pub async fn revoke_authority(
        &self,
        kind: Kind,
        id: &str,
        force: bool,
    ) -> Result<(AuthorityView, usize), AuthorityError> {
        if kind == Kind::X509 && self.settings.upstream.is_some() {
            return Err(AuthorityError::LocalWithUpstream("revoked"));
        }
        let _g = self.rotation.lock().await;
        let t = self.find(kind, id).await?;
        self.check_old(kind, &t)?;
        let bundle = self.refresh_bundle().await?;
        match t.bundle_key.find(&bundle) {
            None => return Err(AuthorityError::NotInBundle { kind, id: t.id }),
            Some(false) => return Err(AuthorityError::NotTainted { kind, id: t.id }),
            Some(true) => {}
        }
        let count = self.holding().await?.get(&t.id).copied().unwrap_or(0);
        if count > 0 && !force {
            return Err(AuthorityError::AgentsHolding {
                kind,
                id: t.id,
                count,
                window_secs: READINESS_WINDOW.as_secs(),
            });
        }
        let key = t.bundle_key.clone();
        let td = self.settings.trust_domain.as_str().to_string();
        let b = self
            .ds
            .modify_bundle(&td, &move |b| {
                if key.find(b) != Some(true) {
                    return Err(DsError::FailedPrecondition(
                        "the authority changed in the bundle meanwhile".into(),
                    ));
                }
                Ok(key.remove(b))
            })
            .await?;
        self.set_bundle(b);
        info!(kind = %kind, authority_id = %t.id, local = t.local, forced = force && count > 0, "authority revoked");
        self.log_authority_change("revoke", &kind.to_string(), &t.id);
        if t.local {
            self.forget_revoked().await;
        }
        Ok((Self::view(&t, SlotStatus::Old, true), count))
    }

    /// SPIRE's checks of `skid` (any case) for an upstream taint or revoke: an upstream is
    /// configured, the ID is given, it did not sign the active authority, and it signed an OLD
    /// one (the next slot's, or an older one this server remembers). The lower-case ID.
    fn check_upstream_skid(
        &self,
        skid: &str,
        prefix: &'static str,
    ) -> Result<String, AuthorityError> {
        if self.settings.upstream.is_none() {
            return Err(AuthorityError::NoUpstream);
        }
        let bad = |reason| AuthorityError::UpstreamId { prefix, reason };
        let skid = skid.to_ascii_lowercase();
        if skid.is_empty() {
            return Err(bad("no subject key ID provided"));
        }
        let st = self.read();
        if st
            .x509
            .current
            .as_ref()
            .is_some_and(|c| c.upstream_authority_id == skid)
        {
            return Err(bad(
                "unable to use upstream authority singing current authority",
            ));
        }
        let mut signed = st
            .x509
            .next
            .iter()
            .chain(st.x509.older.iter())
            .filter(|a| a.upstream_authority_id == skid);
        match signed.next() {
            None => Err(bad(
                "upstream authority didn't sign the old local authority",
            )),
            Some(a) if a.status == SlotStatus::Prepared => Err(bad(
                "only upstream authorities signing an old authority can be used",
            )),
            Some(_) => Ok(skid),
        }
    }

    /// Marks the upstream root with subject key ID `skid` tainted in the bundle (SPIRE's
    /// `TaintX509UpstreamAuthority`): agents and servers re-issue what chains to it.
    pub async fn taint_upstream_authority(&self, skid: &str) -> Result<String, AuthorityError> {
        let _g = self.rotation.lock().await;
        let skid = self.check_upstream_skid(skid, "provided subject key id is not valid")?;
        let td = self.settings.trust_domain.as_str().to_string();
        let want = skid.clone();
        let r = self
            .ds
            .modify_bundle(&td, &move |b| {
                let mut found = false;
                for c in b
                    .x509_authorities
                    .iter_mut()
                    .filter(|c| root_skid(&c.asn1) == want)
                {
                    if c.tainted {
                        return Err(DsError::AlreadyExists("tainted".into()));
                    }
                    c.tainted = true;
                    found = true;
                }
                if !found {
                    return Err(DsError::NotFound("root".into()));
                }
                Ok(true)
            })
            .await;
        let b = match r {
            Ok(b) => b,
            Err(DsError::AlreadyExists(_)) => return Err(AuthorityError::UpstreamRootTainted),
            Err(DsError::NotFound(_)) => {
                return Err(AuthorityError::UpstreamRootUnknown(
                    "failed to taint upstream authority",
                ));
            }
            Err(e) => return Err(e.into()),
        };
        self.set_bundle(b);
        self.taint_notify.notify_one();
        info!(subject_key_id = %skid, "X.509 upstream authority tainted");
        self.log_authority_change("taint", "X.509 upstream", &skid);
        Ok(skid)
    }

    /// Removes the tainted upstream root with subject key ID `skid` from the bundle (SPIRE's
    /// `RevokeX509UpstreamAuthority`). Refused while an agent seen within
    /// [`READINESS_WINDOW`] still holds SVIDs under it, unless `force` (Kame's readiness
    /// check, as for local authorities).
    pub async fn revoke_upstream_authority(
        &self,
        skid: &str,
        force: bool,
    ) -> Result<(String, usize), AuthorityError> {
        let _g = self.rotation.lock().await;
        let skid = self.check_upstream_skid(skid, "invalid subject key ID")?;
        let count = self.holding().await?.get(&skid).copied().unwrap_or(0);
        let tainted = self
            .refresh_bundle()
            .await?
            .x509_authorities
            .iter()
            .any(|c| c.tainted && root_skid(&c.asn1) == skid);
        if count > 0 && !force && tainted {
            return Err(AuthorityError::AgentsHolding {
                kind: Kind::X509,
                id: skid,
                count,
                window_secs: READINESS_WINDOW.as_secs(),
            });
        }
        let td = self.settings.trust_domain.as_str().to_string();
        let want = skid.clone();
        let r = self
            .ds
            .modify_bundle(&td, &move |b| {
                let hits: Vec<bool> = b
                    .x509_authorities
                    .iter()
                    .filter(|c| root_skid(&c.asn1) == want)
                    .map(|c| c.tainted)
                    .collect();
                if hits.is_empty() {
                    return Err(DsError::NotFound("root".into()));
                }
                if hits.iter().any(|t| !t) {
                    return Err(DsError::FailedPrecondition("untainted".into()));
                }
                b.x509_authorities.retain(|c| root_skid(&c.asn1) != want);
                Ok(true)
            })
            .await;
        let b = match r {
            Ok(b) => b,
            Err(DsError::FailedPrecondition(_)) => {
                return Err(AuthorityError::UpstreamRootNotTainted);
            }
            Err(DsError::NotFound(_)) => {
                return Err(AuthorityError::UpstreamRootUnknown(
                    "failed to revoke X.509 upstream authority",
                ));
            }
            Err(e) => return Err(e.into()),
        };
        self.set_bundle(b);
        self.forget_revoked().await;
        info!(subject_key_id = %skid, forced = force && count > 0, "X.509 upstream authority revoked");
        self.log_authority_change("revoke", "X.509 upstream", &skid);
        Ok((skid, count))
    }

    fn check_old(&self, kind: Kind, t: &Target) -> Result<(), AuthorityError> {
        match t.status {
            SlotStatus::Active => Err(AuthorityError::IsActive {
                kind,
                id: t.id.clone(),
            }),
            SlotStatus::Prepared => Err(AuthorityError::IsPrepared {
                kind,
                id: t.id.clone(),
            }),
            SlotStatus::Old => Ok(()),
        }
    }

    /// Drops this server's non-current authorities that are no longer in the bundle (revoked,
    /// here or by another server) and disposes of their keys. Runs on every rotation tick, so
    /// every server sharing the datastore acts on a revocation.
    pub async fn reconcile_authorities(&self) {
        let _g = self.rotation.lock().await;
        self.forget_revoked().await;
    }

    async fn forget_revoked(&self) {
        let bundle = self.bundle();
        let gone =
            |t: &Target| t.status != SlotStatus::Active && t.bundle_key.find(&bundle).is_none();
        let revoked: Vec<(Kind, Target)> = [Kind::X509, Kind::Jwt]
            .into_iter()
            .flat_map(|k| {
                self.local_targets(k)
                    .into_iter()
                    .filter(|t| gone(t))
                    .map(move |t| (k, t))
            })
            .collect();
        if revoked.is_empty() {
            return;
        }
        for (kind, t) in &revoked {
            if let Some((key_id, fp)) = &t.key {
                match self.km.delete_key(key_id, fp).await {
                    Ok(true) => {
                        info!(kind = %kind, authority_id = %t.id, backend = self.km.name(), "key of a revoked authority disposed of");
                        self.refresh_key_gauge().await;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        // Kept: the next tick tries again.
                        warn!(kind = %kind, authority_id = %t.id, error = %e, "cannot dispose of a revoked authority's key yet");
                        continue;
                    }
                }
            }
            let mut st = self.write();
            match kind {
                Kind::X509 => st.x509.forget(&t.id),
                Kind::Jwt => st.jwt.forget(&t.id),
            }
        }
        self.journal_changed().await;
    }

    /// Saves the journal after an operation changed the slots; a failure is logged and retried
    /// with the next save (the in-memory state stays authoritative, as in rotation).
    async fn journal_changed(&self) {
        if self.save_journal().await {
            self.clear_saved_intents().await;
        }
    }

    fn set_bundle(&self, b: Bundle) {
        *self.bundle.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(b);
    }

    /// The authority IDs (X.509 SKIDs and JWT kids) tainted in this trust domain's bundle.
    pub fn tainted_ids(&self) -> Vec<String> {
        let b = self.bundle();
        let mut out: Vec<String> = b
            .x509_authorities
            .iter()
            .filter(|c| c.tainted)
            .filter_map(|c| kame_api::x509svid::IssuerInfo::from_cert_der(&c.asn1).ok())
            .map(|i| hex::encode(i.key_id))
            .collect();
        out.extend(
            b.jwt_authorities
                .iter()
                .filter(|k| k.tainted)
                .map(|k| k.key_id.clone()),
        );
        out
    }
}

/// Activation on request: the PREPARED next authority `id` becomes current, the current one
/// OLD in the next slot. False if next is not that PREPARED authority.
fn swap<T: Authority>(s: &mut Slots<T>, id: &str) -> bool {
    let (Some(c), Some(n)) = (s.current.clone(), s.next.clone()) else {
        return false;
    };
    if n.authority_id() != id || n.status() != SlotStatus::Prepared {
        return false;
    }
    s.current = Some(Arc::new(n.with_status(SlotStatus::Active)));
    s.next = Some(Arc::new(c.with_status(SlotStatus::Old)));
    true
}

impl<T: Authority> Slots<T> {
    /// Forgets a revoked authority (never the current one).
    fn forget(&mut self, id: &str) {
        if self.next.as_ref().is_some_and(|n| n.authority_id() == id) {
            self.next = None;
        }
        self.older.retain(|o| o.authority_id() != id);
    }
}

/// The subject key ID (lower-case hex) of a bundle root; empty if it cannot be read.
fn root_skid(der: &[u8]) -> String {
    kame_api::x509svid::IssuerInfo::from_cert_der(der)
        .map(|i| hex::encode(i.key_id))
        .unwrap_or_default()
}
