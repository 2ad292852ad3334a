// Test K: active speakers as a user sees them. Two Chromium browsers with file-backed fake
// microphones — Alice a loud 440 Hz tone, Bob silence — join one room. Alice's tiles get the
// speaking highlight on both pages (her own preview on hers), Bob's never do; muting Alice's mic
// clears the highlight, unmuting brings it back. Prints join→speaking, mute→cleared and
// unmute→speaking times. Every `active_speakers` frame the pages receive is logged (Playwright's
// WebSocket events) and shown when a step fails. A second test checks that someone joining while
// Alice speaks sees her marked (the server tells a joiner the current speakers).
import test from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { withServer, launchChromium, openPage, joinViaUi, poll, state } from './harness.js';

const STEP_TIMEOUT = 8000;

/** Writes a 16-bit PCM mono WAV: a sine of `freq` Hz at `amplitude` of full scale (0: silence).
 *  3 s of 440 Hz is a whole number of periods, so Chromium's looping of the file has no click. */
function writeWav(file, { seconds = 3, rate = 48000, freq = 440, amplitude = 0 } = {}) {
  const samples = seconds * rate;
  const buf = Buffer.alloc(44 + samples * 2);
  buf.write('RIFF', 0, 'ascii');
  buf.writeUInt32LE(36 + samples * 2, 4);
  buf.write('WAVE', 8, 'ascii');
  buf.write('fmt ', 12, 'ascii');
  buf.writeUInt32LE(16, 16); // fmt chunk size
  buf.writeUInt16LE(1, 20); // PCM
  buf.writeUInt16LE(1, 22); // mono
  buf.writeUInt32LE(rate, 24);
  buf.writeUInt32LE(rate * 2, 28); // byte rate
  buf.writeUInt16LE(2, 32); // block align
  buf.writeUInt16LE(16, 34); // bits per sample
  buf.write('data', 36, 'ascii');
  buf.writeUInt32LE(samples * 2, 40);
  for (let i = 0; i < samples; i++) {
    buf.writeInt16LE(Math.round(amplitude * 32767 * Math.sin((2 * Math.PI * freq * i) / rate)), 44 + 2 * i);
  }
  writeFileSync(file, buf);
}

/** Records the `active_speakers` frames (and a count of all frames) the page receives on /ws. */
function logSpeakerFrames(page, label) {
  const log = { label, frames: 0, speakers: [] };
  page.on('websocket', (ws) => {
    if (!ws.url().endsWith('/ws')) return;
    ws.on('framereceived', ({ payload }) => {
      log.frames++;
      let msg;
      try {
        msg = JSON.parse(typeof payload === 'string' ? payload : payload.toString());
      } catch {
        return;
      }
      if (msg.type === 'active_speakers') log.speakers.push({ at: Date.now(), speakers: msg.speakers });
    });
  });
  return log;
}

/** What the page shows: grid tiles, participant list entries and the hook's `speakers`. */
const view = (page) => page.evaluate(() => ({
  tiles: [...document.querySelectorAll('#grid .tile')].map((t) => {
    const css = getComputedStyle(t);
    return {
      key: t.dataset.key, participant: t.dataset.participant, source: t.dataset.source,
      speaking: t.classList.contains('speaking'), dominant: t.classList.contains('dominant'),
      outline: `${css.outlineStyle} ${css.outlineWidth} ${css.outlineColor}`,
    };
  }),
  list: [...document.querySelectorAll('#participants li')].map((li) => ({
    sid: li.dataset.sid, speaking: li.classList.contains('speaking'), icon: Boolean(li.querySelector('.speaking-icon')),
    name: li.querySelector('.name')?.textContent ?? null,
  })),
  speakers: window.warbler.state().speakers,
}));

/**
 * Runs `body` with a fresh server and two Chromium browsers, one per microphone file (the fake
 * capture file is a browser-wide switch): `pa` (Alice) captures a loud 440 Hz tone, `pb` (Bob)
 * silence; both pages are open on the room, not joined yet. `until(what, page, cond)` polls the
 * page's view (bounded by STEP_TIMEOUT) and, on timeout, reports the last view and every
 * `active_speakers` frame both pages received.
 */
