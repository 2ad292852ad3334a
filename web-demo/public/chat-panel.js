// Chat panel: renders a ChatClient (chat.js) into the side panel — message list with author, time
// and state, composer (Enter sends), typing indicator, mentions, reactions, edit/delete of own
// messages, "load older", search with highlighted matches, inline errors, unread badge while
// collapsed. User text only ever reaches the page through textContent / text nodes.
import { mentionRanges, utf8Length } from './chat.js';

const REACTIONS = ['👍', '🎉', '❤️'];
const READ_DELAY_MS = 300;
const CONFIRM_MS = 4000;

export class ChatPanel {
  chat = null;
  #el;
  #editing = null; // seq of the message being edited
  #editDraft = '';
  #confirmDelete = null; // seq whose Delete was clicked once
  #confirmTimer = null;
  #renderQueued = false;
  #readTimer = null;
  #flash = null;
  #onChange = () => this.#schedule();

  /** `el`: the panel's elements (see index.html); `collapsed`: the initial state. */
  constructor(el, { collapsed = false } = {}) {
    this.#el = el;
    this.setCollapsed(collapsed);
    el.toggle.addEventListener('click', () => this.setCollapsed(!this.collapsed));
    el.button.addEventListener('click', () => {
      this.setCollapsed(!this.collapsed);
      if (!this.collapsed) el.panel.scrollIntoView({ block: 'nearest' });
    });
    el.form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      this.#submit();
    });
    el.input.addEventListener('keydown', (ev) => {
      // Enter sends; Shift+Enter is a new line; Enter that ends an IME composition (Chinese,
      // Japanese input) only commits the composition.
      if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing && ev.keyCode !== 229) {
        ev.preventDefault();
        this.#submit();
      }
    });
    el.input.addEventListener('input', () => {
      this.chat?.typingInput(el.input.value.trim().length > 0);
      this.#renderCounter();
    });
    el.input.addEventListener('blur', () => this.chat?.typingStopped());
    el.older.addEventListener('click', () => this.#loadOlder());
    el.searchForm.addEventListener('submit', (ev) => {
      ev.preventDefault();
      this.chat?.runSearch(el.search.value);
    });
    el.search.addEventListener('search', () => { if (!el.search.value) this.chat?.clearSearch(); }); // the clear (x) button
    el.resultsClose.addEventListener('click', () => {
      el.search.value = '';
      this.chat?.clearSearch();
      this.render();
      this.#scrollToBottom(true);
    });
    document.addEventListener('visibilitychange', () => this.#schedule());
  }

  /** Shows `chat` (null: nothing). */
  bind(chat) {
    if (this.chat === chat) return;
    this.chat?.removeEventListener('change', this.#onChange);
    this.chat = chat;
    this.#editing = this.#confirmDelete = null;
    this.#el.list.replaceChildren();
    this.#el.search.value = '';
    chat?.addEventListener('change', this.#onChange);
    this.render();
  }

  get collapsed() {
    return this.#el.panel.dataset.collapsed === 'true';
  }

  setCollapsed(collapsed) {
    const el = this.#el;
    el.panel.dataset.collapsed = String(collapsed);
    el.body.hidden = collapsed;
    el.toggle.setAttribute('aria-expanded', String(!collapsed));
    el.toggle.textContent = collapsed ? 'Show' : 'Hide';
    el.button.setAttribute('aria-pressed', String(!collapsed));
    if (!collapsed) queueMicrotask(() => this.#scrollToBottom());
    this.render();
  }

  #schedule() {
    if (this.#renderQueued) return;
    this.#renderQueued = true;
    queueMicrotask(() => {
      this.#renderQueued = false;
      this.render();
    });
  }

  #submit() {
    const text = this.#el.input.value;
    if (!this.chat || !text.trim()) return;
    this.chat.send(text);
    this.#el.input.value = '';
    this.#renderCounter();
    this.#scrollToBottom(true);
  }

  async #loadOlder() {
    const scroll = this.#el.scroll;
    const fromBottom = scroll.scrollHeight - scroll.scrollTop;
    await this.chat?.loadOlder();
    this.render();
    scroll.scrollTop = scroll.scrollHeight - fromBottom; // keep what the user was reading in place
  }

  // ---- rendering ----

  render() {
    const el = this.#el;
    const chat = this.chat;
    if (!chat) return;
    const scroll = el.scroll;
    const atBottom = scroll.scrollHeight - scroll.scrollTop - scroll.clientHeight < 40;

    // Header: connection, unread badge (when the user cannot see the list).
    const seeing = !this.collapsed && document.visibilityState === 'visible';
    const status = chat.ready ? '' : chat.channelState === 'open' || chat.channelState === 'connecting' ? 'connecting…' : 'offline';
    el.status.textContent = status;
    el.panel.dataset.ready = String(chat.ready);
    const unread = seeing ? 0 : chat.unread;
    for (const badge of [el.unread, el.buttonBadge]) {
      badge.hidden = unread === 0;
      badge.textContent = String(unread);
    }
    el.mentions.hidden = seeing || chat.unreadMentions === 0;
    el.mentions.textContent = `@${chat.unreadMentions}`;
    el.mentions.title = `${chat.unreadMentions} unread message(s) mention you`;

    el.older.hidden = !chat.hasOlder;
    el.older.disabled = chat.loadingOlder || !chat.ready;
    el.older.textContent = chat.loadingOlder ? 'Loading…' : 'Load older messages';

    this.#renderList();

    const names = chat.typingNames();
    el.typing.textContent = names.length === 0 ? '' : names.length === 1 ? `${names[0]} is typing…`
      : names.length === 2 ? `${names[0]} and ${names[1]} are typing…` : `${names.length} people are typing…`;

    const notices = [];
    if (chat.ready && !chat.canChat) notices.push('You can read this chat but not post: your access token lacks the chat grant.');
    if (!chat.ready && chat.pending.some((p) => p.status === 'sending')) notices.push('Not connected: unsent messages go out when the chat reconnects.');
    el.notice.hidden = notices.length === 0;
    el.notice.textContent = notices.join(' ');

    el.errors.replaceChildren(...chat.errors.map((e, i) => {
      const li = document.createElement('li');
      li.dataset.code = e.code;
      const code = document.createElement('code');
      code.textContent = e.code;
      const dismiss = button('×', 'dismiss', () => chat.dismissError(i));
      dismiss.title = 'Dismiss';
      li.append(code, ` ${e.op ? `${e.op}: ` : ''}${e.message}`, dismiss);
      return li;
    }));

    this.#renderSearch();
    this.#renderCounter();
    if (atBottom) this.#scrollToBottom();
    if (seeing && chat.ready && chat.maxSeq > chat.lastRead) {
      clearTimeout(this.#readTimer);
      this.#readTimer = setTimeout(() => {
        if (this.chat === chat && !this.collapsed && document.visibilityState === 'visible') chat.markRead();
      }, READ_DELAY_MS);
    }
  }

  #renderCounter() {
    const el = this.#el;
    const max = this.chat?.limits.max_text_bytes ?? 4096;
    const bytes = utf8Length(el.input.value);
    el.counter.hidden = bytes < max * 0.8;
    el.counter.textContent = `${bytes} / ${max} bytes`;
    el.counter.classList.toggle('over', bytes > max);
  }

  #scrollToBottom(force = false) {
    const s = this.#el.scroll;
    if (force || !this.collapsed) s.scrollTop = s.scrollHeight;
  }

  #renderList() {
    const chat = this.chat;
    const items = chat.list();
    // "Seen by": on our newest stored message, who has read up to it.
    const lastOwn = items.filter((m) => m.own && m.seq != null).at(-1);
    const seenBy = lastOwn ? [...chat.receipts].filter(([who, seq]) => who !== chat.identity && seq >= lastOwn.seq).map(([who]) => chat.nameOf(who)) : [];
    const list = this.#el.list;
    const existing = new Map([...list.children].map((li) => [li.dataset.key, li]));
    let prev = null;
    for (const m of items) {
      const key = m.system ? `system\u0000${m.sysId}` : `${m.from ?? ''}\u0000${m.id ?? `#${m.seq}`}`;
      let li = existing.get(key);
      if (li) existing.delete(key);
      else {
        li = document.createElement('li');
        li.dataset.key = key;
      }
      if (m.system) {
        if (!li.classList.contains('system')) {
          li.className = 'system';
          const time = tag('time', 'time', formatTime(m.ts));
          li.append(tag('span', 'text', m.text), ' ', time);
        }
        const want = prev ? prev.nextSibling : list.firstChild;
        if (want !== li) list.insertBefore(li, want);
        prev = li;
        continue;
      }
      const view = {
        seq: m.seq ?? null, id: m.id, from: m.from, name: m.name, text: m.text, ts: m.ts, state: m.state, own: m.own,
        error: m.error ?? null, deleted: Boolean(m.deleted), edited: m.edited_ts ?? null, reactions: m.reactions ?? {},
        mentionsMe: Boolean(m.mentions?.includes(chat.identity)), me: chat.identity, canChat: chat.canChat,
        editing: m.seq != null && this.#editing === m.seq, confirming: m.seq != null && this.#confirmDelete === m.seq,
        seen: m === lastOwn ? seenBy : [], flash: m.seq != null && this.#flash === m.seq,
      };
      const sig = JSON.stringify(view);
      if (li.dataset.sig !== sig) {
        li.dataset.sig = sig;
        this.#fillMessage(li, view);
      }
      const want = prev ? prev.nextSibling : list.firstChild;
      if (want !== li) list.insertBefore(li, want);
      prev = li;
    }
    for (const li of existing.values()) li.remove();
  }

  #fillMessage(li, m) {
    const chat = this.chat;
    li.className = 'msg';
    li.classList.toggle('own', m.own);
    li.classList.toggle('deleted', m.deleted);
    li.classList.toggle('mentions-me', m.mentionsMe);
    li.classList.toggle('flash', m.flash);
    li.dataset.state = m.state;
    li.dataset.from = m.from ?? '';
    li.dataset.id = m.id ?? '';
    if (m.seq != null) li.dataset.seq = m.seq;
    else delete li.dataset.seq;

    const meta = document.createElement('div');
    meta.className = 'meta';
    const author = button(m.name || m.from || '?', 'author', () => this.#insertMention(m.from));
    author.title = m.own ? 'you' : `Mention @${m.from}`;
    meta.append(author);
    if (m.own) meta.append(tag('span', 'you', '(you)'));
    const time = tag('time', 'time', formatTime(m.ts));
    time.dateTime = new Date(m.ts).toISOString();
    time.title = new Date(m.ts).toLocaleString();
    meta.append(time);
    if (m.edited && !m.deleted) meta.append(tag('span', 'edited', '(edited)'));
    if (m.state === 'sending') meta.append(tag('span', 'status', m.error?.retrying ? `retrying (${m.error.code})…` : 'sending…'));
    if (m.state === 'failed') meta.append(tag('span', 'status failed', 'not sent'));

    const parts = [meta];
    if (m.editing) {
      const form = document.createElement('form');
      form.className = 'edit';
      const input = document.createElement('textarea');
      input.className = 'edit-input';
      input.rows = 2;
      input.value = this.#editDraft;
      input.addEventListener('input', () => { this.#editDraft = input.value; });
      input.addEventListener('keydown', (ev) => {
        if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing && ev.keyCode !== 229) {
          ev.preventDefault();
          form.requestSubmit();
        } else if (ev.key === 'Escape') {
          this.#stopEditing();
        }
      });
      form.addEventListener('submit', (ev) => {
        ev.preventDefault();
        const text = input.value;
        this.#stopEditing();
        if (text.trim() && text !== m.text) chat.edit(m.seq, text).catch(() => {});
      });
      form.append(input, button('Save', 'save', null, 'submit'), button('Cancel', 'cancel', () => this.#stopEditing()));
      parts.push(form);
      queueMicrotask(() => input.isConnected && document.activeElement !== input && input.focus());
    } else {
      const text = document.createElement('div');
      text.className = 'text';
      if (m.deleted) text.textContent = 'message deleted';
      else renderText(text, m.text, m.me, (id) => chat.nameOf(id));
      parts.push(text);
    }

    if (m.error && (m.state === 'failed' || m.error.retrying)) {
      const err = document.createElement('div');
      err.className = 'error';
      err.dataset.code = m.error.code;
      const code = tag('code', '', m.error.code);
      err.append(code, ` ${describe(m.error)}`);
      if (m.state === 'failed') {
        if (m.error.code !== 'too_long' && m.error.code !== 'forbidden') err.append(button('Retry', 'retry', () => chat.retry(m.id)));
        err.append(button('Discard', 'discard', () => chat.discard(m.id)));
      }
      parts.push(err);
    }

    if (m.seq != null && !m.deleted) {
      const emojis = Object.keys(m.reactions);
      if (emojis.length) {
        const box = document.createElement('div');
        box.className = 'reactions';
        for (const e of emojis) {
          const who = m.reactions[e];
          const mine = who.includes(m.me);
          const b = button(`${e} ${who.length}`, 'reaction', () => chat.react(m.seq, e, !mine).catch(() => {}));
          b.dataset.emoji = e;
          b.setAttribute('aria-pressed', String(mine));
          b.title = who.map((id) => chat.nameOf(id)).join(', ');
          box.append(b);
        }
        parts.push(box);
      }
      const actions = document.createElement('div');
      actions.className = 'actions';
      for (const e of REACTIONS) {
        const mine = Boolean(m.reactions[e]?.includes(m.me));
        const b = button(e, 'react', () => chat.react(m.seq, e, !mine).catch(() => {}));
        b.dataset.emoji = e;
        b.setAttribute('aria-pressed', String(mine));
        b.title = mine ? `Remove your ${e}` : `React with ${e}`;
        b.disabled = !m.canChat;
        actions.append(b);
      }
      if (m.own && !m.editing) {
        actions.append(button('Edit', 'edit', () => this.#startEditing(m)));
        actions.append(button(m.confirming ? 'Delete?' : 'Delete', m.confirming ? 'delete confirming' : 'delete', () => this.#deleteClicked(m.seq)));
      }
      parts.push(actions);
    }
    if (m.seen.length) parts.push(tag('div', 'seen', `Seen by ${m.seen.join(', ')}`));
    li.replaceChildren(...parts);
  }

  #startEditing(m) {
    this.#editing = m.seq;
    this.#editDraft = m.text;
    this.render();
  }

  #stopEditing() {
    this.#editing = null;
    this.render();
  }

  /** Delete takes two clicks: the first turns the button into "Delete?" for a few seconds. */
  #deleteClicked(seq) {
    clearTimeout(this.#confirmTimer);
    if (this.#confirmDelete === seq) {
      this.#confirmDelete = null;
      this.chat.delete(seq).catch(() => {});
    } else {
      this.#confirmDelete = seq;
      this.#confirmTimer = setTimeout(() => {
        this.#confirmDelete = null;
        this.render();
      }, CONFIRM_MS);
    }
    this.render();
  }

  #insertMention(identity) {
    if (!identity || identity === this.chat?.identity) return;
    const input = this.#el.input;
    const sep = input.value && !/\s$/.test(input.value) ? ' ' : '';
    input.value += `${sep}@${identity} `;
    input.focus();
  }

  #renderSearch() {
    const el = this.#el;
    const s = this.chat.search;
    el.results.hidden = !s;
    el.scroll.hidden = Boolean(s);
    if (!s) return;
    el.resultsTitle.textContent = s.busy ? `Searching for “${s.q}”…`
      : s.error ? `Search failed: ${s.error.code} ${s.error.message}`
        : `${s.results.length} result${s.results.length === 1 ? '' : 's'} for “${s.q}”${s.truncated ? ' (more not shown)' : ''}`;
    el.resultsList.replaceChildren(...s.results.map((hit) => {
      const li = document.createElement('li');
      li.className = 'result';
      li.dataset.seq = hit.message.seq;
      const meta = document.createElement('div');
      meta.className = 'meta';
      meta.append(tag('span', 'author', hit.message.name || hit.message.from), tag('time', 'time', formatTime(hit.message.ts)));
      const snippet = document.createElement('div');
      snippet.className = 'snippet';
      renderHighlights(snippet, hit.snippet, hit.highlights ?? []);
      li.append(meta, snippet);
      li.tabIndex = 0;
      const open = () => this.#jumpTo(hit.message.seq);
      li.addEventListener('click', open);
      li.addEventListener('keydown', (ev) => { if (ev.key === 'Enter') open(); });
      return li;
    }));
  }

  /** Leaves the search and shows message `seq` (when it is loaded), briefly highlighted. */
  #jumpTo(seq) {
    this.#el.search.value = '';
    this.#flash = seq;
    this.chat.clearSearch();
    this.render();
    this.#el.list.querySelector(`li[data-seq="${seq}"]`)?.scrollIntoView({ block: 'center' });
    setTimeout(() => {
      if (this.#flash === seq) this.#flash = null;
      this.render();
    }, 2000);
  }
}

