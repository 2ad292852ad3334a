// Test J (chat, two pages): a Chromium page that publishes camera + microphone (the chat data
// channel shares its publisher connection with the media) and a subscribe-only one (a publish
// offer that carries only the data channel) chat both ways through the panel: text appears on the
// other page with the author's name, the sender's copy goes from pending to acknowledged; the
// typing indicator, @mentions, the unread badge of a collapsed panel and read receipts, a
// reaction toggled on and off, edit and delete reach the other page; text is never parsed as HTML.
// On a phone-sized page the panel starts collapsed and the footer's Chat button counts unread.
import test from 'node:test';
import assert from 'node:assert/strict';
import { withServer, launchChromium, openPage, joinViaUi, poll, state } from './harness.js';
import { chatState, chatMessages, panelMessages, waitChatReady, sendViaUi, waitEntry, summary } from './j-chat-support.js';

test('J: two pages chat both ways; typing, mentions, unread badge, reactions, edit and delete', { timeout: 150000 }, async (t) => {
  await withServer(t, async ({ server, track }) => {
    const browser = track(await launchChromium());
    const room = 'room-j';
    const alice = await openPage(browser, `${server.url}/?room=${room}`, 'alice');
    const bob = await openPage(browser, `${server.url}/?room=${room}&publish=0`, 'bob');
    const t0 = Date.now();
    await joinViaUi(alice, room, 'Alice');
    await joinViaUi(bob, room, 'Bob');
    const [ca, cb] = [await waitChatReady(alice), await waitChatReady(bob)];
    t.diagnostic(`both chat channels open and greeted ${Date.now() - t0} ms after the first join click`);
    assert.equal(ca.canChat, true);
    assert.equal(cb.canChat, true);
    assert.notEqual(ca.identity, cb.identity);
    assert.equal((await state(alice)).local.length, 2, 'Alice publishes media on the connection that carries chat');

    // Both ways, several messages each; time from Enter to the text on the other page's panel.
    const domMs = { ab: [], ba: [] };
    const hookMs = { ab: [], ba: [], ack: [] };
    for (let i = 1; i <= 5; i++) {
      for (const [from, to, who, dir] of [[alice, bob, 'Alice', 'ab'], [bob, alice, 'Bob', 'ba']]) {
        const text = `${who} says hello #${i}`;
        const sent = Date.now();
        await sendViaUi(from, text);
        const seen = await waitEntry(to, `"${text}" on the other page`, text);
        domMs[dir].push(Date.now() - sent);
        assert.equal(seen.author, who, 'the author name is shown');
        assert.equal(seen.own, false);
        assert.equal(seen.you, false);
        assert.equal(seen.state, 'sent');
        assert.match(seen.time, /\d{1,2}:\d{2}/);
        const mine = await waitEntry(from, `"${text}" acknowledged on the sender's page`, text, (m) => m.state === 'sent');
        assert.ok(mine.own && mine.you, 'own messages are marked');
        assert.equal(mine.seq, seen.seq, 'both pages show the same seq');
        assert.equal(mine.status, null, 'no "sending…" once acknowledged');
        const [sender, receiver] = [await chatMessages(from), await chatMessages(to)];
        const s = sender.find((m) => m.text === text);
        const r = receiver.find((m) => m.text === text);
        hookMs[dir].push(r.receivedAt - s.sentAt);
        hookMs.ack.push(s.ackedAt - s.sentAt);
      }
    }
    t.diagnostic(`Enter → text on the other page (DOM, polled every 25 ms): Alice→Bob ${JSON.stringify(summary(domMs.ab))}, Bob→Alice ${JSON.stringify(summary(domMs.ba))} ms`);
    t.diagnostic(`send → received (page clocks): Alice→Bob ${JSON.stringify(summary(hookMs.ab))}, Bob→Alice ${JSON.stringify(summary(hookMs.ba))} ms; send → ack ${JSON.stringify(summary(hookMs.ack))} ms`);
    const seqs = (await panelMessages(bob)).map((m) => m.seq);
    assert.deepEqual(seqs, Array.from({ length: 10 }, (_, i) => i + 1), 'Bob shows all ten in order');
    assert.deepEqual((await panelMessages(alice)).map((m) => m.seq), seqs, 'Alice shows the same list');

    // Typing: Bob types (no Enter) → "Bob is typing…" on Alice's page; clearing the input ends it.
    const tType = Date.now();
    await bob.fill('#chat-input', 'I am writing somethi');
    await bob.type('#chat-input', 'ng');
    await poll('the typing indicator on Alice\'s page', async () => (await alice.textContent('#chat-typing')) === 'Bob is typing…', { interval: 25 });
    const typingMs = Date.now() - tType;
    assert.deepEqual((await chatState(alice)).typing, ['Bob']);
    assert.equal(await bob.textContent('#chat-typing'), '', 'the typist does not see himself typing');
    const tStop = Date.now();
    await bob.fill('#chat-input', '');
    await poll('the typing indicator to go away', async () => (await alice.textContent('#chat-typing')) === '', { interval: 25 });
    t.diagnostic(`typing indicator shown ${typingMs} ms after the first keystroke, gone ${Date.now() - tStop} ms after the input was cleared`);

    // Mentions: Bob mentions Alice; her page highlights it as hers, Bob's as a mention of someone else.
    const mention = `@${ca.identity} can you check the <b>deploy</b>? <img src=x onerror="window.pwned=1">`;
    await sendViaUi(bob, mention);
    const atAlice = await waitEntry(alice, 'the mention on Alice\'s page', mention);
    assert.deepEqual(atAlice.mentions, [{ text: `@${ca.identity}`, me: true }]);
    assert.equal(atAlice.mentionsMe, true);
    const atBob = await waitEntry(bob, 'the mention on Bob\'s page', mention, (m) => m.state === 'sent');
    assert.deepEqual(atBob.mentions, [{ text: `@${ca.identity}`, me: false }]);
    // Markup in a message is text: no element is created from it.
    assert.equal(atAlice.html.includes('<img'), false, `rendered as text: ${atAlice.html}`);
    assert.equal(await alice.locator('#chat-list img, #chat-list b').count(), 0);
    assert.equal(await alice.evaluate(() => window.pwned ?? null), null);

    // Unread badge: Alice collapses the panel; Bob writes twice; the header and the Chat button
    // count 2. Expanding reads them, and Bob's page says Alice has seen his latest message.
    await poll('Alice to have read everything', async () => (await chatState(alice)).unread === 0);
    await alice.click('#chat-toggle');
    assert.equal(await alice.isVisible('#chat-list'), false, 'collapsed: the list is hidden');
    await sendViaUi(bob, 'are you there?');
    await sendViaUi(bob, 'hello?');
    await poll('the unread badge to count 2', async () => (await alice.isVisible('#chat-unread')) && (await alice.textContent('#chat-unread')) === '2'
      || { badge: await alice.textContent('#chat-unread'), state: await chatState(alice) });
    assert.equal(await alice.textContent('#chat-button-badge'), '2');
    assert.equal((await chatState(alice)).unread, 2);
    await alice.click('#chat-button');
    await poll('the badge to clear once the panel is open', async () => !(await alice.isVisible('#chat-unread')) && (await chatState(alice)).unread === 0);
    const seen = await poll('Bob to see the read receipt', async () => (await panelMessages(bob)).find((m) => m.text === 'hello?' && m.seen));
    assert.equal(seen.seen, 'Seen by Alice');

    // Reaction: Alice toggles 👍 on Bob's "hello?"; Bob sees "👍 1"; toggled off, it goes away.
    const hello = (await panelMessages(alice)).find((m) => m.text === 'hello?');
    const reactButton = alice.locator(`#chat-list li[data-seq="${hello.seq}"] .actions .react[data-emoji="👍"]`);
    await reactButton.click();
    await waitEntry(bob, 'the reaction on Bob\'s page', 'hello?', (m) => m.reactions.length === 1 && m.reactions[0].text === '👍 1' && !m.reactions[0].mine);
    await waitEntry(alice, 'Alice\'s reaction shown as hers', 'hello?', (m) => m.reactions[0]?.mine === true);
    await reactButton.click();
    await waitEntry(bob, 'the reaction to be removed on Bob\'s page', 'hello?', (m) => m.reactions.length === 0);

    // Edit: Alice edits her first message; Bob sees the new text marked (edited). Only the author
    // gets Edit/Delete.
    const first = 'Alice says hello #1';
    const mineFirst = (await panelMessages(alice)).find((m) => m.text === first);
    assert.equal(mineFirst.canEdit, true);
    assert.equal((await panelMessages(bob)).find((m) => m.text === first).canEdit, false, 'no Edit on others\' messages');
    const row = alice.locator(`#chat-list li[data-seq="${mineFirst.seq}"]`);
    await row.locator('.actions .edit').click();
    await row.locator('.edit-input').fill('Alice says hello #1, edited: 你好');
    await row.locator('.edit-input').press('Enter');
    const tEdit = Date.now();
    const edited = await waitEntry(bob, 'the edit on Bob\'s page', 'Alice says hello #1, edited: 你好', (m) => m.edited);
    assert.equal(edited.seq, mineFirst.seq);
    t.diagnostic(`edit visible on the other page ${Date.now() - tEdit} ms after Enter`);

    // Delete (two clicks: Delete, then Delete?): both pages show "message deleted".
    await row.locator('.actions .delete').click();
    await row.locator('.actions .delete.confirming').click();
    for (const [name, page] of [['Bob', bob], ['Alice', alice]]) {
      await poll(`the delete on ${name}'s page`, async () => {
        const m = (await panelMessages(page)).find((x) => x.seq === mineFirst.seq);
        return m?.deleted && m.text === 'message deleted' && !m.canEdit && m.reactions.length === 0;
      });
    }
    const bobSeqs = (await panelMessages(bob)).map((m) => m.seq);
    assert.deepEqual(bobSeqs, Array.from({ length: 13 }, (_, i) => i + 1), 'the deleted message keeps its place');

    // Joins and leaves appear in the panel as system lines (not stored messages).
    const carol = await openPage(browser, `${server.url}/?room=${room}&publish=0`, 'carol');
    await joinViaUi(carol, room, 'Carol');
    const systemLines = () => alice.evaluate(() => [...document.querySelectorAll('#chat-list > li.system .text')].map((x) => x.textContent));
    await poll('"Carol joined" in Alice\'s panel', async () => (await systemLines()).includes('Carol joined'));
    await carol.click('#leave-button');
    await poll('"Carol left" in Alice\'s panel', async () => (await systemLines()).includes('Carol left'));
    assert.deepEqual((await panelMessages(alice)).map((m) => m.seq), Array.from({ length: 13 }, (_, i) => i + 1), 'system lines are not messages');

    for (const [name, p] of [['Alice', alice], ['Bob', bob]]) {
      assert.deepEqual((await state(p)).errors, [], `${name}: no banner errors`);
      assert.deepEqual((await chatState(p)).errors, [], `${name}: no chat errors`);
      assert.deepEqual((await chatState(p)).pending, [], `${name}: nothing left pending`);
    }
  });
});

