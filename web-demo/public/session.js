// Session: one participant in a room — signaling, the publisher and subscriber peer connections,
// local media and the model of remote participants. No DOM here; the UI listens for 'change'.
import { Signaling, SignalError } from './signaling.js';
import { msidTrackByMid } from './sdp.js';

const VIDEO_CONSTRAINTS = { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } };
const PING_INTERVAL_MS = 15000;
const IS_FIREFOX = typeof navigator !== 'undefined' && /firefox/i.test(navigator.userAgent);
// The camera goes out as three simulcast encodings at 1/4, 1/2 and full size. The server orders
// layers by the picture size it sees, never by name, so each browser may use its own rid names
// (Firefox's customary l/m/h, q/h/f elsewhere).
const SIMULCAST = (IS_FIREFOX ? ['l', 'm', 'h'] : ['q', 'h', 'f']).map((rid, i) => ({ rid, scaleResolutionDownBy: [4, 2, 1][i] }));
// VP8 temporal layers let the server fit between spatial steps; used where the browser offers them.
const TEMPORAL_MODE = 'L1T3';
// `req` values of our own track_settings messages, from a range the signaling requests never reach:
// an error for one of them (the track went away meanwhile) is expected and not shown.
const QUIET_REQ_BASE = 1_000_000_000;

export class Session extends EventTarget {
  sig = null;
  pub = null; // publisher RTCPeerConnection: we offer
  sub = null; // subscriber RTCPeerConnection: the server offers
  joined = false;
  room = null;
  self = null; // {sid, identity, name, tracks: Map}
  participants = new Map(); // sid -> {sid, identity, name, tracks: Map<trackSid, track>}
  local = new Map(); // source -> {source, track, stream, transceiver, trackId, sid, muted}
  remote = new Map(); // trackSid -> {track, mid, kind}: media currently received
  serverStates = { publisher: null, subscriber: null }; // as the server reports them
  paused = new Map(); // trackSid -> reason ('bandwidth' | 'hidden' | 'feed_dry'): the server stopped sending it
  publishing = true; // false: subscribe-only (no camera, no microphone)
  chatChannel = null; // the `chat` data channel on the publisher connection (see chat.js)
  speakers = []; // participant sids speaking now, loudest (dominant) first; may include self (`active_speakers`)
  speakerLevels = new Map(); // sid -> level 0..1 from the latest `active_speakers`

  #subTracks = {}; // mid -> track sid, from the latest subscriber_offer
  #streamByMid = new Map(); // mid -> msid stream id (= publisher participant sid)
  #pubChain = Promise.resolve();
  #subChain = Promise.resolve();
  #signaled = { publisher: false, subscriber: false }; // the server knows the connection: trickle may flow
  #pendingCandidates = { publisher: [], subscriber: [] };
  #pingTimer = null;
  #ended = false;
  #screenPending = false; // getDisplayMedia is showing its picker
  #changeQueued = false;
  #layerChain = Promise.resolve();
  #wantedSettings = new Map(); // trackSid -> {width, height, visible, pinned}: what the UI shows
  #sentSettings = new Map(); // trackSid -> JSON of the last track_settings sent for it
  #quietReq = QUIET_REQ_BASE;
  #quietReqs = new Set();
  #chatWanted = false;

