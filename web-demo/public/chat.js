// Chat: the client side of the `chat` data channel (docs/protocol.md, "Chat") — no DOM here.
// Holds the room's messages by seq, the messages still waiting for their `ack` (kept across
// reconnects and page reloads, resent with the same id), typing indicators, read positions,
// receipts and search results. One ChatClient lives per room and survives the sessions (data
// channels) of that room in this tab; the UI listens for 'change'.

const REQUEST_TIMEOUT_MS = 15000;
const TYPING_REFRESH_MS = 3000; // send typing on:true again while typing, at most this often
const TYPING_EXPIRY_MS = 6500; // someone's indicator goes away without a refresh or an on:false
const FRAME_LIMIT_BYTES = 60 * 1024; // the media engine drops data channel messages over 64 KiB
const RETRYABLE = new Set(['rate_limited', 'unavailable', 'internal']); // resend the same id later
const MAX_AUTO_RETRIES = 5;
const PAGE = 50;
const GAP_GRACE_MS = 1000;
const encoder = new TextEncoder();

export const utf8Length = (s) => encoder.encode(s).length;

export class ChatError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
    this.detail = message;
  }
}

export class ChatClient extends EventTarget {
  room;
  identity = null; // from hello
  name = null;
  canChat = false;
  admin = false;
  limits = { max_text_bytes: 4096, messages_per_second: 10, burst: 20, max_page: 200 };
  channelState = 'closed'; // state of the current data channel: connecting | open | closing | closed
  ready = false; // hello received on the current channel
  messages = new Map(); // seq -> message (server shape) + receivedAt (local ms)
  pending = []; // {id, text, status: 'sending' | 'failed', error, createdAt, sentAt, attempts}
  lastRead = 0; // our identity's read position
  unreadMentions = 0;
  latestSeq = 0; // the room's latest seq as far as we know
  rev = 0; // the newest change (rev) we have applied
  typing = new Map(); // identity -> {name, until}
  receipts = new Map(); // identity -> seq it has read up to
  names = new Map(); // identity -> display name, from what we have seen
  errors = []; // inline errors not tied to a pending message: {code, message, op, at}
  systemLines = []; // local notices (joins, leaves): {system, sysId, text, ts}
  #systemCount = 0;
  search = null; // {q, busy, results, truncated, error}
  loadingOlder = false;
  stats = { hellos: 0, sent: 0, resent: 0, acks: 0, duplicateAcks: 0, typingSent: 0, readsSent: 0, droppedAcks: 0, refusals: {} };

  #dc = null;
  #nextReq = 1;
  #waiters = new Map(); // req -> {resolve, reject, timer}
  #typingSentAt = 0; // when we last sent typing on:true (0: our indicator is off)
  #typingTimer = null;
  #readInFlight = false;
  #changeQueued = false;
  #retryTimers = new Map(); // pending id -> timer
  #dropAcks = 0; // test hook: ignore this many incoming acks (as if lost with the connection)
  #heldBefore = null; // {maxSeq, rev} of what we held when the current channel opened

  constructor(room) {
    super();
    this.room = room;
    this.#loadPending();
    this.#typingTimer = setInterval(() => this.#expireTyping(), 1000);
  }

