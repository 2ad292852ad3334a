// App: the page's UI — join form and tokens, video grid, chat panel, participant list, controls,
// device picker, error banner — driving one Session at a time; also exposes the `window.warbler`
// test hook.
import { Session } from './session.js';
import { AdaptiveStream } from './adaptive.js';
import { QualityMonitor } from './quality.js';
import { ChatClient } from './chat.js';
import { ChatPanel } from './chat-panel.js';

const $ = (id) => document.getElementById(id);
const ui = {
  form: $('join-form'), room: $('room-input'), name: $('name-input'), tokenField: $('token-field'),
  token: $('token-input'), join: $('join-button'), roomView: $('room-view'), controls: $('controls'),
  grid: $('grid'), participants: $('participants'), audio: $('audio-sinks'), title: $('room-title'),
  conn: $('conn-state'), pubState: $('pub-state'), subState: $('sub-state'),
  mic: $('mic-button'), camera: $('camera-button'), screen: $('screen-button'), leave: $('leave-button'),
  cameraSelect: $('camera-select'), micSelect: $('mic-select'), publish: $('publish-input'),
  banner: $('banner'), bannerList: $('banner-list'), bannerClose: $('banner-close'),
};
const chatEls = {
  panel: $('chat-panel'), body: $('chat-body'), toggle: $('chat-toggle'), button: $('chat-button'),
  buttonBadge: $('chat-button-badge'), unread: $('chat-unread'), mentions: $('chat-mentions'), status: $('chat-status'),
  searchForm: $('chat-search-form'), search: $('chat-search'), results: $('chat-results'), resultsTitle: $('chat-results-title'),
  resultsClose: $('chat-results-close'), resultsList: $('chat-results-list'), scroll: $('chat-scroll'), older: $('chat-older'),
  list: $('chat-list'), typing: $('chat-typing'), notice: $('chat-notice'), errors: $('chat-errors'), form: $('chat-form'),
  input: $('chat-input'), counter: $('chat-counter'),
};

let session = null;
const errors = []; // everything shown in the banner: {code, message, at}
const tabSuffix = tabId(); // identity = name + this, one per tab (kept across reloads of the tab)
const adaptive = new AdaptiveStream(() => session);
const quality = new QualityMonitor(() => session, ui.grid);
let pinnedKey = null; // the tile the user pinned: shown large, its track gets bandwidth first
let chat = null; // ChatClient of the current (or last) room: kept across rejoins of that room
// Small screens start with the chat collapsed (the unread count shows on its header and button).
const chatPanel = new ChatPanel(chatEls, { collapsed: matchMedia('(max-width: 700px)').matches });

// ---- join / leave ----

const params = new URLSearchParams(location.search);
ui.room.value = params.get('room') ?? '';
ui.name.value = params.get('name') ?? '';
if (params.get('publish') === '0') ui.publish.checked = false; // subscribe-only (tests, viewers)
if (!navigator.mediaDevices?.getDisplayMedia) ui.screen.disabled = true;

ui.form.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  if (session) return;
  const room = ui.room.value.trim();
  const name = ui.name.value.trim();
  ui.join.disabled = true;
  try {
    let token = ui.tokenField.hidden ? '' : ui.token.value.trim();
    if (!token) {
      token = await fetchDevToken(room, identityFor(name), name);
      if (!token) {
        ui.tokenField.hidden = false; // production mode: the user brings a token
        ui.token.focus();
        return;
      }
    }
    await enterRoom(room, token, ui.publish.checked);
  } catch (e) {
    showError(e.code ?? 'client', e.message);
  } finally {
    ui.join.disabled = false;
  }
});

async function fetchDevToken(room, identity, name) {
  const q = new URLSearchParams({ room, identity, name });
  const res = await fetch(`/dev/token?${q}`);
  if (res.status === 404) return null;
  if (!res.ok) throw Object.assign(new Error(`Token request failed: HTTP ${res.status} ${await res.text()}`), { code: 'token' });
  return (await res.json()).token;
}

