// Test J (chat history and search): a page that joins sees the earlier messages (hello + the latest
// page); a reloaded page sees them again and still marks its own (same tab, same identity); a
// room with more than one page of history shows the latest 50 and "Load older" brings the rest;
// the search box finds a Chinese message by a 2-character substring and an English one
// case-insensitively, with the matches highlighted.
import test from 'node:test';
import assert from 'node:assert/strict';
import { withServer, launchChromium, openPage, joinViaUi, poll, state } from './harness.js';
import { chatState, panelMessages, waitChatReady, sendViaUi, waitEntry, devToken, restPost, restHistory } from './j-chat-support.js';

test('J: history on join and after a reload, load older, search (Chinese 2-character term) with highlights', { timeout: 150000 }, async (t) => {
  await withServer(t, async ({ server, track }) => {
    const browser = track(await launchChromium());
    const room = 'room-jh';
    const alice = await openPage(browser, `${server.url}/?room=${room}&publish=0`, 'alice');
    await joinViaUi(alice, room, 'Alice');
    const before = await waitChatReady(alice);
    const texts = ['Good morning, team', '明天我们在北京开会，请准时到。', 'The DEPLOYMENT went fine'];
    for (const text of texts) {
      await sendViaUi(alice, text);
      await waitEntry(alice, `"${text}" acknowledged`, text, (m) => m.state === 'sent');
    }

    // Bob joins later: the greeting brings what was said before.
    const bob = await openPage(browser, `${server.url}/?room=${room}&publish=0`, 'bob');
    const tJoin = Date.now();
    await joinViaUi(bob, room, 'Bob');
    await poll('Bob to see the earlier messages', async () => (await panelMessages(bob)).length === 3, { interval: 25 });
    t.diagnostic(`history shown ${Date.now() - tJoin} ms after Bob's join click`);
    const atBob = await panelMessages(bob);
    assert.deepEqual(atBob.map((m) => [m.seq, m.author, m.text, m.own]), texts.map((x, i) => [i + 1, 'Alice', x, false]));

    // Alice reloads: a new page and session, the same tab identity; her messages are back, hers.
    await alice.reload();
    await poll('the join form after the reload', () => alice.isVisible('#join-form'));
    const tRe = Date.now();
    await joinViaUi(alice, room, 'Alice');
    const after = await waitChatReady(alice, 'the chat after the reload');
    assert.equal(after.identity, before.identity, 'the tab keeps its identity across a reload');
    await poll('the earlier messages after the reload', async () => (await panelMessages(alice)).length === 3, { interval: 25 });
    t.diagnostic(`history shown ${Date.now() - tRe} ms after the join click that followed the reload`);
    const reloaded = await panelMessages(alice);
    assert.deepEqual(reloaded.map((m) => [m.seq, m.text, m.own, m.you, m.state]), texts.map((x, i) => [i + 1, x, true, true, 'sent']));
    assert.equal(await alice.isVisible('#chat-older'), false, 'nothing older to load');

    // A bot posts 60 messages over REST; both pages receive them live.
    const bot = await devToken(server, room, 'deploybot', 'Deploy Bot');
    for (let i = 1; i <= 60; i++) {
      const r = await restPost(server, room, bot, { id: `bot-${i}`, text: `build ${i} ${i === 42 ? 'deployed to 北京 region' : 'passed'}` });
      assert.ok(r.status === 201, JSON.stringify(r));
    }
    for (const [name, p] of [['Alice', alice], ['Bob', bob]]) {
      await poll(`${name} to show all 63`, async () => (await panelMessages(p)).length === 63);
    }
    assert.equal((await panelMessages(bob)).at(-1).author, 'Deploy Bot');

    // Carol joins: the latest 50 (seq 14..63), then "Load older" brings seq 1..13.
    const carol = await openPage(browser, `${server.url}/?room=${room}&publish=0`, 'carol');
    await joinViaUi(carol, room, 'Carol');
    await waitChatReady(carol);
    const greeted = await poll('Carol\'s first page', async () => {
      const m = await panelMessages(carol);
      return m.length === 50 && m;
    });
    assert.deepEqual([greeted[0].seq, greeted.at(-1).seq], [14, 63]);
    assert.ok(await carol.isVisible('#chat-older'), '"Load older" is offered');
    const tOlder = Date.now();
    await carol.click('#chat-older');
    const all = await poll('the older messages', async () => {
      const m = await panelMessages(carol);
      return m.length === 63 && m;
    }, { interval: 25 });
    t.diagnostic(`"Load older" brought 13 messages in ${Date.now() - tOlder} ms`);
    assert.deepEqual(all.map((m) => m.seq), Array.from({ length: 63 }, (_, i) => i + 1));
    assert.equal(all[0].text, texts[0]);
    await poll('"Load older" to go away', async () => !(await carol.isVisible('#chat-older')));

    // Search for a 2-character Chinese term: both messages containing it, newest first, "北京" marked.
    const search = async (page, q) => {
      await page.fill('#chat-search', q);
      const t1 = Date.now();
      await page.press('#chat-search', 'Enter');
      const shown = await poll(`results for "${q}"`, async () => {
        const title = await page.textContent('#chat-results-title');
        if (!(await page.isVisible('#chat-results')) || title.startsWith('Searching')) return false;
        return {
          title,
          ms: Date.now() - t1,
          results: await page.evaluate(() => [...document.querySelectorAll('#chat-results-list > li')].map((li) => ({
            seq: Number(li.dataset.seq), author: li.querySelector('.author').textContent, snippet: li.querySelector('.snippet').textContent,
            marks: [...li.querySelectorAll('mark')].map((m) => m.textContent),
          }))),
        };
      }, { interval: 25 });
      t.diagnostic(`search "${q}": ${shown.results.length} result(s) shown ${shown.ms} ms after Enter`);
      return shown;
    };
    const zh = await search(carol, '北京');
    assert.equal(zh.title, '2 results for “北京”');
    assert.deepEqual(zh.results.map((r) => [r.seq, r.author, r.snippet, r.marks]), [
      [45, 'Deploy Bot', 'build 42 deployed to 北京 region', ['北京']], // bot message 42 is seq 3 + 42
      [2, 'Alice', texts[1], ['北京']],
    ]);
    assert.equal(await carol.isVisible('#chat-scroll'), false, 'the results replace the list');
    const two = await search(carol, '开会');
    assert.deepEqual(two.results.map((r) => [r.seq, r.marks]), [[2, ['开会']]]);
    const en = await search(carol, 'deploy');
    assert.deepEqual(en.results.map((r) => r.seq).sort((a, b) => a - b), [3, 45]);
    assert.ok(en.results.every((r) => r.marks.length === 1 && r.marks[0].toLowerCase() === 'deploy'), JSON.stringify(en.results));
    assert.ok(en.results.some((r) => r.marks[0] === 'DEPLOY'), 'the match is highlighted as written');
    const hook = await carol.evaluate(() => window.warbler.chat.search('北京'));
    assert.deepEqual(hook.results.map((r) => r.message.seq), [45, 2]);

    // Picking a result closes the search and shows the message in the list.
    await carol.click('#chat-results-list > li[data-seq="2"]');
    await poll('the list again, the message highlighted', async () => !(await carol.isVisible('#chat-results'))
      && (await carol.isVisible('#chat-list li[data-seq="2"].flash')));

    // Stored exactly once each: the REST view agrees with the pages.
    const stored = await restHistory(server, room, bot);
    assert.equal(stored.length, 63);
    assert.deepEqual(stored.slice(0, 3).map((m) => m.text), texts);
    for (const [name, p] of [['Alice', alice], ['Bob', bob], ['Carol', carol]]) {
      assert.deepEqual((await state(p)).errors, [], `${name}: no banner errors`);
      assert.deepEqual((await chatState(p)).errors, [], `${name}: no chat errors`);
    }
  });
});
