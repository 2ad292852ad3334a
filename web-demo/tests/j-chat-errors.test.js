// Test J (chat refusals, shown inline in the panel): a message one byte over the limit (counted in
// UTF-8 bytes: 1366 × "中") is refused `too_long` by the server and stored nowhere, while exactly
// 4096 bytes goes through; a burst over the rate limit is refused `rate_limited` and retried with
// the same ids until every message is stored once; in production mode a token without the `chat`
// grant (and without `publish`: the page falls back to a chat-only connection) reads the room
// but its message is refused `forbidden`.
import test from 'node:test';
import assert from 'node:assert/strict';
import { withServer, launchChromium, openPage, joinViaUi, fill, poll, state, issueToken } from './harness.js';
import { chatState, chatMessages, panelMessages, waitChatReady, sendViaUi, waitEntry, devToken, restHistory } from './j-chat-support.js';

test('J: too_long is shown and nothing is stored; the limit itself passes; a burst is rate limited and retried', { timeout: 120000 }, async (t) => {
  await withServer(t, async ({ server, track }) => {
    const browser = track(await launchChromium());
    const room = 'room-je';
    const alice = await openPage(browser, `${server.url}/?room=${room}&publish=0`, 'alice');
    const bob = await openPage(browser, `${server.url}/?room=${room}&publish=0`, 'bob');
    await joinViaUi(alice, room, 'Alice');
    await joinViaUi(bob, room, 'Bob');
    const ca = await waitChatReady(alice);
    await waitChatReady(bob);
    assert.equal(ca.limits.max_text_bytes, 4096);

    // 1366 × 中 = 4098 bytes (1366 characters): over the limit. The composer's counter says so.
    const tooLong = '中'.repeat(1366);
    await alice.fill('#chat-input', tooLong);
    assert.equal(await alice.textContent('#chat-counter'), '4098 / 4096 bytes');
    assert.ok(await alice.locator('#chat-counter.over').isVisible());
    await alice.press('#chat-input', 'Enter');
    const failed = await waitEntry(alice, 'the too_long error', tooLong, (m) => m.state === 'failed');
    assert.equal(failed.error.code, 'too_long');
    assert.match(failed.error.text, /too_long.*4098 bytes.*4096/);
    assert.equal(failed.status, 'not sent');
    assert.equal(failed.seq, null);
    assert.equal(await alice.locator('#chat-list li[data-state="failed"] .error .retry').count(), 0, 'no Retry for too_long');
    t.diagnostic(`too_long shown inline: "${failed.error.text}"`);

    // Exactly 4096 bytes is accepted, and is the first message of the room: nothing was stored before.
    const atLimit = `${'中'.repeat(1365)}x`;
    await sendViaUi(alice, atLimit);
    const ok = await waitEntry(bob, 'the 4096-byte message on Bob\'s page', atLimit);
    assert.equal(ok.seq, 1, 'the refused message took no seq');
    assert.equal((await panelMessages(bob)).length, 1, 'Bob never saw the refused message');
    const token = await devToken(server, room, 'auditor');
    assert.deepEqual((await restHistory(server, room, token)).map((m) => m.seq), [1]);

    // Discard removes the failed message from the list.
    await alice.click('#chat-list li[data-state="failed"] .error .discard');
    await poll('the failed message to go', async () => !(await panelMessages(alice)).some((m) => m.state === 'failed'));
    assert.deepEqual((await chatState(alice)).pending, []);

    // A burst of 30 (burst 20, 10/s): the server refuses some with rate_limited; the panel says it
    // is retrying, and retries with the same ids until all are stored, once each.
    const burst = Array.from({ length: 30 }, (_, i) => `burst ${i + 1}`);
    await alice.evaluate((texts) => texts.forEach((x) => window.warbler.chat.send(x)), burst);
    const retrying = await poll('a message shown as retrying after rate_limited', async () =>
      (await panelMessages(alice)).find((m) => m.status === 'retrying (rate_limited)…'), { interval: 25, timeout: 5000 });
    t.diagnostic(`"${retrying.text}" shows "${retrying.status}" with "${retrying.error?.text}"`);
    await poll('every burst message acknowledged', async () => {
      const m = await panelMessages(alice);
      return burst.every((x) => m.some((y) => y.text === x && y.state === 'sent'));
    }, { timeout: 30000 });
    const stats = (await chatState(alice)).stats;
    t.diagnostic(`burst of 30: ${stats.refusals.rate_limited} rate_limited refusals, ${stats.resent} resends`);
    assert.ok(stats.refusals.rate_limited >= 5, JSON.stringify(stats));
    await poll('Bob to show the whole burst', async () => {
      const m = await panelMessages(bob);
      return burst.every((x) => m.filter((y) => y.text === x).length === 1);
    });
    const stored = await restHistory(server, room, token);
    assert.equal(stored.length, 31, 'each burst message stored once');
    assert.deepEqual([...new Set(stored.map((m) => m.id))].length, 31);
    const ids = new Map((await chatMessages(alice)).map((m) => [m.text, m.id]));
    for (const m of stored.slice(1)) assert.equal(m.id, ids.get(m.text), 'retries keep the client id');
    assert.deepEqual((await chatState(alice)).errors, []);
    assert.deepEqual((await state(alice)).errors, [], 'chat refusals stay out of the banner');
  });
});

