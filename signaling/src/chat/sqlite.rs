//! The embedded chat store: SQLite (bundled) in WAL mode in `data_dir/chat.sqlite3`.
//!
//! Durability: `synchronous=FULL`. In WAL mode a commit appends the transaction's pages to the
//! WAL and, with FULL, fsyncs the WAL before `COMMIT` returns, so a committed (and therefore
//! acknowledged) batch survives a `kill -9` of the process and a power loss of the machine (as far
//! as the disk honours flushes; `fullfsync` is on for macOS). `NORMAL` would fsync only at
//! checkpoints: a power cut could then roll back batches that were already acknowledged, which
//! the protocol promises never happens. The cost of FULL is one fsync per commit, which the
//! group-commit writer spreads over a whole batch.
//!
//! Checkpoints (copying the WAL back into the database file) run on a background thread with
//! their own connection, so they do not sit in the writer's commit path; the writer's own
//! auto-checkpoint only kicks in as a safety net if the WAL grows very large.
//!
//! Search lives in a second database, `data_dir/chat-index.sqlite3`, written by its own indexer
//! thread, so full-text indexing (more than half of the CPU a message costs) is not on the path to
//! the ack and runs in parallel with message commits (SQLite allows one writer per database file).
//! Every change of a message's text (post, edit, delete) takes the next value of a global change
//! counter `ix`, stored on the message row; the index database records the last `ix` it has
//! indexed, in the same transaction as the index changes, and catches up from there after a
//! restart or a crash (it is rebuilt from scratch if missing or unusable). So it needs no fsync of
//! its own (`synchronous=NORMAL`). A search first waits (briefly) until everything acknowledged
//! before it started is indexed, so a client finds what it has just posted.
//!
//! - `messages_fts`: FTS5 with the `trigram` tokenizer (substring matching for any script, bm25
//!   ranking);
//! - `messages_grams`: trigrams cannot match terms shorter than 3 characters, so every unigram and
//!   bigram of each message is indexed as a token (see `text::gram_tokens`), which answers 1-2
//!   character terms such as `世界`.
//!
//! Both are contentless (`contentless_delete=1`): the text is in the messages database.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tracing::warn;
use warbler_sfu::ids::RoomName;

use super::store::ChatStore;
use super::text::{SearchQuery, gram_token, gram_tokens, snippet};
use super::*;