function tabId() {
  try {
    let id = sessionStorage.getItem('warbler.tab');
    if (!id) sessionStorage.setItem('warbler.tab', id = Math.random().toString(36).slice(2, 8));
    return id;
  } catch {
    return Math.random().toString(36).slice(2, 8);
  }
}

function identityFor(name) {
  const slug = name.toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-|-$/g, '').slice(0, 40) || 'guest';
  return `${slug}-${tabSuffix}`;
}

async function enterRoom(room, token, publish = true) {
  const s = new Session();
  session = s;
  s.addEventListener('change', () => session === s && render());
  s.addEventListener('error', (e) => showError(e.detail.code, e.detail.message));
  s.addEventListener('ended', () => {
    if (session !== s) return;
    session = null;
    chat?.detach();
    showJoinForm();
  });
  if (chat?.room !== room) {
    chat?.dispose();
    chat = new ChatClient(room);
  }
  chatPanel.bind(chat);
  s.addEventListener('chatchannel', (e) => session === s && chat.attach(e.detail));
  s.addEventListener('presence', (e) => session === s && chat.addSystem(`${e.detail.name} ${e.detail.kind === 'joined' ? 'joined' : 'left'}`));
  ui.title.textContent = `room ${room}`;
  showRoomView();
  const wsUrl = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
  try {
    quality.start();
    await s.join({ wsUrl, token, publish });
  } catch {
    return; // already reported through the session's 'error' event; 'ended' restored the form
  }
  history.replaceState(null, '', `?room=${encodeURIComponent(room)}${publish ? '' : '&publish=0'}`);
  await refreshDevices();
}

ui.leave.addEventListener('click', () => session?.leave());
window.addEventListener('pagehide', () => session?.leave());

function showRoomView() {
  ui.form.hidden = true;
  ui.roomView.hidden = ui.controls.hidden = ui.conn.hidden = false;
}

function showJoinForm() {
  quality.stop();
  pinnedKey = null;
  ui.form.hidden = false;
  ui.roomView.hidden = ui.controls.hidden = ui.conn.hidden = true;
  ui.title.textContent = '';
  for (const tile of ui.grid.children) adaptive.unobserve(tile);
  ui.grid.replaceChildren();
  ui.participants.replaceChildren();
  ui.audio.replaceChildren();
}

// ---- controls ----

ui.mic.addEventListener('click', () => toggleMute('microphone'));
ui.camera.addEventListener('click', () => toggleMute('camera'));
ui.screen.addEventListener('click', () =>
  session?.local.has('screen_share') ? session.stopScreenShare() : session?.startScreenShare());

function toggleMute(source) {
  const l = session?.local.get(source);
  if (l) session.setMuted(source, !l.muted);
}

for (const [select, kind] of [[ui.cameraSelect, 'videoinput'], [ui.micSelect, 'audioinput']]) {
  select.addEventListener('change', () => session?.switchDevice(kind, select.value));
}
navigator.mediaDevices?.addEventListener?.('devicechange', () => refreshDevices());

async function refreshDevices() {
  if (!session) return;
  const devices = await navigator.mediaDevices.enumerateDevices();
  for (const [select, kind, source] of [[ui.cameraSelect, 'videoinput', 'camera'], [ui.micSelect, 'audioinput', 'microphone']]) {
    const current = session?.local.get(source)?.track.getSettings().deviceId;
    select.replaceChildren(
      ...devices.filter((d) => d.kind === kind).map((d, i) => {
        const opt = new Option(d.label || `${kind} ${i + 1}`, d.deviceId);
        opt.selected = d.deviceId === current;
        return opt;
      }),
    );
  }
}

// ---- banner ----

function showError(code, message) {
  errors.push({ code, message, at: new Date().toISOString() });
  const li = document.createElement('li');
  const c = document.createElement('code');
  c.textContent = code;
  li.append(c, ` ${message}`);
  ui.bannerList.append(li);
  ui.banner.hidden = false;
}

ui.bannerClose.addEventListener('click', () => {
  ui.bannerList.replaceChildren();
  ui.banner.hidden = true;
});

// ---- rendering ----

