// Per-tile reception quality: once a second, reads the subscriber connection's inbound-rtp stats
// and shows on each remote video tile the received resolution and frame rate and a quality grade —
// good / medium / poor — from the layer received (against the largest this track has shown and
// the tile's size), packet loss and freezes over the last interval.

const INTERVAL_MS = 1000;

/**
 * The grade of one interval. `width`: received frame width; `expected`: the width the tile could
 * use (the smaller of its displayed width and the largest frame seen for the track); `lossRatio`:
 * lost / (lost + received) in the interval; `froze`: a new freeze in the interval.
 */
export function grade({ width, expected, lossRatio, froze, fps, paused }) {
  if (paused) return paused === 'bandwidth' ? 'poor' : 'off';
  if (!width) return 'poor';
  const ratio = expected > 0 ? width / expected : 1;
  if (ratio < 0.4 || lossRatio > 0.1 || froze || fps < 5) return 'poor';
  if (ratio < 0.75 || lossRatio > 0.02) return 'medium';
  return 'good';
}

export class QualityMonitor {
  #session; // () => Session | null
  #grid;
  #timer = null;
  #prev = new Map(); // trackSid -> previous sample
  #maxWidth = new Map(); // trackSid -> largest frame width received
  #info = new Map(); // trackSid -> what the tile shows

  constructor(session, grid) {
    this.#session = session;
    this.#grid = grid;
  }

  start() {
    if (this.#timer) return;
    this.#timer = setInterval(() => this.#sample().catch((e) => console.debug('warbler: stats', e)), INTERVAL_MS);
  }

  stop() {
    clearInterval(this.#timer);
    this.#timer = null;
    this.#prev.clear();
    this.#maxWidth.clear();
    this.#info.clear();
  }

  /** What each remote video tile shows: {trackSid, width, height, fps, quality, lossRatio, ...}. */
  info() {
    return [...this.#info.values()].map((i) => ({ ...i }));
  }

  async #sample() {
    const s = this.#session();
    if (!s) return;
    const stats = (await s.inboundStats()).filter((x) => x.kind === 'video');
    const seen = new Set();
    for (const x of stats) {
      seen.add(x.trackSid);
      const prev = this.#prev.get(x.trackSid);
      this.#prev.set(x.trackSid, x);
      if (x.frameWidth > (this.#maxWidth.get(x.trackSid) ?? 0)) this.#maxWidth.set(x.trackSid, x.frameWidth);
      const tile = this.#grid.querySelector(`.tile[data-track="${CSS.escape(x.trackSid)}"]`);
      const dpr = window.devicePixelRatio || 1;
      const display = tile ? Math.round(tile.clientWidth * dpr) : 0;
      const maxW = this.#maxWidth.get(x.trackSid) ?? 0;
      const expected = display > 0 ? Math.min(maxW, display) : maxW;
      const dLost = prev ? Math.max(0, x.packetsLost - prev.packetsLost) : 0;
      const dRecv = prev ? Math.max(0, x.packetsReceived - prev.packetsReceived) : 0;
      const lossRatio = dLost + dRecv > 0 ? dLost / (dLost + dRecv) : 0;
      const froze = prev ? x.freezeCount > prev.freezeCount : false;
      const flowing = prev ? x.framesDecoded > prev.framesDecoded : x.framesDecoded > 0;
      const fps = x.framesPerSecond || (prev ? (x.framesDecoded - prev.framesDecoded) * 1000 / INTERVAL_MS : 0);
      const quality = grade({ width: flowing ? x.frameWidth : 0, expected, lossRatio, froze, fps, paused: x.paused });
      const info = { trackSid: x.trackSid, width: x.frameWidth, height: x.frameHeight, fps: Math.round(fps), quality,
        lossRatio: Math.round(lossRatio * 1000) / 1000, froze, expected, paused: x.paused };
      this.#info.set(x.trackSid, info);
      if (tile) show(tile, info);
    }
    for (const sid of [...this.#info.keys()]) if (!seen.has(sid)) this.#info.delete(sid);
  }
}

function show(tile, i) {
  const el = tile.querySelector('.quality');
  if (!el) return;
  tile.dataset.quality = i.quality;
  tile.dataset.resolution = `${i.width}x${i.height}`;
  el.hidden = false;
  el.dataset.quality = i.quality;
  el.title = `received ${i.width}×${i.height} at ${i.fps} fps; loss ${(i.lossRatio * 100).toFixed(1)}%` +
    (i.froze ? '; froze' : '') + `; quality ${i.quality}`;
  el.querySelector('.res').textContent = i.paused ? '—' : `${i.width}×${i.height} · ${i.fps} fps`;
  el.querySelector('.grade').textContent = i.quality;
}
