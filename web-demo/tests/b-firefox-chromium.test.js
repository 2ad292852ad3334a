// Test B: a Firefox page (puppeteer-core, WebDriver BiDi) and a Chromium page (playwright-core) in one
// room decode each other's video — the server must forward a codec both engines have (VP8) — then
// Firefox answers a renegotiation (Chromium's screen share on and off) and leaves.
import test from 'node:test';
import assert from 'node:assert/strict';
import { withServer, launchChromium, launchFirefox, openPage, joinViaUi, waitFlowing, poll, state, inboundStats } from './harness.js';

test('B: Firefox and Chromium decode each other', { timeout: 150000 }, async (t) => {
  await withServer(t, async ({ server, track }) => {
    const room = 'room-b';
    const [firefox, chromium] = await Promise.all([launchFirefox(), launchChromium(['--auto-select-desktop-capture-source=Entire screen'])]);
    track(firefox);
    track(chromium);
    const [ff, cr] = await Promise.all([
      openPage(firefox, `${server.url}/?room=${room}`, 'firefox'),
      openPage(chromium, `${server.url}/?room=${room}`, 'chromium'),
    ]);
    const t0 = Date.now();
    const sf = await joinViaUi(ff, room, 'Fox');
    const sc = await joinViaUi(cr, room, 'Chrome');

    const ffGetsCr = await waitFlowing(ff, sc.participantId, 'video', { timeout: 40000 });
    const crGetsFf = await waitFlowing(cr, sf.participantId, 'video', { timeout: 40000 });
    const ffAudio = await waitFlowing(ff, sc.participantId, 'audio');
    const crAudio = await waitFlowing(cr, sf.participantId, 'audio');
    t.diagnostic(`both decoding ${Date.now() - t0} ms after the first join click`);
    t.diagnostic(`Firefox<-Chromium video ${ffGetsCr.first.codec} ${ffGetsCr.second.frameWidth}x${ffGetsCr.second.frameHeight} frames ${ffGetsCr.first.framesDecoded}->${ffGetsCr.second.framesDecoded}; audio packets ${ffAudio.first.packetsReceived}->${ffAudio.second.packetsReceived}`);
    t.diagnostic(`Chromium<-Firefox video ${crGetsFf.first.codec} ${crGetsFf.second.frameWidth}x${crGetsFf.second.frameHeight} frames ${crGetsFf.first.framesDecoded}->${crGetsFf.second.framesDecoded}; audio packets ${crAudio.first.packetsReceived}->${crAudio.second.packetsReceived}`);
    for (const v of [ffGetsCr, crGetsFf]) assert.ok(v.second.framesDecoded > v.first.framesDecoded);

    for (const [name, p] of [['firefox', ff], ['chromium', cr]]) {
      const s = await state(p);
      assert.equal(s.publisherState, 'connected', `${name} publisher`);
      assert.equal(s.subscriberState, 'connected', `${name} subscriber`);
      assert.deepEqual(s.errors, [], `${name} shows no errors`);
    }
    await poll('Firefox to show the Chromium tile', () =>
      ff.$(`.tile[data-participant="${sc.participantId}"] video`).then(Boolean));

    // Renegotiation towards Firefox: Chromium shares its screen, Firefox answers the new offer.
    await cr.click('#screen-button');
    const screen = await waitFlowing(ff, sc.participantId, 'video', { source: 'screen_share' });
    t.diagnostic(`Firefox<-Chromium screen ${screen.second.frameWidth}x${screen.second.frameHeight} frames ${screen.first.framesDecoded}->${screen.second.framesDecoded}`);
    await cr.click('#screen-button');
    await poll('the screen share to leave Firefox', async () => {
      const stats = await inboundStats(ff);
      return !stats.some((s) => s.trackSid === screen.second.trackSid) &&
        !(await ff.$(`.tile[data-source="screen_share"]`));
    }, { timeout: 10000 });
    await waitFlowing(ff, sc.participantId, 'video', { source: 'camera' });

    // Firefox leaves; Chromium drops it.
    await ff.click('#leave-button');
    await poll('Chromium to drop Firefox', async () =>
      !(await state(cr)).participants.some((p) => p.sid === sf.participantId) &&
      (await cr.locator(`.tile[data-participant="${sf.participantId}"]`).count()) === 0, { timeout: 10000 });
    assert.deepEqual((await state(ff)).errors, []);
    assert.deepEqual((await state(cr)).errors, []);
  });
});