function render() {
  const s = session;
  if (!s) return;
  for (const [el, state, label] of [[ui.pubState, s.pub?.connectionState, 'publisher'], [ui.subState, s.sub?.connectionState, 'subscriber']]) {
    el.dataset.state = state ?? 'new';
    el.textContent = `${label}: ${state ?? 'new'}`;
  }
  const mic = s.local.get('microphone');
  const cam = s.local.get('camera');
  const sharing = s.local.has('screen_share');
  setToggle(ui.mic, mic?.muted, mic ? (mic.muted ? 'Unmute mic' : 'Mute mic') : 'No mic');
  setToggle(ui.camera, cam?.muted, cam ? (cam.muted ? 'Camera on' : 'Camera off') : 'No camera');
  ui.mic.disabled = !mic;
  ui.camera.disabled = !cam;
  setToggle(ui.screen, sharing, sharing ? 'Stop sharing' : 'Share screen');

  // Tiles, keyed "<participant sid>:<camera|screen_share>"; our own preview comes first.
  const tiles = [];
  const me = s.self;
  if (me || s.local.size) {
    tiles.push({ key: 'local:camera', participant: me?.sid ?? 'local', source: 'camera', name: `${me?.name ?? 'You'} (you)`,
      track: cam?.track, off: !cam || cam.muted, mirrored: true, local: true });
    const screen = s.local.get('screen_share');
    if (screen) tiles.push({ key: 'local:screen_share', participant: me?.sid ?? 'local', source: 'screen_share',
      name: `${me?.name ?? 'You'} (your screen)`, track: screen.track, local: true });
  }
  for (const p of s.participants.values()) {
    const tracks = [...p.tracks.values()];
    const camera = tracks.find((t) => t.kind === 'video' && t.source !== 'screen_share');
    tiles.push({ key: `${p.sid}:camera`, participant: p.sid, source: 'camera', name: p.name,
      track: camera && s.remote.get(camera.sid)?.track, off: !camera || camera.muted, trackSid: camera?.sid });
    for (const t of tracks.filter((t) => t.kind === 'video' && t.source === 'screen_share')) {
      tiles.push({ key: `${p.sid}:${t.sid}`, participant: p.sid, source: 'screen_share', name: `${p.name} (screen)`,
        track: s.remote.get(t.sid)?.track, trackSid: t.sid });
    }
  }
  if (pinnedKey && !tiles.some((t) => t.key === pinnedKey && !t.local)) pinnedKey = null;
  // Active speakers (server's `active_speakers`, loudest first): every tile of a speaker is
  // highlighted, the loudest one's tiles more so. Our own tiles count when the server hears us.
  const speaking = new Set(s.speakers);
  const dominant = s.speakers[0];
  for (const t of tiles) {
    t.pinned = t.key === pinnedKey;
    t.speaking = speaking.has(t.participant);
    t.dominant = t.speaking && t.participant === dominant;
  }
  tiles.sort((a, b) => Number(b.pinned) - Number(a.pinned)); // the pinned tile first (stable otherwise)
  reconcile(ui.grid, tiles, (t) => t.key, createTile, updateTile, (tile) => adaptive.unobserve(tile));

  // Remote audio: one <audio> per received audio track.
  const audio = [...s.remote].filter(([, r]) => r.kind === 'audio').map(([sid, r]) => ({ sid, track: r.track }));
  reconcile(ui.audio, audio, (a) => a.sid, () => Object.assign(document.createElement('audio'), { autoplay: true }),
    (el, a) => attach(el, a.track));

  // Participant list with mute and speaking indicators.
  const people = [];
  if (me) people.push({ sid: me.sid, name: `${me.name} (you)`, micMuted: !mic || mic.muted, camOff: !cam || cam.muted,
    speaking: speaking.has(me.sid), dominant: me.sid === dominant });
  for (const p of s.participants.values()) {
    const tracks = [...p.tracks.values()];
    const a = tracks.find((t) => t.kind === 'audio');
    const v = tracks.find((t) => t.kind === 'video' && t.source !== 'screen_share');
    people.push({ sid: p.sid, name: p.name, micMuted: !a || a.muted, camOff: !v || v.muted,
      sharing: tracks.some((t) => t.source === 'screen_share'), speaking: speaking.has(p.sid), dominant: p.sid === dominant });
  }
  reconcile(ui.participants, people, (p) => p.sid, () => document.createElement('li'), (li, p) => {
    li.dataset.sid = p.sid;
    li.dataset.micMuted = p.micMuted;
    li.dataset.camOff = p.camOff;
    li.classList.toggle('speaking', p.speaking);
    li.classList.toggle('dominant', p.speaking && p.dominant);
    li.innerHTML = '<span class="name"></span><span class="flags"><span class="mic"></span> <span class="cam"></span></span>';
    const nameEl = li.querySelector('.name');
    if (p.speaking) nameEl.insertAdjacentHTML('afterbegin', '<span class="speaking-icon" title="speaking">🔊</span> ');
    nameEl.append(p.name + (p.sharing ? ' · sharing' : ''));
    const micEl = li.querySelector('.mic');
    micEl.textContent = p.micMuted ? 'mic off' : 'mic';
    micEl.classList.toggle('off', p.micMuted);
    const camEl = li.querySelector('.cam');
    camEl.textContent = p.camOff ? 'cam off' : 'cam';
    camEl.classList.toggle('off', p.camOff);
  });
}

