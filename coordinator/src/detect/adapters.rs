//! Translation of scanner payloads into normalized [`Detection`]s: GitHub
//! `secret_scanning_alert` events, GitGuardian incident webhooks and the
//! generic keywave JSON. Pure functions over already-authenticated bodies.
//!
//! Neither GitHub nor GitGuardian sends the leaked value in a webhook, so
//! their detections usually carry no credential identification and are
//! recorded as `unidentified` (with the repository and secret type as
//! labels, for triage). A GitHub alert in the REST API's form, which
//! includes `secret` (e.g. forwarded by a SOAR), is identified by the
//! SHA-256 of that value; the value itself is dropped at once.

use keywave_common::crypto::Secret;
use keywave_common::detect::{
    parse_rfc3339, sha256_fingerprint, CredentialRef, Detection, Severity, Timestamp,
};
use keywave_common::wire::SCHEMA_VERSION;
use serde_json::Value;
use std::collections::BTreeMap;
use thiserror::Error;

/// What a payload turned into.
#[derive(Debug, Clone, PartialEq)]
pub enum Translated {
    /// A detection to publish.
    Detection(Box<Detection>),
    /// An authentic event that is not a leak (a resolved alert, a ping...).
    Ignored(String),
}

/// Why a payload could not be translated (a 400 for the sender).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AdapterError {
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("missing or invalid field {0}")]
    Field(&'static str),
    #[error("{0}")]
    Invalid(String),
}

fn parse(body: &[u8]) -> Result<Value, AdapterError> {
    serde_json::from_slice(body).map_err(|e| {
        let mut s = e.to_string();
        s.truncate(200);
        AdapterError::NotJson(s)
    })
}

fn label(labels: &mut BTreeMap<String, String>, k: &str, v: Option<&str>) {
    if let Some(v) = v.filter(|v| !v.is_empty()) {
        let v: String = v.chars().filter(|c| !c.is_control()).take(256).collect();
        labels.insert(k.to_string(), v);
    }
}

fn url(v: Option<&str>) -> Option<String> {
    v.filter(|u| {
        (u.starts_with("https://") || u.starts_with("http://"))
            && u.len() <= 2048
            && !u.chars().any(|c| c.is_whitespace() || c.is_control())
    })
    .map(String::from)
}

fn time(v: Option<&str>) -> Timestamp {
    v.and_then(|s| parse_rfc3339(s).ok())
        .map(Timestamp)
        .unwrap_or_else(Timestamp::now)
}

fn validated(d: Detection) -> Result<Translated, AdapterError> {
    d.validate()
        .map_err(|e| AdapterError::Invalid(e.to_string()))?;
    Ok(Translated::Detection(Box::new(d)))
}

/// GitHub actions that mean a secret is (again) exposed.
const GITHUB_LEAK_ACTIONS: &[&str] = &["created", "reopened", "publicly_leaked", "validated"];

/// A GitHub webhook delivery: `event` is the `X-GitHub-Event` header.
pub fn github(event: &str, body: &[u8]) -> Result<Translated, AdapterError> {
    let v = parse(body)?;
    match event {
        "ping" => return Ok(Translated::Ignored("ping".into())),
        "secret_scanning_alert" => {}
        other => {
            return Ok(Translated::Ignored(format!(
                "event {:?} is not a secret scanning alert",
                other.chars().take(64).collect::<String>()
            )))
        }
    }
    let action = v["action"].as_str().ok_or(AdapterError::Field("action"))?;
    let alert = &v["alert"];
    alert["number"]
        .as_u64()
        .ok_or(AdapterError::Field("alert.number"))?;
    let repo = v["repository"]["full_name"]
        .as_str()
        .ok_or(AdapterError::Field("repository.full_name"))?;
    github_alert(alert, repo, action)
}

/// `owner/repo` from a GitHub API URL such as
/// `https://api.github.com/repos/acme/app/secret-scanning/alerts?state=open`.
pub fn github_repo_of_url(url: &str) -> Option<String> {
    let rest = url.split_once("/repos/")?.1;
    let mut parts = rest.split(['/', '?', '#']);
    let (owner, repo) = (parts.next()?, parts.next()?);
    (!owner.is_empty() && !repo.is_empty()).then(|| format!("{owner}/{repo}"))
}

