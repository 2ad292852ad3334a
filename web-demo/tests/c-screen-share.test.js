// Test C: screen sharing in Chromium (getDisplayMedia with the fake capture UI): the other page gets a
// second video track with source screen_share that decodes; stopping removes it again.
import test from 'node:test';
import assert from 'node:assert/strict';
import { withServer, launchChromium, openPage, joinViaUi, waitFlowing, poll, state, inboundStats } from './harness.js';

test('C: screen share start and stop', { timeout: 120000 }, async (t) => {
  await withServer(t, async ({ server, track }) => {
    const browser = track(await launchChromium(['--auto-select-desktop-capture-source=Entire screen']));
    const room = 'room-c';
    const [p1, p2] = await Promise.all([
      openPage(browser, `${server.url}/?room=${room}`, 'sharer'),
      openPage(browser, `${server.url}/?room=${room}`, 'viewer'),
    ]);
    const s1 = await joinViaUi(p1, room, 'Sharer');
    await joinViaUi(p2, room, 'Viewer');
    const camera = await waitFlowing(p2, s1.participantId, 'video', { source: 'camera' });

    const tShare = Date.now();
    await p1.click('#screen-button');
    const shared = await poll('the sharer to publish a screen_share track', async () => {
      const s = await state(p1);
      const l = s.local.find((l) => l.source === 'screen_share');
      return l?.sid && l;
    });
    await poll('the viewer to learn of the screen_share track', async () => {
      const s = await state(p2);
      const p = s.participants.find((p) => p.sid === s1.participantId);
      return p?.tracks.some((tr) => tr.sid === shared.sid && tr.source === 'screen_share' && tr.kind === 'video');
    });
    const screen = await waitFlowing(p2, s1.participantId, 'video', { source: 'screen_share' });
    assert.equal(screen.second.trackSid, shared.sid);
    assert.notEqual(screen.second.trackSid, camera.second.trackSid);
    t.diagnostic(`screen share decoding ${Date.now() - tShare} ms after the click: ${screen.second.frameWidth}x${screen.second.frameHeight}, frames ${screen.first.framesDecoded}->${screen.second.framesDecoded}`);
    await poll('the viewer to show a screen tile', async () =>
      (await p2.locator(`.tile[data-participant="${s1.participantId}"][data-source="screen_share"] video`).count()) === 1);
    // The camera keeps flowing next to the screen.
    await waitFlowing(p2, s1.participantId, 'video', { source: 'camera' });

    const tStop = Date.now();
    await p1.click('#screen-button');
    await poll('the screen_share track to go away on the viewer', async () => {
      const s = await state(p2);
      const p = s.participants.find((p) => p.sid === s1.participantId);
      const stats = await inboundStats(p2);
      const tiles = await p2.locator(`.tile[data-source="screen_share"]`).count();
      return p && !p.tracks.some((tr) => tr.sid === shared.sid) && !stats.some((st) => st.trackSid === shared.sid) && tiles === 0;
    }, { timeout: 10000 });
    t.diagnostic(`screen share gone on the viewer ${Date.now() - tStop} ms after stop`);
    assert.equal((await state(p1)).local.some((l) => l.source === 'screen_share'), false);
    // The camera still flows after the renegotiation.
    await waitFlowing(p2, s1.participantId, 'video', { source: 'camera' });
    assert.deepEqual((await state(p2)).errors, []);
    assert.deepEqual((await state(p1)).errors, []);
  });
});
