// Helpers of the chat panel tests (j-*.test.js): what the panel shows (read from the DOM), the
// `window.warbler.chat` hook, sending through the composer, the REST API, and a server that can
// be crashed and restarted on the same port and data directory.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fill, poll, warblerBin } from './harness.js';

export const chatState = (page) => page.evaluate(() => window.warbler.chat.state());
export const chatMessages = (page) => page.evaluate(() => window.warbler.chat.messages());

/** The message list as the user sees it: one entry per <li>, from the DOM only. */
export function panelMessages(page) {
  return page.evaluate(() => [...document.querySelectorAll('#chat-list > li:not(.system)')].map((li) => ({
    seq: li.dataset.seq ? Number(li.dataset.seq) : null,
    id: li.dataset.id,
    state: li.dataset.state,
    own: li.classList.contains('own'),
    author: li.querySelector('.meta .author')?.textContent ?? null,
    you: Boolean(li.querySelector('.meta .you')),
    time: li.querySelector('.meta time')?.textContent ?? null,
    status: li.querySelector('.meta .status')?.textContent ?? null,
    edited: Boolean(li.querySelector('.meta .edited')),
    text: li.querySelector('.text')?.textContent ?? null,
    deleted: li.classList.contains('deleted'),
    mentions: [...li.querySelectorAll('.text .mention')].map((m) => ({ text: m.textContent, me: m.classList.contains('me') })),
    mentionsMe: li.classList.contains('mentions-me'),
    error: li.querySelector('.error') ? { code: li.querySelector('.error').dataset.code, text: li.querySelector('.error').textContent } : null,
    reactions: [...li.querySelectorAll('.reactions .reaction')].map((b) => ({ text: b.textContent, mine: b.getAttribute('aria-pressed') === 'true' })),
    canEdit: Boolean(li.querySelector('.actions .edit')),
    seen: li.querySelector('.seen')?.textContent ?? null,
    elements: li.querySelectorAll('*').length,
    html: li.querySelector('.text')?.innerHTML ?? null,
  })));
}

/** Waits until the chat channel of `page` has said hello (hook) and the panel shows it. */
export async function waitChatReady(page, what = 'the chat to connect', timeout = 20000) {
  return poll(what, async () => {
    const s = await chatState(page);
    const shown = await page.evaluate(() => document.querySelector('#chat-panel').dataset.ready === 'true' && document.querySelector('#chat-status').textContent === '');
    return s?.ready && shown && s;
  }, { timeout });
}

/** Types `text` into the composer and presses Enter, as a user would (Playwright or Puppeteer). */
export async function sendViaUi(page, text) {
  await fill(page, '#chat-input', text);
  await page.focus('#chat-input');
  await page.keyboard.press('Enter');
}

/** The first panel entry whose text is `text` (polls until `pred` holds for it). */
export async function waitEntry(page, what, text, pred = () => true, opts = {}) {
  return poll(what, async () => {
    const m = (await panelMessages(page)).find((x) => x.text === text);
    return m && pred(m) && m;
  }, { interval: 25, ...opts });
}

export async function devToken(server, room, identity, name = identity) {
  const res = await fetch(`${server.url}/dev/token?${new URLSearchParams({ room, identity, name })}`);
  if (!res.ok) throw new Error(`dev token: HTTP ${res.status}`);
  return (await res.json()).token;
}

/** POST /api/rooms/{room}/messages; on 429 waits for Retry-After and tries again (same id). */
export async function restPost(server, room, token, body) {
  for (let attempt = 0; ; attempt++) {
    const res = await fetch(`${server.url}/api/rooms/${room}/messages`, {
      method: 'POST', headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' }, body: JSON.stringify(body),
    });
    const json = await res.json();
    if (res.status !== 429 || attempt > 20) return { status: res.status, body: json };
    await new Promise((r) => setTimeout(r, 1000 * Number(res.headers.get('retry-after') ?? 1)));
  }
}

/** GET /api/rooms/{room}/messages (all pages, oldest first). */
export async function restHistory(server, room, token) {
  const all = [];
  let after = 0;
  for (;;) {
    const res = await fetch(`${server.url}/api/rooms/${room}/messages?after=${after}&limit=200`, { headers: { Authorization: `Bearer ${token}` } });
    if (!res.ok) throw new Error(`history: HTTP ${res.status} ${await res.text()}`);
    const page = await res.json();
    all.push(...page.messages);
    if (!page.has_more || !page.messages.length) return all;
    after = page.messages.at(-1).seq;
  }
}

async function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/**
 * A warbler server with a fixed port and data directory that can be frozen (SIGSTOP), crashed
 * (SIGKILL) and started again: the page's URL and the chat database survive.
 */
export async function restartableServer() {
  const port = await freePort();
  const dataDir = mkdtempSync(path.join(os.tmpdir(), 'warbler-chat-test-'));
  const url = `http://localhost:${port}`;
  let child = null;
  let output = '';
  const start = async () => {
    const args = ['serve', '--listen', `127.0.0.1:${port}`, '--rtc-port', '0', '--data-dir', dataDir];
    if (process.env.WARBLER_WEB_ROOT) args.push('--web-root', process.env.WARBLER_WEB_ROOT);
    const c = spawn(warblerBin, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { RUST_LOG: 'info', ...process.env } });
    child = c;
    c.exited = new Promise((resolve) => c.on('exit', () => { c.dead = true; resolve(); }));
    const keep = (d) => { output = (output + d).slice(-2_000_000); };
    c.stdout.on('data', keep);
    c.stderr.on('data', keep);
    await poll('the server to answer /healthz', async () => {
      if (c.dead) throw new Error('server exited');
      const res = await fetch(`${url}/healthz`).catch(() => null);
      return res?.status === 200;
    }, { timeout: 15000, interval: 100 });
  };
  const killOnExit = () => child?.kill('SIGKILL');
  process.once('exit', killOnExit);
  await start();
  return {
    url,
    port,
    get output() { return output; },
    freeze: () => child.kill('SIGSTOP'),
    async crash() {
      const c = child;
      c.kill('SIGKILL');
      await c.exited;
    },
    restart: start,
    async stop() {
      const c = child;
      if (c && !c.dead) {
        c.kill('SIGCONT');
        c.kill('SIGTERM');
        const t = setTimeout(() => c.kill('SIGKILL'), 5000);
        await c.exited;
        clearTimeout(t);
      }
      process.off('exit', killOnExit);
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/** Median and maximum of a list of numbers, rounded. */
export function summary(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return { n: s.length, median: Math.round(s[Math.floor(s.length / 2)]), max: Math.round(s.at(-1)), min: Math.round(s[0]) };
}