/// The body of GitHub's REST "list secret scanning alerts" (for a
/// repository, `GET /repos/{owner}/{repo}/secret-scanning/alerts?state=open`,
/// or an organization): a JSON array of alerts. Each alert becomes what
/// [`github`] makes of a webhook delivery of it (same `source_id`
/// `owner/repo#number`, so an alert that also arrived by webhook is one
/// detection); open alerts count as `created`, resolved ones are ignored.
/// `url` is where the list came from: the repository of alerts that do not
/// name theirs.
pub fn github_alerts_list(
    body: &[u8],
    url: &str,
) -> Result<Vec<Result<Translated, AdapterError>>, AdapterError> {
    let v = parse(body)?;
    let alerts = v.as_array().ok_or(AdapterError::Invalid(
        "expected a JSON array of secret scanning alerts".into(),
    ))?;
    let fallback = github_repo_of_url(url);
    Ok(alerts
        .iter()
        .map(|alert| {
            alert["number"]
                .as_u64()
                .ok_or(AdapterError::Field("number"))?;
            let repo = alert["repository"]["full_name"]
                .as_str()
                .map(String::from)
                .or_else(|| alert["url"].as_str().and_then(github_repo_of_url))
                .or_else(|| fallback.clone())
                .ok_or(AdapterError::Field("repository.full_name"))?;
            match alert["state"].as_str() {
                None | Some("open") => github_alert(alert, &repo, "created"),
                Some(other) => Ok(Translated::Ignored(format!(
                    "alert state {:?} is not open",
                    other.chars().take(64).collect::<String>()
                ))),
            }
        })
        .collect())
}

/// A JSON array of normalized [`Detection`]s (docs/detection.schema.json),
/// e.g. from a SIEM's "open alerts" endpoint.
pub fn detections_list(body: &[u8]) -> Result<Vec<Result<Translated, AdapterError>>, AdapterError> {
    let v = parse(body)?;
    let items = v.as_array().ok_or(AdapterError::Invalid(
        "expected a JSON array of detections".into(),
    ))?;
    Ok(items
        .iter()
        .map(|item| {
            let d: Detection = serde_json::from_value(item.clone()).map_err(|e| {
                let mut s = e.to_string();
                s.truncate(200);
                AdapterError::Invalid(s)
            })?;
            validated(d)
        })
        .collect())
}

/// One GitHub secret scanning alert (the webhook's `alert` object or an
/// element of the REST list) of repository `repo`, under `action`.
fn github_alert(alert: &Value, repo: &str, action: &str) -> Result<Translated, AdapterError> {
    let number = alert["number"]
        .as_u64()
        .ok_or(AdapterError::Field("alert.number"))?;
    if !GITHUB_LEAK_ACTIONS.contains(&action) {
        return Ok(Translated::Ignored(format!(
            "action {:?} does not expose a secret",
            action.chars().take(64).collect::<String>()
        )));
    }
    if action == "validated" && alert["validity"].as_str() == Some("inactive") {
        return Ok(Translated::Ignored(
            "the secret was validated as inactive".into(),
        ));
    }
    let credential = match alert["secret"].as_str() {
        // The REST form carries the value: keep only its digest.
        Some(s) if !s.is_empty() => {
            CredentialRef::by_fingerprint(sha256_fingerprint(&Secret::new(s.to_string())))
        }
        _ => CredentialRef::default(),
    };
    let publicly = alert["publicly_leaked"].as_bool() == Some(true) || action == "publicly_leaked";
    let mut labels = BTreeMap::new();
    label(&mut labels, "repository", Some(repo));
    label(&mut labels, "secret_type", alert["secret_type"].as_str());
    label(&mut labels, "action", Some(action));
    label(&mut labels, "validity", alert["validity"].as_str());
    validated(Detection {
        v: SCHEMA_VERSION,
        source: "github".into(),
        source_id: format!("{repo}#{number}"),
        detected_at: time(
            alert["created_at"]
                .as_str()
                .or(alert["updated_at"].as_str()),
        ),
        credential,
        severity: if publicly {
            Severity::Critical
        } else {
            Severity::High
        },
        evidence_url: url(alert["html_url"].as_str()),
        labels,
    })
}

