// Test H: a Firefox publisher's simulcast (VP8, rids l/m/h — other names than Chromium's q/h/f) is
// received and forwarded at the layer the subscriber's tile needs: a Chromium subscriber whose tile
// is 160 px wide gets the lowest layer, a tile as wide as the middle layer that one, a large tile
// the top one.
// (Firefox's fake camera delivers the 1280x720 the page asks for, so the layers are 320, 640 and
// 1280 wide; with a 640x480 capture they would be 160, 320 and 640 and the same tiles pick them.)
// The server's `layers` notices to Firefox name all three of its rids, and Firefox applies them
// (setParameters), pausing and resuming encodings.
import test from 'node:test';
import assert from 'node:assert/strict';
import { withServer, launchChromium, launchFirefox, openPage, joinViaUi, waitFlowing, poll, state } from './harness.js';
import { cameraStat } from './shaped.js';

/** Sets the subscriber's tile for `participantSid` to `cssWidth` px wide (16:9), or back to the grid's size. */
async function sizeTile(page, participantSid, cssWidth) {
  await page.evaluate(({ sid, w }) => {
    const tile = document.querySelector(`.tile[data-participant="${sid}"][data-source="camera"]`);
    tile.style.width = w ? `${w}px` : '';
  }, { sid: participantSid, w: cssWidth });
}

test('H: Firefox simulcast (l/m/h) is forwarded at the layer the Chromium tile needs', { timeout: 180000 }, async (t) => {
  await withServer(t, async ({ server, track }) => {
    const [firefox, chromium] = await Promise.all([launchFirefox(), launchChromium()]);
    track(firefox);
    track(chromium);
    const room = 'room-h';
    const ff = await openPage(firefox, `${server.url}/?room=${room}`, 'firefox');
    const cr = await openPage(chromium, `${server.url}/?room=${room}&publish=0`, 'chromium');
    const sf = await joinViaUi(ff, room, 'Fox');
    const cam = await poll('Firefox to publish its camera', async () => (await state(ff)).local.find((l) => l.source === 'camera' && l.sid));
    assert.deepEqual(cam?.rids, ['l', 'm', 'h'], 'Firefox publishes its camera with rids l, m, h');
    await joinViaUi(cr, room, 'Viewer');

    // The layer sizes follow from the capture (1/4, 1/2, 1/1). The upper two may be paused by the
    // server before they ever encode (nobody needs them until a tile asks), so they are checked
    // against Firefox's outbound stats at the end, when all three run.
    const capture = await ff.evaluate(() => window.warbler.session.local.get('camera').track.getSettings());
    const widths = { l: Math.round(capture.width / 4), m: Math.round(capture.width / 2), h: capture.width };
    t.diagnostic(`Firefox capture ${capture.width}x${capture.height}: expected layer widths ${JSON.stringify(widths)}`);
    await poll('Firefox to send its lowest encoding', async () => {
      const o = (await ff.evaluate(() => window.warbler.outboundStats())).filter((x) => x.kind === 'video');
      return o.length === 3 && o.find((x) => x.rid === 'l')?.bytesSent > 0;
    }, { timeout: 30000 });

    await waitFlowing(cr, sf.participantId, 'video', { timeout: 40000 });
    const seen = new Set();
    const reach = async (what, pred, timeout = 20000) => {
      const t0 = Date.now();
      const s = await poll(what, async () => {
        const s = await cameraStat(cr, sf.participantId);
        if (s?.frameWidth) seen.add(`${s.frameWidth}x${s.frameHeight}`);
        return s && pred(s) && s;
      }, { timeout });
      t.diagnostic(`${what}: ${s.frameWidth}x${s.frameHeight} after ${Date.now() - t0} ms (${s.codec})`);
      return s;
    };

    const pin = `.tile[data-participant="${sf.participantId}"][data-source="camera"] .pin`;
    // Large first: the pinned tile spans the grid → the top layer.
    await cr.click(pin);
    await reach('a large (pinned) tile gets the top layer', (s) => s.frameWidth === widths.h, 30000);

    // Small tile: unpinned, 160x90 CSS px (device pixel ratio 1) → the lowest layer.
    await cr.click(pin);
    await sizeTile(cr, sf.participantId, 160);
    await poll('track_settings for a 160 px tile', async () =>
      (await cr.evaluate(() => window.warbler.tiles())).some((x) => x.participant === sf.participantId && x.settings?.width === 160));
    const low = await reach('a 160 px tile gets the lowest layer', (s) => s.frameWidth === widths.l);
    assert.equal(low.codec, 'video/VP8');

    // Nobody needs m and h now: after the server's grace period Firefox is told to stop them.
    const paused = await poll('the server to tell Firefox to pause m and h', async () => {
      const c = (await state(ff)).local.find((l) => l.source === 'camera');
      return c?.layersApplied && c.layersApplied.l === true && c.layersApplied.m === false && c.layersApplied.h === false && c;
    }, { timeout: 15000 });
    t.diagnostic(`layers notice to Firefox: ${JSON.stringify(paused.layersRequested)} → applied ${JSON.stringify(paused.layersApplied)}`);
    assert.deepEqual(Object.keys(paused.layersRequested).sort(), ['h', 'l', 'm'], 'the server knows the three layers by Firefox\'s names');

    // Middle: a tile as wide as the middle layer → that layer (resumed at Firefox).
    await sizeTile(cr, sf.participantId, widths.m);
    await reach(`a ${widths.m} px tile gets the middle layer`, (s) => s.frameWidth === widths.m);

    // Large again: the top layer is resumed at Firefox and forwarded.
    await sizeTile(cr, sf.participantId, 0);
    await cr.click(pin);
    await reach('pinned again: the top layer', (s) => s.frameWidth === widths.h);
    const resumed = (await state(ff)).local.find((l) => l.source === 'camera');
    t.diagnostic(`Firefox layers now: ${JSON.stringify(resumed.layersApplied)} after ${resumed.layerMessages} notices; Chromium saw ${[...seen].join(', ')}`);
    assert.equal(resumed.layersApplied?.h, true, 'the top layer was resumed at Firefox');
    const out = await poll('Firefox to send all three encodings at their sizes', async () => {
      const o = (await ff.evaluate(() => window.warbler.outboundStats())).filter((x) => x.kind === 'video');
      return o.length === 3 && o.every((x) => x.active && x.bytesSent > 0 && x.frameWidth === widths[x.rid]) && o;
    }, { timeout: 15000 });
    t.diagnostic(`Firefox encodings: ${out.map((x) => `${x.rid} ${x.frameWidth}x${x.frameHeight}@${Math.round(x.framesPerSecond)}`).join(', ')}`);
    const final = await cameraStat(cr, sf.participantId);
    t.diagnostic(`Chromium receive totals: freezes ${final.freezeCount} (${final.totalFreezesDuration.toFixed(3)} s), lost ${final.packetsLost}, keyframes ${final.keyFramesDecoded}`);
    for (const [name, p] of [['firefox', ff], ['chromium', cr]]) assert.deepEqual((await state(p)).errors, [], `${name} shows no errors`);
  });
});
