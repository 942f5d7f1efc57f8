//! JWT-SVIDs for workloads: fetched from the server per (SPIFFE ID, audience), cached until
//! half their lifetime has passed or their key is tainted.

use super::*;

impl Manager {
    /// JWT-SVIDs for the workload with `selectors`: for `spiffe_id` only when given, else for
    /// each of its identities; cached until half their lifetime.
    pub async fn fetch_jwt(
        &self,
        selectors: &[types::Selector],
        spiffe_id: Option<&str>,
        audience: &[String],
    ) -> Result<Vec<(types::Entry, String)>, tonic::Status> {
        let mut aud: Vec<String> = audience.to_vec();
        aud.sort();
        aud.dedup();
        let view = self.view(selectors);
        if view.matched == 0 {
            return Err(tonic::Status::permission_denied("no identity issued"));
        }
        let entries: Vec<types::Entry> = {
            let st = self
                .state
                .read()
                .map_err(|_| tonic::Status::internal("agent state lock poisoned"))?;
            let mut v: Vec<types::Entry> = matching(&st, selectors)
                .into_iter()
                .filter(|e| spiffe_id.is_none_or(|id| entry_spiffe_id(e) == id))
                .cloned()
                .collect();
            // one token per SPIFFE ID
            let mut seen = BTreeSet::new();
            v.retain(|e| seen.insert(entry_spiffe_id(e)));
            v
        };
        if entries.is_empty() {
            return Err(tonic::Status::permission_denied(format!(
                "no identity issued for {}",
                spiffe_id.unwrap_or("this workload")
            )));
        }
        let now = now_secs();
        let mut out = vec![];
        for e in entries {
            let key = (e.id.clone(), aud.clone());
            let cached = self
                .state
                .read()
                .ok()
                .and_then(|s| s.jwt.get(&key).cloned())
                .filter(|j| now < j.issued_at + (j.expires_at.saturating_sub(j.issued_at)) / 2);
            if let Some(j) = cached {
                out.push((e, j.token));
                continue;
            }
            let ch = self
                .authenticated_channel()
                .await
                .map_err(|e| tonic::Status::unavailable(format!("cannot reach the server: {e}")))?;
            let r = pb::svid::svid_client::SvidClient::new(ch)
                .new_jwtsvid(pb::svid::NewJwtsvidRequest {
                    entry_id: e.id.clone(),
                    audience: aud.clone(),
                })
                .await;
            let svid = match r {
                Ok(r) => r
                    .into_inner()
                    .svid
                    .ok_or_else(|| tonic::Status::unavailable("the server returned no JWT-SVID"))?,
                Err(s) if s.code() == tonic::Code::InvalidArgument => return Err(s),
                Err(s) => {
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::PermissionDenied
                    ) {
                        self.set_channel(None);
                    }
                    return Err(tonic::Status::unavailable(format!(
                        "the server could not mint a JWT-SVID: {}",
                        s.message()
                    )));
                }
            };
            if let Ok(mut st) = self.state.write() {
                st.jwt.insert(
                    key,
                    JwtCached {
                        token: svid.token.clone(),
                        issued_at: svid.issued_at.max(0) as u64,
                        expires_at: svid.expires_at.max(0) as u64,
                    },
                );
            }
            out.push((e, svid.token));
        }
        Ok(out)
    }
}

/// The `kid` in a JWT's header.
pub fn jwt_kid(token: &str) -> Option<String> {
    use base64::Engine;
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("kid")?.as_str().map(str::to_string)
}