/// GitGuardian actions that mean a secret is (again) exposed.
const GITGUARDIAN_LEAK_ACTIONS: &[&str] = &[
    "incident_triggered",
    "incident_reopened",
    "incident_regression",
];

/// A GitGuardian custom webhook delivery (incident events).
pub fn gitguardian(body: &[u8]) -> Result<Translated, AdapterError> {
    let v = parse(body)?;
    let action = v["action"].as_str().ok_or(AdapterError::Field("action"))?;
    if !GITGUARDIAN_LEAK_ACTIONS.contains(&action) {
        return Ok(Translated::Ignored(format!(
            "action {:?} does not expose a secret",
            action.chars().take(64).collect::<String>()
        )));
    }
    let inc = &v["incident"];
    let id = inc["id"]
        .as_u64()
        .map(|n| n.to_string())
        .or_else(|| inc["id"].as_str().map(String::from))
        .ok_or(AdapterError::Field("incident.id"))?;
    let severity = inc["severity"]
        .as_str()
        .and_then(|s| s.parse::<Severity>().ok())
        .unwrap_or(Severity::High);
    let mut labels = BTreeMap::new();
    label(&mut labels, "detector", inc["detector"]["name"].as_str());
    label(&mut labels, "action", Some(action));
    label(&mut labels, "validity", inc["validity"].as_str());
    if let Some(occ) = inc["occurrences"].as_array().and_then(|o| o.first()) {
        label(
            &mut labels,
            "repository",
            occ["source"]["full_name"].as_str(),
        );
        label(&mut labels, "filepath", occ["filepath"].as_str());
    }
    validated(Detection {
        v: SCHEMA_VERSION,
        source: "gitguardian".into(),
        source_id: id,
        detected_at: time(inc["date"].as_str().or(v["timestamp"].as_str())),
        credential: CredentialRef::default(),
        severity,
        evidence_url: url(inc["gitguardian_url"].as_str()),
        labels,
    })
}

