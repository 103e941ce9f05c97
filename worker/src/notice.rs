//! Rotation notices for leak detection: a worker that holds the
//! detection key announces, on `keywave.rotated.<region>.<credential>`, the
//! keyed `dfp1:` fingerprints of each secret that becomes CURRENT (rotation
//! promoted, rollback restored, enrolment) and of the one it replaced, so the
//! coordinator can match a scanner's `sha256:` of a leaked value. Never a
//! secret; nothing at all without a key.

use async_nats::jetstream;
use keywave_common::crypto::Secret;
use keywave_common::detect::{DetectKey, RotatedNotice};
use tracing::{debug, warn};

/// Publishes [`RotatedNotice`]s of one region with the detection key.
#[derive(Clone)]
pub struct Notifier {
    js: jetstream::Context,
    key: DetectKey,
    region: String,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl Notifier {
    pub fn new(js: jetstream::Context, key: DetectKey, region: impl Into<String>) -> Self {
        Notifier {
            js,
            key,
            region: region.into(),
        }
    }

    /// Announces that `current` is now the CURRENT secret of `credential_id`,
    /// replacing `previous`. Advisory: the notice only feeds fingerprint
    /// matching of leak detections, so a failure to publish it is logged and
    /// never fails (or retries) the rotation whose secret is already CURRENT.
    /// A redelivered task announces again; the stream drops the duplicate
    /// (the message id is the credential and the fingerprint).
    pub async fn announce(&self, credential_id: &str, current: &Secret, previous: Option<&Secret>) {
        let notice = RotatedNotice::new(&self.key, credential_id, &self.region, current, previous);
        match notice.publish(&self.js).await {
            Ok(()) => {
                debug!(credential = %credential_id, detect_fp = %notice.detect_fp, "Rotation notice published")
            }
            Err(e) => warn!(
                credential = %credential_id,
                error = %e,
                "Could not publish the rotation notice; fingerprint matching of leak detections misses this secret until its next rotation"
            ),
        }
    }
}