pub const DB_FILE: &str = "chat.sqlite3";
pub const INDEX_FILE: &str = "chat-index.sqlite3";
const SCHEMA_VERSION: i64 = 2;
/// Messages indexed per index transaction.
const INDEX_BATCH: i64 = 5000;
/// How long a search waits for the index to catch up with what was acknowledged before it.
const SEARCH_INDEX_WAIT: Duration = Duration::from_millis(500);
/// Reader connections kept open for reuse.
const MAX_IDLE_READERS: usize = 8;
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// The writer checkpoints by itself only past this many WAL pages (~160 MiB).
const WRITER_AUTOCHECKPOINT_PAGES: i64 = 40_000;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS rooms (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    last_seq INTEGER NOT NULL DEFAULT 0,
    rev INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    room_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    rev INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    author TEXT NOT NULL,
    name TEXT NOT NULL,
    text TEXT NOT NULL,
    ts INTEGER NOT NULL,
    reply_to INTEGER,
    mentions TEXT,
    edited_ts INTEGER,
    deleted_by TEXT,
    -- the global change counter value of the latest change of this message's text
    ix INTEGER NOT NULL,
    UNIQUE (room_id, seq),
    UNIQUE (room_id, author, client_id)
);
CREATE INDEX IF NOT EXISTS messages_by_rev ON messages (room_id, rev);
CREATE TABLE IF NOT EXISTS reactions (
    message_id INTEGER NOT NULL,
    emoji TEXT NOT NULL,
    identity TEXT NOT NULL,
    ts INTEGER NOT NULL,
    PRIMARY KEY (message_id, emoji, identity)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS receipts (
    room_id INTEGER NOT NULL,
    identity TEXT NOT NULL,
    last_read INTEGER NOT NULL,
    PRIMARY KEY (room_id, identity)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mentions (
    room_id INTEGER NOT NULL,
    identity TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (room_id, identity, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_by_ix ON messages (ix);
"#;

/// Version 1 (never released) indexed text in the messages database itself.
const MIGRATE_1_TO_2: &str = r#"
DROP TRIGGER IF EXISTS messages_fts_insert;
DROP TRIGGER IF EXISTS messages_fts_delete;
DROP TRIGGER IF EXISTS messages_fts_update;
DROP TABLE IF EXISTS messages_fts;
DROP TABLE IF EXISTS messages_grams;
ALTER TABLE messages ADD COLUMN ix INTEGER NOT NULL DEFAULT 0;
UPDATE messages SET ix = id;
"#;

const INDEX_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS progress (id INTEGER PRIMARY KEY CHECK (id = 1), last_ix INTEGER NOT NULL);
INSERT OR IGNORE INTO progress (id, last_ix) VALUES (1, 0);
CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5(text, content='', contentless_delete=1, tokenize='trigram');
CREATE VIRTUAL TABLE IF NOT EXISTS messages_grams USING fts5(grams, content='', contentless_delete=1, tokenize='unicode61 remove_diacritics 0', detail='none');
"#;

const MSG_COLS: &str = "id, seq, rev, client_id, author, name, text, ts, reply_to, mentions, edited_ts, deleted_by";

pub struct SqliteStore {
    path: PathBuf,
    index_path: PathBuf,
    writer: Mutex<Writer>,
    readers: Mutex<Vec<Connection>>,
    progress: Arc<Progress>,
    stop_checkpointer: Arc<AtomicBool>,
}

/// The writing connection and the last value of the change counter it committed.
struct Writer {
    conn: Connection,
    ix: i64,
}

/// What is committed and what is indexed, shared by the writer, the indexer and searches.
#[derive(Default)]
struct Progress {
    state: Mutex<ProgressState>,
    changed: Condvar,
}

#[derive(Default)]
struct ProgressState {
    committed: i64,
    indexed: i64,
    stop: bool,
}

impl Progress {
    fn lock(&self) -> std::sync::MutexGuard<'_, ProgressState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Clone, Copy)]
struct RoomRow {
    id: i64,
    last_seq: u64,
    rev: u64,
    dirty: bool,
}

/// A message row plus its database id.
struct Row {
    id: i64,
    msg: Message,
}

fn store_err(e: impl std::fmt::Display) -> ChatError {
    ChatError::Store(e.to_string())
}

/// Opens the index database, creating it (or recreating it when it is unusable, or ahead of the
/// messages database, e.g. after a restore from backup) as needed; returns it and its last `ix`.
fn open_index(path: &Path, committed: i64) -> Result<(Connection, i64), ChatError> {
    let attempt = || -> rusqlite::Result<(Connection, i64)> {
        let c = Connection::open(path)?;
        c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))?;
        c.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=10000; PRAGMA cache_size=-65536;")?;
        c.execute_batch(&format!("BEGIN; {INDEX_SCHEMA} COMMIT;"))?;
        let last: i64 = c.query_row("SELECT last_ix FROM progress WHERE id = 1", [], |r| r.get(0))?;
        Ok((c, last))
    };
    match attempt() {
        Ok((c, last)) if last <= committed => Ok((c, last)),
        other => {
            match other {
                Ok((_, last)) => warn!(last, committed, "chat search index is ahead of the messages; rebuilding it"),
                Err(e) => warn!(error = %e, "chat search index unusable; rebuilding it"),
            }
            for suffix in ["", "-wal", "-shm"] {
                let mut f = path.as_os_str().to_owned();
                f.push(suffix);
                let _ = std::fs::remove_file(PathBuf::from(f));
            }
            attempt().map_err(store_err)
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) `data_dir/chat.sqlite3` and its search index, and starts the
    /// checkpoint and indexer threads.
    pub fn open(data_dir: &Path) -> Result<Self, ChatError> {
        std::fs::create_dir_all(data_dir).map_err(|e| ChatError::Store(format!("{}: {e}", data_dir.display())))?;
        let path = data_dir.join(DB_FILE);
        let index_path = data_dir.join(INDEX_FILE);
        let conn = Connection::open(&path)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(ChatError::Store(format!("could not enable WAL (journal_mode is {mode})")));
        }
        conn.execute_batch(&format!(
            "PRAGMA synchronous=FULL; PRAGMA fullfsync=ON; PRAGMA checkpoint_fullfsync=ON;
             PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT_PAGES}; PRAGMA cache_size=-65536;
             PRAGMA temp_store=MEMORY; PRAGMA busy_timeout=10000;"
        ))?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(ChatError::Store(format!("{} has schema version {version}, newer than this server's {SCHEMA_VERSION}", path.display())));
        }
        let migrate = if version == 1 { MIGRATE_1_TO_2 } else { "" };
        conn.execute_batch(&format!("BEGIN; {migrate} {SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"))?;
        let ix: i64 = conn.query_row("SELECT COALESCE(MAX(ix), 0) FROM messages", [], |r| r.get(0))?;
        let (index, indexed) = open_index(&index_path, ix)?;
        let progress = Arc::new(Progress::default());
        {
            let mut p = progress.lock();
            p.committed = ix;
            p.indexed = indexed;
        }
        let source = Connection::open(&path)?;
        source.execute_batch("PRAGMA query_only=ON; PRAGMA busy_timeout=10000;")?;
        let p2 = progress.clone();
        std::thread::Builder::new().name("chat-indexer".into()).spawn(move || run_indexer(source, index, indexed, p2)).map_err(store_err)?;

        let stop = Arc::new(AtomicBool::new(false));
        let checkpointer = Connection::open(&path)?;
        checkpointer.execute_batch("PRAGMA busy_timeout=1000; PRAGMA fullfsync=ON; PRAGMA checkpoint_fullfsync=ON;")?;
        let stop2 = stop.clone();
        std::thread::Builder::new()
            .name("chat-checkpoint".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    std::thread::sleep(CHECKPOINT_EVERY);
                    if let Err(e) = checkpointer.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        warn!(error = %e, "chat WAL checkpoint failed");
                    }
                }
            })
            .map_err(store_err)?;
        Ok(Self { path, index_path, writer: Mutex::new(Writer { conn, ix }), readers: Mutex::new(Vec::new()), progress, stop_checkpointer: stop })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits until everything committed so far is searchable; false on timeout.
    pub fn wait_for_index(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut p = self.progress.lock();
        let target = p.committed;
        while p.indexed < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            p = self.progress.changed.wait_timeout(p, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }

    fn open_reader(&self) -> Result<Connection, ChatError> {
        let c = Connection::open(&self.path)?;
        c.execute_batch("PRAGMA query_only=ON; PRAGMA busy_timeout=10000; PRAGMA cache_size=-32768; PRAGMA mmap_size=268435456;")?;
        c.execute("ATTACH DATABASE ?1 AS ix", [self.index_path.to_string_lossy()])?;
        Ok(c)
    }

    fn with_reader<R>(&self, f: impl FnOnce(&Connection) -> Result<R, ChatError>) -> Result<R, ChatError> {
        let pooled = self.readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match pooled {
            Some(c) => c,
            None => self.open_reader()?,
        };
        let r = f(&conn);
        let mut pool = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < MAX_IDLE_READERS {
            pool.push(conn);
        }
        r
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.stop_checkpointer.store(true, Ordering::Relaxed);
        self.progress.lock().stop = true;
        self.progress.changed.notify_all();
    }
}

