// Test D: errors reach the person, in the banner: in production mode (configured API key, no
// /dev/token) a forged or malformed token shows the server's `unauthorized`; a token without the
// publish grant shows `forbidden`; a denied camera/microphone shows a media error.
import test from 'node:test';
import assert from 'node:assert/strict';
import { withServer, launchChromium, openPage, fill, poll, state, issueToken } from './harness.js';

const KEY = 'APIwebtest';
const SECRET = 'web-demo-test-secret-0123456789abcdefghij';
const PRODUCTION = ['--api-key', KEY, '--api-secret', SECRET];

/** Waits for a new banner error after `before` errors; returns it. */
async function nextError(page, before, what) {
  const s = await poll(what, async () => {
    const s = await state(page);
    return s.errors.length > before && s;
  }, { timeout: 15000 });
  assert.ok(await page.isVisible('#banner'), 'the banner is visible');
  return { error: s.errors[s.errors.length - 1], state: s, banner: await page.textContent('#banner') };
}

test('D: production mode: a forged or malformed token shows `unauthorized`; a valid one joins', { timeout: 90000 }, async (t) => {
  await withServer(t, async ({ server, track }) => {
    assert.equal((await fetch(`${server.url}/dev/token?room=r&identity=i`)).status, 404, 'no dev tokens with a configured key');
    // Same key id, wrong secret: a well-formed but forged signature.
    const forged = issueToken(['--room', 'room-d', '--identity', 'mallory', '--api-key', KEY, '--api-secret', 'x'.repeat(SECRET.length)]);
    const valid = issueToken(['--room', 'room-d', '--identity', 'alice', '--name', 'Alice', ...PRODUCTION]);

    const browser = track(await launchChromium());
    const page = await openPage(browser, `${server.url}/?room=room-d`, 'chromium-d');
    await fill(page, '#name-input', 'Mallory');
    await page.click('#join-button');
    await page.waitForSelector('#token-input', { state: 'visible', timeout: 10000 });

    for (const [what, bad] of [['forged', forged], ['malformed', 'not-a-token']]) {
      const before = (await state(page)).errors.length;
      await fill(page, '#token-input', bad);
      await page.click('#join-button');
      const { error, state: s, banner } = await nextError(page, before, `the ${what} token to be refused`);
      assert.equal(error.code, 'unauthorized', `${what} token: ${JSON.stringify(s.errors)}`);
      assert.match(banner, /unauthorized/);
      assert.equal(s.joined, false);
      await poll('the join form to come back', () => page.isVisible('#join-form'));
      t.diagnostic(`${what} token -> banner "${error.code}: ${error.message}"`);
    }

    // The same form with a properly signed token gets in.
    await page.click('#banner-close');
    await fill(page, '#token-input', valid);
    await page.click('#join-button');
    const s = await poll('the valid token to join', async () => (await state(page)).joined && state(page));
    assert.equal(s.self.identity, 'alice');
    assert.equal(await page.isVisible('#banner'), false);
  }, { serverArgs: PRODUCTION });
});

test('D: a token without the publish grant shows `forbidden` when the page publishes', { timeout: 90000 }, async (t) => {
  await withServer(t, async ({ server, track }) => {
    const token = issueToken(['--room', 'room-d3', '--identity', 'viewer', '--grants', 'subscribe', ...PRODUCTION]);
    const browser = track(await launchChromium());
    const page = await openPage(browser, `${server.url}/?room=room-d3`, 'chromium-d3');
    await fill(page, '#name-input', 'Viewer');
    await page.click('#join-button');
    await page.waitForSelector('#token-input', { state: 'visible', timeout: 10000 });
    await fill(page, '#token-input', token);
    await page.click('#join-button');
    const s = await poll('the publish to be refused', async () => {
      const s = await state(page);
      return s.errors.some((e) => e.code === 'forbidden') && s;
    }, { timeout: 15000 });
    const error = s.errors.find((e) => e.code === 'forbidden');
    assert.deepEqual(s.errors.map((e) => e.code), ['forbidden'], JSON.stringify(s.errors));
    assert.ok(await page.isVisible('#banner'));
    assert.match(await page.textContent('#banner'), /forbidden/);
    assert.equal(s.joined, true, 'a refused publish keeps the session');
    t.diagnostic(`publish without grant -> banner "${error.code}: ${error.message}"`);
  }, { serverArgs: PRODUCTION });
});

test('D: a denied camera and microphone shows a media error, and the page still joins', { timeout: 90000 }, async (t) => {
  await withServer(t, async ({ server, track }) => {
    // Without the fake-UI auto-accept, the permission prompt is denied.
    const browser = track(await launchChromium(['--deny-permission-prompts'], { without: ['--use-fake-ui-for-media-stream'] }));
    const page = await openPage(browser, `${server.url}/?room=room-d2`, 'chromium-d2');
    await fill(page, '#name-input', 'Nomedia');
    await page.click('#join-button');
    const { error, banner } = await nextError(page, 0, 'a media error');
    assert.equal(error.code, 'media');
    assert.match(banner, /media/);
    await poll('the page to be joined (receive-only)', async () => (await state(page)).joined);
    t.diagnostic(`media error -> banner "${error.code}: ${error.message}"`);
  });
});
