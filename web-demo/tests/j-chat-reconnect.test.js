// Test J (chat across reconnects): a message written while the server hangs shows as "sending…";
// the server is killed and restarted on the same port and data directory; after the pages rejoin
// the message is resent with the same client id and stored once, and what was acknowledged before
// the crash is still there. A message whose ack is lost (the page ignores it) stays pending,
// survives a rejoin and a page reload (sessionStorage), and its resend is answered as a duplicate:
// still one stored message. A page that was away (60 new messages, an edit, a delete and a
// reaction on older ones) catches up with `history after` and `sync` when it rejoins.
import test from 'node:test';
import assert from 'node:assert/strict';
import { withServer, launchChromium, openPage, joinViaUi, poll, state } from './harness.js';
import { chatState, chatMessages, panelMessages, waitChatReady, sendViaUi, waitEntry, devToken, restPost, restHistory, restartableServer } from './j-chat-support.js';

test('J: a message sent while the server hangs is resent with the same id after a crash and restart', { timeout: 150000 }, async (t) => {
  const server = await restartableServer();
  const browser = await launchChromium();
  try {
    const room = 'room-jr';
    const alice = await openPage(browser, `${server.url}/?room=${room}&publish=0`, 'alice');
    const bob = await openPage(browser, `${server.url}/?room=${room}&publish=0`, 'bob');
    await joinViaUi(alice, room, 'Alice');
    await joinViaUi(bob, room, 'Bob');
    await waitChatReady(alice);
    await waitChatReady(bob);
    await sendViaUi(alice, 'acknowledged before the crash');
    await waitEntry(bob, 'the first message on Bob\'s page', 'acknowledged before the crash');
    await waitEntry(alice, 'the first message acknowledged', 'acknowledged before the crash', (m) => m.state === 'sent');

    // The server hangs (SIGSTOP): the message goes out on the data channel and no ack comes.
    server.freeze();
    const text = 'written while the server hangs';
    await sendViaUi(alice, text);
    const pending = await waitEntry(alice, 'the message shown as sending', text, (m) => m.state === 'sending');
    assert.equal(pending.status, 'sending…');
    assert.equal(pending.seq, null);
    const [p] = (await chatState(alice)).pending;
    assert.deepEqual([p.text, p.status, p.attempts], [text, 'sending', 1]);

    // Crash (SIGKILL while stopped) and restart on the same port and data directory.
    await server.crash();
    for (const [name, page] of [['Alice', alice], ['Bob', bob]]) {
      await poll(`${name}'s page to notice the lost server`, async () => !(await state(page)).joined && page.isVisible('#join-form'));
    }
    await server.restart();
    const tRejoin = Date.now();
    await joinViaUi(alice, room, 'Alice');
    await joinViaUi(bob, room, 'Bob');
    const sent = await waitEntry(alice, 'the resent message acknowledged', text, (m) => m.state === 'sent', { timeout: 30000 });
    t.diagnostic(`acknowledged ${Date.now() - tRejoin} ms after the rejoin click`);
    const onBob = await waitEntry(bob, 'the resent message on Bob\'s page', text, () => true, { timeout: 30000 });
    assert.equal(onBob.author, 'Alice');
    assert.equal(onBob.seq, sent.seq);
    assert.equal(onBob.id, p.id, 'stored under the id it was first sent with');

    const s = await chatState(alice);
    assert.equal(s.stats.resent, 1, JSON.stringify(s.stats));
    assert.deepEqual(s.pending, []);
    const stored = await restHistory(server, room, await devToken(server, room, 'auditor'));
    assert.deepEqual(stored.map((m) => [m.seq, m.id === p.id, m.text]), [[1, false, 'acknowledged before the crash'], [2, true, text]]);
    assert.deepEqual((await panelMessages(alice)).map((m) => [m.seq, m.text, m.state]), stored.map((m) => [m.seq, m.text, 'sent']));
    assert.deepEqual((await panelMessages(bob)).map((m) => [m.seq, m.text]), stored.map((m) => [m.seq, m.text]));
  } catch (e) {
    console.error(`--- warbler output ---\n${server.output}\n--- end ---`);
    throw e;
  } finally {
    await browser.close();
    await server.stop();
  }
});

