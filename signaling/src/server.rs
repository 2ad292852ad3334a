//! Assembles and runs the server: keys, engine thread, HTTP routes, and the graceful drain on
//! shutdown (stop admitting, let rooms empty for a while, then remove everyone and stop).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Query, State, WebSocketUpgrade};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};
use warbler_sfu::api::{EngineConfig, Grants};
use warbler_sfu::metrics::Metrics;
use warbler_sfu::shell::{RtcNetConfig, spawn};

use crate::auth::{KeyStore, unix_now};
use crate::config::Config;
use crate::state::{AppState, SignalingMetrics};
use crate::{chat, web, whip, ws};

/// Frames above this close the socket outright; between the configured limit and this they get
/// a `message_too_large` error and the session continues.
const WS_HARD_LIMIT: usize = 1024 * 1024;
const DEV_TOKEN_TTL_SECS: u64 = 6 * 3600;

/// A running server.
pub struct Server {
    pub http_addr: SocketAddr,
    pub state: Arc<AppState>,
    stop_http: watch::Sender<bool>,
    http: tokio::task::JoinHandle<()>,
    engine_thread: Option<std::thread::JoinHandle<()>>,
}

/// The API keys from configuration, or the development key pair of the data directory.
pub fn load_keys(config: &Config) -> anyhow::Result<KeyStore> {
    match (&config.api_key, &config.api_secret) {
        (Some(k), Some(s)) => KeyStore::new(k.clone(), s.clone()).map_err(anyhow::Error::msg),
        _ => {
            let (keys, created) = KeyStore::development(&config.data_dir)?;
            warn!(
                key = keys.signing_key_id(),
                file = %config.data_dir.join(crate::auth::DEV_KEY_FILE).display(),
                created,
                "no API key configured: using the development key pair; /dev/token is enabled"
            );
            Ok(keys)
        }
    }
}

pub async fn start(config: Config) -> anyhow::Result<Server> {
    std::fs::create_dir_all(&config.data_dir)?;
    let keys = load_keys(&config)?;
    let registry = prometheus::Registry::new();
    let engine_metrics = Metrics::new(&registry)?;
    let engine_cfg = EngineConfig {
        max_participants_per_room: config.limits.max_participants_per_room,
        max_sdp_bytes: config.limits.max_sdp_bytes,
        max_data_message_bytes: config.limits.max_data_message_bytes,
        ..EngineConfig::default()
    };
    let net = RtcNetConfig { port: config.rtc_port, public_ips: config.public_ip.clone() };
    let (engine, engine_thread) = spawn(engine_cfg, net, engine_metrics)?;
    let metrics = SignalingMetrics::new(&registry)?;
    let chat_transport = Arc::new(crate::chat::transport::EngineTransport(engine.clone()));
    let chat = crate::chat::ChatService::open_sqlite(config.chat.clone(), &config.data_dir, chat_transport, &registry)?;
    let state = Arc::new(AppState {
        config: config.clone(),
        keys,
        engine,
        registry,
        metrics,
        sessions: Default::default(),
        draining: Default::default(),
        chat,
    });
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let http_addr = listener.local_addr()?;
    let app = router(state.clone());
    let (stop_http, mut stop_rx) = watch::channel(false);
    let http = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).with_graceful_shutdown(shutdown).await {
            warn!(error = %e, "HTTP server error");
        }
    });
    info!(
        http = %http_addr,
        rtc = ?state.engine.advertised(),
        "warbler listening: open http://{http_addr}/ for the web demo"
    );
    Ok(Server { http_addr, state, stop_http, http, engine_thread: Some(engine_thread) })
}

pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.config.limits.max_sdp_bytes + 1024;
    let mut r = Router::new()
        .route("/ws", get(ws_upgrade))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/whip/{room}", post(whip::whip_post).options(whip::options))
        .route("/whip/{room}/{session}", axum::routing::patch(whip::whip_patch).delete(whip::whip_delete).options(whip::options))
        .route("/whep/{room}/{identity}", post(whip::whep_post).options(whip::options))
        .route("/whep/{room}/{identity}/{session}", axum::routing::patch(whip::whep_patch).delete(whip::whep_delete).options(whip::options))
        .route("/api/rooms/{room}/messages", get(chat::rest::list).post(chat::rest::post).options(chat::rest::options))
        .route("/api/rooms/{room}/messages/search", get(chat::rest::search).options(chat::rest::options));
    if state.keys.is_development() {
        r = r.route("/dev/token", get(dev_token));
    }
    r.fallback(get(web::serve)).layer(DefaultBodyLimit::max(body_limit)).layer(axum::middleware::from_fn(cors)).with_state(state)
}

