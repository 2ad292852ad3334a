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
//! Search: `messages_fts` is an FTS5 index with the `trigram` tokenizer over the message text
//! (substring matching for any script, bm25 ranking); trigrams cannot match terms shorter than 3
//! characters, so `messages_grams` indexes every unigram and bigram of each message as
//! room-scoped tokens (see `text::gram_tokens`), which answers 1-2 character terms such as `世界`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tracing::warn;
use warbler_sfu::ids::RoomName;

use super::store::ChatStore;
use super::text::{SearchQuery, gram_token, gram_tokens, snippet};
use super::*;

pub const DB_FILE: &str = "chat.sqlite3";
const SCHEMA_VERSION: i64 = 1;
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
CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5(text, content='messages', content_rowid='id', tokenize='trigram');
CREATE VIRTUAL TABLE IF NOT EXISTS messages_grams USING fts5(grams, content='', contentless_delete=1, tokenize='unicode61 remove_diacritics 0', detail='none');
-- No triggers keep the FTS tables in step (the code does): a trigger makes every message INSERT
-- a multi-write statement with a statement savepoint, and FTS5 flushes its pending terms into a
-- new segment at every savepoint, i.e. once per message instead of once per batch.
DROP TRIGGER IF EXISTS messages_fts_insert;
DROP TRIGGER IF EXISTS messages_fts_delete;
DROP TRIGGER IF EXISTS messages_fts_update;
"#;

const MSG_COLS: &str = "id, seq, rev, client_id, author, name, text, ts, reply_to, mentions, edited_ts, deleted_by";

pub struct SqliteStore {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    stop_checkpointer: Arc<AtomicBool>,
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

impl SqliteStore {
    /// Opens (creating if needed) `data_dir/chat.sqlite3` and starts the checkpoint thread.
    pub fn open(data_dir: &Path) -> Result<Self, ChatError> {
        std::fs::create_dir_all(data_dir).map_err(|e| ChatError::Store(format!("{}: {e}", data_dir.display())))?;
        let path = data_dir.join(DB_FILE);
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
        conn.execute_batch(&format!("BEGIN; {SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"))?;
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
            .map_err(|e| ChatError::Store(e.to_string()))?;
        Ok(Self { path, writer: Mutex::new(conn), readers: Mutex::new(Vec::new()), stop_checkpointer: stop })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open_reader(&self) -> Result<Connection, ChatError> {
        let c = Connection::open(&self.path)?;
        c.execute_batch("PRAGMA query_only=ON; PRAGMA busy_timeout=10000; PRAGMA cache_size=-32768; PRAGMA mmap_size=268435456;")?;
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
    }
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

fn index_message(c: &Connection, room_id: i64, id: i64, seq: Seq, text: &str, mentions: &[String]) -> rusqlite::Result<()> {
    c.prepare_cached("INSERT INTO messages_fts (rowid, text) VALUES (?1, ?2)")?.execute(params![id, text])?;
    c.prepare_cached("INSERT INTO messages_grams (rowid, grams) VALUES (?1, ?2)")?.execute(params![id, gram_tokens(text)])?;
    let mut st = c.prepare_cached("INSERT OR IGNORE INTO mentions (room_id, identity, seq) VALUES (?1, ?2, ?3)")?;
    for m in mentions {
        st.execute(params![room_id, m, seq.0 as i64])?;
    }
    Ok(())
}

/// `text`: the text the message was indexed with.
fn unindex_message(c: &Connection, room_id: i64, id: i64, seq: Seq, text: &str) -> rusqlite::Result<()> {
    c.prepare_cached("INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', ?1, ?2)")?.execute(params![id, text])?;
    c.prepare_cached("DELETE FROM messages_grams WHERE rowid = ?1")?.execute([id])?;
    c.prepare_cached("DELETE FROM mentions WHERE room_id = ?1 AND seq = ?2")?.execute(params![room_id, seq.0 as i64])?;
    Ok(())
}

fn not_found(seq: Seq) -> ChatError {
    ChatError::NotFound(format!("no message {} in this room", seq.0))
}

type OpResult = Result<WriteOutcome, ChatError>;

/// One op inside the batch transaction. The outer error aborts the batch; the inner is this
/// op's refusal.
fn apply_one(c: &Connection, rooms: &mut HashMap<String, RoomRow>, now_ms: i64, op: &WriteOp) -> rusqlite::Result<OpResult> {
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
                    WriteOp::Post { .. } => unreachable_post(),
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
            c.prepare_cached(
                "INSERT INTO messages (room_id, seq, rev, client_id, author, name, text, ts, reply_to, mentions)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
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
                mentions_json(mentions)
            ])?;
            let id = c.last_insert_rowid();
            index_message(c, room.id, id, seq, text, mentions)?;
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
            c.prepare_cached("UPDATE messages SET text = ?1, edited_ts = ?2, rev = ?3, mentions = ?4 WHERE id = ?5")?.execute(params![
                text,
                now_ms,
                room.rev as i64,
                mentions_json(mentions),
                row.id
            ])?;
            unindex_message(c, room.id, row.id, *seq, &row.msg.text)?;
            index_message(c, room.id, row.id, *seq, text, mentions)?;
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
            c.prepare_cached("UPDATE messages SET text = '', mentions = NULL, deleted_by = ?1, rev = ?2 WHERE id = ?3")?.execute(params![
                identity,
                room.rev as i64,
                row.id
            ])?;
            unindex_message(c, room.id, row.id, *seq, &row.msg.text)?;
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

fn unreachable_post() -> ChatError {
    ChatError::Store("room row missing for a post".into())
}

impl ChatStore for SqliteStore {
    fn apply(&self, now_ms: i64, ops: &[WriteOp]) -> Result<Vec<OpResult>, ChatError> {
        let mut conn = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut rooms: HashMap<String, RoomRow> = HashMap::new();
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            out.push(apply_one(&tx, &mut rooms, now_ms, op)?);
        }
        {
            let mut st = tx.prepare_cached("UPDATE rooms SET last_seq = ?1, rev = ?2 WHERE id = ?3")?;
            for r in rooms.values().filter(|r| r.dirty) {
                st.execute(params![r.last_seq as i64, r.rev as i64, r.id])?;
            }
        }
        tx.commit()?;
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
        self.with_reader(|c| {
            let Some(r) = room_row(c, &room.0)? else { return Ok(vec![]) };
            // (message id, score) of the newest `window` candidates.
            let candidates: Vec<(i64, f64)> = match q.fts_expression() {
                Some(expr) => c
                    .prepare_cached(
                        "SELECT messages_fts.rowid, -bm25(messages_fts) FROM messages_fts CROSS JOIN messages m ON m.id = messages_fts.rowid
                         WHERE messages_fts MATCH ?1 AND m.room_id = ?2 ORDER BY messages_fts.rowid DESC LIMIT ?3",
                    )?
                    .query_map(params![expr, r.id, window as i64], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect::<rusqlite::Result<_>>()?,
                None => {
                    let token = format!("\"{}\"", gram_token(&q.short_gram()));
                    c.prepare_cached(
                        "SELECT messages_grams.rowid FROM messages_grams CROSS JOIN messages m ON m.id = messages_grams.rowid
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
                if let Some(row) = load_by_id(c, id)? {
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
