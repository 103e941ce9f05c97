//! Every key of the worker's TOML configuration, with its default and the
//! environment variable that overrides it: the table docs/configuration.md
//! is generated from. A unit test checks it against the serde structs of
//! [`crate::config`] (a key added there and not here, or the reverse, fails).

use crate::config as c;
use keywave_common::nats as n;

/// One key of the worker configuration file.
#[derive(Debug, Clone, Copy)]
pub struct ConfigKey {
    /// Dotted path: `region`, `jetstream.replicas`, `nats.user`, `endpoint[].url`.
    pub key: &'static str,
    /// Default, as a user would write it (empty: none / required).
    pub default: &'static str,
    /// Environment variable that sets or overrides it (empty: none).
    pub env: &'static str,
    pub doc: &'static str,
}

const fn k(
    key: &'static str,
    default: &'static str,
    env: &'static str,
    doc: &'static str,
) -> ConfigKey {
    ConfigKey {
        key,
        default,
        env,
        doc,
    }
}

/// The keys, in the order of `keywave-worker.example.toml`.
pub const CONFIG_KEYS: &[ConfigKey] = &[
    k("region", "(required)", "", "Region served: tasks from `keywave.task.<region>.>`, secrets in `keywave-secrets-<region>`. `--region` overrides it."),
    k("worker_id", "`worker-<random hex>`", "", "Name of this worker in results and logs."),
    k("concurrency", "64", "", "Tasks run at once."),
    k("nats_url", "`nats://127.0.0.1:4222`", c::ENV_NATS_URL, "NATS server URL, or several comma-separated. `--nats` overrides it."),
    k("region_key_file", "", c::ENV_REGION_KEY, "File holding the region key (hex or base64 of 32 bytes); the variable holds the key itself and is read when the file is not set."),
    k("detect_key_file", "", c::ENV_DETECT_KEY_FILE, "File holding the detection key; `KEYWAVE_DETECT_KEY` (the key itself) is read when neither is set. Without a key no rotation notice is announced."),
    k("coordinator_public_keys", "`[]`", c::ENV_COORDINATOR_PUBLIC_KEYS, "Coordinator public keys (64 hex digits) whose task signatures are accepted; the variable (comma-separated) is read when the list is empty."),
    k("require_signed_tasks", "true", "", "Tasks must be signed; may only repeat the default (the opt-out is insecure_unsigned_tasks)."),
    k("insecure_unsigned_tasks", "false", c::ENV_INSECURE_UNSIGNED_TASKS, "INSECURE, development only: serve unsigned tasks when no coordinator public key is configured."),
    k("shutdown_grace_secs", "30", "", "Seconds in-flight tasks may take to finish after SIGTERM/SIGINT."),
    k("metrics_addr", "(off)", crate::metrics::ENV_METRICS_ADDR, "Address to serve `/metrics`, `/healthz` and `/readyz` on, e.g. `0.0.0.0:9464`. `--metrics-addr` overrides it."),
    k("jetstream.replicas", "1", "", "Replicas of the streams, consumer and bucket this worker creates."),
    k("jetstream.task_backoff_secs", "`[5, 5, 10, 20, 30]`", "", "Redelivery delays of an un-acked task, one per delivery, the last repeating (the first is the ack wait; running tasks send in-progress acks, so a short one is safe). Applied when this worker creates the region's consumer."),
    k("jetstream.task_max_deliver", "10", "", "Deliveries of a task before the server gives up on it (it is then dead-lettered)."),
    k("jetstream.max_ack_pending", "20000", "", "Tasks of the region handed out but not acked, over all its workers."),
    k("jetstream.placement", "", "", "Supercluster: where this region's secret store is created if this worker creates it: server tags and/or `cluster=<name>`, joined by `+` (e.g. `region:eu`); the coordinator's `--placement` for this region. Default: the server places it."),
    k("jetstream.home_placement", "", "", "Supercluster: where the shared streams and buckets are created if this worker creates them (e.g. `cluster=home`); the coordinator's `--home-placement`."),
    k("jetstream.region_replicas", "", "", "Replicas of this region's secret store if this worker creates it. Default: `jetstream.replicas`."),
    k("nats.creds_file", "", n::ENV_CREDS, "NATS credentials file (user JWT and nkey seed)."),
    k("nats.nkey_seed_file", "", n::ENV_NKEY, "File holding a NATS user nkey seed."),
    k("nats.user", "", n::ENV_USER, "NATS user name."),
    k("nats.password_file", "", n::ENV_PASSWORD_FILE, "File holding the NATS password of `nats.user`."),
    k("nats.password_env", "`KEYWAVE_NATS_PASSWORD`", "", "Name of the environment variable holding the NATS password."),
    k("nats.inbox_prefix", "`_INBOX`", n::ENV_INBOX_PREFIX, "Prefix of this worker's reply subjects."),
    k("nats.ca_file", "", n::ENV_CA, "CA certificate (PEM) of the NATS server; implies TLS."),
    k("nats.client_cert_file", "", n::ENV_CERT, "Client certificate (PEM) for a server that verifies clients."),
    k("nats.client_key_file", "", n::ENV_KEY, "Private key (PEM) of `nats.client_cert_file`."),
    k("nats.tls_required", "false", n::ENV_TLS_REQUIRED, "Refuse to connect without TLS."),
    k("endpoint[].name", "(required)", "", "Endpoint name, as the inventory names it."),
    k("endpoint[].kind", "(required)", "", "`postgres`, `mysql`, `redis` or `sim`."),
    k("endpoint[].max_concurrency", "16", "", "Operations against the endpoint at once."),
    k("endpoint[].max_rotations_per_second", "(no limit)", "", "Rotations (add / replace operations, retries included) started per second against the endpoint, at most; fractions allowed."),
    k("endpoint[].url", "", "", "redis: admin connection URL without a password."),
    k("endpoint[].host", "(required for postgres, mysql)", "", "postgres, mysql: server host."),
    k("endpoint[].port", "5432 / 3306", "", "postgres, mysql: server port."),
    k("endpoint[].dbname", "`postgres`", "", "postgres: database every connection opens."),
    k("endpoint[].admin_user", "redis: `default`", "", "Admin login used to rotate (required for postgres, mysql)."),
    k("endpoint[].admin_password_env", "", "", "Name of the environment variable holding the admin password."),
    k("endpoint[].admin_password_file", "", "", "File holding the admin password."),
    k("endpoint[].tls", "`disable`", "", "postgres, mysql: `disable` (plain TCP) or `require` (TLS with a verified certificate and host name, for the admin pool and every login check). A certificate that fails verification: `target_unreachable`; a server that refuses plain text: `target_auth`."),
    k("endpoint[].ca_file", "(system trust store)", "", "postgres, mysql, with `tls = \"require\"`: PEM bundle of the CAs to trust for the server (then only these); read at start-up."),
    k("endpoint[].server_name", "`host`", "", "postgres, mysql, with `tls = \"require\"`: name (or IP address) the server's certificate must carry, when it is not `host`."),
    k("endpoint[].admin_connections", "4", "", "postgres, mysql: admin connections kept open (at most `max_concurrency`)."),
    k("endpoint[].continuity", "`auto`", "", "postgres, mysql: `auto`, `refuse`, `alternating`, `overwrite` or `dual` (mysql)."),
    k("endpoint[].clone_suffix", "`_clone`", "", "postgres, mysql: clone login suffix with `continuity = \"alternating\"`."),
    k("endpoint[].alternating", "`{}`", "", "postgres, mysql: principals rotated with alternating users, and their clone."),
    k("endpoint[].account_host", "`%`", "", "mysql: host part of an account named by a bare user name."),
    k("endpoint[].secret_length", "40", "", "postgres, mysql: length of generated secrets."),
    k("endpoint[].secret_charset", "`alphanumeric`", "", "postgres, mysql: `alphanumeric`, `alphanumeric_symbols` or `hex`."),
    k("endpoint[].latency_ms", "0", "", "sim: milliseconds each operation takes."),
    k("endpoint[].fail_rate", "0", "", "sim: probability that a set fails on purpose."),
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::{self, Deserialize, Visitor};

    /// A deserializer that only records the field names a derived
    /// `Deserialize` struct asks for.
    struct Fields;

    #[derive(Debug)]
    struct Stop(Vec<&'static str>);
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{:?}", self.0)
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<T: std::fmt::Display>(_: T) -> Self {
            Stop(Vec::new())
        }
    }

    impl<'de> de::Deserializer<'de> for Fields {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop(Vec::new()))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            Err(Stop(fields.to_vec()))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }

    fn fields_of<T: for<'de> Deserialize<'de>>() -> Vec<&'static str> {
        match T::deserialize(Fields) {
            Err(Stop(f)) => f,
            Ok(_) => unreachable!(),
        }
    }

    #[test]
    fn the_table_lists_every_key_of_the_file_and_no_other() {
        let mut expected: Vec<String> = Vec::new();
        for f in fields_of::<c::File>() {
            match f {
                // Tables, listed by their keys.
                "jetstream" | "nats" | "endpoint" => {}
                f => expected.push(f.to_string()),
            }
        }
        expected.extend(
            fields_of::<c::JetStreamFile>()
                .iter()
                .map(|f| format!("jetstream.{f}")),
        );
        expected.extend(
            fields_of::<keywave_common::nats::ConnectConfig>()
                .iter()
                .map(|f| format!("nats.{f}")),
        );
        expected.extend(
            fields_of::<c::EndpointFile>()
                .iter()
                .map(|f| format!("endpoint[].{f}")),
        );
        let mut listed: Vec<String> = CONFIG_KEYS.iter().map(|k| k.key.to_string()).collect();
        expected.sort();
        listed.sort();
        assert!(expected.len() > 30, "{expected:?}");
        assert_eq!(
            listed, expected,
            "worker/src/config_keys.rs CONFIG_KEYS must list every key of the configuration file"
        );
    }
}
