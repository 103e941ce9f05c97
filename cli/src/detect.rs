//! `keywave detect`: publish a detection, report time to contain, list
//! detections that started nothing. Raw flags here; validated into a
//! [`Detection`] with the bad flag named.

use crate::containment as report;
use crate::context::{connect, CommandError, DetectCommandError};
use clap::{Args, Subcommand};
use keywave_common::client::ApiClient;
use keywave_common::flags::{usage, UsageError};
use keywave_common::{
    detect::{self, CredentialRef, Detection, Severity, Timestamp},
    ids, topology,
    wire::SCHEMA_VERSION,
};
use keywave_coordinator::detect::store;
use std::collections::BTreeMap;
use std::io::Read;

/// `keywave detect`: report a leak, or inspect what detections did.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DetectArgs {
    #[command(subcommand)]
    pub command: Option<DetectCommand>,
    #[command(flatten)]
    pub publish: PublishArgs,
}

#[derive(Debug, Subcommand)]
pub enum DetectCommand {
    /// Time to contain of a containment campaign, per credential, and the credentials still exposed.
    #[command(
        after_help = "Examples:\n  keywave detect report contain-0123456789ab\n  keywave --json detect report contain-0123456789ab | jq .time_to_contain"
    )]
    Report {
        /// The containment campaign id (see `keywave campaign list`).
        campaign: String,
    },
    /// Detections that started nothing: unmatched, unidentified, rejected, already contained.
    #[command(
        after_help = "Examples:\n  keywave detect unmatched\n  keywave --json detect unmatched --limit 500"
    )]
    Unmatched {
        /// Most recent records shown.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Print the sha256: fingerprint of a secret read from stdin (what a scanner sends).
    #[command(after_help = "Example:\n  printf %s \"$LEAKED\" | keywave detect fingerprint")]
    Fingerprint,
}

/// Raw flags of a detection published from the CLI.
#[derive(Debug, Args, Default)]
pub struct PublishArgs {
    /// The leaked credential's keywave id.
    #[arg(long, value_name = "ID", conflicts_with_all = ["principal", "fingerprint"])]
    pub credential: Option<String>,
    /// The leaked login (with --endpoint).
    #[arg(
        long,
        value_name = "P",
        requires = "endpoint",
        conflicts_with = "fingerprint"
    )]
    pub principal: Option<String>,
    /// The endpoint of --principal, as named in the inventory.
    #[arg(long, value_name = "E", requires = "principal")]
    pub endpoint: Option<String>,
    /// sha256:<hex> of the leaked value (see `keywave detect fingerprint`), or a dfp1: fingerprint.
    #[arg(long, value_name = "FP")]
    pub fingerprint: Option<String>,
    /// Who found it (subject token).
    #[arg(long, default_value = "cli")]
    pub source: String,
    /// The source's id of the finding (de-duplication key); random by default.
    #[arg(long)]
    pub source_id: Option<String>,
    /// low, medium, high or critical.
    #[arg(long, default_value = "high")]
    pub severity: String,
    /// Link to the evidence.
    #[arg(long, value_name = "URL")]
    pub evidence_url: Option<String>,
    /// When the leak was found (RFC 3339); now by default.
    #[arg(long, value_name = "RFC3339")]
    pub detected_at: Option<String>,
    /// Context labels, key=value (repeatable).
    #[arg(long = "label", value_name = "K=V")]
    pub labels: Vec<String>,
}

impl PublishArgs {
    /// The validated detection.
    pub fn to_detection(&self) -> Result<Detection, UsageError> {
        let credential = match (&self.credential, &self.principal, &self.endpoint, &self.fingerprint) {
            (Some(id), None, None, None) => CredentialRef::by_id(id),
            (None, Some(p), Some(e), None) => CredentialRef::by_login(p, e),
            (None, None, None, Some(fp)) => CredentialRef::by_fingerprint(fp.trim()),
            _ => {
                return Err(usage(
                    "--credential",
                    "name the leaked credential with exactly one of --credential ID, --principal P --endpoint E, or --fingerprint FP",
                ))
            }
        };
        let mut labels = BTreeMap::new();
        for l in &self.labels {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| usage("--label", format!("{l:?} is not key=value")))?;
            labels.insert(k.to_string(), v.to_string());
        }
        let d = Detection {
            v: SCHEMA_VERSION,
            source: self.source.clone(),
            source_id: self
                .source_id
                .clone()
                .unwrap_or_else(|| ids::random_id("cli")),
            detected_at: match &self.detected_at {
                Some(s) => {
                    Timestamp(detect::parse_rfc3339(s).map_err(|e| usage("--detected-at", e))?)
                }
                None => Timestamp::now(),
            },
            credential,
            severity: self
                .severity
                .parse::<Severity>()
                .map_err(|e| usage("--severity", e))?,
            evidence_url: self.evidence_url.clone(),
            labels,
        };
        d.validate().map_err(|e| {
            let flag = match e.field {
                "source" => "--source",
                "source_id" => "--source-id",
                "credential.id" => "--credential",
                "credential.principal" => "--principal",
                "credential.endpoint" => "--endpoint",
                "credential.fingerprint" => "--fingerprint",
                "evidence_url" => "--evidence-url",
                "labels" => "--label",
                _ => "--credential",
            };
            usage(flag, e.message)
        })?;
        Ok(d)
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"{e}\"}}"))
    );
}

