//! How this server's keys are named and found in the Transit engine (SPIRE's naming,
//! `<server id>-<uuid>-<key id>`), reading a key's versions and public keys, and loading this
//! server's keys at start. It creates and deletes nothing.

use super::*;

impl VaultKeyManager {
    pub(super) fn mount(&self) -> &str {
        self.cfg.transit_engine_path.trim_matches('/')
    }

    pub(super) fn prefix(&self) -> String {
        format!("{}-", self.cfg.server_id)
    }

    /// `<server id>-<uuid>-<key id>` → key id.
    pub(super) fn key_id_of(&self, name: &str) -> Option<String> {
        let rest = name.strip_prefix(&self.prefix())?;
        let (uuid, id) = (rest.get(..36)?, rest.get(37..)?);
        uuid::Uuid::parse_str(uuid).ok()?;
        (rest.as_bytes().get(36) == Some(&b'-') && !id.is_empty()).then(|| id.to_string())
    }

    pub(super) async fn list(&self) -> Result<Vec<String>> {
        let mount = self.mount().to_string();
        self.call(|c| {
            let mount = mount.clone();
            async move {
                match vaultrs::transit::key::list(c.as_ref(), &mount).await {
                    Ok(r) => Ok(r.keys),
                    Err(vaultrs::error::ClientError::APIError { code: 404, .. }) => Ok(vec![]),
                    Err(e) => Err(vault_err("list transit keys", e)),
                }
            }
        })
        .await
    }

    /// The key's type, newest version, its public key and creation time (None when Vault's
    /// time cannot be read).
    pub(super) async fn read(&self, name: &str) -> Result<(KeyType, u64, Vec<u8>, Option<u64>)> {
        let (version, der, created) = self
            .versions(name)
            .await?
            .into_iter()
            .max_by_key(|(v, _, _)| *v)
            .ok_or_else(|| Error::Backend(format!("transit key {name} has no version")))?;
        let kt = crate::encoding::key_type_of_spki(&der)
            .ok_or_else(|| Error::Backend(format!("transit key {name}: unsupported key type")))?;
        Ok((kt, version, der, created))
    }

    /// Every version of an asymmetric transit key: its public key (SPKI DER) and creation time.
    pub(super) async fn versions(&self, name: &str) -> Result<Vec<(u64, Vec<u8>, Option<u64>)>> {
        let (mount, n) = (self.mount().to_string(), name.to_string());
        let r = self
            .call(|c| {
                let (mount, n) = (mount.clone(), n.clone());
                async move {
                    vaultrs::transit::key::read(c.as_ref(), &mount, &n)
                        .await
                        .map_err(|e| vault_err("read transit key", e))
                }
            })
            .await?;
        let vaultrs::api::transit::responses::ReadKeyData::Asymmetric(versions) = r.keys else {
            return Err(Error::Backend(format!(
                "transit key {name} is not asymmetric"
            )));
        };
        versions
            .iter()
            .map(|(v, e)| {
                let version = v
                    .parse()
                    .map_err(|_| Error::Backend(format!("transit key {name}: version {v:?}")))?;
                let der = kame_pem_public(&e.public_key)
                    .ok_or_else(|| Error::Backend(format!("transit key {name}: bad public key")))?;
                Ok((version, der, rfc3339_secs(&e.creation_time)))
            })
            .collect()
    }

    /// Finds this server's keys; when several names carry one key id, the newest is current
    /// and the others are leftovers.
    pub(super) async fn load(&self) -> Result<()> {
        let mut newest: HashMap<String, (Option<u64>, Entry)> = HashMap::new();
        let mut leftovers = vec![];
        for name in self.list().await? {
            let Some(id) = self.key_id_of(&name) else {
                continue;
            };
            let (kt, version, spki_der, created) = self.read(&name).await?;
            let entry = Entry {
                public: PublicKey {
                    id: id.clone(),
                    key_type: kt,
                    fingerprint: fingerprint(&spki_der),
                    spki_der,
                },
                name: name.clone(),
                version,
            };
            match newest.get(&id) {
                Some((t, old)) if *t >= created => leftovers.push(Leftover {
                    key_id: id,
                    name: entry.name,
                }),
                Some((_, old)) => {
                    leftovers.push(Leftover {
                        key_id: id.clone(),
                        name: old.name.clone(),
                    });
                    newest.insert(id, (created, entry));
                }
                None => {
                    newest.insert(id, (created, entry));
                }
            }
        }
        self.keys
            .replace(newest.into_iter().map(|(k, (_, e))| (k, e)).collect());
        *self.leftovers.write().unwrap_or_else(|p| p.into_inner()) = leftovers;
        Ok(())
    }

    /// Keys of this server no key id names (see [`VaultKeyManager::delete_key`]).
    pub fn leftovers(&self) -> Vec<Leftover> {
        self.leftovers.read().map(|l| l.clone()).unwrap_or_default()
    }

    pub(super) fn entry(&self, id: &str) -> Result<Entry> {
        self.keys.get(id)
    }

    /// The transit name behind `id`.
    pub fn key_name(&self, id: &str) -> Result<String> {
        Ok(self.entry(id)?.name)
    }
}

/// DER of a PEM `PUBLIC KEY`.
pub(super) fn kame_pem_public(pem: &str) -> Option<Vec<u8>> {
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .ok()
}

/// Seconds since the epoch of an RFC 3339 time (`2026-11-23T08:17:32.198Z`,
/// `2026-11-23T03:17:32-05:00`); None when it is not one.
pub fn rfc3339_secs(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return None;
    }
    let n = |r: std::ops::Range<usize>| {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse::<u64>().ok())?
    };
    let (y, mo, d, h, mi, sec) = (
        n(0..4)?,
        n(5..7)?,
        n(8..10)?,
        n(11..13)?,
        n(14..16)?,
        n(17..19)?,
    );
    if b[13] != b':' || b[16] != b':' || !(1..=12).contains(&mo) || d == 0 || d > 31 {
        return None;
    }
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Fractional seconds, then Z or an offset.
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset: i64 = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && matches!(&o[..1], "+" | "-") && &o[3..4] == ":" => {
            let oh: i64 = o[1..3].parse().ok()?;
            let om: i64 = o[4..6].parse().ok()?;
            let v = oh * 3600 + om * 60;
            if &o[..1] == "+" { v } else { -v }
        }
        _ => return None,
    };
    // Days from civil (H. Hinnant's algorithm).
    let (y, m) = if mo <= 2 {
        (y.checked_sub(1)?, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe;
    let days = days.checked_sub(719_468)?;
    let local = (days * 86400 + h * 3600 + mi * 60 + sec) as i64;
    u64::try_from(local - offset).ok()
}
