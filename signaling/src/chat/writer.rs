//! The group-commit writer: one OS thread owns all chat writes. It takes whatever writes are
//! queued (up to `max_batch`), applies them in one durable transaction, then answers each
//! submitter and hands the batch's events, in commit order, to the fan-out. Concurrent writers
//! thus share one fsync, and no SQLite call ever runs on the tokio runtime.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tracing::error;
use warbler_sfu::ids::ParticipantId;

use super::metrics::ChatMetrics;
use super::store::ChatStore;
use super::{ChatError, WriteOp, WriteOutcome};

/// A committed write, as the fan-out needs it.
#[derive(Clone, Debug)]
pub struct Committed {
    pub op: WriteOp,
    pub outcome: WriteOutcome,
    /// The participant that submitted it (not sent its own post back; it gets the ack).
    pub origin: Option<ParticipantId>,
}

pub type WriteResult = Result<WriteOutcome, ChatError>;

struct Job {
    op: WriteOp,
    origin: Option<ParticipantId>,
    reply: oneshot::Sender<WriteResult>,
    queued: Instant,
}

/// Submits writes to the writer thread. Dropping every handle stops the thread once the queue is
/// drained.
#[derive(Clone)]
pub struct WriterHandle {
    tx: SyncSender<Job>,
}

/// Clock of the writer (unix ms), injectable for tests.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0))
}

impl WriterHandle {
    /// Starts the writer thread. Committed events go to `events` (bounded: a slow fan-out slows
    /// the writer instead of growing memory).
    pub fn spawn(
        store: Arc<dyn ChatStore>,
        max_batch: usize,
        max_queue: usize,
        events: mpsc::Sender<Vec<Committed>>,
        metrics: ChatMetrics,
        clock: Clock,
    ) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(max_queue);
        std::thread::Builder::new().name("chat-writer".into()).spawn(move || run(rx, store, max_batch.max(1), events, metrics, clock))?;
        Ok(Self { tx })
    }

    /// Queues a write now (so writes from one submitter keep their order) and returns the
    /// receiver of its result, which arrives after the batch is durable.
    pub fn submit(&self, op: WriteOp, origin: Option<ParticipantId>) -> Result<oneshot::Receiver<WriteResult>, ChatError> {
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Job { op, origin, reply, queued: Instant::now() }) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(ChatError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(ChatError::Store("the chat writer has stopped".into())),
        }
    }
}

fn run(rx: Receiver<Job>, store: Arc<dyn ChatStore>, max_batch: usize, events: mpsc::Sender<Vec<Committed>>, metrics: ChatMetrics, clock: Clock) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < max_batch {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let ops: Vec<WriteOp> = jobs.iter().map(|j| j.op.clone()).collect();
        let started = Instant::now();
        let result = store.apply(clock(), &ops);
        metrics.store_seconds.observe(started.elapsed().as_secs_f64());
        metrics.batch_size.observe(jobs.len() as f64);
        match result {
            Ok(outcomes) => {
                let mut committed = Vec::with_capacity(jobs.len());
                for ((job, op), outcome) in jobs.into_iter().zip(ops).zip(outcomes) {
                    metrics.ack_seconds.observe(job.queued.elapsed().as_secs_f64());
                    if let Ok(o) = &outcome {
                        committed.push(Committed { op, outcome: o.clone(), origin: job.origin });
                    }
                    let _ = job.reply.send(outcome);
                }
                if !committed.is_empty() && events.blocking_send(committed).is_err() {
                    // The fan-out is gone (shutdown); stored messages are still served as history.
                }
            }
            Err(e) => {
                error!(error = %e, batch = jobs.len(), "chat batch failed; nothing of it was stored");
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}
