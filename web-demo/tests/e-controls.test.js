// Test E: the controls others can see: mic mute and camera off reach the other page as mute
// indicators, and the device picker switches camera and microphone without interrupting the media.
import test from 'node:test';
import assert from 'node:assert/strict';
import { withServer, launchChromium, openPage, joinViaUi, waitFlowing, poll, state } from './harness.js';

test('E: mute, camera off and device switching', { timeout: 120000 }, async (t) => {
  await withServer(t, async ({ server, track }) => {
    // Three fake cameras (and Chromium's three fake microphones) for the device picker. Chromium's
    // fake_device_1 emulates a Y16 depth camera that WebRTC cannot encode; fake_device_2 (MJPEG) can.
    const browser = track(await launchChromium(['--use-fake-device-for-media-stream=fps=30,device-count=3'],
      { without: ['--use-fake-device-for-media-stream=fps=30'] }));
    const room = 'room-e';
    const [p1, p2] = await Promise.all([
      openPage(browser, `${server.url}/?room=${room}`, 'alice'),
      openPage(browser, `${server.url}/?room=${room}`, 'bob'),
    ]);
    const alice = (await joinViaUi(p1, room, 'Alice')).participantId;
    await joinViaUi(p2, room, 'Bob');
    await waitFlowing(p2, alice, 'video');

    const aliceSeenByBob = async () => (await state(p2)).participants.find((p) => p.sid === alice);
    const flag = (name) => p2.getAttribute(`#participants li[data-sid="${alice}"]`, name);

    // Mic mute / unmute.
    await p1.click('#mic-button');
    await poll('Bob to see Alice muted', async () =>
      (await aliceSeenByBob())?.tracks.find((tr) => tr.kind === 'audio')?.muted === true && (await flag('data-mic-muted')) === 'true');
    assert.equal(await p1.textContent('#mic-button'), 'Unmute mic');
    await p1.click('#mic-button');
    await poll('Bob to see Alice unmuted', async () =>
      (await aliceSeenByBob())?.tracks.find((tr) => tr.kind === 'audio')?.muted === false && (await flag('data-mic-muted')) === 'false');

    // Camera off / on: the tile shows the avatar while the camera is off.
    const avatar = `.tile[data-participant="${alice}"][data-source="camera"] .avatar`;
    await p1.click('#camera-button');
    await poll('Bob to see Alice camera off', async () =>
      (await flag('data-cam-off')) === 'true' && (await p2.isVisible(avatar)));
    await p1.click('#camera-button');
    await poll('Bob to see Alice camera on', async () =>
      (await flag('data-cam-off')) === 'false' && !(await p2.isVisible(avatar)));

    // Device picker: switch to the second camera and another microphone (replaceTrack, no renegotiation).
    const before = await state(p1);
    const cameras = await p1.$$eval('#camera-select option', (os) => os.map((o) => o.textContent));
    const mics = await p1.$$eval('#mic-select option', (os) => os.map((o) => o.textContent));
    assert.ok(cameras.length >= 2, `cameras to pick from: ${cameras}`);
    const camLabel = before.local.find((l) => l.source === 'camera').label;
    const micLabel = before.local.find((l) => l.source === 'microphone').label;
    const otherCam = cameras.includes('fake_device_2') ? 'fake_device_2' : cameras.find((c) => c !== camLabel);
    const otherMic = mics.find((m) => m !== micLabel);
    await p1.selectOption('#camera-select', { label: otherCam });
    await p1.selectOption('#mic-select', { label: otherMic });
    const after = await poll('Alice to use the other devices', async () => {
      const s = await state(p1);
      const cam = s.local.find((l) => l.source === 'camera');
      const mic = s.local.find((l) => l.source === 'microphone');
      return cam.label === otherCam && mic.label === otherMic && s;
    });
    // Same published tracks (same sids), media still flowing to Bob.
    for (const source of ['camera', 'microphone']) {
      assert.equal(after.local.find((l) => l.source === source).sid, before.local.find((l) => l.source === source).sid);
    }
    const video = await waitFlowing(p2, alice, 'video');
    const audio = await waitFlowing(p2, alice, 'audio');
    t.diagnostic(`after switching to ${otherCam} / ${otherMic}: frames ${video.first.framesDecoded}->${video.second.framesDecoded}, audio packets ${audio.first.packetsReceived}->${audio.second.packetsReceived}`);
    assert.deepEqual((await state(p1)).errors, []);
    assert.deepEqual((await state(p2)).errors, []);
  });
});
