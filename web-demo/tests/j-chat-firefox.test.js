// Test J (chat, Firefox): a Firefox page that publishes camera + microphone (its `chat` data
// channel bundled with the media, negotiated by Firefox's SCTP stack) and a subscribe-only
// Chromium page chat both ways, in Chinese too; Firefox shows the typing indicator and a reaction.
import test from 'node:test';
import assert from 'node:assert/strict';
import { withServer, launchChromium, launchFirefox, openPage, joinViaUi, poll, state } from './harness.js';
import { chatState, chatMessages, panelMessages, waitChatReady, sendViaUi, waitEntry } from './j-chat-support.js';

test('J: Firefox and Chromium chat both ways', { timeout: 150000 }, async (t) => {
  await withServer(t, async ({ server, track }) => {
    const room = 'room-jff';
    const [firefox, chromium] = await Promise.all([launchFirefox(), launchChromium()]);
    track(firefox);
    track(chromium);
    const ff = await openPage(firefox, `${server.url}/?room=${room}`, 'firefox');
    const cr = await openPage(chromium, `${server.url}/?room=${room}&publish=0`, 'chromium');
    const t0 = Date.now();
    await joinViaUi(ff, room, 'Fox');
    await joinViaUi(cr, room, 'Chrome');
    await waitChatReady(ff, 'Firefox\'s chat', 30000);
    await waitChatReady(cr);
    t.diagnostic(`both chats greeted ${Date.now() - t0} ms after the first join click`);
    assert.equal((await state(ff)).local.length, 2, 'Firefox publishes media on the connection that carries chat');

    for (const [from, to, who, text] of [[ff, cr, 'Fox', 'hello from Firefox 🦊'], [cr, ff, 'Chrome', '你好，火狐！'], [ff, cr, 'Fox', '收到，谢谢']]) {
      const t1 = Date.now();
      await sendViaUi(from, text);
      const seen = await waitEntry(to, `"${text}" on the other page`, text);
      const shownMs = Date.now() - t1;
      assert.equal(seen.author, who);
      await waitEntry(from, `"${text}" acknowledged`, text, (m) => m.state === 'sent' && m.own);
      const s = (await chatMessages(from)).find((m) => m.text === text);
      const r = (await chatMessages(to)).find((m) => m.text === text);
      t.diagnostic(`"${text}" ${who} → other page: ${r.receivedAt - s.sentAt} ms send → received (page clocks), ack after ${s.ackedAt - s.sentAt} ms; ${shownMs} ms from typing start to the DOM`);
    }

    await cr.fill('#chat-input', 'typing to the fox');
    await poll('Firefox to show Chrome typing', async () => (await ff.$eval('#chat-typing', (e) => e.textContent)) === 'Chrome is typing…', { interval: 50 });
    const target = (await panelMessages(cr)).find((m) => m.text === '收到，谢谢');
    await cr.click(`#chat-list li[data-seq="${target.seq}"] .actions .react[data-emoji="🎉"]`);
    await waitEntry(ff, 'the reaction on Firefox', '收到，谢谢', (m) => m.reactions.some((r) => r.text === '🎉 1'));

    for (const [name, p] of [['firefox', ff], ['chromium', cr]]) {
      assert.deepEqual((await state(p)).errors, [], `${name}: no banner errors`);
      assert.deepEqual((await chatState(p)).errors, [], `${name}: no chat errors`);
    }
  });
});