/// WHIP/WHEP players in other origins (and the demo served elsewhere) need CORS.
async fn cors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, header::HeaderValue::from_static("*"));
    h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, header::HeaderValue::from_static("Location, Link, ETag"));
    res
}

/// Read buffer (and write batching threshold) of a signaling WebSocket.
const WS_READ_BUFFER: usize = 8 * 1024;

async fn ws_upgrade(State(state): State<Arc<AppState>>, ConnectInfo(peer): ConnectInfo<SocketAddr>, upgrade: WebSocketUpgrade) -> Response {
    if state.metrics.ws_connections.get() as usize >= state.config.limits.max_ws_connections {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections").into_response();
    }
    upgrade
        .max_message_size(WS_HARD_LIMIT)
        .max_frame_size(WS_HARD_LIMIT)
        // tungstenite zero-fills the whole free read buffer on every read attempt, including
        // the ones that find nothing: at the default 128 KiB that was a tenth of the server's CPU
        // with 300 participants, and 256 KiB of buffers per connection. Larger messages still
        // arrive whole (the buffer grows for a frame that needs it).
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_READ_BUFFER)
        .on_upgrade(move |socket| ws::session(socket, state, peer.to_string()))
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    let draining = state.draining.load(Ordering::Relaxed);
    match state.engine.counts().await {
        Ok((rooms, participants)) => {
            let status = if draining { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
            let body = json!({ "status": if draining { "draining" } else { "ok" }, "rooms": rooms, "participants": participants });
            (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, [(header::CONTENT_TYPE, "application/json")], json!({ "status": "engine down", "error": e.to_string() }).to_string()).into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let families = state.registry.gather();
    match prometheus::TextEncoder::new().encode_to_string(&families) {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[derive(Deserialize)]
struct DevTokenQuery {
    room: String,
    identity: String,
    name: Option<String>,
}

async fn dev_token(State(state): State<Arc<AppState>>, Query(q): Query<DevTokenQuery>) -> Response {
    let grants = Grants { publish: true, subscribe: true, chat: true, admin: false };
    match state.keys.issue(&q.room, &q.identity, q.name.as_deref(), grants, DEV_TOKEN_TTL_SECS, unix_now()) {
        Ok(token) => axum::Json(json!({ "token": token, "room": q.room, "identity": q.identity })).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, axum::Json(json!({ "code": "bad_message", "message": e }))).into_response(),
    }
}

impl Server {
    /// Graceful stop: refuse newcomers, wait up to `drain` for rooms to empty (or until `abort`
    /// fires), then remove everyone, stop HTTP and the engine.
    pub async fn drain_and_stop(mut self, drain: Duration, abort: impl std::future::Future<Output = ()>) {
        self.state.draining.store(true, Ordering::Relaxed);
        let _ = self.state.engine.start_draining().await;
        info!(timeout_secs = drain.as_secs(), "draining: no new participants; waiting for rooms to empty");
        let engine = self.state.engine.clone();
        let emptied = async {
            loop {
                match engine.counts().await {
                    Ok((_, 0)) | Err(_) => break,
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        };
        tokio::select! {
            _ = emptied => info!("all rooms empty"),
            _ = tokio::time::sleep(drain) => info!("drain timeout; removing remaining participants"),
            _ = abort => info!("second signal; stopping now"),
        }
        let _ = self.state.engine.shutdown().await;
        let _ = self.stop_http.send(true);
        if tokio::time::timeout(Duration::from_secs(5), &mut self.http).await.is_err() {
            warn!("HTTP connections did not close in time");
            self.http.abort();
        }
        if let Some(t) = self.engine_thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        info!("stopped");
    }

    /// Immediate stop (tests).
    pub async fn stop(self) {
        self.drain_and_stop(Duration::ZERO, std::future::pending()).await;
    }
}