async function withSpeakerPages(t, room, body) {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'warbler-k-audio-'));
  const tone = path.join(dir, 'tone-440.wav');
  const silence = path.join(dir, 'silence.wav');
  writeWav(tone, { amplitude: 0.5 });
  writeWav(silence, { amplitude: 0 });
  try {
    await withServer(t, async ({ server, track }) => {
      const [toneBrowser, silentBrowser] = await Promise.all([
        launchChromium([`--use-file-for-fake-audio-capture=${tone}`]).then(track),
        launchChromium([`--use-file-for-fake-audio-capture=${silence}`]).then(track),
      ]);
      const [pa, pb] = await Promise.all([
        openPage(toneBrowser, `${server.url}/?room=${room}`, 'alice'),
        openPage(silentBrowser, `${server.url}/?room=${room}`, 'bob'),
      ]);
      const logs = [logSpeakerFrames(pa, 'alice'), logSpeakerFrames(pb, 'bob')];
      const until = async (what, page, cond, timeout = STEP_TIMEOUT) => {
        let last = null;
        try {
          return await poll(what, async () => {
            last = await view(page);
            return cond(last) && last;
          }, { timeout, interval: 50 });
        } catch (e) {
          e.message += `\nlast view: ${JSON.stringify(last)}\n${framesReport(logs)}`;
          throw e;
        }
      };
      await body({ pa, pb, logs, until });
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const tileOf = (v, sid) => v.tiles.find((x) => x.participant === sid && x.source === 'camera');
const itemOf = (v, sid) => v.list.find((x) => x.sid === sid);
const noneSpeaking = (v) => !v.tiles.some((x) => x.speaking) && !v.list.some((x) => x.speaking || x.icon);
/** `speaker` is marked speaking (tile, dominant, list entry with 🔊, first in the hook's list),
 *  `silent` is shown and not marked. */
const marked = (speaker, silent) => (v) => {
  const on = tileOf(v, speaker);
  const off = tileOf(v, silent);
  return Boolean(on?.speaking && on.dominant && off && !off.speaking && !off.dominant
    && itemOf(v, speaker)?.speaking && itemOf(v, speaker).icon && itemOf(v, speaker).name.startsWith('🔊')
    && itemOf(v, silent) && !itemOf(v, silent).speaking && !itemOf(v, silent).icon
    && v.speakers[0] === speaker && !v.speakers.includes(silent));
};

test('K: active speaker highlight follows who speaks, mute clears it', { timeout: 150000 }, async (t) => {
  await withSpeakerPages(t, 'room-k', async ({ pa, pb, logs, until }) => {
    // Bob (silent) is in the room first, so every change of speakers from Alice's first packet
    // on reaches him (see the late-joiner test below for joining while someone already speaks).
    const bob = (await joinViaUi(pb, 'room-k', 'Bob')).participantId;
    const tAliceClick = Date.now();
    const alice = (await joinViaUi(pa, 'room-k', 'Alice')).participantId;
    const tBothJoined = Date.now();

    // Bob hears Alice: her tile and list entry light up on his page, his own preview does not.
    const bobSees = await until('Bob\'s page to show Alice speaking (and not Bob)', pb, marked(alice, bob));
    const tBobSaw = Date.now();
    // Alice's page: her own preview tile is highlighted, Bob's tile is not.
    const aliceSees = await until('Alice\'s page to show herself speaking (and not Bob)', pa, marked(alice, bob));
    const tAliceSaw = Date.now();
    // The highlight is really drawn: a solid green outline, none on the silent tile.
    for (const v of [bobSees, aliceSees]) {
      assert.match(tileOf(v, alice).outline, /^solid [35]px rgb\(63, 185, 80\)$/, `speaking tile outline: ${tileOf(v, alice).outline}`);
      assert.match(tileOf(v, bob).outline, / 0px /, `silent tile outline: ${tileOf(v, bob).outline}`);
    }
    assert.equal(tileOf(aliceSees, alice).key, 'local:camera', 'on Alice\'s page the speaking tile is her own preview');
    assert.equal(tileOf(bobSees, bob).key, 'local:camera', 'on Bob\'s page the silent tile is his own preview');
    t.diagnostic(`join→speaking: Bob's page shows Alice speaking ${tBobSaw - tAliceClick} ms after Alice's join click `
      + `(${tBobSaw - tBothJoined} ms after her join completed); Alice's page shows herself ${tAliceSaw - tAliceClick} ms after the click`);

    // Alice mutes her microphone: nobody is speaking any more, on either page.
    const tMute = Date.now();
    await pa.click('#mic-button');
    await until('Bob\'s page to show nobody speaking after Alice muted', pb, noneSpeaking);
    const muteToClearedBob = Date.now() - tMute;
    await until('Alice\'s page to show nobody speaking after she muted', pa, noneSpeaking);
    const muteToClearedAlice = Date.now() - tMute;
    assert.equal(await pa.textContent('#mic-button'), 'Unmute mic');
    assert.deepEqual((await state(pb)).speakers, []);
    t.diagnostic(`mute→cleared: ${muteToClearedBob} ms on Bob's page, ${muteToClearedAlice} ms on Alice's`);

    // Unmute: Alice speaks again.
    const tUnmute = Date.now();
    await pa.click('#mic-button');
    await until('Bob\'s page to show Alice speaking again after unmute', pb, marked(alice, bob));
    const unmuteToSpeakingBob = Date.now() - tUnmute;
    await until('Alice\'s page to show herself speaking again after unmute', pa, marked(alice, bob));
    t.diagnostic(`unmute→speaking: ${unmuteToSpeakingBob} ms on Bob's page, ${Date.now() - tUnmute} ms on Alice's`);

    // Bob (silence) never appeared as a speaker in any frame either page received; levels are 0..1.
    for (const log of logs) {
      for (const f of log.speakers) {
        assert.ok(Array.isArray(f.speakers), `speakers is an array: ${JSON.stringify(f)}`);
        for (const s of f.speakers) {
          assert.notEqual(s.sid, bob, `${log.label} was told the silent Bob speaks: ${JSON.stringify(f)}`);
          assert.ok(typeof s.level === 'number' && s.level >= 0 && s.level <= 1, `level in 0..1: ${JSON.stringify(f)}`);
        }
      }
    }
    for (const line of framesReport(logs, { short: true }).split('\n')) t.diagnostic(line);

    // Alice leaves: Bob's page keeps no mark of her.
    await pa.click('#leave-button');
    await until('Bob\'s page to drop Alice and her speaking marks', pb,
      (v) => !tileOf(v, alice) && !itemOf(v, alice) && noneSpeaking(v) && !v.speakers.includes(alice));
    assert.deepEqual((await state(pa)).errors, []);
    assert.deepEqual((await state(pb)).errors, []);
  });
});

// Someone joining while another already speaks sees the highlight too: announcements go out on
// changes, so the server sends a joiner the current speakers.
test('K: a late joiner sees who is already speaking', { timeout: 120000 }, async (t) => {
  await withSpeakerPages(t, 'room-k-late', async ({ pa, pb, until }) => {
    const alice = (await joinViaUi(pa, 'room-k-late', 'Alice')).participantId;
    await until('Alice\'s page to show herself speaking', pa, (v) => tileOf(v, alice)?.speaking && v.speakers[0] === alice);
    const tClick = Date.now();
    const bob = (await joinViaUi(pb, 'room-k-late', 'Bob')).participantId;
    await until('the late joiner Bob\'s page to show Alice speaking', pb, marked(alice, bob));
    t.diagnostic(`late joiner: Bob's page shows Alice speaking ${Date.now() - tClick} ms after his join click`);
  });
});

/** The logged `active_speakers` frames per page, times relative to the first frame seen. */
function framesReport(logs, { short = false } = {}) {
  const t0 = Math.min(...logs.flatMap((l) => l.speakers.map((f) => f.at)), Infinity);
  return logs.map((l) => {
    const frames = l.speakers.map((f) => `+${f.at - t0}ms ${JSON.stringify(f.speakers.map((s) => [s.sid, s.level]))}`);
    const shown = short && frames.length > 12 ? [...frames.slice(0, 6), '…', ...frames.slice(-6)] : frames;
    return `${l.label}: ${l.speakers.length} active_speakers of ${l.frames} WebSocket frames received: ${shown.join('; ') || '(none)'}`;
  }).join('\n');
}
