//! The CA's keys in the KeyManager: making a new one (recorded as an intent first, so a key
//! made before a crash is reused or disposed of, never lost track of), whether a key is in
//! use, and reconciling the KeyManager with the keys the journal names (at most
//! `RECONCILE_CAP` disposals per pass).

use super::*;

impl Ca {
    /// Whether an authority in either slot holds the key with `fingerprint`.
    pub(super) fn key_in_use(&self, fingerprint: &str) -> bool {
        let st = self.read();
        let x = [&st.x509.current, &st.x509.next]
            .into_iter()
            .flatten()
            .any(|a| a.key.fingerprint == fingerprint);
        let j = [&st.jwt.current, &st.jwt.next]
            .into_iter()
            .flatten()
            .any(|a| a.key.fingerprint == fingerprint);
        x || j
    }

    /// A key for `key_id`: the one a crash-interrupted generation left (its intent is still
    /// pending), else a new one made under a fresh intent journaled first.
    pub(super) async fn new_key(&self, key_id: &str, kt: KeyType) -> Result<PublicKey, CaError> {
        let server_id = &self.settings.server_id;
        for i in self.ds.list_key_intents(server_id).await? {
            if i.key_id != key_id {
                continue;
            }
            // Made for another key type (the configuration changed since): not reused, and no
            // longer pending, so the reconcile pass disposes of it.
            if i.key_type != kt.to_string() {
                self.ds.delete_key_intent(&i.intent_id).await?;
                continue;
            }
            let adopted = match self.km.adopt(key_id, &i.intent_id).await {
                Ok(a) => a,
                // The backend is down: try again on the next tick, intent kept.
                Err(e @ kame_keymanager::Error::Unavailable(_)) => return Err(e.into()),
                Err(e) => {
                    warn!(key_id, intent = %i.intent_id, error = %e, "cannot reuse an interrupted generation's key; making a new one");
                    None
                }
            };
            match adopted {
                // The key an authority already holds: that generation finished and only its
                // intent was left behind (a crash after the journal was saved).
                Some(pk) if self.key_in_use(&pk.fingerprint) => {
                    self.ds.delete_key_intent(&i.intent_id).await?;
                }
                Some(pk) if pk.key_type == kt => {
                    info!(key_id, intent = %i.intent_id, "reusing the key of an interrupted generation");
                    self.unsaved_intents
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(i.intent_id);
                    return Ok(pk);
                }
                // Not there (never created, or of another type): the reconcile pass disposes
                // of whatever is left; the intent is done.
                _ => self.ds.delete_key_intent(&i.intent_id).await?,
            }
        }
        let intent = uuid::Uuid::new_v4().to_string();
        self.ds
            .put_key_intent(&crate::datastore::KeyIntent {
                intent_id: intent.clone(),
                server_id: server_id.clone(),
                key_id: key_id.to_string(),
                key_type: kt.to_string(),
                created_at: now_secs() as i64,
            })
            .await?;
        let pk = self
            .km
            .generate_key_with_intent(key_id, kt, &intent)
            .await?;
        kame_keymanager::failpoint("after_key_create");
        self.unsaved_intents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(intent);
        self.refresh_key_gauge().await;
        Ok(pk)
    }

    /// Brings the named-keys gauge up to date after a key is made or disposed of (the
    /// reconcile pass updates the rest of the inventory).
    pub(super) async fn refresh_key_gauge(&self) {
        if let Ok(keys) = self.km.public_keys().await {
            self.metrics.set_named_keys(keys.len());
        }
    }

    /// Converges the KeyManager to the keys this server names: orphans (keys of this server
    /// no id names, e.g. created before a crash) are disposed of, at most [`RECONCILE_CAP`] per
    /// pass, except those a pending intent may still reuse.
    pub async fn reconcile_keys(&self) -> Result<KeyInventory, CaError> {
        let pending: Vec<String> = self
            .ds
            .list_key_intents(&self.settings.server_id)
            .await?
            .into_iter()
            .map(|i| i.intent_id)
            .collect();
        let named = self.km.public_keys().await?.len();
        // Liveness for this server, and the sweep of dead servers' keys.
        let swept = match self.km.maintain().await {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "key backend upkeep (liveness, sweep) failed");
                0
            }
        };
        let mut inv = KeyInventory {
            named,
            swept,
            ..Default::default()
        };
        for o in self.km.orphans().await? {
            if o.intent.as_ref().is_some_and(|i| pending.contains(i)) {
                inv.pending += 1;
                continue;
            }
            if inv.disposed >= RECONCILE_CAP {
                inv.remaining += 1;
                continue;
            }
            match self.km.dispose(&o).await {
                Ok(()) => {
                    info!(instance = %o.instance, key_id = ?o.key_id, "disposed of an orphaned key");
                    inv.disposed += 1;
                }
                Err(e) => {
                    warn!(instance = %o.instance, error = %e, "could not dispose of an orphaned key");
                    inv.remaining += 1;
                }
            }
        }
        self.metrics.record(&inv);
        info!(
            backend = self.km.name(),
            named = inv.named,
            pending = inv.pending,
            disposed = inv.disposed,
            remaining = inv.remaining,
            swept = inv.swept,
            "key inventory"
        );
        Ok(inv)
    }
}

/// The public half of a key the KeyManager no longer holds (an OLD authority's).
pub(super) fn released_key(id: &str, spki_der: Vec<u8>, fingerprint: String) -> PublicKey {
    PublicKey {
        id: id.to_string(),
        key_type: kame_keymanager::encoding::key_type_of_spki(&spki_der).unwrap_or(KeyType::EcP256),
        spki_der,
        fingerprint,
    }
}
