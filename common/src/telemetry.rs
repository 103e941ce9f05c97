//! Logs, traces and the Prometheus text format, set up the same way by the
//! three binaries (`keywave`, `keywave-coordinator`, `keywave-worker`).
//!
//! # Logs
//!
//! One line per event on stderr, `text` (default) or `json`
//! (`--log-format`, [`ENV_LOG_FORMAT`]). `RUST_LOG` filters them (default
//! per binary, e.g. `info`). JSON lines carry the fields of the event and of
//! every span it is in (`campaign`, `wave`, `task`, `credential`), never a
//! secret: keywave logs ids and fingerprints only.
//!
//! # Traces
//!
//! OpenTelemetry, exported over OTLP (HTTP/protobuf) when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//! set, configured the standard way: `OTEL_SERVICE_NAME` (default: the
//! binary's name), `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`; `grpc`
//! and `http/json` are refused at start-up by this build),
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`,
//! `OTEL_RESOURCE_ATTRIBUTES`; `OTEL_SDK_DISABLED=true` turns it off. When
//! no endpoint is set there is no exporter and no OpenTelemetry layer: the
//! cost is that of `tracing` alone.
//!
//! Spans: `campaign` and `wave` in the coordinator, `task` and one `step`
//! per protocol step in the worker. The W3C trace context (`traceparent`,
//! `tracestate`) of the current span is put in the NATS headers of every
//! task and rollback the coordinator publishes ([`inject`]), read back by
//! the worker ([`extract`], [`set_parent`]) so that its task span is a child
//! of the wave span, and put again on the result it publishes.
//!
//! # Metrics
//!
//! [`prom`]: the few pieces of the Prometheus text exposition format
//! (version 0.0.4) the coordinator and worker `/metrics` endpoints write.

use async_nats::header::{HeaderMap, HeaderName};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};
use opentelemetry_sdk::Resource;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;
use thiserror::Error;
use tracing::{Dispatch, Level};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{Layer, Registry};

/// Environment variable choosing the log format (`text` or `json`).
pub const ENV_LOG_FORMAT: &str = "KEYWAVE_LOG_FORMAT";
/// Standard OpenTelemetry variables read here (others are read by the exporter).
pub const ENV_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const ENV_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
pub const ENV_OTLP_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
pub const ENV_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
pub const ENV_SDK_DISABLED: &str = "OTEL_SDK_DISABLED";

/// The W3C trace-context headers.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Name of the instrumentation scope of keywave's spans.
const SCOPE: &str = "keywave";

/// Set once an OpenTelemetry layer exists in this process: until then
/// [`inject`] and [`set_parent`] return at once (the hot path when traces
/// are off).
static TRACED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn traced() -> bool {
    TRACED.load(std::sync::atomic::Ordering::Relaxed)
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line, with the fields of the enclosing spans.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LogFormat {
    type Err = crate::wire::UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(crate::wire::UnknownName::new(
                "log format",
                other,
                "text or json",
            )),
        }
    }
}

#[derive(Debug, Error)]
pub enum TelemetryError {
    #[error("{ENV_OTLP_PROTOCOL}={0:?} is not supported by this build: use http/protobuf (an OTLP/HTTP endpoint, usually port 4318)")]
    Protocol(String),
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// What a binary sets up.
#[derive(Debug, Clone)]
pub struct Options {
    /// `service.name` unless `OTEL_SERVICE_NAME` is set.
    pub service: &'static str,
    pub log_format: LogFormat,
    /// Log filter when `RUST_LOG` is unset, e.g. `info`.
    pub default_filter: &'static str,
}

impl Options {
    pub fn new(service: &'static str, log_format: LogFormat, default_filter: &'static str) -> Self {
        Options {
            service,
            log_format,
            default_filter,
        }
    }
}

/// Keeps the tracer provider alive; [`Guard::shutdown`] flushes the spans
/// still buffered (call it before the runtime stops).
#[must_use = "dropping the guard does not flush; call shutdown() before exiting"]
#[derive(Debug, Default)]
pub struct Guard {
    provider: Option<SdkTracerProvider>,
}

impl Guard {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes and stops the exporter (blocking, bounded by the exporter's timeout).
    pub async fn shutdown(self) {
        if let Some(p) = self.provider {
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = p.shutdown() {
                    eprintln!("telemetry: flushing spans failed: {e}");
                }
            })
            .await;
        }
    }
}

/// Installs the global subscriber: logs in `opts.log_format` and, when an
/// OTLP endpoint is configured in the environment, span export. Must be
/// called inside a Tokio runtime when exporting.
pub fn init(opts: &Options) -> Result<Guard, TelemetryError> {
    let provider = otlp_provider(opts.service)?;
    let dispatch = dispatch(opts, provider.clone());
    tracing::dispatcher::set_global_default(dispatch)
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(Guard { provider })
}

/// The same subscriber as [`init`], not installed, exporting to `exporter`
/// (each span as it ends): for tests, which install it with
/// `tracing::dispatcher::set_default` and read what `exporter` collected.
pub fn dispatch_with_exporter<E: SpanExporter + 'static>(
    opts: &Options,
    exporter: E,
) -> (Dispatch, SdkTracerProvider) {
    let provider = SdkTracerProvider::builder()
        .with_resource(resource(opts.service))
        .with_simple_exporter(exporter)
        .build();
    (dispatch(opts, Some(provider.clone())), provider)
}

/// Whether the environment asks for span export.
fn otlp_wanted() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var(ENV_SDK_DISABLED).is_ok_and(|v| v.trim() == "true");
    !disabled && (set(ENV_OTLP_ENDPOINT) || set(ENV_OTLP_TRACES_ENDPOINT))
}

fn resource(service: &'static str) -> Resource {
    // Resource::builder() reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME.
    let b = Resource::builder();
    match std::env::var(ENV_SERVICE_NAME) {
        Ok(v) if !v.trim().is_empty() => b.build(),
        _ => b.with_service_name(service).build(),
    }
}

fn otlp_provider(service: &'static str) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    if !otlp_wanted() {
        return Ok(None);
    }
    for var in [ENV_OTLP_PROTOCOL, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] {
        if let Ok(p) = std::env::var(var) {
            if !p.trim().is_empty() && p.trim() != "http/protobuf" {
                return Err(TelemetryError::Protocol(p));
            }
        }
    }
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let timeout = std::env::var("OTEL_EXPORTER_OTLP_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(10));
    let client = OnRuntime {
        inner: opentelemetry_http::hyper::HyperClient::with_default_connector(timeout, None),
        rt: tokio::runtime::Handle::try_current()
            .map_err(|_| TelemetryError::Exporter("no Tokio runtime".into()))?,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_http_client(client)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    Ok(Some(
        SdkTracerProvider::builder()
            .with_resource(resource(service))
            .with_batch_exporter(exporter)
            .build(),
    ))
}

/// The hyper client run on the process's Tokio runtime: the SDK's batch
/// processor exports from a thread of its own, outside any runtime.
#[derive(Debug)]
struct OnRuntime {
    inner: opentelemetry_http::hyper::HyperClient,
    rt: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let client = self.inner.clone();
        self.rt
            .spawn(async move { client.send_bytes(request).await })
            .await
            .map_err(|e| Box::new(e) as opentelemetry_http::HttpError)?
    }
}

/// The subscriber: the log layer (filtered by `RUST_LOG`) and, with a
/// provider, the OpenTelemetry layer. The latter takes keywave's spans down
/// to DEBUG (the protocol's `step` spans) and other events and spans from
/// INFO, whatever `RUST_LOG` says; without a provider those spans stay
/// disabled and cost nothing.
/// Whether log lines on stderr get colours: only when stderr is a terminal
/// (a log file written by redirection or collected from a container stays
/// plain text) and `NO_COLOR` is unset or empty (<https://no-color.org>).
fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    colour_allowed(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// [`colour_on_stderr`]'s rule: a terminal, and `NO_COLOR` absent or empty.
fn colour_allowed(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

fn dispatch(opts: &Options, provider: Option<SdkTracerProvider>) -> Dispatch {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(opts.default_filter));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour_on_stderr());
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![match opts.log_format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .with_filter(filter)
            .boxed(),
    }];
    if let Some(p) = provider {
        TRACED.store(true, std::sync::atomic::Ordering::Relaxed);
        let tracer = p.tracer(SCOPE);
        let spans = filter_fn(|m| {
            *m.level() <= Level::INFO
                || (m.is_span() && *m.level() <= Level::DEBUG && m.target().starts_with("keywave"))
        });
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(spans)
                .boxed(),
        );
    }
    Dispatch::new(tracing_subscriber::registry().with(layers))
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let name = match key {
            TRACEPARENT => HeaderName::from_static(TRACEPARENT),
            TRACESTATE => HeaderName::from_static(TRACESTATE),
            _ => return,
        };
        self.0.insert(name, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        [TRACEPARENT, TRACESTATE]
            .into_iter()
            .filter(|k| self.0.get(*k).is_some())
            .collect()
    }
}

/// Puts the W3C trace context of the current span (`traceparent`, and
/// `tracestate` when not empty) in `headers`. Does nothing when the current
/// span is not traced (no OpenTelemetry layer): no allocation then.
pub fn inject(headers: &mut HeaderMap) {
    if !traced() {
        return;
    }
    inject_context(&tracing::Span::current().context(), headers);
}

/// [`inject`] with an explicit OpenTelemetry context.
pub fn inject_context(cx: &opentelemetry::Context, headers: &mut HeaderMap) {
    if !cx.span().span_context().is_valid() {
        return;
    }
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

/// The trace context carried by `headers` (an empty context when none).
pub fn extract(headers: Option<&HeaderMap>) -> opentelemetry::Context {
    match headers {
        Some(h) if h.get(TRACEPARENT).is_some() => {
            TraceContextPropagator::new().extract(&HeaderExtractor(h))
        }
        _ => opentelemetry::Context::new(),
    }
}

/// Makes `span` a child of the trace context in `headers`, if any (and if
/// spans are traced at all).
pub fn set_parent(span: &tracing::Span, headers: Option<&HeaderMap>) {
    if !traced() || span.is_disabled() || headers.is_none_or(|h| h.get(TRACEPARENT).is_none()) {
        return;
    }
    let _ = span.set_parent(extract(headers));
}

/// Whether the current span is traced by OpenTelemetry (has a valid context).
pub fn current_is_traced() -> bool {
    tracing::Span::current()
        .context()
        .span()
        .span_context()
        .is_valid()
}

/// The Prometheus text exposition format (0.0.4), written by hand: metric
/// families with `# HELP` and `# TYPE`, counters, gauges and histograms with
/// fixed buckets kept in atomics.
pub mod prom {
    use std::fmt::Write as _;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// The `Content-Type` of a scrape.
    pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

