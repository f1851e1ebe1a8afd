//! `GET /metrics`: the counters of this process in the Prometheus text
//! format, for the operator console and for any scraper.
//!
//! What is exposed depends on the parts the process runs: the gateway's
//! connections and message counts (`chat_gateway_*`), the relay's
//! throughput and push latency (`chat_relay_*`), and, always, the errors
//! answered to clients by code (`chat_errors_total`), the round trips to
//! PostgreSQL and Redis and the WebSocket requests by type
//! (`chat_pg_round_trips_total`, `chat_redis_round_trips_total`,
//! `chat_ws_requests_total`: a benchmark divides them by the sends). Nothing here names a
//! room or a user, so the endpoint needs no token; the per-room view is the
//! admin-only `GET /console/api/ops`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use chat_gateway::Gateway;
use chat_relay::RelayMetrics;
use chat_shared::metrics::{self, Exposition, Kind};

/// Where the numbers of one process come from. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Telemetry {
    /// `INSTANCE_ID`: labels the gateway's series, so several gateways
    /// scraped together stay apart.
    pub instance_id: String,
    /// The gateway, when this process runs one.
    pub gateway: Option<Gateway>,
    /// The relay's counters, when this process runs the relay.
    pub relay: Option<Arc<RelayMetrics>>,
}

impl Telemetry {
    /// The exposition text.
    pub fn prometheus(&self) -> String {
        let mut out = Exposition::new();
        if let Some(gateway) = &self.gateway {
            let stats = gateway.stats();
            let label = [("gateway", self.instance_id.as_str())];
            out.family(
                "chat_gateway_connections",
                "Live WebSocket connections on this gateway.",
                Kind::Gauge,
            )
            .sample(
                "chat_gateway_connections",
                &label,
                stats.connections_open as f64,
            )
            .family(
                "chat_gateway_messages_in_total",
                "Messages received from WebSocket clients.",
                Kind::Counter,
            )
            .sample(
                "chat_gateway_messages_in_total",
                &label,
                stats.messages_in as f64,
            )
            .family(
                "chat_gateway_posts_out_total",
                "Management API posts accepted (events pushed to clients).",
                Kind::Counter,
            )
            .sample(
                "chat_gateway_posts_out_total",
                &label,
                stats.posts_out as f64,
            );
        }
        if let Some(relay) = &self.relay {
            relay.snapshot().write_prometheus(&mut out);
        }
        out.errors();
        out.round_trips();
        out.finish()
    }
}

/// `GET /metrics`, to merge into the stack's router or to serve alone (a
/// relay without a gateway, `chat-local relay --metrics-listen`).
pub fn router(telemetry: Telemetry) -> Router {
    Router::new()
        .route("/metrics", get(serve))
        .with_state(telemetry)
}

async fn serve(State(telemetry): State<Telemetry>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        telemetry.prometheus(),
    )
}