const KEY = 'APIchattest';
const SECRET = 'web-demo-chat-test-secret-0123456789abcdef';
const PRODUCTION = ['--api-key', KEY, '--api-secret', SECRET];

async function joinWithToken(page, name, token) {
  await fill(page, '#name-input', name);
  await page.click('#join-button');
  await page.waitForSelector('#token-input', { state: 'visible', timeout: 10000 });
  await fill(page, '#token-input', token);
  await page.click('#join-button');
  return poll(`${name} to join`, async () => (await state(page)).joined && state(page));
}

test('J: without the chat grant the panel reads the room and a message is refused `forbidden`', { timeout: 120000 }, async (t) => {
  await withServer(t, async ({ server, track }) => {
    const room = 'room-jf';
    const writer = issueToken(['--room', room, '--identity', 'wendy', '--name', 'Wendy', '--grants', 'subscribe,chat', ...PRODUCTION]);
    const reader = issueToken(['--room', room, '--identity', 'rita', '--name', 'Rita', '--grants', 'subscribe', ...PRODUCTION]);
    const browser = track(await launchChromium());
    const wendy = await openPage(browser, `${server.url}/?room=${room}&publish=0`, 'wendy');
    await joinWithToken(wendy, 'Wendy', writer);
    await waitChatReady(wendy);
    await sendViaUi(wendy, 'welcome, readers');
    await waitEntry(wendy, 'Wendy\'s message acknowledged', 'welcome, readers', (m) => m.state === 'sent');

    // Rita's page publishes its camera as usual: refused (no publish grant, the banner says so);
    // the page then opens chat alone on a fresh publisher connection, which needs no grant.
    const rita = await openPage(browser, `${server.url}/?room=${room}`, 'rita');
    await joinWithToken(rita, 'Rita', reader);
    const cr = await waitChatReady(rita, 'Rita\'s chat (chat-only connection)');
    assert.equal(cr.canChat, false);
    assert.deepEqual((await state(rita)).errors.map((e) => e.code), ['forbidden'], 'the refused publish, in the banner');
    assert.deepEqual((await state(rita)).local, [], 'no media after the refused publish');
    await waitEntry(rita, 'the history on Rita\'s page', 'welcome, readers', (m) => m.author === 'Wendy');
    assert.match(await rita.textContent('#chat-notice'), /lacks the chat grant/);
    assert.equal(await rita.locator('#chat-list .actions .react:not([disabled])').count(), 0, 'reactions are disabled');

    // Typing is not sent without the grant (it would only earn refusals).
    await rita.fill('#chat-input', 'can I');
    await rita.press('#chat-input', 'Enter');
    const refused = await waitEntry(rita, 'the forbidden error', 'can I', (m) => m.state === 'failed');
    assert.equal(refused.error.code, 'forbidden');
    assert.match(refused.error.text, /forbidden.*chat grant/);
    t.diagnostic(`forbidden shown inline: "${refused.error.text}"`);
    const s = await chatState(rita);
    assert.equal(s.stats.typingSent, 0);
    assert.deepEqual(s.stats.refusals, { forbidden: 1 });

    // Nothing reached the room.
    await sendViaUi(wendy, 'still only me');
    await waitEntry(rita, 'Wendy\'s next message on Rita\'s page', 'still only me');
    assert.deepEqual((await panelMessages(wendy)).map((m) => m.text), ['welcome, readers', 'still only me']);
    assert.deepEqual((await restHistory(server, room, reader)).map((m) => m.text), ['welcome, readers', 'still only me']);
  }, { serverArgs: PRODUCTION });
});
