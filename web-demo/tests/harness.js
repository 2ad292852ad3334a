// Test harness: starts a fresh warbler server per test, launches Chromium (playwright-core) and
// Firefox (puppeteer-core), joins rooms through the UI and polls the page's `window.warbler` hook.
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import puppeteer from 'puppeteer-core';

const here = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(here, '..', '..');

export const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--use-fake-device-for-media-stream=fps=30', '--use-fake-ui-for-media-stream',
  '--force-fieldtrials=WebRTC-LegacySimulcastLayerLimit/Disabled/',
  '--autoplay-policy=no-user-gesture-required',
];

export const FIREFOX_PREFS = {
  'media.navigator.streams.fake': true, 'media.navigator.permission.disabled': true,
  'media.peerconnection.ice.obfuscate_host_addresses': false, 'app.update.enabled': false,
  'network.captive-portal-service.enabled': false, 'browser.safebrowsing.malware.enabled': false,
  'browser.safebrowsing.phishing.enabled': false, 'datareporting.policy.dataSubmissionEnabled': false,
  'toolkit.telemetry.enabled': false, 'services.settings.server': 'http://127.0.0.1:9/',
  'media.autoplay.default': 0,
};

/** Polls `fn` until it returns a truthy value; throws with the last value/error after `timeout` ms. */
export async function poll(what, fn, { timeout = 20000, interval = 250 } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      const detail = last instanceof Error ? last.stack : JSON.stringify(last);
      throw new Error(`timed out after ${timeout} ms waiting for ${what}; last: ${detail}`);
    }
    await new Promise((r) => setTimeout(r, interval));
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

export const warblerBin = process.env.WARBLER_BIN || path.join(repoRoot, 'target', 'debug', 'warbler');

/** Issues a token with the binary's own `warbler token` subcommand (args: --room, --api-key, ...). */
export function issueToken(args) {
  return execFileSync(warblerBin, ['token', ...args], { encoding: 'utf8' }).trim();
}

/**
 * Starts `warbler serve` on a free port with a fresh data dir (plus `extraArgs`); resolves once
 * /healthz answers 200. `listenHost` '0.0.0.0' lets pages in a network namespace reach it.
 */
export async function startServer(extraArgs = [], { listenHost = '127.0.0.1' } = {}) {
  const bin = warblerBin;
  const port = await freePort();
  const dataDir = mkdtempSync(path.join(os.tmpdir(), 'warbler-web-test-'));
  const args = ['serve', '--listen', `${listenHost}:${port}`, '--rtc-port', '0', '--data-dir', dataDir];
  if (process.env.WARBLER_WEB_ROOT) args.push('--web-root', process.env.WARBLER_WEB_ROOT);
  args.push(...extraArgs);
  const child = spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { RUST_LOG: 'info', ...process.env } });
  let output = '';
  const keep = (d) => {
    output += d;
    if (output.length > 2_000_000) output = output.slice(-1_000_000);
  };
  child.stdout.on('data', keep);
  child.stderr.on('data', keep);
  let exited = null;
  const exitPromise = new Promise((resolve) => child.on('exit', (code, signal) => {
    exited = { code, signal };
    resolve();
  }));
  child.on('error', (e) => keep(`spawn error: ${e.message}\n`));
  // Never leave a server behind, even if the runner ends this process mid-test.
  const killOnExit = () => child.kill('SIGKILL');
  process.once('exit', killOnExit);
  const url = `http://localhost:${port}`;
  const server = {
    url,
    port,
    get output() { return output; },
    async stop() {
      if (!exited) {
        child.kill('SIGTERM');
        const killTimer = setTimeout(() => child.kill('SIGKILL'), 5000);
        await exitPromise;
        clearTimeout(killTimer);
      }
      process.off('exit', killOnExit);
      rmSync(dataDir, { recursive: true, force: true });
      // WARBLER_TEST_LOG_DIR=DIR keeps every server's output (DIR/warbler-PORT.log), pass or fail.
      if (process.env.WARBLER_TEST_LOG_DIR) writeFileSync(path.join(process.env.WARBLER_TEST_LOG_DIR, `warbler-${port}.log`), output);
    },
  };
  try {
    await poll('the server to answer /healthz', async () => {
      if (exited) throw new Error(`server exited (${JSON.stringify(exited)}) before becoming healthy`);
      const res = await fetch(`${url}/healthz`).catch(() => null);
      return res?.status === 200;
    }, { timeout: 15000, interval: 100 });
  } catch (e) {
    await server.stop();
    e.message += `\n--- server output ---\n${output}`;
    throw e;
  }
  return server;
}

