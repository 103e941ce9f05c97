//! Connecting to NATS the one way every keywave process does: a server list
//! given as one comma-separated string (`nats://a:4222,nats://b:4222`, the
//! seeds of a cluster), the process's client name, and reconnect settings
//! for daemons that must ride out a server restart or a leader election.

use async_nats::{Client, ConnectError, ConnectErrorKind, ConnectOptions, ServerAddr};
use std::time::Duration;

/// How long one connection attempt to one server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Interval of the client's pings: a dead server is noticed after two missed
/// pongs, well before a task's ack wait runs out.
pub const PING_INTERVAL: Duration = Duration::from_secs(20);
/// Longest wait between two reconnect attempts.
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(4);

/// Splits `urls` on `,`, trims each entry and parses it as a server address
/// (`nats://host:port`, `tls://...`, or a bare `host[:port]`). Empty entries
/// (a trailing comma) are skipped; no entry at all is an error.
pub fn server_addrs(urls: &str) -> Result<Vec<ServerAddr>, ConnectError> {
    let addrs = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<ServerAddr>()
                .map_err(|e| ConnectError::with_source(ConnectErrorKind::ServerParse, e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err(ConnectError::with_source(
            ConnectErrorKind::ServerParse,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "no NATS server URL given"),
        ));
    }
    Ok(addrs)
}

/// keywave's client settings, named `name` (shown by the server's
/// `connz`): reconnect forever with a capped exponential delay, so that a
/// daemon outlives a server restart; frequent enough pings to notice a dead
/// connection. The first connect still fails fast (unless the caller adds
/// `retry_on_initial_connect`), so a wrong URL is reported at start-up.
pub fn options(name: impl Into<String>) -> ConnectOptions {
    ConnectOptions::new()
        .name(name.into())
        .connection_timeout(CONNECT_TIMEOUT)
        .ping_interval(PING_INTERVAL)
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
}

/// 0 ms, then 100 ms doubling up to [`MAX_RECONNECT_DELAY`].
fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(16);
    (Duration::from_millis(100) * 2u32.pow(exp)).min(MAX_RECONNECT_DELAY)
}

/// Connects to the servers in `urls` (comma-separated) with [`options`].
pub async fn connect(urls: &str, name: &str) -> Result<Client, ConnectError> {
    connect_with(urls, options(name)).await
}

/// Connects to the servers in `urls` (comma-separated) with `options`.
pub async fn connect_with(urls: &str, options: ConnectOptions) -> Result<Client, ConnectError> {
    options.connect(server_addrs(urls)?).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(urls: &str) -> Vec<(String, u16)> {
        server_addrs(urls)
            .unwrap()
            .iter()
            .map(|a| (a.host().to_string(), a.port()))
            .collect()
    }

    #[test]
    fn comma_separated_urls_are_split_and_trimmed() {
        assert_eq!(hosts("nats://127.0.0.1:4222"), [("127.0.0.1".into(), 4222)]);
        assert_eq!(
            hosts("nats://a:4222,nats://b:4223"),
            [("a".into(), 4222), ("b".into(), 4223)]
        );
        assert_eq!(
            hosts(" nats://a:4222 ,\tb:5222, c ,"),
            [("a".into(), 4222), ("b".into(), 5222), ("c".into(), 4222)]
        );
    }

    #[test]
    fn bad_or_missing_urls_are_parse_errors() {
        for bad in [
            "",
            " , ",
            "http://a:4222",
            "nats://a:4222,nats://b:notaport",
        ] {
            let e = server_addrs(bad).unwrap_err();
            assert_eq!(e.kind(), ConnectErrorKind::ServerParse, "{bad:?}");
        }
    }

    #[test]
    fn reconnect_delay_is_capped() {
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(100));
        assert_eq!(reconnect_delay(3), Duration::from_millis(200));
        assert_eq!(reconnect_delay(100), MAX_RECONNECT_DELAY);
        assert_eq!(reconnect_delay(usize::MAX), MAX_RECONNECT_DELAY);
    }
}