/// The indexer thread: whenever the writer has committed changes beyond what is indexed, indexes
/// them (in order of `ix`, up to `INDEX_BATCH` per transaction) from the messages database.
fn run_indexer(source: Connection, mut index: Connection, mut last: i64, progress: Arc<Progress>) {
    loop {
        {
            let mut p = progress.lock();
            while p.committed <= last && !p.stop {
                p = progress.changed.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            if p.stop {
                return;
            }
        }
        match index_batch(&source, &mut index, last) {
            Ok(Some(next)) => last = next,
            // Nothing newer is visible yet (cannot happen once committed); do not spin.
            Ok(None) => last = progress.lock().committed,
            Err(e) => {
                warn!(error = %e, "chat indexing failed; retrying");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        }
        progress.lock().indexed = last;
        progress.changed.notify_all();
    }
}

/// Indexes the messages changed after `after`; returns the last `ix` indexed.
fn index_batch(source: &Connection, index: &mut Connection, after: i64) -> rusqlite::Result<Option<i64>> {
    // (id, ix, text, indexed before, deleted)
    let rows: Vec<(i64, i64, String, bool, bool)> = source
        .prepare_cached("SELECT id, ix, text, edited_ts IS NOT NULL OR deleted_by IS NOT NULL, deleted_by IS NOT NULL FROM messages WHERE ix > ?1 ORDER BY ix LIMIT ?2")?
        .query_map(params![after, INDEX_BATCH], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let Some(last) = rows.last().map(|r| r.1) else { return Ok(None) };
    let tx = index.transaction()?;
    for (id, _, text, changed, deleted) in &rows {
        // A message never edited or deleted cannot have been indexed yet: its only change is this one.
        if *changed {
            tx.prepare_cached("DELETE FROM messages_fts WHERE rowid = ?1")?.execute([id])?;
            tx.prepare_cached("DELETE FROM messages_grams WHERE rowid = ?1")?.execute([id])?;
        }
        if !deleted {
            tx.prepare_cached("INSERT INTO messages_fts (rowid, text) VALUES (?1, ?2)")?.execute(params![id, text])?;
            tx.prepare_cached("INSERT INTO messages_grams (rowid, grams) VALUES (?1, ?2)")?.execute(params![id, gram_tokens(text)])?;
        }
    }
    tx.prepare_cached("UPDATE progress SET last_ix = ?1 WHERE id = 1")?.execute([last])?;
    tx.commit()?;
    Ok(Some(last))
}

fn room_row(c: &Connection, name: &str) -> rusqlite::Result<Option<RoomRow>> {
    c.prepare_cached("SELECT id, last_seq, rev FROM rooms WHERE name = ?1")?
        .query_row([name], |r| Ok(RoomRow { id: r.get(0)?, last_seq: r.get::<_, i64>(1)? as u64, rev: r.get::<_, i64>(2)? as u64, dirty: false }))
        .optional()
}

fn message_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let mentions: Option<String> = r.get(9)?;
    let deleted_by: Option<String> = r.get(11)?;
    Ok(Row {
        id: r.get(0)?,
        msg: Message {
            seq: Seq(r.get::<_, i64>(1)? as u64),
            rev: Rev(r.get::<_, i64>(2)? as u64),
            id: r.get(3)?,
            from: r.get(4)?,
            name: r.get(5)?,
            text: r.get(6)?,
            ts: r.get(7)?,
            reply_to: r.get::<_, Option<i64>>(8)?.map(|s| Seq(s as u64)),
            mentions: mentions.and_then(|m| serde_json::from_str(&m).ok()).unwrap_or_default(),
            edited_ts: r.get(10)?,
            deleted: deleted_by.is_some(),
            deleted_by,
            reactions: Default::default(),
        },
    })
}

fn load_reactions(c: &Connection, row: &mut Row) -> rusqlite::Result<()> {
    let mut st = c.prepare_cached("SELECT emoji, identity FROM reactions WHERE message_id = ?1 ORDER BY ts, identity")?;
    let mut rows = st.query([row.id])?;
    while let Some(r) = rows.next()? {
        row.msg.reactions.entry(r.get(0)?).or_default().push(r.get(1)?);
    }
    Ok(())
}

fn load_by_seq(c: &Connection, room_id: i64, seq: Seq) -> rusqlite::Result<Option<Row>> {
    let row = c
        .prepare_cached(&format!("SELECT {MSG_COLS} FROM messages WHERE room_id = ?1 AND seq = ?2"))?
        .query_row(params![room_id, seq.0 as i64], message_from_row)
        .optional()?;
    match row {
        Some(mut row) => {
            load_reactions(c, &mut row)?;
            Ok(Some(row))
        }
        None => Ok(None),
    }
}

fn load_by_id(c: &Connection, id: i64) -> rusqlite::Result<Option<Row>> {
    let row = c.prepare_cached(&format!("SELECT {MSG_COLS} FROM messages WHERE id = ?1"))?.query_row([id], message_from_row).optional()?;
    match row {
        Some(mut row) => {
            load_reactions(c, &mut row)?;
            Ok(Some(row))
        }
        None => Ok(None),
    }
}

fn read_state_in(c: &Connection, room: &RoomRow, identity: &str) -> rusqlite::Result<ReadState> {
    let last_read: i64 = c
        .prepare_cached("SELECT last_read FROM receipts WHERE room_id = ?1 AND identity = ?2")?
        .query_row(params![room.id, identity], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let unread: i64 = c
        .prepare_cached("SELECT COUNT(*) FROM mentions WHERE room_id = ?1 AND identity = ?2 AND seq > ?3")?
        .query_row(params![room.id, identity, last_read], |r| r.get(0))?;
    Ok(ReadState { last_read: Seq(last_read as u64), unread_mentions: unread as u64, latest_seq: Seq(room.last_seq) })
}

fn mentions_json(m: &[String]) -> Option<String> {
    if m.is_empty() { None } else { serde_json::to_string(m).ok() }
}

fn add_mentions(c: &Connection, room_id: i64, seq: Seq, mentions: &[String]) -> rusqlite::Result<()> {
    let mut st = c.prepare_cached("INSERT OR IGNORE INTO mentions (room_id, identity, seq) VALUES (?1, ?2, ?3)")?;
    for m in mentions {
        st.execute(params![room_id, m, seq.0 as i64])?;
    }
    Ok(())
}

fn remove_mentions(c: &Connection, room_id: i64, seq: Seq) -> rusqlite::Result<()> {
    c.prepare_cached("DELETE FROM mentions WHERE room_id = ?1 AND seq = ?2")?.execute(params![room_id, seq.0 as i64])?;
    Ok(())
}

fn not_found(seq: Seq) -> ChatError {
    ChatError::NotFound(format!("no message {} in this room", seq.0))
}

type OpResult = Result<WriteOutcome, ChatError>;

/// One op inside the batch transaction. The outer error aborts the batch; the inner is this
/// op's refusal.
/// `ix`: the change counter, advanced for every change of a message's text.
fn apply_one(c: &Connection, rooms: &mut HashMap<String, RoomRow>, ix: &mut i64, now_ms: i64, op: &WriteOp) -> rusqlite::Result<OpResult> {
    let name = &op.room().0;
    if !rooms.contains_key(name) {
        let row = match room_row(c, name)? {
            Some(r) => Some(r),
            None if matches!(op, WriteOp::Post { .. }) => {
                c.prepare_cached("INSERT INTO rooms (name) VALUES (?1)")?.execute([name])?;
                Some(RoomRow { id: c.last_insert_rowid(), last_seq: 0, rev: 0, dirty: false })
            }
            None => None,
        };
        match row {
            Some(r) => {
                rooms.insert(name.clone(), r);
            }
            None => {
                return Ok(Err(match op {
                    WriteOp::Edit { seq, .. } | WriteOp::Delete { seq, .. } | WriteOp::React { seq, .. } | WriteOp::Read { seq, .. } => not_found(*seq),
                    // Posts create their room above.
                    WriteOp::Post { .. } => ChatError::Store("room row missing for a post".into()),
                }));
            }
        }
    }
    let room = rooms.get_mut(name).expect("inserted above");
    match op {
        WriteOp::Post { author, client_id, text, reply_to, mentions, .. } => {
            let existing: Option<i64> = c
                .prepare_cached("SELECT id FROM messages WHERE room_id = ?1 AND author = ?2 AND client_id = ?3")?
                .query_row(params![room.id, author.identity, client_id.as_str()], |r| r.get(0))
                .optional()?;
            if let Some(id) = existing {
                let row = load_by_id(c, id)?.expect("row just found");
                return Ok(Ok(WriteOutcome::Posted { message: row.msg, duplicate: true, mentioned: vec![] }));
            }
            if let Some(r) = reply_to
                && (r.0 == 0 || r.0 > room.last_seq)
            {
                return Ok(Err(ChatError::NotFound(format!("no message {} to reply to", r.0))));
            }
            room.last_seq += 1;
            room.rev += 1;
            room.dirty = true;
            let seq = Seq(room.last_seq);
            let rev = Rev(room.rev);
            *ix += 1;
            c.prepare_cached(
                "INSERT INTO messages (room_id, seq, rev, client_id, author, name, text, ts, reply_to, mentions, ix)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                room.id,
                seq.0 as i64,
                rev.0 as i64,
                client_id.as_str(),
                author.identity,
                author.name,
                text,
                now_ms,
                reply_to.map(|s| s.0 as i64),
                mentions_json(mentions),
                *ix
            ])?;
            add_mentions(c, room.id, seq, mentions)?;
            let room = *room;
            let mentioned = mentions.iter().map(|m| Ok((m.clone(), read_state_in(c, &room, m)?))).collect::<rusqlite::Result<Vec<_>>>()?;
            let message = Message {
                seq,
                rev,
                id: client_id.as_str().to_owned(),
                from: author.identity.clone(),
                name: author.name.clone(),
                text: text.clone(),
                ts: now_ms,
                reply_to: *reply_to,
                mentions: mentions.clone(),
                edited_ts: None,
                deleted: false,
                deleted_by: None,
                reactions: Default::default(),
            };
            Ok(Ok(WriteOutcome::Posted { message, duplicate: false, mentioned }))
        }
        WriteOp::Edit { identity, seq, text, mentions, .. } => {
            let Some(row) = load_by_seq(c, room.id, *seq)?.filter(|r| !r.msg.deleted) else { return Ok(Err(not_found(*seq))) };
            if row.msg.from != *identity {
                return Ok(Err(ChatError::Forbidden("only the author may edit a message")));
            }
            room.rev += 1;
            room.dirty = true;
            *ix += 1;
            c.prepare_cached("UPDATE messages SET text = ?1, edited_ts = ?2, rev = ?3, mentions = ?4, ix = ?5 WHERE id = ?6")?.execute(params![
                text,
                now_ms,
                room.rev as i64,
                mentions_json(mentions),
                *ix,
                row.id
            ])?;
            remove_mentions(c, room.id, *seq)?;
            add_mentions(c, room.id, *seq, mentions)?;
            let room = *room;
            let mentioned = mentions.iter().map(|m| Ok((m.clone(), read_state_in(c, &room, m)?))).collect::<rusqlite::Result<Vec<_>>>()?;
            let message = load_by_id(c, row.id)?.expect("row just updated").msg;
            Ok(Ok(WriteOutcome::Edited { message, mentioned }))
        }
        WriteOp::Delete { identity, admin, seq, .. } => {
            let Some(row) = load_by_seq(c, room.id, *seq)?.filter(|r| !r.msg.deleted) else { return Ok(Err(not_found(*seq))) };
            if row.msg.from != *identity && !admin {
                return Ok(Err(ChatError::Forbidden("only the author or a room admin may delete a message")));
            }
            room.rev += 1;
            room.dirty = true;
            *ix += 1;
            c.prepare_cached("UPDATE messages SET text = '', mentions = NULL, deleted_by = ?1, rev = ?2, ix = ?3 WHERE id = ?4")?.execute(params![
                identity,
                room.rev as i64,
                *ix,
                row.id
            ])?;
            remove_mentions(c, room.id, *seq)?;
            c.prepare_cached("DELETE FROM reactions WHERE message_id = ?1")?.execute([row.id])?;
            Ok(Ok(WriteOutcome::Deleted { seq: *seq, rev: Rev(room.rev), by: identity.clone() }))
        }
        WriteOp::React { identity, seq, emoji, on, .. } => {
            let Some(row) = load_by_seq(c, room.id, *seq)?.filter(|r| !r.msg.deleted) else { return Ok(Err(not_found(*seq))) };
            let already = row.msg.reactions.get(emoji).is_some_and(|who| who.contains(identity));
            let changed = if *on {
                if !already && !row.msg.reactions.contains_key(emoji) && row.msg.reactions.len() >= MAX_REACTIONS_PER_MESSAGE {
                    return Ok(Err(ChatError::BadMessage(format!("a message carries at most {MAX_REACTIONS_PER_MESSAGE} different reactions"))));
                }
                !already
                    && c.prepare_cached("INSERT OR IGNORE INTO reactions (message_id, emoji, identity, ts) VALUES (?1, ?2, ?3, ?4)")?.execute(params![
                        row.id, emoji, identity, now_ms
                    ])? > 0
            } else {
                already && c.prepare_cached("DELETE FROM reactions WHERE message_id = ?1 AND emoji = ?2 AND identity = ?3")?.execute(params![row.id, emoji, identity])? > 0
            };
            let rev = if changed {
                room.rev += 1;
                room.dirty = true;
                c.prepare_cached("UPDATE messages SET rev = ?1 WHERE id = ?2")?.execute(params![room.rev as i64, row.id])?;
                Rev(room.rev)
            } else {
                row.msg.rev
            };
            Ok(Ok(WriteOutcome::Reacted { seq: *seq, rev, emoji: emoji.clone(), identity: identity.clone(), on: *on, changed }))
        }
        WriteOp::Read { identity, seq, .. } => {
            let seq = (*seq).min(Seq(room.last_seq));
            let changed = c
                .prepare_cached(
                    "INSERT INTO receipts (room_id, identity, last_read) VALUES (?1, ?2, ?3)
                     ON CONFLICT (room_id, identity) DO UPDATE SET last_read = excluded.last_read WHERE excluded.last_read > receipts.last_read",
                )?
                .execute(params![room.id, identity, seq.0 as i64])?
                > 0;
            let state = read_state_in(c, room, identity)?;
            Ok(Ok(WriteOutcome::Read { identity: identity.clone(), state, changed }))
        }
    }
}

impl ChatStore for SqliteStore {
    fn apply(&self, now_ms: i64, ops: &[WriteOp]) -> Result<Vec<OpResult>, ChatError> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut ix = w.ix;
        let tx = w.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut rooms: HashMap<String, RoomRow> = HashMap::new();
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            out.push(apply_one(&tx, &mut rooms, &mut ix, now_ms, op)?);
        }
        {
            let mut st = tx.prepare_cached("UPDATE rooms SET last_seq = ?1, rev = ?2 WHERE id = ?3")?;
            for r in rooms.values().filter(|r| r.dirty) {
                st.execute(params![r.last_seq as i64, r.rev as i64, r.id])?;
            }
        }
        tx.commit()?;
        if ix != w.ix {
            w.ix = ix;
            self.progress.lock().committed = ix;
            self.progress.changed.notify_all();
        }
        Ok(out)
    }

    fn history(&self, room: &RoomName, q: HistoryQuery) -> Result<Page, ChatError> {
        self.with_reader(|c| {
            let Some(r) = room_row(c, &room.0)? else { return Ok(Page::default()) };
            let (sql, arg, limit, reverse) = match q {
                HistoryQuery::Latest { limit } => ("room_id = ?1 AND seq > ?2 ORDER BY seq DESC", 0i64, limit, true),
                HistoryQuery::Before { seq, limit } => ("room_id = ?1 AND seq < ?2 ORDER BY seq DESC", seq.0 as i64, limit, true),
                HistoryQuery::After { seq, limit } => ("room_id = ?1 AND seq > ?2 ORDER BY seq ASC", seq.0 as i64, limit, false),
                HistoryQuery::ChangedSince { rev, limit } => ("room_id = ?1 AND rev > ?2 ORDER BY rev ASC", rev.0 as i64, limit, false),
            };
            let mut st = c.prepare_cached(&format!("SELECT {MSG_COLS} FROM messages WHERE {sql} LIMIT ?3"))?;
            let mut rows = st.query_map(params![r.id, arg, limit as i64 + 1], message_from_row)?.collect::<rusqlite::Result<Vec<Row>>>()?;
            let has_more = rows.len() > limit;
            rows.truncate(limit);
            if reverse {
                rows.reverse();
            }
            let mut messages = Vec::with_capacity(rows.len());
            for mut row in rows {
                load_reactions(c, &mut row)?;
                messages.push(row.msg);
            }
            Ok(Page { messages, has_more, latest_seq: Seq(r.last_seq), rev: Rev(r.rev) })
        })
    }

    fn search(&self, room: &RoomName, q: &SearchQuery, limit: usize, window: usize) -> Result<Vec<SearchHit>, ChatError> {
        // Read your writes: what was acknowledged before this search is in the index (unless the
        // indexer is far behind, then the newest messages may be missing).
        self.wait_for_index(SEARCH_INDEX_WAIT);
        self.with_reader(|c| {
            let Some(r) = room_row(c, &room.0)? else { return Ok(vec![]) };
            // (message id, score) of the newest `window` candidates.
            let candidates: Vec<(i64, f64)> = match q.fts_expression() {
                Some(expr) => c
                    .prepare_cached(
                        "SELECT messages_fts.rowid, -bm25(messages_fts) FROM ix.messages_fts CROSS JOIN messages m ON m.id = messages_fts.rowid
                         WHERE messages_fts MATCH ?1 AND m.room_id = ?2 ORDER BY messages_fts.rowid DESC LIMIT ?3",
                    )?
                    .query_map(params![expr, r.id, window as i64], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect::<rusqlite::Result<_>>()?,
                None => {
                    let token = format!("\"{}\"", gram_token(&q.short_gram()));
                    c.prepare_cached(
                        "SELECT messages_grams.rowid FROM ix.messages_grams CROSS JOIN messages m ON m.id = messages_grams.rowid
                         WHERE messages_grams MATCH ?1 AND m.room_id = ?2 ORDER BY messages_grams.rowid DESC LIMIT ?3",
                    )?
                    .query_map(params![token, r.id, window as i64], |row| Ok((row.get(0)?, 0.0)))?
                    .collect::<rusqlite::Result<_>>()?
                }
            };
            // The trigram index matches long terms exactly; anything else (short terms, which the gram
            // index only narrows down) is checked on the text. When the index checked everything,
            // only the best are loaded.
            let all_checked = q.long_terms().count() == q.terms.len();
            let mut ranked = candidates;
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(b.0.cmp(&a.0)));
            let mut hits: Vec<(f64, Row)> = Vec::new();
            for (id, score) in ranked {
                if hits.len() >= limit {
                    break;
                }
                if !all_checked {
                    let text: Option<String> = c
                        .prepare_cached("SELECT text FROM messages WHERE id = ?1 AND deleted_by IS NULL")?
                        .query_row([id], |r| r.get(0))
                        .optional()?;
                    if !text.is_some_and(|t| q.matches(&t)) {
                        continue;
                    }
                }
                // The index may lag an edit or delete by a moment: check the current text.
                if let Some(row) = load_by_id(c, id)?.filter(|r| !r.msg.deleted && q.matches(&r.msg.text)) {
                    hits.push((score, row));
                }
            }
            hits.truncate(limit);
            Ok(hits
                .into_iter()
                .map(|(score, row)| {
                    let (snippet, highlights) = snippet(&row.msg.text, q);
                    SearchHit { message: row.msg, score, snippet, highlights }
                })
                .collect())
        })
    }

    fn read_state(&self, room: &RoomName, identity: &str) -> Result<ReadState, ChatError> {
        self.with_reader(|c| match room_row(c, &room.0)? {
            Some(r) => Ok(read_state_in(c, &r, identity)?),
            None => Ok(ReadState::default()),
        })
    }
}
