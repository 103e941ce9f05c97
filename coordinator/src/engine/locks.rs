//! One campaign per credential at a time. Every credential in the plan of an
//! unfinished campaign (running, paused, waiting for approval, rolling back)
//! is held by that campaign; a second campaign that selects it is refused
//! with the conflicts named, or starts without them when the operator asks
//! (`skip_locked`). Two campaigns rotating the same login at once would race
//! at the target and could each "prove" a secret the other replaced.
//!
//! The table lives in the term of the active coordinator: it is rebuilt from
//! the plans of the unfinished campaigns when a term starts (before the API
//! answers), so locks survive restarts and failovers without a write per
//! credential, and a campaign's entries go when it ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Conflicts named in a refusal at most (the count is always given).
pub const MAX_NAMED_CONFLICTS: usize = 20;

/// Credential id → the campaign holding it.
#[derive(Default)]
pub struct Locks {
    held: Mutex<HashMap<String, Arc<str>>>,
}

/// Credentials selected by a start that other campaigns hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflicts {
    /// (credential, holding campaign), the first [`MAX_NAMED_CONFLICTS`].
    pub named: Vec<(String, String)>,
    pub count: usize,
    /// The holding campaigns, each once, sorted.
    pub campaigns: Vec<String>,
}

impl std::fmt::Display for Conflicts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} selected credential(s) are in unfinished campaign(s) {}: ",
            self.count,
            self.campaigns.join(", ")
        )?;
        for (i, (cred, cid)) in self.named.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{cred} ({cid})")?;
        }
        if self.count > self.named.len() {
            write!(f, " and {} more", self.count - self.named.len())?;
        }
        Ok(())
    }
}

impl Locks {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<str>>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks every id of `ids` held by `cid` (rebuilding after a restart;
    /// an id already held by another campaign keeps its first holder).
    pub fn hold_all<'a>(&self, cid: &str, ids: impl IntoIterator<Item = &'a str>) {
        let owner: Arc<str> = Arc::from(cid);
        let mut t = self.table();
        for id in ids {
            t.entry(id.to_string()).or_insert_with(|| owner.clone());
        }
    }

    /// The ids of `ids` held by a campaign other than `cid`.
    pub fn conflicts<'a>(&self, cid: &str, ids: impl IntoIterator<Item = &'a str>) -> Conflicts {
        scan(&self.table(), cid, ids)
    }

    /// Holds every id of `ids` for `cid`, all or none: `Err` names those
    /// another campaign holds. Returns the ids this call took (not those
    /// `cid` held already), for [`Locks::release`] if the start fails.
    pub fn try_hold<'a>(
        &self,
        cid: &str,
        ids: impl IntoIterator<Item = &'a str> + Clone,
    ) -> Result<Vec<String>, Conflicts> {
        let mut t = self.table();
        let found = scan(&t, cid, ids.clone());
        if found.count > 0 {
            return Err(found);
        }
        let owner: Arc<str> = Arc::from(cid);
        let mut taken = Vec::new();
        for id in ids {
            if !t.contains_key(id) {
                t.insert(id.to_string(), owner.clone());
                taken.push(id.to_string());
            }
        }
        Ok(taken)
    }

    /// Whether a campaign other than `cid` holds `id`.
    pub fn held_by_other(&self, cid: &str, id: &str) -> bool {
        self.table().get(id).is_some_and(|h| &**h != cid)
    }

    /// Gives back ids taken by [`Locks::try_hold`] for `cid`.
    pub fn release(&self, cid: &str, taken: &[String]) {
        let mut t = self.table();
        for id in taken {
            if t.get(id.as_str()).is_some_and(|h| &**h == cid) {
                t.remove(id.as_str());
            }
        }
    }

    /// Releases everything `cid` holds (it ended).
    pub fn release_campaign(&self, cid: &str) {
        self.table().retain(|_, h| &**h != cid);
    }

    /// How many credentials are held.
    pub fn len(&self) -> usize {
        self.table().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Locks taken by a start: given back on drop unless the start succeeded.
pub struct Taken<'a> {
    locks: &'a Locks,
    cid: String,
    ids: Vec<String>,
}

impl<'a> Taken<'a> {
    pub fn new(locks: &'a Locks, cid: &str, ids: Vec<String>) -> Self {
        Taken {
            locks,
            cid: cid.to_string(),
            ids,
        }
    }

    /// The campaign started: it keeps the locks until it ends.
    pub fn keep(mut self) {
        self.ids.clear();
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if !self.ids.is_empty() {
            self.locks.release(&self.cid, &self.ids);
        }
    }
}

fn scan<'a>(
    t: &HashMap<String, Arc<str>>,
    cid: &str,
    ids: impl IntoIterator<Item = &'a str>,
) -> Conflicts {
    let mut named = Vec::new();
    let mut count = 0;
    let mut campaigns = std::collections::BTreeSet::new();
    for id in ids {
        if let Some(holder) = t.get(id).filter(|h| &***h != cid) {
            count += 1;
            campaigns.insert(holder.to_string());
            if named.len() < MAX_NAMED_CONFLICTS {
                named.push((id.to_string(), holder.to_string()));
            }
        }
    }
    Conflicts {
        named,
        count,
        campaigns: campaigns.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_campaign_is_refused_all_or_nothing_and_gets_the_credentials_once_the_first_ends() {
        let l = Locks::default();
        let a: Vec<String> = (0..40).map(|i| format!("cred-{i}")).collect();
        let ids = || a.iter().map(String::as_str);
        assert_eq!(l.try_hold("c-1", ids()).unwrap().len(), 40);
        // The same campaign again (an idempotent start): nothing new taken.
        assert!(l.try_hold("c-1", ids()).unwrap().is_empty());
        let mixed = ["cred-3", "other-1", "cred-7"];
        let err = l.try_hold("c-2", mixed.iter().copied()).unwrap_err();
        assert_eq!(err.count, 2);
        assert_eq!(err.campaigns, ["c-1"]);
        assert!(err.to_string().contains("cred-3 (c-1)"), "{err}");
        // Nothing of the refused start was taken.
        assert_eq!(l.len(), 40);
        assert_eq!(l.conflicts("c-2", ["other-1"]).count, 0);
        l.release_campaign("c-1");
        assert!(l.is_empty());
        assert_eq!(l.try_hold("c-2", mixed.iter().copied()).unwrap().len(), 3);
    }

    #[test]
    fn a_failed_start_gives_back_only_what_it_took() {
        let l = Locks::default();
        l.hold_all("c-1", ["a", "b"]);
        let taken = l.try_hold("c-1", ["a", "b", "c"]).unwrap();
        assert_eq!(taken, ["c"]);
        l.release("c-1", &taken);
        assert_eq!(l.conflicts("c-9", ["a", "b", "c"]).count, 2);
    }

    #[test]
    fn conflicts_name_at_most_a_bounded_number() {
        let l = Locks::default();
        let ids: Vec<String> = (0..100).map(|i| format!("x{i}")).collect();
        l.hold_all("c-1", ids.iter().map(String::as_str));
        let c = l.conflicts("c-2", ids.iter().map(String::as_str));
        assert_eq!(c.count, 100);
        assert_eq!(c.named.len(), MAX_NAMED_CONFLICTS);
        assert!(c.to_string().ends_with("and 80 more"));
    }
}
