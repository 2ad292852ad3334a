// Adaptive stream: watches each remote video tile's displayed size (ResizeObserver, in device
// pixels), whether it is on screen (IntersectionObserver, page visibility) and whether it is
// pinned, and tells the session (→ `track_settings`), debounced, so the server never sends a
// layer larger than the tile or a track nobody sees.

const DEBOUNCE_MS = 250;

export class AdaptiveStream {
  #session; // () => the current Session or null
  #tiles = new Map(); // tile element -> {trackSid, width, height, intersecting, pinned, timer}
  #resize;
  #intersect;

  constructor(session) {
    this.#session = session;
    this.#resize = new ResizeObserver((entries) => {
      for (const e of entries) {
        const st = this.#tiles.get(e.target);
        if (!st) continue;
        const box = e.devicePixelContentBoxSize?.[0];
        const dpr = window.devicePixelRatio || 1;
        const width = box ? box.inlineSize : e.contentRect.width * dpr;
        const height = box ? box.blockSize : e.contentRect.height * dpr;
        st.sizeKnown = true;
        if (width > 0 && height > 0) Object.assign(st, { width: Math.round(width), height: Math.round(height), shown: true });
        else st.shown = false; // display:none or collapsed: nothing to show (the last size is kept)
        this.#schedule(e.target);
      }
    });
    this.#intersect = new IntersectionObserver((entries) => {
      for (const e of entries) {
        const st = this.#tiles.get(e.target);
        if (!st) continue;
        st.intersecting = e.isIntersecting;
        st.intersectKnown = true;
        this.#schedule(e.target);
      }
    }, { threshold: 0 });
    document.addEventListener('visibilitychange', () => {
      for (const tile of this.#tiles.keys()) this.#schedule(tile);
    });
  }

  /** Starts (or keeps) watching `tile`, which shows received track `trackSid`. */
  observe(tile, trackSid, { pinned = false } = {}) {
    let st = this.#tiles.get(tile);
    if (!st) {
      st = { trackSid: null, width: 0, height: 0, shown: false, intersecting: false, pinned: false, timer: null,
        sizeKnown: false, intersectKnown: false }; // nothing is sent before both observers have reported
      this.#tiles.set(tile, st);
      try {
        this.#resize.observe(tile, { box: 'device-pixel-content-box' });
      } catch {
        this.#resize.observe(tile); // browsers without device-pixel boxes: CSS px × devicePixelRatio
      }
      this.#intersect.observe(tile);
    }
    if (st.trackSid !== trackSid) {
      if (st.trackSid) this.#session()?.clearTrackSettings(st.trackSid);
      st.trackSid = trackSid;
      this.#schedule(tile, 0);
    }
    if (st.pinned !== pinned) {
      st.pinned = pinned;
      this.#schedule(tile, 0);
    }
  }

  /** Stops watching `tile` (it left the grid or shows no remote track any more). */
  unobserve(tile) {
    const st = this.#tiles.get(tile);
    if (!st) return;
    clearTimeout(st.timer);
    this.#resize.unobserve(tile);
    this.#intersect.unobserve(tile);
    this.#tiles.delete(tile);
    if (st.trackSid) this.#session()?.clearTrackSettings(st.trackSid);
  }

  /** What was last handed to the session for each watched track (for the test hook). */
  settings() {
    return [...this.#tiles.values()].filter((st) => st.trackSid && st.sizeKnown && st.intersectKnown).map((st) => ({ trackSid: st.trackSid, ...this.#current(st) }));
  }

  #current(st) {
    const visible = st.shown && st.intersecting && document.visibilityState !== 'hidden';
    return { width: st.width, height: st.height, visible, pinned: st.pinned };
  }

  #schedule(tile, delay = DEBOUNCE_MS) {
    const st = this.#tiles.get(tile);
    if (!st) return;
    clearTimeout(st.timer);
    st.timer = setTimeout(() => {
      st.timer = null;
      if (st.trackSid && st.sizeKnown && st.intersectKnown) this.#session()?.setTrackSettings(st.trackSid, this.#current(st));
    }, delay);
  }
}