/// The generic endpoint: the body is a [`Detection`] (docs/detection.schema.json).
pub fn generic(body: &[u8]) -> Result<Translated, AdapterError> {
    let d: Detection = serde_json::from_slice(body).map_err(|e| {
        let mut s = e.to_string();
        s.truncate(200);
        AdapterError::NotJson(s)
    })?;
    validated(d)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A GitHub `secret_scanning_alert` delivery as GitHub sends it
    /// (abridged), optionally with the REST form's `secret`.
    pub fn github_payload(action: &str, number: u64, secret: Option<&str>) -> String {
        let secret = secret
            .map(|s| format!("\"secret\": {},", serde_json::to_string(s).unwrap()))
            .unwrap_or_default();
        format!(
            r#"{{
  "action": "{action}",
  "alert": {{
    "number": {number},
    "created_at": "2026-03-17T15:42:05Z",
    "updated_at": null,
    "url": "https://api.github.com/repos/acme/payments/secret-scanning/alerts/{number}",
    "html_url": "https://github.com/acme/payments/security/secret-scanning/{number}",
    "locations_url": "https://api.github.com/repos/acme/payments/secret-scanning/alerts/{number}/locations",
    "resolution": null, "resolved_at": null, "resolved_by": null, "resolution_comment": null,
    "secret_type": "redis_connection_string",
    "secret_type_display_name": "Redis connection string",
    {secret}
    "validity": "unknown",
    "push_protection_bypassed": false,
    "publicly_leaked": false,
    "multi_repo": false
  }},
  "repository": {{ "id": 186853002, "name": "payments", "full_name": "acme/payments", "private": true }},
  "organization": {{ "login": "acme", "id": 9919 }},
  "sender": {{ "login": "github", "id": 9919, "type": "Bot" }}
}}"#
        )
    }

    /// A GitGuardian `incident_triggered` delivery (abridged).
    pub fn gitguardian_payload(action: &str, id: u64) -> String {
        format!(
            r#"{{
  "source": "GitGuardian",
  "timestamp": "2026-03-17T15:42:06.788914Z",
  "action": "{action}",
  "message": "A new incident has been detected.",
  "target_user": "GitGuardian",
  "incident": {{
    "id": {id},
    "date": "2026-03-17T15:42:06.140481Z",
    "detector": {{ "name": "redis_credentials", "display_name": "Redis Credentials", "nature": "specific", "family": "Database", "detector_group_name": "redis_credentials", "detector_group_display_name": "Redis Credentials" }},
    "secret_hash": "Ri9FjVgdOlPnBmujoxP4XPJcbe82BhJXB/SAngijw/juCISuOMgPzYhV28m6OG24",
    "hmsl_hash": "05975add34ddc9a38a0fb57c7d3e676ffed57080516fc16bf8d8f14308fedb86",
    "secret_revoked": false,
    "occurrence_count": 1,
    "status": "TRIGGERED",
    "regression": false,
    "assignee_email": null,
    "occurrences_count": 1,
    "occurrences": [{{ "id": 4242, "incident_id": {id}, "kind": "realtime", "sha": "d670460b4b4aece5915caf5c68d12f560a9fe3e4", "source": {{ "id": 6531, "url": "https://github.com/acme/payments", "type": "github", "full_name": "acme/payments", "health": "at_risk" }}, "author_name": "dev", "author_info": "dev@acme.example", "date": "2026-03-17T15:41:00Z", "presence": "present", "url": "https://github.com/acme/payments/commit/d670460b4b4aece5915caf5c68d12f560a9fe3e4#L12", "filepath": "config/redis.env" }}],
    "ignore_reason": null, "ignored_at": null,
    "secret_presence": "present",
    "severity": "critical",
    "validity": "cannot_check",
    "resolved_at": null,
    "share_url": null,
    "tags": ["FROM_HISTORICAL_SCAN"],
    "gitguardian_url": "https://dashboard.gitguardian.com/workspace/1/incidents/{id}"
  }}
}}"#
        )
    }

    #[test]
    fn github_alert_with_rest_secret_is_fingerprinted() {
        let body = github_payload("created", 12, Some("s3cr3t-value"));
        let Translated::Detection(d) = github("secret_scanning_alert", body.as_bytes()).unwrap()
        else {
            panic!("not a detection")
        };
        assert_eq!(d.source_id, "acme/payments#12");
        assert_eq!(d.msg_id(), "github:acme/payments#12");
        assert_eq!(
            d.credential.fingerprint.as_deref(),
            Some(sha256_fingerprint(&Secret::new("s3cr3t-value".into())).as_str())
        );
        assert_eq!(d.labels["repository"], "acme/payments");
        assert_eq!(d.detected_at.ms(), 1_773_762_125_000);
        // The value itself is nowhere in the detection.
        assert!(!serde_json::to_string(&d).unwrap().contains("s3cr3t-value"));
    }

    #[test]
    fn github_non_leak_events_are_ignored_and_bad_ones_refused() {
        let body = github_payload("resolved", 12, None);
        assert!(matches!(
            github("secret_scanning_alert", body.as_bytes()),
            Ok(Translated::Ignored(_))
        ));
        assert!(matches!(
            github("ping", b"{\"zen\":\"x\"}"),
            Ok(Translated::Ignored(_))
        ));
        assert!(matches!(
            github("secret_scanning_alert", b"{not json"),
            Err(AdapterError::NotJson(_))
        ));
        assert_eq!(
            github("secret_scanning_alert", b"{\"action\":\"created\"}"),
            Err(AdapterError::Field("alert.number"))
        );
        let Translated::Detection(d) = github(
            "secret_scanning_alert",
            github_payload("created", 3, None).as_bytes(),
        )
        .unwrap() else {
            panic!()
        };
        assert!(d.credential.is_empty(), "GitHub webhooks carry no secret");
    }

    #[test]
    fn gitguardian_incident_translates() {
        let body = gitguardian_payload("incident_triggered", 9001);
        let Translated::Detection(d) = gitguardian(body.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(d.msg_id(), "gitguardian:9001");
        assert_eq!(d.severity, Severity::Critical);
        assert_eq!(d.labels["detector"], "redis_credentials");
        assert_eq!(d.labels["filepath"], "config/redis.env");
        assert!(d.evidence_url.unwrap().ends_with("/incidents/9001"));
        assert!(matches!(
            gitguardian(gitguardian_payload("incident_assigned", 1).as_bytes()),
            Ok(Translated::Ignored(_))
        ));
    }
}
