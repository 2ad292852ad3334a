import { startServer, launchChromium, launchFirefox, openPage, joinViaUi, waitFlowing, inboundStats, state } from './harness.js';
const server = await startServer();
const [ffb, crb] = await Promise.all([launchFirefox(), launchChromium(['--auto-select-desktop-capture-source=Entire screen'])]);
const sleep = (ms) => new Promise(r => setTimeout(r, ms));
const dump = async (ff, label) => {
  const st = await inboundStats(ff);
  const tr = await ff.evaluate(() => { const s = window.warbler.session; return JSON.stringify({ tx: s.sub.getTransceivers().map(t => [t.mid, t.currentDirection, t.direction, t.receiver.track.kind, t.receiver.track.id, t.receiver.track.muted]), received: s.snapshot().received }); });
  const raw = await ff.evaluate(async () => { const r = await window.warbler.session.sub.getStats(); const o = []; r.forEach(s => { if (s.type === 'inbound-rtp') o.push({ ssrc: s.ssrc, kind: s.kind, mid: s.mid, tid: s.trackIdentifier, fd: s.framesDecoded, pr: s.packetsReceived }); }); return JSON.stringify(o); });
  console.log(label, JSON.stringify(st.map(s => [s.kind, s.source, s.mid, s.trackSid, s.framesDecoded, s.packetsReceived])), '\n  ', tr, '\n  raw', raw);
};
try {
  const ff = await openPage(ffb, `${server.url}/?room=x`, 'ff');
  const cr = await openPage(crb, `${server.url}/?room=x`, 'cr');
  await joinViaUi(ff, 'x', 'Fox');
  const sc = (await joinViaUi(cr, 'x', 'Chrome')).participantId;
  await waitFlowing(ff, sc, 'video');
  await dump(ff, 'start');
  await cr.click('#screen-button');
  await sleep(3000);
  await dump(ff, 'sharing');
  const sdp1 = await ff.evaluate(() => window.warbler.session.sub.remoteDescription.sdp);
  await cr.click('#screen-button');
  await sleep(3000);
  await dump(ff, 'stopped');
  await sleep(2000);
  await dump(ff, 'stopped+2s');
  const sdp2 = await ff.evaluate(() => window.warbler.session.sub.remoteDescription.sdp);
  console.log('--- offer while sharing\n' + sdp1 + '\n--- offer after stop\n' + sdp2);
} finally { await ffb.close(); await crb.close(); await server.stop(); }
