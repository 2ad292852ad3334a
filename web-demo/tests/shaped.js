// Measuring a subscriber over time for the shaped-link tests: a bounded sampler of inbound-rtp
// stats (and the server's estimate), and per-phase summaries — when the received width crossed a
// bound, freezes, loss and stalls between two instants.

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** The inbound video stats of `participantSid`'s camera on `page`, or null. */
export async function cameraStat(page, participantSid) {
  return page.evaluate(async (sid) => {
    const all = await window.warbler.inboundStats();
    return all.find((s) => s.participantSid === sid && s.kind === 'video' && s.source !== 'screen_share') ?? null;
  }, participantSid);
}

/**
 * Samples `probes` ({name: async () => value}) every `intervalMs` until stopped or `maxMs` passed;
 * each series holds {t (ms since `t0`), v}. Errors of one probe are recorded as null values.
 */
export function startSampler(probes, { t0 = Date.now(), intervalMs = 250, maxMs = 300000 } = {}) {
  const series = Object.fromEntries(Object.keys(probes).map((k) => [k, []]));
  let stopped = false;
  const done = (async () => {
    const end = Date.now() + maxMs;
    while (!stopped && Date.now() < end) {
      const start = Date.now();
      await Promise.all(Object.entries(probes).map(async ([k, fn]) => {
        let v = null;
        try {
          v = await fn();
        } catch {
          v = null;
        }
        series[k].push({ t: Date.now() - t0, v });
      }));
      await sleep(Math.max(0, intervalMs - (Date.now() - start)));
    }
  })();
  return {
    series,
    t0,
    now: () => Date.now() - t0,
    latest: (k) => series[k].at(-1)?.v ?? null,
    async stop() {
      stopped = true;
      await done;
    },
  };
}

/** Samples of one series within [from, to) (ms since t0) that have a value. */
export function within(series, from, to = Infinity) {
  return series.filter((s) => s.t >= from && s.t < to && s.v);
}

/**
 * For inbound video samples within [from, to): counter deltas, the largest single freeze seen
 * (exact when one freeze ended between two samples), the longest stretch without a new decoded
 * frame (time between two samples that show new frames, so ≥ the sampling interval), widths seen, and when the width first satisfied `pred` and stayed so until `to`.
 */
export function summarize(series, from, to, pred) {
  const s = within(series, from, to);
  if (s.length < 2) return { samples: s.length };
  const first = s[0].v;
  const last = s.at(-1).v;
  const d = (k) => (last[k] ?? 0) - (first[k] ?? 0);
  let maxFreezeS = 0;
  let maxStallMs = 0;
  let lastProgressT = s[0].t;
  for (let i = 1; i < s.length; i++) {
    const a = s[i - 1].v;
    const b = s[i].v;
    const dc = b.freezeCount - a.freezeCount;
    const dd = b.totalFreezesDuration - a.totalFreezesDuration;
    if (dc >= 1) maxFreezeS = Math.max(maxFreezeS, dc === 1 ? dd : dd / dc);
    if (b.framesDecoded > a.framesDecoded) {
      maxStallMs = Math.max(maxStallMs, s[i].t - lastProgressT);
      lastProgressT = s[i].t;
    }
  }
  maxStallMs = Math.max(maxStallMs, s.at(-1).t - lastProgressT);
  let firstMatch = null;
  let sustained = null;
  if (pred) {
    firstMatch = s.find((x) => pred(x.v))?.t ?? null;
    for (let i = s.length - 1; i >= 0 && pred(s[i].v); i--) sustained = s[i].t;
  }
  const widths = [...new Set(s.map((x) => x.v.frameWidth))];
  const received = d('packetsReceived');
  const lost = d('packetsLost');
  return {
    samples: s.length,
    firstMatchMs: firstMatch == null ? null : firstMatch - from,
    sustainedFromMs: sustained == null ? null : sustained - from,
    freezes: d('freezeCount'),
    freezeSeconds: Math.round(d('totalFreezesDuration') * 1000) / 1000,
    maxFreezeMs: Math.round(maxFreezeS * 1000),
    maxStallMs,
    packetsLost: lost,
    packetsReceived: received,
    lossPct: received + lost > 0 ? Math.round((lost / (received + lost)) * 10000) / 100 : 0,
    framesDecoded: d('framesDecoded'),
    fps: Math.round((d('framesDecoded') * 1000) / (s.at(-1).t - s[0].t)),
    widths,
    lastWidth: last.frameWidth,
  };
}

/** A one-line-per-second trace: width@fps of each page series and the estimate (kbit/s). */
export function traceLines(sampler, pageKeys, estimateKey, from, to, otherEstimateKey) {
  const lines = [];
  for (let t = from; t < to; t += 1000) {
    const parts = [`t=${((t - from) / 1000).toFixed(0).padStart(3)}s`];
    for (const k of pageKeys) {
      const w = within(sampler.series[k], t, t + 1000);
      const v = w.at(-1)?.v;
      parts.push(`${k} ${v ? `${v.frameWidth}@${Math.round(v.framesPerSecond ?? 0)}${v.paused ? `(${v.paused})` : ''}` : '-'}`);
    }
    if (estimateKey) {
      const e = within(sampler.series[estimateKey], t, t + 1000).at(-1)?.v;
      parts.push(`est ${e == null ? '-' : Math.round(e / 1000)}k`);
    }
    if (otherEstimateKey) {
      const e = within(sampler.series[otherEstimateKey], t, t + 1000).at(-1)?.v;
      parts.push(`(${otherEstimateKey} ${e == null ? '-' : Math.round(e / 1000)}k)`);
    }
    lines.push(parts.join('  '));
  }
  return lines;
}