/**
 * Runs `body(ctx)` with a fresh server; closes every browser registered with ctx.track() and stops
 * the server afterwards, printing the server's output if the body failed.
 */
export async function withServer(t, body, { serverArgs = [], listenHost } = {}) {
  const server = await startServer(serverArgs, { listenHost });
  const browsers = [];
  const ctx = { server, track: (b) => (browsers.push(b), b) };
  try {
    await body(ctx);
  } catch (e) {
    console.error(`--- warbler output (${t.name}) ---\n${server.output}\n--- end of warbler output ---`);
    throw e;
  } finally {
    await Promise.allSettled(browsers.map((b) => b.close()));
    await server.stop();
  }
}

export async function launchChromium(extraArgs = [], { without = [], executablePath = '/usr/bin/chromium' } = {}) {
  const args = CHROMIUM_ARGS.filter((a) => !without.includes(a)).concat(extraArgs);
  return chromium.launch({ executablePath, args });
}

export async function launchFirefox() {
  // The same page size as Playwright's Chromium pages (puppeteer's default is 800x600, where a
  // third tile is below the fold and adaptive stream rightly pauses it as hidden).
  return puppeteer.launch({ browser: 'firefox', executablePath: '/usr/bin/firefox-esr', headless: true, extraPrefsFirefox: FIREFOX_PREFS,
    defaultViewport: { width: 1280, height: 720 } });
}

/** Opens the demo in a new page; browser console errors are echoed with a label. */
export async function openPage(browser, url, label) {
  const page = await browser.newPage();
  page.on('console', (m) => {
    const type = typeof m.type === 'function' ? m.type() : m.type;
    if (type === 'error' || type === 'warning' || type === 'warn') console.error(`[${label} console.${type}] ${m.text()}`);
  });
  page.on('pageerror', (e) => console.error(`[${label} pageerror] ${e.message ?? e}`));
  await page.goto(url);
  return page;
}

/** Replaces an input's value (works with Playwright and Puppeteer pages). */
export async function fill(page, selector, value) {
  if (typeof page.fill === 'function') return page.fill(selector, value); // Playwright
  await page.$eval(selector, (el) => { el.value = ''; });
  await page.type(selector, value);
}

/** Joins `room` through the form as `name`; resolves once the hook reports joined. */
export async function joinViaUi(page, room, name) {
  await fill(page, '#room-input', room);
  await fill(page, '#name-input', name);
  await page.click('#join-button');
  return poll(`${name} to join ${room}`, () => state(page).then((s) => s.joined && s));
}

export const state = (page) => page.evaluate(() => window.warbler.state());
export const inboundStats = (page) => page.evaluate(() => window.warbler.inboundStats());

/** The inbound stats entry for `participantSid`'s track of `kind` (and `source`, if given). */
export async function remoteStat(page, participantSid, kind, source) {
  const stats = await inboundStats(page);
  return stats.find((s) => s.participantSid === participantSid && s.kind === kind && (!source || s.source === source));
}

/**
 * Waits until `participantSid`'s `kind` track is flowing on `page`: `counter` must be > 0 and then
 * strictly increase between two samples. Returns {first, second, firstSeenMs}.
 */
export async function waitFlowing(page, participantSid, kind, { source, counter, timeout = 30000 } = {}) {
  const field = counter ?? (kind === 'video' ? 'framesDecoded' : 'packetsReceived');
  const what = `${kind}${source ? ` (${source})` : ''} of ${participantSid}`;
  let all = null; // the page's last inboundStats(), for the failure message
  const sample = async () => {
    all = await inboundStats(page);
    return all.find((s) => s.participantSid === participantSid && s.kind === kind && (!source || s.source === source));
  };
  const withContext = async (promise) => {
    try {
      return await promise;
    } catch (e) {
      e.message += `\ninboundStats: ${JSON.stringify(all)}\nstate: ${JSON.stringify(await state(page).catch((x) => String(x)))}`;
      throw e;
    }
  };
  const t0 = Date.now();
  const first = await withContext(poll(`${what}: ${field} > 0`, async () => {
    const s = await sample();
    return s && s[field] > 0 && s;
  }, { timeout }));
  const firstSeenMs = Date.now() - t0;
  const second = await withContext(poll(`${what}: ${field} to grow past ${first[field]}`, async () => {
    const s = await sample();
    return s && s.trackSid === first.trackSid && s[field] > first[field] && s;
  }, { timeout: 10000 }));
  return { first, second, firstSeenMs };
}