/** Text with its @mentions in spans (text nodes only: never parsed as HTML). */
function renderText(el, text, me, nameOf) {
  el.replaceChildren();
  let at = 0;
  for (const r of mentionRanges(text)) {
    if (r.start > at) el.append(text.slice(at, r.start));
    const span = tag('span', r.identity === me ? 'mention me' : 'mention', text.slice(r.start, r.end));
    span.title = nameOf(r.identity);
    el.append(span);
    at = r.end;
  }
  if (at < text.length) el.append(text.slice(at));
}

/** A search snippet with its `[start, end)` highlight ranges (Unicode code points) in <mark>. */
function renderHighlights(el, snippet, highlights) {
  const cps = Array.from(snippet);
  let at = 0;
  for (const [start, end] of [...highlights].sort((a, b) => a[0] - b[0])) {
    if (start < at) continue;
    if (start > at) el.append(cps.slice(at, start).join(''));
    el.append(tag('mark', '', cps.slice(start, end).join('')));
    at = end;
  }
  if (at < cps.length) el.append(cps.slice(at).join(''));
}

function describe(e) {
  switch (e.code) {
    case 'rate_limited': return e.retrying ? 'sending too fast; trying again shortly' : e.message;
    default: return e.message;
  }
}

function formatTime(ts) {
  return new Date(ts).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

function tag(name, className, text) {
  const e = document.createElement(name);
  if (className) e.className = className;
  e.textContent = text;
  return e;
}

function button(text, className, onClick, type = 'button') {
  const b = tag('button', className, text);
  b.type = type;
  if (onClick) b.addEventListener('click', onClick);
  return b;
}
