// Test I: adaptive stream in a normal room. A Chromium page publishes 720p simulcast; a
// subscribe-only page watches it. Its tile reports the displayed size and visibility
// (`track_settings`): moved out of the viewport, the server pauses the track (`track_paused`
// reason `hidden`, the tile says so) and frames stop; back in view, `track_resumed` and frames
// flow again; a pinned (large) tile gets the 1280 layer, a 160 px tile the smallest.
import test from 'node:test';
import assert from 'node:assert/strict';
import { withServer, launchChromium, openPage, joinViaUi, waitFlowing, poll, state } from './harness.js';
import { cameraStat, sleep } from './shaped.js';

const tileSel = (sid) => `.tile[data-participant="${sid}"][data-source="camera"]`;
const tileInfo = async (page, sid) => (await page.evaluate(() => window.warbler.tiles())).find((x) => x.participant === sid);

test('I: hidden tiles pause, shown tiles resume, tile size picks the layer', { timeout: 150000 }, async (t) => {
  await withServer(t, async ({ server, track }) => {
    const browser = track(await launchChromium());
    const room = 'room-i';
    const pub = await openPage(browser, `${server.url}/?room=${room}`, 'publisher');
    const sub = await openPage(browser, `${server.url}/?room=${room}&publish=0`, 'viewer');
    const sp = await joinViaUi(pub, room, 'Cam');
    const ss = await joinViaUi(sub, room, 'Viewer');
    assert.equal(ss.publishing, false);
    assert.deepEqual(ss.local, [], 'subscribe-only: nothing published');
    await waitFlowing(sub, sp.participantId, 'video', { timeout: 40000 });
    const sid = (await cameraStat(sub, sp.participantId)).trackSid;

    // Large: pinned, the tile spans the grid → the full 1280 layer.
    await sub.click(`${tileSel(sp.participantId)} .pin`);
    const big = await poll('the pinned tile to receive 1280-wide frames', async () => {
      const s = await cameraStat(sub, sp.participantId);
      return s?.frameWidth === 1280 && s;
    }, { timeout: 30000 });
    const info = await poll('the quality indicator', async () => {
      const x = await tileInfo(sub, sp.participantId);
      return x?.quality?.width === 1280 && x;
    });
    t.diagnostic(`pinned tile ${info.settings.width}x${info.settings.height}: ${big.frameWidth}x${big.frameHeight}, indicator ${info.quality.quality} (${info.quality.fps} fps)`);

    // Hidden: moved below the viewport (as if scrolled away) → paused 'hidden', no more frames.
    const tHide = Date.now();
    await sub.evaluate((sel) => { document.querySelector(sel).style.top = '5000px'; }, tileSel(sp.participantId));
    await poll('track_paused hidden', async () => (await state(sub)).paused[sid] === 'hidden', { timeout: 5000 });
    const pausedAfter = Date.now() - tHide;
    const overlay = await poll('the tile to show the pause reason', async () => (await tileInfo(sub, sp.participantId))?.pausedOverlay);
    assert.equal(overlay, 'paused: hidden');
    await sleep(1000); // frames in flight drain
    const a = await cameraStat(sub, sp.participantId);
    await sleep(2000);
    const b = await cameraStat(sub, sp.participantId);
    t.diagnostic(`hidden: track_paused after ${pausedAfter} ms; frames decoded over 2 s while hidden: ${b.framesDecoded - a.framesDecoded}`);
    assert.ok(b.framesDecoded - a.framesDecoded <= 2, `frames stop while hidden (${b.framesDecoded - a.framesDecoded})`);

    // Shown again → resumed, frames flow.
    const tShow = Date.now();
    await sub.evaluate((sel) => { document.querySelector(sel).style.top = ''; }, tileSel(sp.participantId));
    await poll('track_resumed', async () => !(await state(sub)).paused[sid], { timeout: 5000 });
    const resumedAfter = Date.now() - tShow;
    const c = await cameraStat(sub, sp.participantId);
    const d = await poll('frames to flow again', async () => {
      const s = await cameraStat(sub, sp.participantId);
      return s.framesDecoded > c.framesDecoded + 15 && s;
    }, { timeout: 10000 });
    assert.equal((await tileInfo(sub, sp.participantId)).pausedOverlay, null, 'the pause overlay is gone');
    t.diagnostic(`shown: track_resumed after ${resumedAfter} ms; first frames again within ${Date.now() - tShow} ms (${d.frameWidth}x${d.frameHeight})`);

    // Small: unpinned and 160 px wide → the smallest layer (320x180).
    await sub.click(`${tileSel(sp.participantId)} .pin`);
    await sub.evaluate((sel) => { document.querySelector(sel).style.width = '160px'; }, tileSel(sp.participantId));
    await poll('track_settings for the 160 px tile', async () => (await tileInfo(sub, sp.participantId))?.settings?.width === 160);
    const tSmall = Date.now();
    const small = await poll('the small tile to get the smallest layer', async () => {
      const s = await cameraStat(sub, sp.participantId);
      return s?.frameWidth === 320 && s;
    }, { timeout: 20000 });
    t.diagnostic(`160 px tile: ${small.frameWidth}x${small.frameHeight} after ${Date.now() - tSmall} ms; freezes so far ${small.freezeCount} (${small.totalFreezesDuration.toFixed(3)} s)`);

    // The publisher is told nobody needs its two upper layers, and stops encoding them.
    const layers = await poll('the publisher to pause its unneeded layers', async () => {
      const cam = (await state(pub)).local.find((l) => l.source === 'camera');
      return cam?.layersApplied?.q === true && cam.layersApplied.h === false && cam.layersApplied.f === false && cam;
    }, { timeout: 15000 });
    const out = (await pub.evaluate(() => window.warbler.outboundStats())).filter((x) => x.kind === 'video');
    t.diagnostic(`publisher layers: ${JSON.stringify(layers.layersApplied)}; ${out.map((x) => `${x.rid} ${x.active ? 'on' : 'off'}`).join(', ')}`);
    assert.deepEqual(out.filter((x) => x.active).map((x) => x.rid), ['q']);
    for (const [name, p] of [['publisher', pub], ['viewer', sub]]) assert.deepEqual((await state(p)).errors, [], `${name} shows no errors`);
  });
});
