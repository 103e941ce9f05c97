//! A campaign's plan, persisted in the `keywave-campaigns` bucket so that a
//! restarted coordinator publishes exactly the same tasks: the selected
//! credentials sorted by id, as compact [`PlanEntry`]s in chunks
//! (`plan.<cid>.<n>`, JSON arrays of at most [`MAX_CHUNK_ENTRIES`] entries and
//! well under 1 MB), described by a manifest (`plan.<cid>`) written last.
//! Waves are consecutive ranges of the plan; a wave's credentials are read
//! chunk by chunk, so memory does not grow with the campaign.

use async_nats::jetstream::kv;
use futures::{StreamExt, TryStreamExt};
use keywave_common::wire::{ConsumerCheck, Credential, TargetKind, SCHEMA_VERSION};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use thiserror::Error;

/// Most entries in one chunk.
pub const MAX_CHUNK_ENTRIES: u64 = 2_000;
/// Target upper bound of one chunk's encoded size.
pub const MAX_CHUNK_BYTES: usize = 512 * 1024;
/// Concurrent chunk writes.
const WRITE_CONCURRENCY: usize = 8;

/// What a task needs to know about a credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanEntry {
    pub id: String,
    pub region: String,
    pub endpoint: String,
    pub kind: TargetKind,
    pub principal: String,
    /// The credential's consumers and their verification,
    /// resolved from the inventory and the consumer records at planning.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<ConsumerCheck>,
}

impl PlanEntry {
    /// The entry of `c`, with its consumers resolved against `idx`.
    pub fn with_consumers(c: &Credential, idx: &crate::inventory::deps::ConsumerIndex) -> Self {
        PlanEntry {
            consumers: crate::inventory::deps::checks(c, idx),
            ..PlanEntry::from(c)
        }
    }
}

impl From<&Credential> for PlanEntry {
    fn from(c: &Credential) -> Self {
        PlanEntry {
            id: c.id.clone(),
            region: c.region.clone(),
            endpoint: c.endpoint.clone(),
            kind: c.kind,
            principal: c.principal.clone(),
            consumers: Vec::new(),
        }
    }
}

/// Describes the chunks of a plan. Chunk `n` holds plan positions
/// `n * chunk_size .. (n + 1) * chunk_size`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanManifest {
    pub v: u16,
    pub campaign_id: String,
    pub total: u64,
    pub chunk_size: u64,
    pub chunks: u64,
}

#[derive(Debug, Error)]
pub enum PlanError {
    #[error("plan key {key}: {detail}")]
    Kv { key: String, detail: String },
    #[error("plan key {key} is missing")]
    Missing { key: String },
    #[error("plan key {key} is corrupt: {detail}")]
    Corrupt { key: String, detail: String },
}

pub fn manifest_key(cid: &str) -> String {
    format!("plan.{cid}")
}

pub fn chunk_key(cid: &str, n: u64) -> String {
    format!("plan.{cid}.{n}")
}

/// Entries per chunk such that the largest entry still keeps a chunk under
/// [`MAX_CHUNK_BYTES`].
pub fn chunk_size_for(max_entry_bytes: usize) -> u64 {
    ((MAX_CHUNK_BYTES / max_entry_bytes.max(1)) as u64).clamp(1, MAX_CHUNK_ENTRIES)
}

/// Writes a plan: the chunks first, then the manifest (a plan without its
/// manifest is never used).
pub async fn write(
    kv: &kv::Store,
    cid: &str,
    entries: &[PlanEntry],
) -> Result<PlanManifest, PlanError> {
    let max_len = entries
        .iter()
        .map(|e| serde_json::to_vec(e).map_or(0, |b| b.len()) + 1)
        .max()
        .unwrap_or(1);
    let chunk_size = chunk_size_for(max_len);
    let count = (entries.len() as u64).div_ceil(chunk_size);
    // Indexes rather than borrowed slices as stream items: the future stays
    // `Send` for callers that spawn it.
    futures::stream::iter(0..count)
        .map(|n| {
            let first = (n * chunk_size) as usize;
            let last = (first + chunk_size as usize).min(entries.len());
            let key = chunk_key(cid, n);
            let body = serde_json::to_vec(&entries[first..last]);
            async move {
                let body = body.map_err(|e| PlanError::Corrupt {
                    key: key.clone(),
                    detail: e.to_string(),
                })?;
                kv.put(&key, body.into()).await.map_err(|e| PlanError::Kv {
                    key,
                    detail: e.to_string(),
                })?;
                Ok::<_, PlanError>(())
            }
        })
        .buffer_unordered(WRITE_CONCURRENCY)
        .try_collect::<()>()
        .await?;
    let manifest = PlanManifest {
        v: SCHEMA_VERSION,
        campaign_id: cid.to_string(),
        total: entries.len() as u64,
        chunk_size,
        chunks: count,
    };
    let key = manifest_key(cid);
    let body = serde_json::to_vec(&manifest).expect("manifest serializes");
    kv.put(&key, body.into()).await.map_err(|e| PlanError::Kv {
        key,
        detail: e.to_string(),
    })?;
    Ok(manifest)
}