function setToggle(button, pressed, text) {
  button.setAttribute('aria-pressed', String(Boolean(pressed)));
  button.textContent = text;
}

function createTile(t) {
  const tile = document.createElement('div');
  tile.className = 'tile';
  tile.innerHTML = '<video autoplay playsinline muted></video><div class="avatar"></div><div class="label"></div>';
  if (!t.local) {
    // Remote tiles: received resolution and quality, why the server paused the video, pin button.
    tile.insertAdjacentHTML('beforeend', '<div class="paused-overlay" hidden></div>' +
      '<div class="quality" hidden><span class="res"></span> <span class="grade"></span></div>' +
      '<button type="button" class="pin" aria-pressed="false" title="Pin: show large, prefer its quality">Pin</button>');
    tile.querySelector('.pin').addEventListener('click', () => {
      pinnedKey = pinnedKey === tile.dataset.key ? null : tile.dataset.key;
      render();
    });
  }
  return tile;
}

function updateTile(tile, t) {
  Object.assign(tile.dataset, { key: t.key, participant: t.participant, source: t.source });
  if (t.trackSid) tile.dataset.track = t.trackSid;
  else delete tile.dataset.track;
  tile.classList.toggle('mirrored', Boolean(t.mirrored));
  tile.classList.toggle('pinned', Boolean(t.pinned));
  tile.classList.toggle('speaking', Boolean(t.speaking));
  tile.classList.toggle('dominant', Boolean(t.dominant));
  if (!t.local) {
    const pin = tile.querySelector('.pin');
    pin.setAttribute('aria-pressed', String(Boolean(t.pinned)));
    pin.textContent = t.pinned ? 'Unpin' : 'Pin';
    const reason = t.trackSid ? session?.paused.get(t.trackSid) : undefined;
    const overlay = tile.querySelector('.paused-overlay');
    overlay.hidden = !reason || Boolean(t.off);
    overlay.textContent = reason ? `paused: ${reason}` : '';
    if (reason) tile.dataset.paused = reason;
    else delete tile.dataset.paused;
    if (t.track && t.trackSid) adaptive.observe(tile, t.trackSid, { pinned: Boolean(t.pinned) });
    else adaptive.unobserve(tile);
  }
  tile.querySelector('.label').textContent = t.name;
  const avatar = tile.querySelector('.avatar');
  avatar.textContent = (t.name.trim()[0] ?? '?').toUpperCase();
  avatar.hidden = Boolean(t.track) && !t.off;
  attach(tile.querySelector('video'), t.track);
}

/** Points a media element at `track`, touching srcObject only when the track changes. */
function attach(el, track) {
  if (el.warblerTrack === track) return;
  el.warblerTrack = track;
  el.srcObject = track ? new MediaStream([track]) : null;
  if (track) el.play?.().catch(() => {}); // autoplay may need a gesture; the join click usually counts
}

