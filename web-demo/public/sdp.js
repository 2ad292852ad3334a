// SDP helpers: the few facts the client reads out of session descriptions.

/** Maps each m-section's mid to the msid track id it carries (`a=msid:<stream> <track>`). */
export function msidTrackByMid(sdp) {
  const result = new Map();
  for (const section of sdp.split(/\r?\nm=/).slice(1)) {
    const mid = /^a=mid:(\S+)/m.exec(section)?.[1];
    const track = /^a=msid:\S+ (\S+)/m.exec(section)?.[1];
    if (mid != null && track != null) result.set(mid, track);
  }
  return result;
}
