//! The detection flags of `keywave-coordinator`, validated into
//! [`DetectOptions`] with the bad flag named; secrets come from files or the
//! environment, never from the command line.

use super::{DetectOptions, IntakeConfig, WebhookConfig};
use clap::{ArgAction, Args};
use keywave_common::flags::{usage, UsageError};
use keywave_common::{detect::DetectKey, duration, topology, wire};
use std::path::PathBuf;

/// Environment variable holding the detection key (hex or base64).
pub const DETECT_KEY_ENV: &str = "KEYWAVE_DETECT_KEY";
/// Environment variable naming a file holding the detection key.
pub const DETECT_KEY_FILE_ENV: &str = "KEYWAVE_DETECT_KEY_FILE";
/// Environment variable of `--http-listen`.
pub const HTTP_LISTEN_ENV: &str = "KEYWAVE_HTTP_LISTEN";

/// The detection flags of `keywave-coordinator`.
#[derive(Debug, Args, Clone)]
pub struct DaemonDetectArgs {
    /// Run the detection intake (containment campaigns from `keywave.detect.*`).
    #[arg(long, default_value_t = true, action = ArgAction::Set, value_name = "true|false")]
    pub detections: bool,
    /// Detections arriving within this window are coalesced into one containment campaign.
    #[arg(long, default_value = "2s", value_name = "DURATION")]
    pub detect_window: String,
    /// Wave plan of containment campaigns.
    #[arg(long, default_value = "1,100%")]
    pub containment_waves: String,
    /// Failure budget of containment waves (a failed wave pauses for an operator).
    #[arg(long, default_value_t = 0.0)]
    pub containment_failure_budget: f64,
    /// How long one containment task may take.
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    pub containment_task_timeout: String,
    /// Inventory tag of credentials that are contained only once a human approves
    /// (`keywave campaign approve`); untagged ones go ahead at once. Empty: none.
    #[arg(long, default_value = super::intake::DEFAULT_APPROVAL_TAG, value_name = "TAG")]
    pub containment_approval_tag: String,
    /// File holding the detection-fingerprint key (hex or base64); also KEYWAVE_DETECT_KEY.
    #[arg(long, env = DETECT_KEY_FILE_ENV, value_name = "FILE")]
    pub detect_key_file: Option<PathBuf>,
    /// Serve the webhook intake on this address (e.g. 0.0.0.0:8088); off by default.
    /// Secrets: KEYWAVE_GITHUB_WEBHOOK_SECRET, KEYWAVE_GITGUARDIAN_WEBHOOK_SECRET,
    /// KEYWAVE_DETECT_WEBHOOK_SECRET (or the same names with _FILE).
    #[arg(long, env = HTTP_LISTEN_ENV, value_name = "ADDR")]
    pub http_listen: Option<String>,
    /// Largest accepted distance between a webhook's signed timestamp and now.
    #[arg(long, default_value = "5m", value_name = "DURATION")]
    pub webhook_max_skew: String,
    /// Poll sources for open alerts (the webhook fallback): a JSON file, an array of
    /// {"name","url","format":"detections"|"github_alerts","token_env"|"token_file",
    /// "interval","timeout","max_body_bytes","max_pages"}. Off unless given.
    #[arg(long, env = POLL_CONFIG_ENV, value_name = "FILE")]
    pub poll_config: Option<PathBuf>,
}

/// Environment variable of `--poll-config`.
pub const POLL_CONFIG_ENV: &str = "KEYWAVE_POLL_CONFIG";