/** Makes `parent`'s children match `items` (by key), creating, updating and removing elements. */
function reconcile(parent, items, keyOf, create, update, removed = () => {}) {
  const existing = new Map([...parent.children].map((el) => [el.dataset.rkey, el]));
  let prev = null;
  for (const item of items) {
    const key = keyOf(item);
    let el = existing.get(key);
    if (el) existing.delete(key);
    else {
      el = create(item);
      el.dataset.rkey = key;
    }
    update(el, item);
    const want = prev ? prev.nextSibling : parent.firstChild;
    if (want !== el) parent.insertBefore(el, want);
    prev = el;
  }
  for (const el of existing.values()) {
    removed(el);
    if (el.srcObject !== undefined) el.srcObject = null;
    el.querySelector?.('video')?.remove();
    el.remove();
  }
}

// ---- test hook ----

window.warbler = {
  state: () => ({
    ...(session?.snapshot() ?? { joined: false, participantId: null, participants: [], publisherState: 'closed', subscriberState: 'closed',
      speakers: [], speakerLevels: {} }),
    errors: errors.map((e) => ({ ...e })),
  }),
  inboundStats: async () => (session ? session.inboundStats() : []),
  outboundStats: async () => (session ? session.outboundStats() : []),
  /** Per remote video tile: what the quality indicator shows and the adaptive-stream settings. */
  tiles: () => {
    const settings = new Map(adaptive.settings().map((x) => [x.trackSid, x]));
    const info = new Map(quality.info().map((x) => [x.trackSid, x]));
    return [...ui.grid.querySelectorAll('.tile[data-track]')].map((tile) => ({
      key: tile.dataset.key, trackSid: tile.dataset.track, participant: tile.dataset.participant, source: tile.dataset.source,
      pinned: tile.classList.contains('pinned'), paused: tile.dataset.paused ?? null,
      speaking: tile.classList.contains('speaking'), dominant: tile.classList.contains('dominant'),
      pausedOverlay: tile.querySelector('.paused-overlay:not([hidden])')?.textContent ?? null,
      quality: info.get(tile.dataset.track) ?? null, settings: settings.get(tile.dataset.track) ?? null,
      cssWidth: tile.clientWidth, cssHeight: tile.clientHeight,
    }));
  },
  get session() { return session; },
  /** The chat panel's model: what it holds and shows, and the actions of its controls. */
  chat: {
    state: () => chat && {
      room: chat.room, identity: chat.identity, name: chat.name, ready: chat.ready, channelState: chat.channelState,
      canChat: chat.canChat, admin: chat.admin, limits: { ...chat.limits }, latestSeq: chat.latestSeq, rev: chat.rev,
      lastRead: chat.lastRead, unread: chat.unread, unreadMentions: chat.unreadMentions, hasOlder: chat.hasOlder,
      pending: chat.pending.map((p) => ({ id: p.id, text: p.text, status: p.status, error: p.error, attempts: p.attempts })),
      typing: chat.typingNames(), receipts: Object.fromEntries(chat.receipts), errors: chat.errors.map((e) => ({ ...e })),
      search: chat.search && structuredClone(chat.search), stats: structuredClone(chat.stats), collapsed: chatPanel.collapsed,
    },
    /** Stored messages (by seq) then pending ones; `receivedAt`/`sentAt`/`ackedAt` are this page's clock. */
    messages: () => (chat ? chat.list().filter((m) => !m.system).map((m) => structuredClone(m)) : []),
    systemLines: () => (chat ? chat.systemLines.map((m) => m.text) : []),
    send: (text) => chat?.send(text) ?? null,
    edit: (seq, text) => chat.edit(seq, text),
    delete: (seq) => chat.delete(seq),
    react: (seq, emoji, on) => chat.react(seq, emoji, on),
    search: async (q) => structuredClone(await chat.runSearch(q)),
    loadOlder: () => chat.loadOlder(),
    setCollapsed: (collapsed) => chatPanel.setCollapsed(collapsed),
    /** Test hook: ignore the next `n` acks, as if they were lost with the connection. */
    dropAcks: (n = 1) => chat.dropAcks(n),
  },
};