    /// Writes the `# HELP` and `# TYPE` lines of a family.
    pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    }

    /// Writes one sample: `name{labels} value`.
    pub fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
        out.push_str(name);
        write_labels(out, labels, None);
        let _ = writeln!(out, " {}", number(value));
    }

    fn write_labels(out: &mut String, labels: &[(&str, &str)], le: Option<&str>) {
        if labels.is_empty() && le.is_none() {
            return;
        }
        out.push('{');
        let mut first = true;
        for (k, v) in labels.iter().copied().chain(le.map(|l| ("le", l))) {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(k);
            out.push_str("=\"");
            for c in v.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '"' => out.push_str("\\\""),
                    '\n' => out.push_str("\\n"),
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        out.push('}');
    }

    fn number(v: f64) -> String {
        if v.is_infinite() {
            if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
        } else if v.fract() == 0.0 && v.abs() < 1e15 {
            format!("{}", v as i64)
        } else {
            format!("{v}")
        }
    }

    /// Default latency buckets, in seconds: 1 ms to 60 s.
    pub const LATENCY_BUCKETS: &[f64] = &[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];

    /// A histogram with fixed buckets (cumulative on output).
    #[derive(Debug)]
    pub struct Histogram {
        bounds: &'static [f64],
        /// Per bucket (not cumulative), plus one for +Inf.
        counts: Vec<AtomicU64>,
        /// Sum in microseconds-of-unit (value * 1e6), for lock-free adds.
        sum_micros: AtomicU64,
    }

    impl Histogram {
        pub fn new(bounds: &'static [f64]) -> Self {
            Histogram {
                bounds,
                counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum_micros: AtomicU64::new(0),
            }
        }

        pub fn observe(&self, v: f64) {
            let i = self
                .bounds
                .iter()
                .position(|b| v <= *b)
                .unwrap_or(self.bounds.len());
            self.counts[i].fetch_add(1, Ordering::Relaxed);
            self.sum_micros
                .fetch_add((v.max(0.0) * 1e6) as u64, Ordering::Relaxed);
        }

        pub fn count(&self) -> u64 {
            self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
        }

        /// Writes `name_bucket`, `name_sum` and `name_count` samples.
        pub fn write(&self, out: &mut String, name: &str, labels: &[(&str, &str)]) {
            let mut cumulative = 0u64;
            let bucket = format!("{name}_bucket");
            for (i, c) in self.counts.iter().enumerate() {
                cumulative += c.load(Ordering::Relaxed);
                let le = match self.bounds.get(i) {
                    Some(b) => number(*b),
                    None => "+Inf".to_string(),
                };
                out.push_str(&bucket);
                write_labels(out, labels, Some(&le));
                let _ = writeln!(out, " {cumulative}");
            }
            let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
            sample(out, &format!("{name}_sum"), labels, sum);
            sample(out, &format!("{name}_count"), labels, cumulative as f64);
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn text_format() {
            let mut out = String::new();
            family(&mut out, "kw_total", "counter", "Things.");
            sample(&mut out, "kw_total", &[("a", "x\"y")], 3.0);
            let h = Histogram::new(&[0.1, 1.0]);
            h.observe(0.05);
            h.observe(0.5);
            h.observe(7.0);
            h.write(&mut out, "kw_seconds", &[("step", "set")]);
            assert_eq!(
                out,
                "# HELP kw_total Things.\n# TYPE kw_total counter\nkw_total{a=\"x\\\"y\"} 3\n\
                 kw_seconds_bucket{step=\"set\",le=\"0.1\"} 1\nkw_seconds_bucket{step=\"set\",le=\"1\"} 2\n\
                 kw_seconds_bucket{step=\"set\",le=\"+Inf\"} 3\nkw_seconds_sum{step=\"set\"} 7.55\n\
                 kw_seconds_count{step=\"set\"} 3\n"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colour_allowed(true, None));
        assert!(colour_allowed(true, Some(OsStr::new(""))));
        assert!(!colour_allowed(true, Some(OsStr::new("1"))));
        assert!(!colour_allowed(false, None));
    }

    #[test]
    fn log_format_parses() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!(" Text ".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!("xml".parse::<LogFormat>().is_err());
    }

    #[test]
    fn no_context_injects_nothing_and_a_traceparent_round_trips() {
        let mut h = HeaderMap::new();
        inject(&mut h);
        assert!(h.get(TRACEPARENT).is_none());
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert(TRACEPARENT, tp);
        let cx = extract(Some(&h));
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let mut out = HeaderMap::new();
        inject_context(&cx, &mut out);
        assert_eq!(out.get(TRACEPARENT).map(|v| v.as_str()), Some(tp));
    }
}
