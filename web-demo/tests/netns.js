// Shaped links for the browser tests: a network namespace joined to the host by a veth pair on a
// private /30, a token-bucket cap (`tc … tbf`) on the host side of the pair (= the namespace's
// downlink), a wrapper that starts Chromium inside the namespace, and the server's /metrics.
// Everything made here is removed by `destroy()`, and also when the test process exits or is
// interrupted, so a failing test leaves no namespace, link or qdisc behind.
import { execFileSync } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

function ip(...args) {
  return execFileSync('ip', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

function quiet(fn) {
  try {
    fn();
  } catch {
    // already gone
  }
}

/** Why shaped-link tests cannot run here, or null if they can (root, `ip` and `tc` present). */
export function netnsUnavailable() {
  if (process.getuid?.() !== 0) return 'needs root (ip netns, tc)';
  for (const tool of ['ip', 'tc']) {
    try {
      execFileSync(tool, ['-V'], { stdio: 'ignore' });
    } catch {
      return `needs the ${tool} command`;
    }
  }
  return null;
}

/**
 * Creates namespace `name` with a veth pair: `<name>-h` on the host with `<prefix>.1/30`,
 * `<name>-n` in the namespace with `<prefix>.2/30` (prefix e.g. '10.203.0').
 */
export function createNetns(name, prefix) {
  const hostDev = `${name}-h`;
  const nsDev = `${name}-n`;
  const hostIp = `${prefix}.1`;
  const nsIp = `${prefix}.2`;
  const dir = mkdtempSync(path.join(os.tmpdir(), `warbler-${name}-`));
  let destroyed = false;
  const destroy = () => {
    if (destroyed) return;
    destroyed = true;
    quiet(() => execFileSync('tc', ['qdisc', 'del', 'dev', hostDev, 'root'], { stdio: 'ignore' }));
    quiet(() => ip('netns', 'del', name));
    quiet(() => ip('link', 'del', hostDev));
    rmSync(dir, { recursive: true, force: true });
    process.off('exit', destroy);
  };
  const onSignal = (sig) => {
    destroy();
    process.exit(sig === 'SIGINT' ? 130 : 143);
  };
  // Leftovers of an earlier run that was killed hard.
  quiet(() => ip('netns', 'del', name));
  quiet(() => ip('link', 'del', hostDev));
  process.on('exit', destroy);
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    ip('netns', 'add', name);
    ip('link', 'add', hostDev, 'type', 'veth', 'peer', 'name', nsDev);
    ip('link', 'set', nsDev, 'netns', name);
    ip('addr', 'add', `${hostIp}/30`, 'dev', hostDev);
    ip('link', 'set', hostDev, 'up');
    ip('netns', 'exec', name, 'ip', 'link', 'set', 'lo', 'up');
    ip('netns', 'exec', name, 'ip', 'addr', 'add', `${nsIp}/30`, 'dev', nsDev);
    ip('netns', 'exec', name, 'ip', 'link', 'set', nsDev, 'up');
  } catch (e) {
    destroy();
    throw new Error(`cannot create network namespace ${name}: ${e.stderr || e.message}`);
  }
  // Chromium inside the namespace: playwright talks to it over inherited pipes, which
  // `ip netns exec` keeps.
  const chromium = path.join(dir, 'chromium-in-netns');
  writeFileSync(chromium, `#!/bin/sh\nexec ip netns exec ${name} /usr/bin/chromium "$@"\n`);
  chmodSync(chromium, 0o755);
  return {
    name, hostDev, nsDev, hostIp, nsIp, chromium,
    /** Caps the namespace's downlink (host → namespace) with a token bucket. */
    cap(rate = '500kbit', burst = '20kb', latency = '200ms') {
      execFileSync('tc', ['qdisc', 'replace', 'dev', hostDev, 'root', 'tbf', 'rate', rate, 'burst', burst, 'latency', latency]);
    },
    uncap() {
      execFileSync('tc', ['qdisc', 'del', 'dev', hostDev, 'root']);
    },
    /** `tc -s qdisc` of the host side (sent, dropped, overlimits), for the report. */
    qdiscStats() {
      try {
        return execFileSync('tc', ['-s', 'qdisc', 'show', 'dev', hostDev], { encoding: 'utf8' }).trim();
      } catch (e) {
        return String(e.message);
      }
    },
    destroy() {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
      destroy();
    },
  };
}

/** Selected values of the server's /metrics: estimates by participant, drops by reason, counters. */
export async function scrapeMetrics(baseUrl) {
  const text = await (await fetch(`${baseUrl}/metrics`)).text();
  const out = { estimate: {}, dropped: {}, probes: 0, probePackets: 0, layerChanges: 0, nacks: 0, plis: 0 };
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    let m;
    if ((m = /^warbler_subscriber_estimate_bps\{participant="([^"]+)"\} (\S+)/.exec(line))) out.estimate[m[1]] = Number(m[2]);
    else if ((m = /^warbler_packets_dropped_total\{reason="([^"]+)"\} (\S+)/.exec(line))) out.dropped[m[1]] = Number(m[2]);
    else if ((m = /^warbler_bwe_probes_total (\S+)/.exec(line))) out.probes = Number(m[1]);
    else if ((m = /^warbler_bwe_probe_packets_total (\S+)/.exec(line))) out.probePackets = Number(m[1]);
    else if ((m = /^warbler_layer_activity_changes_total (\S+)/.exec(line))) out.layerChanges = Number(m[1]);
    else if ((m = /^warbler_nacks_received_total (\S+)/.exec(line))) out.nacks = Number(m[1]);
    else if ((m = /^warbler_plis_sent_total (\S+)/.exec(line))) out.plis = Number(m[1]);
  }
  return out;
}