impl DaemonDetectArgs {
    /// The validated options (`None` with `--detections false`); secrets
    /// are read through `env`.
    pub fn to_options(
        &self,
        topology: topology::Config,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<DetectOptions>, UsageError> {
        if !self.detections {
            return Ok(None);
        }
        let window = duration::parse(&self.detect_window)
            .map_err(|e| usage("--detect-window", e.to_string()))?;
        if window.is_zero() {
            return Err(usage("--detect-window", "must be positive"));
        }
        let task_timeout = duration::parse(&self.containment_task_timeout)
            .map_err(|e| usage("--containment-task-timeout", e.to_string()))?;
        if task_timeout.is_zero() {
            return Err(usage("--containment-task-timeout", "must be positive"));
        }
        if !(0.0..=1.0).contains(&self.containment_failure_budget) {
            return Err(usage(
                "--containment-failure-budget",
                "must be between 0 and 1",
            ));
        }
        let detect_key = match (&self.detect_key_file, env(DETECT_KEY_ENV)) {
            (Some(path), _) => Some(
                DetectKey::from_file(path)
                    .map_err(|e| usage("--detect-key-file", e.to_string()))?,
            ),
            (None, Some(k)) if !k.is_empty() => {
                Some(DetectKey::parse(&k).map_err(|e| usage(DETECT_KEY_ENV, e.to_string()))?)
            }
            _ => None,
        };
        let webhook = match &self.http_listen {
            None => None,
            Some(addr) => {
                let listen = addr.parse().map_err(|_| {
                    usage(
                        "--http-listen",
                        format!("{addr:?} is not an address like 0.0.0.0:8088"),
                    )
                })?;
                let mut cfg = WebhookConfig::new(listen)
                    .secrets_from_env(&env)
                    .map_err(|e| usage("--http-listen", e))?;
                if cfg.github_secret.is_none()
                    && cfg.gitguardian_secret.is_none()
                    && cfg.generic_secret.is_none()
                {
                    return Err(usage(
                        "--http-listen",
                        "no webhook secret is configured: set KEYWAVE_GITHUB_WEBHOOK_SECRET, KEYWAVE_GITGUARDIAN_WEBHOOK_SECRET or KEYWAVE_DETECT_WEBHOOK_SECRET (or *_FILE)",
                    ));
                }
                cfg.max_skew = duration::parse(&self.webhook_max_skew)
                    .map_err(|e| usage("--webhook-max-skew", e.to_string()))?;
                Some(cfg)
            }
        };
        let polls = match &self.poll_config {
            None => Vec::new(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    usage(
                        "--poll-config",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                super::poll::parse_config(&text, &env)
                    .map_err(|e| usage("--poll-config", format!("{}: {e}", path.display())))?
            }
        };
        Ok(Some(DetectOptions {
            polls,
            topology,
            intake: IntakeConfig {
                window,
                waves: wire::parse_wave_plan(&self.containment_waves)
                    .map_err(|e| usage("--containment-waves", e))?,
                failure_budget: self.containment_failure_budget,
                task_timeout,
                approval_tag: self.containment_approval_tag.trim().to_string(),
                ..Default::default()
            },
            detect_key,
            webhook,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct D {
        #[command(flatten)]
        d: DaemonDetectArgs,
    }

    #[test]
    fn daemon_flags_validate() {
        let none = |_: &str| None;
        let o = D::try_parse_from(["d"])
            .unwrap()
            .d
            .to_options(Default::default(), none)
            .unwrap()
            .unwrap();
        assert_eq!(o.intake.window, std::time::Duration::from_secs(2));
        assert!(o.webhook.is_none());
        assert!(D::try_parse_from(["d", "--detections", "false"])
            .unwrap()
            .d
            .to_options(Default::default(), none)
            .unwrap()
            .is_none());
        let err = D::try_parse_from(["d", "--http-listen", "0.0.0.0:8088"])
            .unwrap()
            .d
            .to_options(Default::default(), none)
            .unwrap_err();
        assert_eq!(err.flag, "--http-listen");
        let env = |k: &str| (k == "KEYWAVE_GITHUB_WEBHOOK_SECRET").then(|| "x".to_string());
        let o = D::try_parse_from(["d", "--http-listen", "127.0.0.1:0"])
            .unwrap()
            .d
            .to_options(Default::default(), env)
            .unwrap()
            .unwrap();
        assert!(o.webhook.unwrap().github_secret.is_some());
        let err = D::try_parse_from(["d", "--detect-window", "0"])
            .unwrap()
            .d
            .to_options(Default::default(), none)
            .unwrap_err();
        assert_eq!(err.flag, "--detect-window");
    }
}