fn fail(e: impl Into<DetectCommandError>) -> CommandError {
    CommandError::Detect(e.into())
}

/// Runs `keywave detect ...`; returns the exit code.
pub async fn run(args: DetectArgs, url: &str, json: bool) -> Result<u8, CommandError> {
    match args.command {
        None => {
            let d = args.publish.to_detection()?;
            let js = topology::context(connect(url).await?);
            topology::detection_streams(&js, &topology::Config::default())
                .await
                .map_err(fail)?;
            let duplicate = detect::publish(&js, &d).await.map_err(fail)?;
            if json {
                print_json(
                    &serde_json::json!({ "ok": true, "detection": d.msg_id(), "subject": d.subject(), "duplicate": duplicate }),
                );
            } else if duplicate {
                println!("detection {} was already recorded", d.msg_id());
            } else {
                println!(
                    "detection {} published on {} ({})",
                    d.msg_id(),
                    d.subject(),
                    d.credential.describe()
                );
            }
            Ok(0)
        }
        Some(DetectCommand::Report { campaign }) => {
            ids::validate("campaign id", &campaign)
                .map_err(|e| usage("CAMPAIGN", e.to_string()))?;
            let client = connect(url).await?;
            let js = topology::context(client.clone());
            let kv = store::bucket(&js, &topology::Config::default())
                .await
                .map_err(fail)?;
            let r = report::build(&js, &ApiClient::new(client), &kv, &campaign)
                .await
                .map_err(fail)?;
            if json {
                print_json(&r);
            } else {
                print!("{}", r.render());
            }
            Ok(if r.exposed.is_empty() {
                0
            } else {
                crate::context::EXIT_NOT_COMPLETED
            })
        }
        Some(DetectCommand::Unmatched { limit }) => {
            let js = topology::context(connect(url).await?);
            let recs = recent_records(&js, limit).await.map_err(fail)?;
            if json {
                print_json(&recs);
            } else {
                println!("{:<24} {:<18} {:<40} REASON", "AT", "OUTCOME", "DETECTION");
                for r in &recs {
                    let det = r
                        .detection
                        .as_ref()
                        .map(|d| format!("{} ({})", d.msg_id(), d.credential.describe()))
                        .unwrap_or_else(|| format!("seq {}", r.stream_seq));
                    println!(
                        "{:<24} {:<18} {:<40} {}",
                        detect::format_rfc3339(r.at_ms),
                        r.outcome.as_str(),
                        det,
                        r.reason
                    );
                }
            }
            Ok(0)
        }
        Some(DetectCommand::Fingerprint) => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| usage("stdin", e.to_string()))?;
            let secret =
                keywave_common::crypto::Secret::new(s.trim_end_matches(['\n', '\r']).to_string());
            drop(s);
            println!("{}", detect::sha256_fingerprint(&secret));
            Ok(0)
        }
    }
}

/// The last `limit` detection records other than `contained`.
async fn recent_records(
    js: &async_nats::jetstream::Context,
    limit: usize,
) -> Result<Vec<store::DetectionRecord>, topology::StreamReadError> {
    use topology::StreamReadError;
    const STREAM: &str = topology::STREAM_EVENTS;
    const IDLE: std::time::Duration = std::time::Duration::from_secs(10);
    let mut out = std::collections::VecDeque::new();
    let read = topology::read_all(
        js,
        STREAM,
        format!("keywave.event.{}.>", store::EVENT_SCOPE),
        IDLE,
        |m| {
            if let Ok(r) = serde_json::from_slice::<store::DetectionRecord>(&m.payload) {
                if r.outcome != store::Outcome::Contained {
                    out.push_back(r);
                    if out.len() > limit {
                        out.pop_front();
                    }
                }
            }
        },
    )
    .await;
    match read {
        // No events stream yet: nothing was ever detected.
        Err(StreamReadError::Open { .. }) => return Ok(Vec::new()),
        r => r?,
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        d: DetectArgs,
    }

    fn publish(args: &[&str]) -> Result<Detection, UsageError> {
        let mut argv = vec!["t"];
        argv.extend_from_slice(args);
        T::try_parse_from(argv).unwrap().d.publish.to_detection()
    }

    #[test]
    fn cli_detections_validate() {
        let d = publish(&["--credential", "db-1", "--severity", "critical"]).unwrap();
        assert_eq!(d.credential, CredentialRef::by_id("db-1"));
        assert_eq!(d.source, "cli");
        assert_eq!(d.severity, Severity::Critical);
        let d = publish(&[
            "--principal",
            "app",
            "--endpoint",
            "redis-eu",
            "--source",
            "siem",
            "--source-id",
            "42",
        ])
        .unwrap();
        assert_eq!(d.msg_id(), "siem:42");
        assert_eq!(publish(&[]).unwrap_err().flag, "--credential");
        assert_eq!(
            publish(&["--fingerprint", "md5:x"]).unwrap_err().flag,
            "--fingerprint"
        );
        assert_eq!(
            publish(&["--credential", "a", "--severity", "urgent"])
                .unwrap_err()
                .flag,
            "--severity"
        );
        assert!(
            T::try_parse_from(["t", "--principal", "p"]).is_err(),
            "principal needs endpoint"
        );
    }
}