/// Reads a plan's manifest; `None` when the campaign has no plan.
pub async fn read_manifest(kv: &kv::Store, cid: &str) -> Result<Option<PlanManifest>, PlanError> {
    let key = manifest_key(cid);
    let Some(body) = kv.get(&key).await.map_err(|e| PlanError::Kv {
        key: key.clone(),
        detail: e.to_string(),
    })?
    else {
        return Ok(None);
    };
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| PlanError::Corrupt {
            key,
            detail: e.to_string(),
        })
}

/// Calls `f` with the entries of a plan, in plan order, one chunk at a time.
pub async fn for_each_chunk(
    kv: &kv::Store,
    manifest: &PlanManifest,
    mut f: impl FnMut(&[PlanEntry]),
) -> Result<(), PlanError> {
    let mut r = PlanReader::new(kv.clone(), manifest.clone());
    for n in 0..manifest.chunks {
        f(&r.chunk(n).await?);
    }
    Ok(())
}

/// Reads ranges of a plan, caching the last chunk.
pub struct PlanReader {
    kv: kv::Store,
    manifest: PlanManifest,
    cached: Option<(u64, Arc<Vec<PlanEntry>>)>,
}

impl PlanReader {
    pub fn new(kv: kv::Store, manifest: PlanManifest) -> Self {
        PlanReader {
            kv,
            manifest,
            cached: None,
        }
    }

    async fn chunk(&mut self, n: u64) -> Result<Arc<Vec<PlanEntry>>, PlanError> {
        if let Some((cn, c)) = &self.cached {
            if *cn == n {
                return Ok(c.clone());
            }
        }
        let key = chunk_key(&self.manifest.campaign_id, n);
        let body = self
            .kv
            .get(&key)
            .await
            .map_err(|e| PlanError::Kv {
                key: key.clone(),
                detail: e.to_string(),
            })?
            .ok_or_else(|| PlanError::Missing { key: key.clone() })?;
        let entries: Vec<PlanEntry> =
            serde_json::from_slice(&body).map_err(|e| PlanError::Corrupt {
                key,
                detail: e.to_string(),
            })?;
        let entries = Arc::new(entries);
        self.cached = Some((n, entries.clone()));
        Ok(entries)
    }

    /// The entries at plan positions `start..start + len`, one chunk at a
    /// time: returns the chunk-sized slice beginning at `pos` (and its first
    /// position), so callers iterate without holding more than one chunk.
    pub async fn slice_at(
        &mut self,
        pos: u64,
        end: u64,
    ) -> Result<(Arc<Vec<PlanEntry>>, std::ops::Range<usize>), PlanError> {
        let cs = self.manifest.chunk_size;
        let n = pos / cs;
        let chunk = self.chunk(n).await?;
        let first = (pos - n * cs) as usize;
        let last = ((end.min((n + 1) * cs)) - n * cs) as usize;
        if last > chunk.len() || first > last {
            return Err(PlanError::Corrupt {
                key: chunk_key(&self.manifest.campaign_id, n),
                detail: format!(
                    "chunk has {} entries, positions {first}..{last} wanted",
                    chunk.len()
                ),
            });
        }
        Ok((chunk, first..last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_keeps_chunks_small() {
        assert_eq!(chunk_size_for(100), MAX_CHUNK_ENTRIES);
        // The largest possible entry: 3 ids of 128 bytes and a 256-byte principal.
        let worst = 128 * 3 + 256 + 64;
        let cs = chunk_size_for(worst);
        assert!(cs >= 500);
        assert!(cs as usize * worst <= MAX_CHUNK_BYTES);
        assert_eq!(chunk_size_for(usize::MAX), 1);
    }
}
