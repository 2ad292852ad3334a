// Signaling: the WebSocket to /ws — JSON messages, request ids, replies and server events.

export class SignalError extends Error {
  constructor(code, message, fromServer = false) {
    super(`${code}: ${message}`);
    this.code = code;
    this.fromServer = fromServer; // an `error` message from the server (already shown as such)
  }
}

export class Signaling extends EventTarget {
  #ws = null;
  #nextReq = 1;
  #pending = new Map(); // req -> {resolve, reject}

  /** Opens the socket; resolves once it is open. */
  connect(url) {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url);
      this.#ws = ws;
      ws.onopen = () => resolve();
      ws.onerror = () => reject(new SignalError('network', `cannot connect to ${url}`));
      ws.onmessage = (ev) => this.#onMessage(ev.data);
      ws.onclose = (ev) => {
        const err = new SignalError('closed', `signaling connection closed (${ev.code}${ev.reason ? ' ' + ev.reason : ''})`);
        for (const p of this.#pending.values()) p.reject(err);
        this.#pending.clear();
        this.dispatchEvent(new CustomEvent('close', { detail: { code: ev.code, reason: ev.reason } }));
      };
    });
  }

  get open() {
    return this.#ws?.readyState === WebSocket.OPEN;
  }

  /** Sends a message without waiting for a reply. */
  send(msg) {
    if (this.open) this.#ws.send(JSON.stringify(msg));
  }

  /** Sends a message with a fresh `req` and resolves with the reply carrying the same `req`
   *  (rejects with a SignalError if the server answers with an `error`). */
  request(msg, timeoutMs = 15000) {
    const req = this.#nextReq++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(req);
        reject(new SignalError('timeout', `no reply to ${msg.type} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#pending.set(req, {
        resolve: (m) => { clearTimeout(timer); resolve(m); },
        reject: (e) => { clearTimeout(timer); reject(e); },
      });
      if (!this.open) {
        this.#pending.get(req).reject(new SignalError('closed', 'signaling connection is not open'));
        this.#pending.delete(req);
        return;
      }
      this.#ws.send(JSON.stringify({ ...msg, req }));
    });
  }

  close() {
    this.#ws?.close();
  }

  #onMessage(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      console.warn('warbler: unparsable message from server', text);
      return;
    }
    const waiter = msg.req != null ? this.#pending.get(msg.req) : undefined;
    if (waiter) {
      this.#pending.delete(msg.req);
      if (msg.type === 'error') waiter.reject(new SignalError(msg.code, msg.message, true));
      else waiter.resolve(msg);
    }
    // Every message (replies included) is also an event, so errors always reach the banner.
    this.dispatchEvent(new CustomEvent('message', { detail: msg }));
  }
}
