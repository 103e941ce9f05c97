//! The HTTP endpoint every keywave daemon serves for its operators:
//! `/metrics` (Prometheus text format), `/healthz` (200 while the process
//! runs) and `/readyz` (200 when the daemon says it is ready, else 503).
//! What is exposed comes from an [`Exposition`]; this module only serves it.

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

/// What a daemon exposes.
pub trait Exposition: Send + Sync + 'static {
    /// The whole `/metrics` page.
    fn render(&self) -> Pin<Box<dyn Future<Output = String> + Send + '_>>;
    /// Whether `/readyz` answers 200.
    fn ready(&self) -> bool;
}

/// Binds `addr` and serves `/metrics`, `/healthz` and `/readyz` until
/// `shutdown` resolves; returns the bound address (port 0 picks one).
pub async fn serve<E: Exposition>(
    addr: SocketAddr,
    source: Arc<E>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let m = source.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, crate::telemetry::prom::CONTENT_TYPE)],
                        m.render().await,
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = source.ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n").into_response()
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
                    }
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "Metrics endpoint failed");
        }
    });
    tracing::info!(addr = %bound, "Serving /metrics, /healthz and /readyz");
    Ok(bound)
}
