//! Matching a detection to one inventory credential: by id, by
//! `principal@endpoint`, or by keyed detection fingerprint (see
//! [`keywave_common::detect`]). The inventory is read into an in-memory
//! index (id and login only), rebuilt when older than its maximum age or
//! when a detection misses.

use super::store::{self, FpEntry};
use async_nats::jetstream::kv;
use keywave_common::detect::{CredentialRef, DetectKey, Fingerprint};
use keywave_common::wire::Selector;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How a detection resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// The credential with this id.
    Credential(String),
    /// The fingerprint is of a secret that was already replaced.
    Retired(String),
    /// Nothing in the inventory matches; the reason says what was tried.
    Unmatched(String),
    /// The detection does not say which credential leaked.
    Unidentified,
}

/// Ids and logins of every inventory credential, and which credentials need
/// an approval before they are contained.
#[derive(Debug, Default)]
pub struct InventoryIndex {
    /// Id → carries the approval tag.
    ids: HashMap<String, bool>,
    logins: HashMap<(String, String), String>,
    built: Option<Instant>,
}

impl InventoryIndex {
    /// Reads the whole inventory. Credentials tagged `approval_tag` (exactly
    /// that tag; none when empty) need an approval before containment.
    pub async fn load(
        inventory: &kv::Store,
        approval_tag: &str,
    ) -> Result<Self, crate::inventory::InventoryError> {
        let creds = crate::inventory::list(inventory, &Selector::default()).await?;
        let mut idx = InventoryIndex {
            built: Some(Instant::now()),
            ..Default::default()
        };
        for c in creds {
            idx.logins
                .insert((c.principal.clone(), c.endpoint.clone()), c.id.clone());
            let gated = !approval_tag.is_empty() && c.tags.iter().any(|t| t == approval_tag);
            idx.ids.insert(c.id, gated);
        }
        Ok(idx)
    }

    /// Whether the index is older than `max_age` (or was never built).
    pub fn stale(&self, max_age: Duration) -> bool {
        match self.built {
            Some(b) => b.elapsed() > max_age,
            None => true,
        }
    }

    /// Whether credential `id` needs an approval before it is contained;
    /// `None` when it is not in the index.
    pub fn needs_approval(&self, id: &str) -> Option<bool> {
        self.ids.get(id).copied()
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Resolves by id or login; `None` when the detection identifies by
    /// fingerprint only.
    pub fn resolve_local(&self, c: &CredentialRef) -> Option<Resolved> {
        if let Some(id) = &c.id {
            return Some(if self.ids.contains_key(id) {
                Resolved::Credential(id.clone())
            } else {
                Resolved::Unmatched(format!("no credential with id {id} in the inventory"))
            });
        }
        if let (Some(p), Some(e)) = (&c.principal, &c.endpoint) {
            return Some(match self.logins.get(&(p.clone(), e.clone())) {
                Some(id) => Resolved::Credential(id.clone()),
                None => Resolved::Unmatched(format!(
                    "no credential with principal {p} on endpoint {e} in the inventory"
                )),
            });
        }
        if c.fingerprint.is_none() {
            return Some(Resolved::Unidentified);
        }
        None
    }
}

/// Resolves a fingerprint through the `fp.<hex>` index.
pub async fn resolve_fingerprint(
    kv: &kv::Store,
    key: Option<&DetectKey>,
    fp: &str,
) -> Result<Resolved, kv::EntryError> {
    let Ok(parsed) = Fingerprint::parse(fp) else {
        return Ok(Resolved::Unmatched("invalid fingerprint".into()));
    };
    let keyed = match (&parsed, key) {
        (Fingerprint::Keyed(k), _) => k.clone(),
        (Fingerprint::Sha256(_), Some(key)) => key.keyed(&parsed),
        (Fingerprint::Sha256(_), None) => {
            return Ok(Resolved::Unmatched(
                "fingerprint matching needs a detection key (KEYWAVE_DETECT_KEY_FILE); none is configured".into(),
            ))
        }
    };
    Ok(
        match store::get_json::<FpEntry>(kv, &store::fp_key(&keyed)).await? {
            Some((e, _)) if e.current => Resolved::Credential(e.credential_id),
            Some((e, _)) => Resolved::Retired(e.credential_id),
            None => Resolved::Unmatched(format!(
                "no credential's secret has fingerprint {keyed} (announced on keywave.rotated.*)"
            )),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_resolution() {
        let mut idx = InventoryIndex::default();
        idx.ids.insert("a".into(), false);
        idx.ids.insert("b".into(), true);
        assert_eq!(idx.needs_approval("a"), Some(false));
        assert_eq!(idx.needs_approval("b"), Some(true));
        assert_eq!(idx.needs_approval("zz"), None);
        idx.logins
            .insert(("app".into(), "redis-eu".into()), "a".into());
        assert_eq!(
            idx.resolve_local(&CredentialRef::by_id("a")),
            Some(Resolved::Credential("a".into()))
        );
        assert!(matches!(
            idx.resolve_local(&CredentialRef::by_id("zz")),
            Some(Resolved::Unmatched(_))
        ));
        assert_eq!(
            idx.resolve_local(&CredentialRef::by_login("app", "redis-eu")),
            Some(Resolved::Credential("a".into()))
        );
        assert_eq!(
            idx.resolve_local(&CredentialRef::default()),
            Some(Resolved::Unidentified)
        );
        assert_eq!(
            idx.resolve_local(&CredentialRef::by_fingerprint(format!(
                "sha256:{}",
                "0".repeat(64)
            ))),
            None
        );
        assert!(idx.stale(Duration::from_secs(1)));
    }
}