test('J: a lost ack leaves the message pending across a rejoin and a reload; the resend is a duplicate', { timeout: 150000 }, async (t) => {
  await withServer(t, async ({ server, track }) => {
    const browser = track(await launchChromium());
    const room = 'room-jd';
    const alice = await openPage(browser, `${server.url}/?room=${room}&publish=0`, 'alice');
    const bob = await openPage(browser, `${server.url}/?room=${room}&publish=0`, 'bob');
    await joinViaUi(alice, room, 'Alice');
    await joinViaUi(bob, room, 'Bob');
    await waitChatReady(alice);
    await waitChatReady(bob);

    for (const [how, text] of [['rejoin', 'my ack gets lost'], ['reload', 'lost again, then a reload']]) {
      const dropped = (await chatState(alice)).stats.droppedAcks;
      await alice.evaluate(() => window.warbler.chat.dropAcks(1));
      await sendViaUi(alice, text);
      await waitEntry(bob, `"${text}" stored and on Bob's page`, text);
      await poll('the ack to arrive (and be dropped)', async () => (await chatState(alice)).stats.droppedAcks === dropped + 1);
      const shown = (await panelMessages(alice)).find((m) => m.text === text);
      assert.equal(shown.state, 'sending', 'without its ack the message still shows as sending');
      const id = (await chatState(alice)).pending[0].id;

      if (how === 'rejoin') {
        await alice.click('#leave-button');
        await poll('the join form', () => alice.isVisible('#join-form'));
      } else {
        await alice.reload();
        await poll('the join form after the reload', () => alice.isVisible('#join-form'));
        const restored = await alice.evaluate(() => window.warbler.chat.state());
        assert.equal(restored, null, 'no chat before joining');
      }
      await joinViaUi(alice, room, 'Alice');
      const done = await waitEntry(alice, `"${text}" acknowledged after the ${how}`, text, (m) => m.state === 'sent');
      const s = await chatState(alice);
      assert.equal(s.stats.resent, 1, `${how}: resent once (${JSON.stringify(s.stats)})`);
      assert.equal(s.stats.duplicateAcks, 1, `${how}: the server recognised the id`);
      assert.equal(done.id, id);
      assert.equal((await panelMessages(alice)).filter((m) => m.text === text).length, 1);
      assert.equal((await panelMessages(bob)).filter((m) => m.text === text).length, 1, 'Bob got it once');
      t.diagnostic(`${how}: resent with id ${id}, duplicate ack, one copy on each page`);
    }
    const stored = await restHistory(server, room, await devToken(server, room, 'auditor'));
    assert.deepEqual(stored.map((m) => m.text), ['my ack gets lost', 'lost again, then a reload']);
    assert.deepEqual((await chatMessages(bob)).map((m) => m.text), ['my ack gets lost', 'lost again, then a reload']);
    assert.deepEqual((await state(bob)).errors, []);
  });
});

test('J: a page that was away catches up: the messages it missed and the edits, deletes and reactions of older ones', { timeout: 150000 }, async (t) => {
  await withServer(t, async ({ server, track }) => {
    const browser = track(await launchChromium());
    const room = 'room-jc';
    const alice = await openPage(browser, `${server.url}/?room=${room}&publish=0`, 'alice');
    const bob = await openPage(browser, `${server.url}/?room=${room}&publish=0`, 'bob');
    await joinViaUi(alice, room, 'Alice');
    await joinViaUi(bob, room, 'Bob');
    await waitChatReady(alice);
    await waitChatReady(bob);
    for (const text of ['to be edited', 'to be deleted']) {
      await sendViaUi(bob, text);
      await waitEntry(alice, `"${text}" on Alice's page`, text);
    }

    // Alice leaves (same tab: she keeps what she has); meanwhile Bob edits, deletes, reacts, and a
    // bot posts 60 messages — more than the 50 the greeting brings.
    await alice.click('#leave-button');
    await poll('Alice at the join form', () => alice.isVisible('#join-form'));
    const row = (seq) => bob.locator(`#chat-list li[data-seq="${seq}"]`);
    await row(1).locator('.actions .edit').click();
    await row(1).locator('.edit-input').fill('edited while Alice was away');
    await row(1).locator('.edit-input').press('Enter');
    await waitEntry(bob, 'the edit on Bob\'s page', 'edited while Alice was away', (m) => m.edited);
    await row(1).locator('.actions .react[data-emoji="👍"]').click();
    await row(2).locator('.actions .delete').click();
    await row(2).locator('.actions .delete.confirming').click();
    await poll('the delete on Bob\'s page', async () => (await panelMessages(bob)).find((m) => m.seq === 2)?.deleted);
    const bot = await devToken(server, room, 'deploybot', 'Deploy Bot');
    for (let i = 1; i <= 60; i++) await restPost(server, room, bot, { id: `b${i}`, text: `while away ${i}` });

    const tBack = Date.now();
    await joinViaUi(alice, room, 'Alice');
    const all = await poll('Alice to hold seq 1..62 with the changes', async () => {
      const m = await panelMessages(alice);
      const ok = m.length === 62 && m.every((x, i) => x.seq === i + 1)
        && m[0].text === 'edited while Alice was away' && m[0].edited && m[0].reactions[0]?.text === '👍 1'
        && m[1].deleted;
      return ok ? m : false;
    }, { timeout: 20000, interval: 50 });
    t.diagnostic(`caught up (history after + sync) ${Date.now() - tBack} ms after the rejoin click`);
    assert.equal(all.at(-1).text, 'while away 60');
    assert.equal(await alice.isVisible('#chat-older'), false, 'nothing older is missing');
    assert.deepEqual((await chatState(alice)).errors, []);
  });
});
