//! Chat metrics in the server's Prometheus registry: requests in, messages out, refusals by
//! code, group-commit batch size and latency, ack latency, search latency, failed deliveries.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};

use super::ErrorCode;

#[derive(Clone)]
pub struct ChatMetrics {
    /// Client requests received, by type (`chat`, `edit`, `history`, ...) and transport.
    pub messages_in: IntCounterVec,
    /// Server messages sent to participants' chat channels, by type (one per recipient).
    pub messages_out: IntCounterVec,
    pub refusals: IntCounterVec,
    /// One group commit: the transaction including its fsync.
    pub store_seconds: Histogram,
    /// From queueing a write to its durable result.
    pub ack_seconds: Histogram,
    pub batch_size: Histogram,
    pub search_seconds: Histogram,
    /// Deliveries the engine could not make, by reason (`no_channel`, `slow`, `other`).
    pub delivery_failures: IntCounterVec,
}

const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

impl ChatMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let messages_in = IntCounterVec::new(Opts::new("warbler_chat_messages_in_total", "Chat requests received, by type and transport"), &["type", "via"])?;
        let messages_out = IntCounterVec::new(Opts::new("warbler_chat_messages_out_total", "Chat messages sent on data channels, by type (per recipient)"), &["type"])?;
        let refusals = IntCounterVec::new(Opts::new("warbler_chat_refusals_total", "Chat requests refused, by error code"), &["code"])?;
        let store_seconds = Histogram::with_opts(HistogramOpts::new("warbler_chat_store_seconds", "Duration of one durable chat batch commit").buckets(LATENCY_BUCKETS.to_vec()))?;
        let ack_seconds = Histogram::with_opts(HistogramOpts::new("warbler_chat_ack_seconds", "From queueing a chat write to its durable result").buckets(LATENCY_BUCKETS.to_vec()))?;
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("warbler_chat_batch_size", "Writes per group commit").buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0]),
        )?;
        let search_seconds = Histogram::with_opts(HistogramOpts::new("warbler_chat_search_seconds", "Duration of one chat search").buckets(LATENCY_BUCKETS.to_vec()))?;
        let delivery_failures =
            IntCounterVec::new(Opts::new("warbler_chat_delivery_failures_total", "Chat deliveries the engine could not make, by reason"), &["reason"])?;
        registry.register(Box::new(messages_in.clone()))?;
        registry.register(Box::new(messages_out.clone()))?;
        registry.register(Box::new(refusals.clone()))?;
        registry.register(Box::new(store_seconds.clone()))?;
        registry.register(Box::new(ack_seconds.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(search_seconds.clone()))?;
        registry.register(Box::new(delivery_failures.clone()))?;
        // Every code shows up (at 0) from the start, so rates work before the first refusal.
        for c in ErrorCode::ALL {
            refusals.with_label_values(&[c.as_str()]);
        }
        Ok(Self { messages_in, messages_out, refusals, store_seconds, ack_seconds, batch_size, search_seconds, delivery_failures })
    }

    pub fn refused(&self, code: ErrorCode) {
        self.refusals.with_label_values(&[code.as_str()]).inc();
    }
}
