//! What every request handler shares: configuration, keys, the engine handle, the HTTP session
//! registry and the metrics.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use dashmap::DashMap;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use warbler_sfu::shell::EngineHandle;

use crate::auth::KeyStore;
use crate::chat::ChatService;
use crate::config::Config;
use crate::protocol::ErrorCode;
use crate::whip::HttpSession;

pub struct AppState {
    pub config: Config,
    pub keys: KeyStore,
    pub engine: EngineHandle,
    pub registry: Registry,
    pub metrics: SignalingMetrics,
    pub sessions: DashMap<String, HttpSession>,
    pub draining: AtomicBool,
    pub chat: Arc<ChatService>,
}

#[derive(Clone)]
pub struct SignalingMetrics {
    pub ws_connections: IntGauge,
    pub ws_messages_in: IntCounter,
    errors: IntCounterVec,
    pub http_requests: IntCounterVec,
}

impl SignalingMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let ws_connections = IntGauge::new("warbler_ws_connections", "Open signaling WebSockets")?;
        registry.register(Box::new(ws_connections.clone()))?;
        let ws_messages_in = IntCounter::new("warbler_ws_messages_in_total", "Signaling messages received")?;
        registry.register(Box::new(ws_messages_in.clone()))?;
        let errors = IntCounterVec::new(Opts::new("warbler_signaling_errors_total", "Errors sent to signaling clients, by code"), &["code"])?;
        registry.register(Box::new(errors.clone()))?;
        let http_requests = IntCounterVec::new(Opts::new("warbler_http_requests_total", "HTTP requests by route and status"), &["route", "status"])?;
        registry.register(Box::new(http_requests.clone()))?;
        Ok(Self { ws_connections, ws_messages_in, errors, http_requests })
    }

    pub fn ws_errors(&self, code: ErrorCode) {
        self.errors.with_label_values(&[code.as_str()]).inc();
    }
}