  /** Connects, joins with `token` and publishes camera + microphone (unless `publish` is false:
   *  subscribe-only), with the `chat` data channel on the publisher connection (unless `chat` is
   *  false; a data-channel-only offer needs no publish grant). Emits 'chatchannel' with the
   *  channel when it is created. Throws if the join fails. */
  async join({ wsUrl, token, publish = true, chat = true }) {
    this.publishing = publish;
    this.#chatWanted = chat;
    this.sig = new Signaling();
    this.sig.addEventListener('message', (e) => this.#onMessage(e.detail));
    this.sig.addEventListener('close', (e) => this.#onClose(e.detail));
    try {
      await this.sig.connect(wsUrl);
      await this.sig.request({ type: 'join', version: 1, token });
    } catch (e) {
      this.#report(e);
      this.#end('join failed');
      throw e;
    }
    this.#pingTimer = setInterval(() => this.sig.send({ type: 'ping' }), PING_INTERVAL_MS);
    if (publish) await this.#startLocalMedia();
    // The data channel after the media, so its m-line comes last in the offer.
    if (chat && !this.#ended) this.#openChat();
    if (this.local.size || this.chatChannel) await this.#negotiatePublisher();
  }

  /** Leaves the room: tells the server, closes both connections, stops local media. */
  leave() {
    if (this.#ended) return;
    this.sig?.send({ type: 'leave' });
    this.#end('left');
  }

  /** Mutes or unmutes a local source ('microphone' | 'camera'): disables the track and tells others. */
  setMuted(source, muted) {
    const l = this.local.get(source);
    if (!l) return;
    l.muted = muted;
    l.track.enabled = !muted;
    if (l.sid) this.sig.send({ type: 'mute', track: l.sid, muted });
    this.#changed();
  }

  async startScreenShare() {
    if (this.local.has('screen_share') || !this.joined || this.#screenPending) return;
    let stream;
    this.#screenPending = true;
    try {
      stream = await navigator.mediaDevices.getDisplayMedia({ video: true, audio: false });
    } catch (e) {
      this.#emitError('media', `Screen sharing failed: ${e.name}: ${e.message}`);
      return;
    } finally {
      this.#screenPending = false;
    }
    if (this.#ended) return stream.getTracks().forEach((t) => t.stop());
    const track = stream.getVideoTracks()[0];
    track.contentHint = 'detail';
    track.addEventListener('ended', () => this.stopScreenShare()); // the browser's own "Stop sharing"
    this.#addLocal('screen_share', track, stream);
    await this.#negotiatePublisher();
  }

  async stopScreenShare() {
    const l = this.local.get('screen_share');
    if (!l) return;
    this.local.delete('screen_share');
    l.track.stop();
    if (this.pub && this.pub.signalingState !== 'closed') {
      this.pub.removeTrack(l.transceiver.sender);
      await this.#negotiatePublisher();
    }
    this.#changed();
  }

  /** Switches the camera ('videoinput') or microphone ('audioinput') without renegotiating. */
  async switchDevice(kind, deviceId) {
    const source = kind === 'audioinput' ? 'microphone' : 'camera';
    const constraints =
      kind === 'audioinput'
        ? { audio: { deviceId: { exact: deviceId } } }
        : { video: { ...VIDEO_CONSTRAINTS, deviceId: { exact: deviceId } } };
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia(constraints);
    } catch (e) {
      this.#emitError('media', `Cannot open the selected ${source}: ${e.name}: ${e.message}`);
      return;
    }
    const track = stream.getTracks()[0];
    const l = this.local.get(source);
    if (!l) {
      // Nothing was published for this source (e.g. it failed at join): publish it now.
      this.#addLocal(source, track, stream);
      await this.#negotiatePublisher();
      return;
    }
    track.enabled = !l.muted;
    await l.transceiver.sender.replaceTrack(track);
    l.track.stop();
    Object.assign(l, { track, stream });
    this.#changed();
  }

  /** A plain-data snapshot of the session, for the UI and the test hook. */
  snapshot() {
    const participant = (p) => ({ sid: p.sid, identity: p.identity, name: p.name, tracks: [...p.tracks.values()] });
    return {
      joined: this.joined,
      room: this.room,
      participantId: this.self?.sid ?? null,
      self: this.self && participant(this.self),
      participants: [...this.participants.values()].map(participant),
      publishing: this.publishing,
      local: [...this.local.values()].map((l) => ({
        source: l.source, kind: l.track.kind, trackId: l.trackId, sid: l.sid, muted: l.muted, label: l.track.label,
        rids: l.rids ?? null, layersRequested: l.layersRequested ?? null, layersApplied: l.layersApplied ?? null,
        layerMessages: l.layerMessages ?? 0,
      })),
      received: [...this.remote].map(([sid, r]) => ({ trackSid: sid, mid: r.mid, kind: r.kind, paused: this.paused.get(sid) ?? null,
        settings: this.#wantedSettings.get(sid) ?? null })),
      paused: Object.fromEntries(this.paused),
      publisherState: this.pub?.connectionState ?? 'new',
      subscriberState: this.sub?.connectionState ?? 'new',
      chatChannelState: this.chatChannel?.readyState ?? null,
      serverStates: { ...this.serverStates },
      speakers: [...this.speakers],
      speakerLevels: Object.fromEntries(this.speakerLevels),
    };
  }

  /** Per received track: inbound-rtp counters from the subscriber connection, keyed by track sid. */
  async inboundStats() {
    if (!this.sub) return [];
    const midByTrackId = new Map(this.sub.getTransceivers().map((t) => [t.receiver.track.id, t.mid]));
    const report = await this.sub.getStats();
    const byMid = new Map();
    report.forEach((s) => {
      if (s.type !== 'inbound-rtp') return;
      const mid = s.mid ?? midByTrackId.get(s.trackIdentifier);
      const trackSid = this.#subTracks[mid];
      if (!trackSid || !this.remote.has(trackSid)) return;
      // An m-line may have carried an earlier stream (another SSRC): keep the most recent one.
      const prev = byMid.get(mid);
      if (prev && (prev.lastPacketReceivedTimestamp ?? 0) > (s.lastPacketReceivedTimestamp ?? 0)) return;
      byMid.set(mid, { ...s, mid, trackSid });
    });
    return [...byMid.values()].map((s) => ({
      participantSid: this.#ownerOf(s.trackSid) ?? this.#streamByMid.get(s.mid) ?? null,
      trackSid: s.trackSid,
      mid: s.mid,
      kind: s.kind ?? s.mediaType,
      source: this.#trackInfo(s.trackSid)?.source ?? null,
      codec: report.get(s.codecId)?.mimeType ?? null,
      packetsReceived: s.packetsReceived ?? 0,
      bytesReceived: s.bytesReceived ?? 0,
      framesDecoded: s.framesDecoded ?? 0,
      frameWidth: s.frameWidth ?? 0,
      frameHeight: s.frameHeight ?? 0,
      framesPerSecond: s.framesPerSecond ?? 0,
      freezeCount: s.freezeCount ?? 0,
      totalFreezesDuration: s.totalFreezesDuration ?? 0, // seconds
      packetsLost: s.packetsLost ?? 0,
      jitter: s.jitter ?? 0, // seconds
      keyFramesDecoded: s.keyFramesDecoded ?? 0,
      pliCount: s.pliCount ?? 0,
      nackCount: s.nackCount ?? 0,
      paused: this.paused.get(s.trackSid) ?? null,
    }));
  }

  /** Per published encoding (one per simulcast rid, or one without rid): outbound-rtp counters and
   *  whether the encoding is active in the sender's parameters. */
  async outboundStats() {
    if (!this.pub) return [];
    const report = await this.pub.getStats();
    const out = [];
    for (const l of this.local.values()) {
      const sender = l.transceiver.sender;
      const encodings = sender.getParameters().encodings ?? [];
      const ssrcs = new Set();
      let senderReport;
      try {
        senderReport = await sender.getStats();
      } catch {
        senderReport = report;
      }
      senderReport.forEach((s) => { if (s.type === 'outbound-rtp') ssrcs.add(s.ssrc); });
      report.forEach((s) => {
        if (s.type !== 'outbound-rtp' || !ssrcs.has(s.ssrc)) return;
        const enc = encodings.find((e) => (e.rid ?? null) === (s.rid ?? null)) ?? (encodings.length === 1 ? encodings[0] : undefined);
        out.push({
          source: l.source, kind: l.track.kind, trackSid: l.sid, rid: s.rid ?? null, ssrc: s.ssrc,
          active: enc ? enc.active !== false : null,
          scalabilityMode: s.scalabilityMode ?? enc?.scalabilityMode ?? null,
          frameWidth: s.frameWidth ?? 0, frameHeight: s.frameHeight ?? 0, framesPerSecond: s.framesPerSecond ?? 0,
          framesEncoded: s.framesEncoded ?? 0, bytesSent: s.bytesSent ?? 0, packetsSent: s.packetsSent ?? 0,
          qualityLimitationReason: s.qualityLimitationReason ?? null,
          targetBitrate: s.targetBitrate ?? null,
        });
      });
    }
    return out;
  }

  /** Adaptive stream: how the UI shows a received video track (`width`/`height` in device pixels,
   *  `visible`, `pinned`). Sent to the server as `track_settings` whenever it changes, and again
   *  whenever the track (re)appears on the subscriber connection. */
  setTrackSettings(trackSid, { width = 0, height = 0, visible = true, pinned = false } = {}) {
    this.#wantedSettings.set(trackSid, { width: Math.round(width), height: Math.round(height), visible, pinned });
    this.#flushTrackSettings();
  }

  /** Forgets the UI's settings for a track it no longer shows. */
  clearTrackSettings(trackSid) {
    this.#wantedSettings.delete(trackSid);
  }

  // ---- signaling messages ----

  #onMessage(msg) {
    switch (msg.type) {
      case 'joined':
        this.joined = true;
        this.room = msg.room;
        this.self = toParticipant(msg.participant);
        for (const p of msg.participants ?? []) this.participants.set(p.sid, toParticipant(p));
        break;
      case 'participant_joined': {
        const p = toParticipant(msg.participant);
        this.participants.set(p.sid, p);
        this.dispatchEvent(new CustomEvent('presence', { detail: { kind: 'joined', name: p.name } }));
        break;
      }
      case 'participant_left':
        if (this.participants.has(msg.sid)) {
          this.dispatchEvent(new CustomEvent('presence', { detail: { kind: 'left', name: this.participants.get(msg.sid).name } }));
        }
        for (const t of this.participants.get(msg.sid)?.tracks.keys() ?? []) {
          this.remote.delete(t);
          this.paused.delete(t);
        }
        this.participants.delete(msg.sid);
        // Whoever left speaks no more, whether or not the server's next `active_speakers` says so.
        if (this.speakers.includes(msg.sid)) {
          this.#setSpeakers(this.speakers.filter((sid) => sid !== msg.sid).map((sid) => ({ sid, level: this.speakerLevels.get(sid) })));
        }
        break;
      case 'active_speakers':
        this.#setSpeakers(msg.speakers ?? []);
        break;
      case 'track_published':
        this.#participant(msg.participant)?.tracks.set(msg.track.sid, msg.track);
        break;
      case 'track_unpublished':
        this.#participant(msg.participant)?.tracks.delete(msg.track);
        this.remote.delete(msg.track);
        this.paused.delete(msg.track);
        break;
      case 'track_muted': {
        const track = this.#participant(msg.participant)?.tracks.get(msg.track);
        if (track) track.muted = msg.muted;
        break;
      }
      case 'subscriber_offer':
        this.#onSubscriberOffer(msg);
        break;
      case 'connection_state':
        this.serverStates[msg.target] = msg.state;
        break;
      case 'track_paused':
        this.paused.set(msg.track, msg.reason);
        break;
      case 'track_resumed':
        this.paused.delete(msg.track);
        break;
      case 'layers':
        this.#applyLayers(msg.track, msg.active ?? {});
        break;
      case 'error':
        if (msg.req != null && this.#quietReqs.delete(msg.req)) {
          console.debug('warbler: track_settings refused', msg.code, msg.message);
          return;
        }
        this.#emitError(msg.code, msg.message);
        break;
      case 'leave':
        this.#emitError('session_ended', `The server ended the session (${msg.reason})`);
        this.#end(msg.reason);
        return;
      case 'publish_answer': // handled by the request that sent the offer
      case 'pong':
        return;
      default:
        console.debug('warbler: ignoring message', msg.type);
        return;
    }
    this.#changed();
  }

  #onClose({ code }) {
    if (this.#ended) return;
    if (this.joined) this.#emitError('disconnected', `Lost the connection to the server (WebSocket close ${code})`);
    this.#end('disconnected');
  }

  /** Replaces the active speakers (`[{sid, level}]`, loudest first) and emits 'speakers'. */
  #setSpeakers(list) {
    const seen = new Set();
    const speakers = [];
    const levels = new Map();
    for (const s of Array.isArray(list) ? list : []) {
      if (typeof s?.sid !== 'string' || seen.has(s.sid)) continue;
      seen.add(s.sid);
      speakers.push(s.sid);
      levels.set(s.sid, Number.isFinite(s.level) ? s.level : null);
    }
    this.speakers = speakers;
    this.speakerLevels = levels;
    this.dispatchEvent(new CustomEvent('speakers', { detail: { speakers: [...speakers], levels: Object.fromEntries(levels) } }));
  }

  // ---- publisher connection ----

  #ensurePublisher() {
    if (!this.pub) this.pub = this.#newPeerConnection('publisher');
    return this.pub;
  }

  /** Creates the reliable, ordered `chat` data channel on the publisher connection. */
  #openChat() {
    const pc = this.#ensurePublisher();
    this.chatChannel = pc.createDataChannel('chat');
    this.dispatchEvent(new CustomEvent('chatchannel', { detail: this.chatChannel }));
  }

  /** The first publish was refused for lack of the publish grant: chat needs no such grant, so
   *  start over with a publisher connection that carries only the data channel. */
  #retryChatOnly() {
    for (const l of this.local.values()) l.track.stop();
    this.local.clear();
    this.publishing = false;
    this.pub?.close();
    this.pub = null;
    this.chatChannel = null;
    this.#pendingCandidates.publisher = [];
    this.#openChat();
    this.#negotiatePublisher();
  }

  #addLocal(source, track, stream) {
    const pc = this.#ensurePublisher();
    const init = { direction: 'sendonly', streams: [stream] };
    let transceiver;
    let rids = null;
    if (source === 'camera') {
      // Simulcast, with temporal layers where the browser offers them; plain simulcast where it
      // refuses them; a single layer as the last resort.
      const temporal = supportsScalabilityMode(TEMPORAL_MODE);
      const attempts = [
        ...(temporal ? [SIMULCAST.map((e) => ({ ...e, scalabilityMode: TEMPORAL_MODE }))] : []),
        SIMULCAST.map((e) => ({ ...e })),
      ];
      for (const sendEncodings of attempts) {
        try {
          transceiver = pc.addTransceiver(track, { ...init, sendEncodings });
          rids = sendEncodings.map((e) => e.rid);
          break;
        } catch (e) {
          console.warn('warbler: simulcast encodings refused', JSON.stringify(sendEncodings), e.name, e.message);
        }
      }
    }
    transceiver ??= pc.addTransceiver(track, init);
    this.local.set(source, { source, track, stream, transceiver, trackId: null, sid: null, muted: false, rids });
    this.#changed();
  }

  /** `layers` from the server: stop encoding the simulcast layers nobody needs, restart the ones
   *  someone needs again (read-modify-write of the sender's parameters, one change at a time). */
  #applyLayers(trackSid, active) {
    const l = [...this.local.values()].find((x) => x.sid === trackSid);
    if (!l) return;
    l.layersRequested = { ...active };
    l.layerMessages = (l.layerMessages ?? 0) + 1;
    this.#layerChain = this.#layerChain.then(async () => {
      if (this.#ended || this.local.get(l.source) !== l) return;
      const sender = l.transceiver.sender;
      const params = sender.getParameters();
      let changed = false;
      for (const enc of params.encodings ?? []) {
        if (enc.rid == null || !(enc.rid in l.layersRequested)) continue;
        const want = Boolean(l.layersRequested[enc.rid]);
        if ((enc.active !== false) !== want) {
          enc.active = want;
          changed = true;
        }
      }
      if (changed) await sender.setParameters(params);
      l.layersApplied = Object.fromEntries((sender.getParameters().encodings ?? []).filter((e) => e.rid != null).map((e) => [e.rid, e.active !== false]));
      this.#changed();
    }).catch((e) => this.#emitError('client', `Cannot change the simulcast layers: ${e.name}: ${e.message}`));
  }

  async #startLocalMedia() {
    const md = navigator.mediaDevices;
    if (!md?.getUserMedia) {
      this.#emitError('media', 'Camera and microphone need a secure page (https:// or http://localhost); joined receive-only');
      return;
    }
    let tracks = [];
    try {
      tracks = (await md.getUserMedia({ audio: true, video: VIDEO_CONSTRAINTS })).getTracks();
    } catch (both) {
      // Try each device alone, so that a missing camera still lets the microphone work.
      const failed = [];
      for (const [what, constraints] of [['microphone', { audio: true }], ['camera', { video: VIDEO_CONSTRAINTS }]]) {
        try {
          tracks.push(...(await md.getUserMedia(constraints)).getTracks());
        } catch (e) {
          failed.push(`${what} (${e.name}: ${e.message})`);
        }
      }
      this.#emitError('media', tracks.length
        ? `Unavailable: ${failed.join(', ')}; publishing the rest`
        : `Camera and microphone unavailable (${both.name}: ${both.message}); joined receive-only`);
    }
    if (this.#ended) {
      tracks.forEach((t) => t.stop());
      return;
    }
    const stream = new MediaStream(tracks);
    for (const track of stream.getAudioTracks()) this.#addLocal('microphone', track, stream);
    for (const track of stream.getVideoTracks()) this.#addLocal('camera', track, stream);
  }

  /** (Re)offers on the publisher connection; offers are serialized. */
  #negotiatePublisher() {
    this.#pubChain = this.#pubChain.then(async () => {
      const pc = this.pub;
      if (!pc || this.#ended) return;
      try {
        await pc.setLocalDescription(await pc.createOffer());
        const sdp = pc.localDescription.sdp;
        const msids = msidTrackByMid(sdp);
        const declared = [];
        for (const l of this.local.values()) {
          l.trackId = msids.get(l.transceiver.mid) ?? l.track.id;
          if (!l.sid) declared.push({ track_id: l.trackId, source: l.source });
        }
        const answer = await this.sig.request({ type: 'publish', sdp, tracks: declared });
        await pc.setRemoteDescription({ type: 'answer', sdp: answer.sdp });
        this.#flushCandidates('publisher'); // only once the server has accepted an offer
        for (const { track_id: trackId, sid } of answer.tracks ?? []) {
          for (const l of this.local.values()) {
            if (l.trackId !== trackId || l.sid === sid) continue;
            l.sid = sid;
            if (l.muted) this.sig.send({ type: 'mute', track: sid, muted: true });
          }
        }
      } catch (e) {
        this.#report(e, 'Publishing failed');
        if (pc.signalingState === 'have-local-offer') await pc.setLocalDescription({ type: 'rollback' }).catch(() => {});
        const firstOffer = !this.#signaled.publisher;
        if (e.code === 'forbidden' && firstOffer && this.#chatWanted && this.local.size && !this.#ended) this.#retryChatOnly();
      }
      this.#changed();
    });
    return this.#pubChain;
  }

  // ---- subscriber connection ----

  #onSubscriberOffer(msg) {
    this.#subChain = this.#subChain.then(async () => {
      if (this.#ended) return;
      if (!this.sub) this.sub = this.#newPeerConnection('subscriber');
      const pc = this.sub;
      try {
        this.#subTracks = msg.tracks ?? {};
        await pc.setRemoteDescription({ type: 'offer', sdp: msg.sdp });
        await pc.setLocalDescription(await pc.createAnswer());
        this.sig.send({ type: 'subscriber_answer', sdp: pc.localDescription.sdp });
        this.#flushCandidates('subscriber');
      } catch (e) {
        this.#report(e, 'Cannot accept the server offer');
      }
      this.#syncRemote();
    });
  }

  /** Rebuilds `remote` from the subscriber transceivers that currently receive a known track. */
  #syncRemote() {
    this.remote = new Map();
    for (const t of this.sub?.getTransceivers() ?? []) {
      const sid = this.#subTracks[t.mid];
      const receiving = t.currentDirection === 'recvonly' || t.currentDirection === 'sendrecv';
      if (sid && receiving) this.remote.set(sid, { track: t.receiver.track, mid: t.mid, kind: t.receiver.track.kind });
    }
    for (const sid of this.#sentSettings.keys()) if (!this.remote.has(sid)) this.#sentSettings.delete(sid);
    for (const sid of this.paused.keys()) if (!this.remote.has(sid)) this.paused.delete(sid);
    this.#flushTrackSettings();
    this.#changed();
  }

  /** Sends `track_settings` for every received video track whose settings changed since last sent
   *  (only for tracks the server already sends us: it knows no others). */
  #flushTrackSettings() {
    if (!this.sig?.open || this.#ended) return;
    for (const [sid, s] of this.#wantedSettings) {
      const r = this.remote.get(sid);
      if (!r || r.kind !== 'video') continue;
      const json = JSON.stringify(s);
      if (this.#sentSettings.get(sid) === json) continue;
      this.#sentSettings.set(sid, json);
      const req = this.#quietReq++;
      this.#quietReqs.add(req);
      if (this.#quietReqs.size > 256) this.#quietReqs.delete(this.#quietReqs.values().next().value);
      const msg = { type: 'track_settings', track: sid, visible: s.visible, pinned: s.pinned, req };
      if (s.width > 0 && s.height > 0) Object.assign(msg, { width: s.width, height: s.height });
      this.sig.send(msg);
    }
  }

  // ---- shared plumbing ----

  #newPeerConnection(target) {
    const pc = new RTCPeerConnection({ bundlePolicy: 'max-bundle' });
    pc.addEventListener('icecandidate', (e) => {
      const c = e.candidate ? e.candidate.toJSON() : null;
      if (c && !c.candidate) return; // an empty end-of-candidates marker: the null event follows
      if (this.#signaled[target]) this.sig.send({ type: 'candidate', target, candidate: c });
      else this.#pendingCandidates[target].push(c);
    });
    pc.addEventListener('connectionstatechange', () => this.#changed());
    if (target === 'subscriber') {
      pc.addEventListener('track', (e) => {
        if (e.streams[0]) this.#streamByMid.set(e.transceiver.mid, e.streams[0].id);
      });
    }
    return pc;
  }

  /** Candidates wait until the server knows the connection (first accepted offer / sent answer). */
  #flushCandidates(target) {
    this.#signaled[target] = true;
    for (const c of this.#pendingCandidates[target].splice(0)) {
      this.sig.send({ type: 'candidate', target, candidate: c });
    }
  }

  #participant(sid) {
    return sid === this.self?.sid ? this.self : this.participants.get(sid);
  }

  #ownerOf(trackSid) {
    for (const p of [this.self, ...this.participants.values()]) if (p?.tracks.has(trackSid)) return p.sid;
    return undefined;
  }

  #trackInfo(trackSid) {
    for (const p of [this.self, ...this.participants.values()]) if (p?.tracks.has(trackSid)) return p.tracks.get(trackSid);
    return undefined;
  }

  /** Reports a failure unless it is a server `error`, which already reached the UI as a message. */
  #report(e, context) {
    if (e instanceof SignalError && e.fromServer) return;
    const code = e instanceof SignalError ? e.code : 'client';
    this.#emitError(code, context ? `${context}: ${e.message}` : e.message);
  }

  #emitError(code, message) {
    this.dispatchEvent(new CustomEvent('error', { detail: { code, message } }));
  }

  #end(reason) {
    if (this.#ended) return;
    this.#ended = true;
    this.joined = false;
    if (this.speakers.length) this.#setSpeakers([]);
    clearInterval(this.#pingTimer);
    for (const l of this.local.values()) l.track.stop();
    this.pub?.close();
    this.sub?.close();
    this.sig?.close();
    this.dispatchEvent(new CustomEvent('ended', { detail: { reason } }));
    this.#changed();
  }

  /** Coalesces state changes into one 'change' event per task. */
  #changed() {
    if (this.#changeQueued) return;
    this.#changeQueued = true;
    queueMicrotask(() => {
      this.#changeQueued = false;
      this.dispatchEvent(new Event('change'));
    });
  }
}

/** Whether the browser says it can encode some video codec with `mode` (e.g. 'L1T3'). */
function supportsScalabilityMode(mode) {
  try {
    const codecs = RTCRtpSender.getCapabilities?.('video')?.codecs ?? [];
    return codecs.some((c) => c.scalabilityModes?.includes(mode));
  } catch {
    return false;
  }
}

function toParticipant(p) {
  return { sid: p.sid, identity: p.identity, name: p.name || p.identity, tracks: new Map((p.tracks ?? []).map((t) => [t.sid, t])) };
}