  /** Starts using `dc` (an RTCDataChannel labelled `chat`); a previous channel is let go. */
  attach(dc) {
    this.detach();
    this.#dc = dc;
    this.channelState = dc.readyState;
    const mine = (fn) => (ev) => this.#dc === dc && fn(ev);
    dc.addEventListener('open', mine(() => {
      this.channelState = 'open';
      this.#changed();
    }));
    dc.addEventListener('close', mine(() => this.detach()));
    dc.addEventListener('message', mine((ev) => this.#onFrame(ev.data)));
    this.#changed();
  }

  /** Forgets the current channel (it closed or the session ended); pending messages stay. */
  detach() {
    if (!this.#dc) return;
    this.#dc = null;
    this.channelState = 'closed';
    this.ready = false;
    this.#typingSentAt = 0;
    this.typing.clear();
    for (const [req, w] of this.#waiters) {
      clearTimeout(w.timer);
      w.reject(new ChatError('disconnected', 'the chat connection closed'));
      this.#waiters.delete(req);
    }
    if (this.search?.busy) this.search = { ...this.search, busy: false, error: { code: 'disconnected', message: 'the chat connection closed' } };
    this.loadingOlder = false;
    this.#changed();
  }

  dispose() {
    this.detach();
    clearInterval(this.#typingTimer);
    for (const t of this.#retryTimers.values()) clearTimeout(t);
  }

  // ---- what the UI shows ----

  /** Stored messages oldest first, then the pending ones in the order they were written. */
  list() {
    const stored = [...this.messages.values()].sort((a, b) => a.seq - b.seq).map((m) => ({ ...m, own: m.from === this.identity, state: 'sent' }));
    const pending = this.pending.map((p) => ({
      id: p.id, from: this.identity, name: this.name ?? 'You', text: p.text, ts: p.createdAt, own: true,
      state: p.status, error: p.error, attempts: p.attempts,
    }));
    // System lines (joins, leaves) sit among the stored messages by time.
    const out = [];
    let i = 0;
    for (const m of stored) {
      while (i < this.systemLines.length && this.systemLines[i].ts < m.ts) out.push(this.systemLines[i++]);
      out.push(m);
    }
    return [...out, ...this.systemLines.slice(i), ...pending];
  }

  /** A local, unstored line such as "Bob joined" (the newest 50 are kept). */
  addSystem(text) {
    this.systemLines.push({ system: true, sysId: ++this.#systemCount, text, ts: Date.now() });
    if (this.systemLines.length > 50) this.systemLines.shift();
    this.#changed();
  }

  get oldestSeq() {
    let min = Infinity;
    for (const s of this.messages.keys()) min = Math.min(min, s);
    return min === Infinity ? 0 : min;
  }

  get maxSeq() {
    let max = 0;
    for (const s of this.messages.keys()) max = Math.max(max, s);
    return max;
  }

  /** Seqs start at 1 and have no gaps: older messages exist while we do not hold seq 1. */
  get hasOlder() {
    const oldest = this.oldestSeq;
    return oldest > 1 || (oldest === 0 && this.latestSeq > 0);
  }

  /** Messages of others after our read position (deleted ones do not count). */
  get unread() {
    let n = 0;
    for (const m of this.messages.values()) if (m.seq > this.lastRead && m.from !== this.identity && !m.deleted) n++;
    return n;
  }

  typingNames() {
    const now = Date.now();
    // (Our identity typing on another device is not news.)
    return [...this.typing].filter(([id, t]) => t.until > now && id !== this.identity).map(([id, t]) => t.name || id);
  }

  nameOf(identity) {
    return this.names.get(identity) ?? identity;
  }

  // ---- actions ----

  /** Posts `text`; returns the client id. It shows as pending until the server's ack. */
  send(text) {
    if (!text.trim()) return null;
    const p = { id: newId(), text, status: 'sending', error: null, createdAt: Date.now(), sentAt: null, attempts: 0, auto: 0 };
    this.pending.push(p);
    if (utf8Length(JSON.stringify({ type: 'chat', id: p.id, text })) > FRAME_LIMIT_BYTES) {
      // The media engine would drop a frame this big without a word: refuse it here.
      this.#fail(p, { code: 'too_long', message: `${utf8Length(text)} bytes is far over the limit of ${this.limits.max_text_bytes}` });
    } else {
      this.#transmit(p);
    }
    this.typingStopped();
    this.#savePending();
    this.#changed();
    return p.id;
  }

  /** Sends a failed message again (same id). */
  retry(id) {
    const p = this.pending.find((x) => x.id === id);
    if (!p) return;
    Object.assign(p, { status: 'sending', error: null, auto: 0 });
    this.#transmit(p);
    this.#savePending();
    this.#changed();
  }

  /** Drops a failed (or still pending) message from the list. */
  discard(id) {
    this.pending = this.pending.filter((x) => x.id !== id);
    clearTimeout(this.#retryTimers.get(id));
    this.#retryTimers.delete(id);
    this.#savePending();
    this.#changed();
  }

  edit(seq, text) {
    return this.#op({ type: 'edit', seq, text }, 'edit');
  }

  delete(seq) {
    return this.#op({ type: 'delete', seq }, 'delete');
  }

  /** Toggles our `emoji` reaction on message `seq` (or sets it with `on`). */
  react(seq, emoji, on) {
    const m = this.messages.get(seq);
    const mine = Boolean(m?.reactions?.[emoji]?.includes(this.identity));
    return this.#op({ type: 'react', seq, emoji, on: on ?? !mine }, 'react');
  }

  /** Older messages: the page just before the oldest one we hold. */
  async loadOlder() {
    if (this.loadingOlder || !this.hasOlder) return;
    this.loadingOlder = true;
    this.#changed();
    try {
      const before = this.oldestSeq || this.latestSeq + 1;
      const page = await this.request({ type: 'history', before, limit: PAGE });
      this.#merge(page.messages);
      this.#noteRoom(page);
    } catch (e) {
      this.#note('history', e);
    } finally {
      this.loadingOlder = false;
      this.#changed();
    }
  }

  async runSearch(q) {
    q = q.trim();
    if (!q) return this.clearSearch();
    const mine = { q, busy: true, results: [], truncated: false, error: null };
    this.search = mine;
    this.#changed();
    try {
      const r = await this.request({ type: 'search', q, limit: 20 });
      if (this.search === mine) this.search = { q, busy: false, results: r.results ?? [], truncated: Boolean(r.truncated), error: null };
    } catch (e) {
      if (this.search === mine) this.search = { q, busy: false, results: [], truncated: false, error: { code: e.code ?? 'client', message: e.detail ?? e.message } };
    }
    this.#changed();
    return this.search;
  }

  clearSearch() {
    this.search = null;
    this.#changed();
  }

  /** The user is writing (`active`: the input is not empty): typing on:true, refreshed every
   *  few seconds; on:false once the input is empty. */
  typingInput(active) {
    if (!active) return this.typingStopped();
    if (!this.ready || !this.canChat) return;
    if (Date.now() - this.#typingSentAt < TYPING_REFRESH_MS) return;
    this.#typingSentAt = Date.now();
    this.stats.typingSent++;
    this.#send({ type: 'typing', on: true });
  }

  typingStopped() {
    if (!this.#typingSentAt) return;
    this.#typingSentAt = 0;
    if (this.ready) this.#send({ type: 'typing', on: false });
  }

  /** Moves our read position to the newest message we hold (when the user can see it). */
  async markRead() {
    const seq = this.maxSeq;
    if (!this.ready || this.#readInFlight || seq <= this.lastRead) return;
    this.#readInFlight = true;
    this.stats.readsSent++;
    try {
      await this.request({ type: 'read', seq });
      this.lastRead = Math.max(this.lastRead, seq);
    } catch (e) {
      this.#note('read', e);
    } finally {
      this.#readInFlight = false;
      this.#changed();
    }
  }

  /** Sends `msg` with a fresh `req`; resolves with the reply (rejects with a ChatError). */
  request(msg) {
    if (!this.ready) return Promise.reject(new ChatError('disconnected', 'chat is not connected'));
    const req = this.#nextReq++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiters.delete(req);
        reject(new ChatError('timeout', `no reply to ${msg.type} within ${REQUEST_TIMEOUT_MS} ms`));
      }, REQUEST_TIMEOUT_MS);
      this.#waiters.set(req, { resolve, reject, timer });
      this.#send({ ...msg, req });
    });
  }

  dismissError(i) {
    this.errors.splice(i, 1);
    this.#changed();
  }

  /** Test hook: the next `n` acks are ignored, as if lost when the connection dropped. */
  dropAcks(n = 1) {
    this.#dropAcks += n;
  }

  // ---- incoming ----

  #onFrame(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      console.warn('warbler chat: unparsable frame', String(data).slice(0, 200));
      return;
    }
    const waiter = msg.req != null ? this.#waiters.get(msg.req) : undefined;
    if (waiter) {
      this.#waiters.delete(msg.req);
      clearTimeout(waiter.timer);
      if (msg.type === 'error') waiter.reject(new ChatError(msg.code, msg.message));
      else waiter.resolve(msg);
    }
    switch (msg.type) {
      case 'hello': this.#onHello(msg); break;
      case 'history':
        if (msg.req == null) this.#onGreeting(msg); // the page sent with hello; replies go to their waiter
        break;
      case 'chat': this.#onChat(msg); break;
      case 'ack': this.#onAck(msg); break;
      case 'edit': this.#store(msg); break;
      case 'delete': {
        const m = this.messages.get(msg.seq);
        if (m) Object.assign(m, { deleted: true, deleted_by: msg.by, text: '', rev: msg.rev, reactions: undefined, mentions: undefined });
        this.#noteRev(msg.rev);
        if (this.search) this.search = { ...this.search, results: this.search.results.filter((h) => h.message.seq !== msg.seq) };
        break;
      }
      case 'reaction': {
        const m = this.messages.get(msg.seq);
        if (m) {
          const reactions = { ...(m.reactions ?? {}) };
          const who = new Set(reactions[msg.emoji] ?? []);
          if (msg.on) who.add(msg.from);
          else who.delete(msg.from);
          if (who.size) reactions[msg.emoji] = [...who];
          else delete reactions[msg.emoji];
          m.reactions = reactions;
          m.rev = msg.rev;
        }
        this.#noteRev(msg.rev);
        break;
      }
      case 'typing':
        if (msg.on) this.typing.set(msg.from, { name: msg.name, until: Date.now() + TYPING_EXPIRY_MS });
        else this.typing.delete(msg.from);
        if (msg.name) this.names.set(msg.from, msg.name);
        break;
      case 'receipt':
        this.receipts.set(msg.from, Math.max(this.receipts.get(msg.from) ?? 0, msg.seq));
        break;
      case 'read_state':
        this.lastRead = Math.max(this.lastRead, msg.last_read);
        this.unreadMentions = msg.unread_mentions;
        this.latestSeq = Math.max(this.latestSeq, msg.latest_seq);
        break;
      case 'error': this.#onError(msg, Boolean(waiter)); break;
      case 'ok': case 'sync': case 'search_results': break; // replies: handled by their waiter
      default: console.debug('warbler chat: ignoring', msg.type);
    }
    this.#changed();
  }

  #onHello(msg) {
    this.stats.hellos++;
    Object.assign(this, {
      identity: msg.identity, name: msg.name, canChat: Boolean(msg.can_chat), admin: Boolean(msg.admin),
      limits: { ...this.limits, ...(msg.limits ?? {}) }, unreadMentions: msg.unread_mentions ?? 0,
    });
    this.names.set(msg.identity, msg.name);
    this.lastRead = Math.max(this.lastRead, msg.last_read ?? 0);
    this.latestSeq = Math.max(this.latestSeq, msg.latest_seq ?? 0);
    this.#heldBefore = this.messages.size ? { maxSeq: this.maxSeq, rev: this.rev } : null;
    this.ready = true;
    // Everything not acknowledged goes again, with the same ids: what the server already stored
    // comes back as a duplicate ack, the rest is stored now.
    for (const p of this.pending) {
      if (p.status === 'sending' || RETRYABLE.has(p.error?.code) || p.error?.code === 'disconnected') {
        Object.assign(p, { status: 'sending', error: null });
        this.#transmit(p);
      }
    }
  }

  /** The latest page, sent when the channel opens. After a reconnect, also fetches what came
   *  between the last message we held and this page, and the changes to older messages. */
  async #onGreeting(page) {
    this.#merge(page.messages);
    this.#noteRoom(page);
    const held = this.#heldBefore;
    this.#heldBefore = null;
    if (!held) return;
    try {
      const first = page.messages[0]?.seq ?? Infinity;
      if (first > held.maxSeq + 1) await this.#fetchAfter(held.maxSeq);
      let rev = held.rev;
      for (;;) {
        const s = await this.request({ type: 'sync', rev, limit: this.limits.max_page ?? 200 });
        for (const m of s.messages) if (this.messages.has(m.seq) || m.seq > held.maxSeq) this.#store(m);
        this.#noteRoom(s);
        if (!s.has_more || !s.messages.length) break;
        rev = s.messages[s.messages.length - 1].rev;
      }
    } catch (e) {
      this.#note('sync', e);
    }
    this.#changed();
  }

  #onChat(msg) {
    const gapFrom = this.maxSeq;
    this.#store(msg);
    this.typing.delete(msg.from);
    // A jump means we missed something (a slow channel): fetch the hole. The missing seq may be
    // our own message whose ack is still on its way (acks and pushes travel separately), so look
    // again a moment later before asking.
    if (gapFrom > 0 && msg.seq > gapFrom + 1 && !this.#heldBefore) {
      setTimeout(() => {
        const missing = [];
        for (let s = gapFrom + 1; s < msg.seq; s++) if (!this.messages.has(s)) missing.push(s);
        if (missing.length && this.ready) this.#fetchAfter(missing[0] - 1, msg.seq).catch((e) => this.#note('history', e));
      }, GAP_GRACE_MS);
    }
  }

  #onAck(msg) {
    if (this.#dropAcks > 0) {
      this.#dropAcks--;
      this.stats.droppedAcks++;
      return;
    }
    const i = this.pending.findIndex((p) => p.id === msg.id);
    this.stats.acks++;
    if (msg.duplicate) this.stats.duplicateAcks++;
    if (i < 0) return;
    const [p] = this.pending.splice(i, 1);
    this.#savePending();
    if (!this.messages.has(msg.seq)) {
      // The ack carries no rev: the next sync, if any, brings it.
      this.#store({ seq: msg.seq, id: p.id, from: this.identity, name: this.name, text: p.text, ts: msg.ts,
        ackedAt: Date.now(), sentAt: p.sentAt, duplicate: Boolean(msg.duplicate) });
    } else {
      Object.assign(this.messages.get(msg.seq), { ackedAt: Date.now(), sentAt: p.sentAt, duplicate: Boolean(msg.duplicate) });
    }
  }

  #onError(msg, answered) {
    this.stats.refusals[msg.code] = (this.stats.refusals[msg.code] ?? 0) + 1;
    const p = msg.id != null ? this.pending.find((x) => x.id === msg.id) : undefined;
    if (p) {
      if (RETRYABLE.has(msg.code) && p.auto < MAX_AUTO_RETRIES) {
        // Backs off a second per attempt (the server's retry_after_ms is the earliest a single
        // message passes; a burst needs more); the same id makes a retry safe.
        p.auto++;
        p.error = { code: msg.code, message: msg.message, retrying: true };
        clearTimeout(this.#retryTimers.get(p.id));
        this.#retryTimers.set(p.id, setTimeout(() => {
          this.#retryTimers.delete(p.id);
          if (this.pending.includes(p) && p.error?.retrying) this.#transmit(p);
        }, 1000 * p.auto));
      } else {
        this.#fail(p, { code: msg.code, message: msg.message });
      }
      this.#savePending();
      return;
    }
    if (!answered) this.errors.push({ code: msg.code, message: msg.message, op: null, at: Date.now() });
  }

  // ---- plumbing ----

  #transmit(p) {
    if (!this.ready) return; // sent when the next channel says hello
    p.attempts++;
    p.sentAt = Date.now();
    if (p.attempts > 1) this.stats.resent++;
    else this.stats.sent++;
    this.#send({ type: 'chat', id: p.id, text: p.text });
  }

  #fail(p, error) {
    p.status = 'failed';
    p.error = error;
  }

  #send(msg) {
    if (this.#dc?.readyState !== 'open') return false;
    try {
      this.#dc.send(JSON.stringify(msg));
      return true;
    } catch (e) {
      console.warn('warbler chat: send failed', e);
      return false;
    }
  }

  async #op(msg, op) {
    try {
      return await this.request(msg);
    } catch (e) {
      this.#note(op, e, msg.seq);
      throw e;
    } finally {
      this.#changed();
    }
  }

  /** An error shown in the panel (a failed request not tied to a pending message). */
  #note(op, e, seq) {
    this.errors.push({ code: e.code ?? 'client', message: e.detail ?? e.message, op, seq: seq ?? null, at: Date.now() });
    this.#changed();
  }

  async #fetchAfter(after, until = Infinity) {
    for (;;) {
      const page = await this.request({ type: 'history', after, limit: this.limits.max_page ?? 200 });
      this.#merge(page.messages);
      this.#noteRoom(page);
      const last = page.messages[page.messages.length - 1]?.seq;
      if (!page.has_more || last == null || last >= until) return;
      after = last;
    }
  }

  #merge(messages) {
    for (const m of messages ?? []) this.#store(m);
  }

  #store(m) {
    const { type, req, ...msg } = m;
    const prev = this.messages.get(msg.seq);
    const local = prev ? { receivedAt: prev.receivedAt, ackedAt: prev.ackedAt, sentAt: prev.sentAt, duplicate: prev.duplicate } : { receivedAt: Date.now() };
    this.messages.set(msg.seq, { ...local, ...msg });
    if (msg.name) this.names.set(msg.from, msg.name);
    this.latestSeq = Math.max(this.latestSeq, msg.seq);
    this.#noteRev(msg.rev);
    // One of ours that we still hold as pending (its ack was lost): it is stored.
    if (msg.from === this.identity && this.pending.some((p) => p.id === msg.id)) {
      this.pending = this.pending.filter((p) => p.id !== msg.id);
      this.#savePending();
    }
  }

  #noteRoom(page) {
    this.latestSeq = Math.max(this.latestSeq, page.latest_seq ?? 0);
  }

  #noteRev(rev) {
    if (typeof rev === 'number') this.rev = Math.max(this.rev, rev);
  }

  #expireTyping() {
    const now = Date.now();
    let changed = false;
    for (const [id, t] of this.typing) if (t.until <= now) {
      this.typing.delete(id);
      changed = true;
    }
    if (changed) this.#changed();
  }

  // Pending messages survive a page reload (same tab): sessionStorage, per room.
  get #storageKey() {
    return `warbler.chat.pending.${this.room}`;
  }

  #savePending() {
    try {
      const keep = this.pending.map(({ id, text, status, error, createdAt, attempts }) => ({ id, text, status, error, createdAt, attempts }));
      if (keep.length) sessionStorage.setItem(this.#storageKey, JSON.stringify(keep));
      else sessionStorage.removeItem(this.#storageKey);
    } catch {
      // storage unavailable: pending messages live as long as the page
    }
  }

  #loadPending() {
    try {
      const saved = JSON.parse(sessionStorage.getItem(this.#storageKey) ?? '[]');
      this.pending = saved.map((p) => ({ ...p, sentAt: null, auto: 0 }));
    } catch {
      this.pending = [];
    }
  }

  #changed() {
    if (this.#changeQueued) return;
    this.#changeQueued = true;
    queueMicrotask(() => {
      this.#changeQueued = false;
      this.dispatchEvent(new Event('change'));
    });
  }
}

/** `@identity` mentions in `text` as the server finds them (signaling/src/chat/text.rs):
 *  [{start, end, identity}] in UTF-16 offsets, `end` after the identity. */
export function mentionRanges(text) {
  const out = [];
  let prev = null;
  for (let i = 0; i < text.length;) {
    const ch = String.fromCodePoint(text.codePointAt(i));
    const starts = ch === '@' && (prev === null || !/[A-Za-z0-9]/.test(prev));
    prev = ch;
    if (starts) {
      let j = i + 1;
      while (j < text.length) {
        const c = String.fromCodePoint(text.codePointAt(j));
        if (/\s/u.test(c) || ',;:!?()[]{}<>"\'@'.includes(c)) break;
        j += c.length;
      }
      const identity = text.slice(i + 1, j).replace(/\.+$/, '');
      if (identity) out.push({ start: i, end: i + 1 + identity.length, identity });
    }
    i += ch.length;
  }
  return out;
}

function newId() {
  const uuid = globalThis.crypto?.randomUUID?.() ?? `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}-${Math.random().toString(36).slice(2)}`;
  return `c-${uuid}`;
}