test('J: on a phone-sized screen the panel starts collapsed; the Chat button counts unread and opens it', { timeout: 90000 }, async (t) => {
  await withServer(t, async ({ server, track }) => {
    const browser = track(await launchChromium());
    const room = 'room-jm';
    const alice = await openPage(browser, `${server.url}/?room=${room}&publish=0`, 'alice');
    const phone = await browser.newPage({ viewport: { width: 390, height: 844 }, deviceScaleFactor: 2 });
    phone.on('pageerror', (e) => console.error(`[phone pageerror] ${e.message ?? e}`));
    await phone.goto(`${server.url}/?room=${room}&publish=0`);
    await joinViaUi(alice, room, 'Alice');
    await joinViaUi(phone, room, 'Pat');
    await waitChatReady(alice);
    const cp = await waitChatReady(phone);
    assert.equal(cp.collapsed, true, 'collapsed by default on a narrow screen');
    assert.equal(await phone.isVisible('#chat-list'), false);
    assert.ok(await phone.isVisible('#chat-button'));

    await sendViaUi(alice, 'hi phone');
    await poll('the Chat button to count 1', async () => (await phone.isVisible('#chat-button-badge')) && (await phone.textContent('#chat-button-badge')) === '1');
    assert.equal(await phone.textContent('#chat-unread'), '1', 'the collapsed header counts too');
    await phone.click('#chat-button');
    await waitEntry(phone, 'the message in the opened panel', 'hi phone', (m) => m.author === 'Alice');
    await poll('the badge to clear', async () => !(await phone.isVisible('#chat-button-badge')));
    const box = await phone.locator('#chat-panel').boundingBox();
    assert.ok(box.x >= 0 && box.x + box.width <= 390, `the panel fits the screen width: ${JSON.stringify(box)}`);
    assert.ok(await phone.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth), 'no sideways scrolling');
    await sendViaUi(phone, 'hello from the phone');
    await waitEntry(alice, 'the phone\'s reply', 'hello from the phone', (m) => m.author === 'Pat');
    await phone.click('#chat-toggle');
    assert.equal(await phone.isVisible('#chat-list'), false, 'collapsible again');
  });
});
