//! The storage contract of chat. A backend keeps rooms' messages with gapless per-room `seq`,
//! idempotency by (room, identity, client id), reactions, read positions and mentions, and a
//! full-text index. SQLite (`sqlite.rs`) is the embedded default; a Postgres backend for several
//! nodes implements the same trait (seq and rev then come from the room row, locked `FOR UPDATE`
//! in the batch's transaction).
//!
//! All methods block: the writer thread calls [`ChatStore::apply`]; reads run on tokio's
//! blocking pool.

use warbler_sfu::ids::RoomName;

use super::text::SearchQuery;
use super::{ChatError, HistoryQuery, Page, ReadState, SearchHit, WriteOp, WriteOutcome};

pub trait ChatStore: Send + Sync + 'static {
    /// Applies `ops` in order in one transaction, durable (on stable storage) when this returns
    /// `Ok`. A refused op (not found, forbidden) yields its `Err` in the list without aborting the
    /// others; an `Err` of the whole call means nothing of the batch was stored. `now_ms` stamps
    /// new messages and edits.
    fn apply(&self, now_ms: i64, ops: &[WriteOp]) -> Result<Vec<Result<WriteOutcome, ChatError>>, ChatError>;

    fn history(&self, room: &RoomName, q: HistoryQuery) -> Result<Page, ChatError>;

    /// The best matches (bm25 over the newest `window` matches; recency for queries whose terms
    /// are all shorter than 3 characters), best first.
    fn search(&self, room: &RoomName, q: &SearchQuery, limit: usize, window: usize) -> Result<Vec<SearchHit>, ChatError>;

    fn read_state(&self, room: &RoomName, identity: &str) -> Result<ReadState, ChatError>;
}
