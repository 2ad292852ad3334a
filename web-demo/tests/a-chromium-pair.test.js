// Test A: two Chromium pages join one room through the UI, decode each other's video and receive
// each other's audio; when one leaves, the other's participant list and grid drop it; rejoining works.
import test from 'node:test';
import assert from 'node:assert/strict';
import { withServer, launchChromium, openPage, joinViaUi, waitFlowing, poll, state } from './harness.js';

test('A: two Chromium pages exchange audio and video; leave removes the participant', { timeout: 120000 }, async (t) => {
  await withServer(t, async ({ server, track }) => {
    const browser = track(await launchChromium());
    const room = 'room-a';
    const [p1, p2] = await Promise.all([
      openPage(browser, `${server.url}/?room=${room}`, 'chromium-1'),
      openPage(browser, `${server.url}/?room=${room}`, 'chromium-2'),
    ]);
    const t0 = Date.now();
    const s1 = await joinViaUi(p1, room, 'Alice');
    const s2 = await joinViaUi(p2, room, 'Bob');
    assert.notEqual(s1.participantId, s2.participantId);

    await poll('each page to list the other', async () => {
      const [a, b] = await Promise.all([state(p1), state(p2)]);
      return a.participants.some((p) => p.sid === s2.participantId) && b.participants.some((p) => p.sid === s1.participantId);
    });

    const video12 = await waitFlowing(p1, s2.participantId, 'video'); // Alice decodes Bob
    const firstFrameMs = Date.now() - t0;
    const video21 = await waitFlowing(p2, s1.participantId, 'video'); // Bob decodes Alice
    const audio12 = await waitFlowing(p1, s2.participantId, 'audio');
    const audio21 = await waitFlowing(p2, s1.participantId, 'audio');
    for (const v of [video12, video21]) {
      assert.ok(v.second.framesDecoded > v.first.framesDecoded);
      assert.ok(v.second.frameWidth > 0 && v.second.frameHeight > 0, 'decoded frames have a size');
    }
    for (const a of [audio12, audio21]) assert.ok(a.second.packetsReceived > a.first.packetsReceived);
    t.diagnostic(`first remote frame ${firstFrameMs} ms after the first join click`);
    t.diagnostic(`Alice<-Bob video ${video12.first.codec} ${video12.second.frameWidth}x${video12.second.frameHeight} frames ${video12.first.framesDecoded}->${video12.second.framesDecoded}; audio packets ${audio12.first.packetsReceived}->${audio12.second.packetsReceived}`);
    t.diagnostic(`Bob<-Alice video ${video21.first.codec} ${video21.second.frameWidth}x${video21.second.frameHeight} frames ${video21.first.framesDecoded}->${video21.second.framesDecoded}; audio packets ${audio21.first.packetsReceived}->${audio21.second.packetsReceived}`);

    // Both connections are up on both sides, and Bob's grid shows Alice's tile with her video.
    for (const p of [p1, p2]) {
      const s = await state(p);
      assert.equal(s.publisherState, 'connected');
      assert.equal(s.subscriberState, 'connected');
    }
    assert.equal(await p2.locator(`.tile[data-participant="${s1.participantId}"] video`).count(), 1);
    assert.equal(await p2.locator(`#participants li[data-sid="${s1.participantId}"]`).count(), 1);

    // Alice leaves: her page returns to the join form, Bob's page drops her.
    const tLeave = Date.now();
    await p1.click('#leave-button');
    await poll('Alice back at the join form', async () => !(await state(p1)).joined && (await p1.isVisible('#join-form')));
    await poll('Bob to drop Alice', async () => {
      const s = await state(p2);
      const tiles = await p2.locator(`.tile[data-participant="${s1.participantId}"]`).count();
      const items = await p2.locator(`#participants li[data-sid="${s1.participantId}"]`).count();
      return !s.participants.some((p) => p.sid === s1.participantId) && tiles === 0 && items === 0;
    }, { timeout: 10000 });
    t.diagnostic(`Bob dropped Alice ${Date.now() - tLeave} ms after she clicked leave`);

    // Alice comes back from the same tab (same identity): a fresh session that works both ways.
    const again = await joinViaUi(p1, room, 'Alice');
    assert.notEqual(again.participantId, s1.participantId);
    await waitFlowing(p2, again.participantId, 'video');
    await waitFlowing(p1, s2.participantId, 'video');
    await poll('Bob to list Alice once', async () =>
      (await state(p2)).participants.filter((p) => p.name === 'Alice').length === 1);
    assert.deepEqual((await state(p2)).errors, []);
    assert.deepEqual((await state(p1)).errors, []);
  });
});
