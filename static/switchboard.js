// switchboard.js: browser client for the switchboard signaling relay.
//
// One `SwitchboardCall` is one side of a two-party call. It keeps a WebSocket
// to `/ws` open (reconnecting with exponential backoff and jitter), runs the
// "perfect negotiation" pattern on an RTCPeerConnection using the `polite`
// flag from the server's welcome, trickles ICE candidates, and reports its
// progress as `statechange` events. The API is documented in docs/client.md.
//
// No dependencies, no build step: import it as an ES module.

/** States reported by `statechange` (and mirrored by the call page's `#status[data-state]`). */
export const STATES = Object.freeze(['idle', 'waiting', 'connecting', 'connected', 'ended', 'failed']);

/** IDs the server accepts: 1 to 64 characters from A-Z a-z 0-9 _ . - */
export const ID_PATTERN = /^[A-Za-z0-9_.-]{1,64}$/;

/** Close code the server uses when the same user joined the same pair again elsewhere. */
export const CLOSE_REPLACED = 4001;
/** Close code the server uses while draining (service restart): reconnect promptly. */
export const CLOSE_SERVICE_RESTART = 1012;
/** Close code the server uses when it refuses a resume token: reconnect without it. */
export const CLOSE_RESUME_REFUSED = 4003;

const DEFAULT_RECONNECT = Object.freeze({
  initialDelayMs: 500,
  maxDelayMs: 15000,
  factor: 2,
  // After close 1012 (drain) we reconnect after a short random delay only,
  // so that many clients of one draining replica do not reconnect at once.
  drainJitterMs: 250,
  // If the peer is online but no connection comes up within this long,
  // restart ICE (then after twice as long, and so on).
  stallTimeoutMs: 8000,
  // A hang-up while the signaling socket is down ends the call here at once;
  // the socket keeps reconnecting this long to tell the peer (`bye`).
  byeTimeoutMs: 30000,
});

/** Type of the relayed frame that tells the peer whether our microphone and camera are on. */
export const MEDIA_STATE_TYPE = 'media-state';

/** Largest number of remote candidates kept while waiting for a matching description. */
const MAX_PENDING_CANDIDATES = 256;
// After `resync`, the polite side leaves the ICE restart to the impolite one
// for this long (both usually hear `resync` at once, and two restarts would
// collide); if no offer arrives meanwhile (only it heard `resync`), it
// restarts ICE itself.
const RESYNC_POLITE_WAIT_MS = 2000;

/**
 * Builds the WebSocket URL for `/ws` on the same host as `base` (default: the page),
 * using `wss:` for `https:` pages and `ws:` otherwise.
 *
 * @param {{userID: string, peerID: string, token?: string|null}} ids
 * @param {string|URL} [base]
 * @returns {string}
 */
export function signalingUrl({ userID, peerID, token }, base = globalThis.location?.href) {
  const url = new URL('/ws', base);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  url.searchParams.set('userID', userID);
  url.searchParams.set('peerID', peerID);
  if (token) url.searchParams.set('token', token);
  url.hash = '';
  return url.toString();
}

/**
 * Asks for camera and microphone, degrading gracefully: if both cannot be had,
 * it tries the microphone alone, then the camera alone. Never throws.
 *
 * @param {MediaStreamConstraints} [constraints]
 * @returns {Promise<{stream: MediaStream|null, problems: Array<{kind: string, name: string, message: string}>}>}
 *   `stream` holds whatever could be captured (null if nothing); `problems`
 *   lists what was missing or denied, for a readable message.
 */
export async function getLocalMedia(constraints = { audio: true, video: true }) {
  const problems = [];
  const md = globalThis.navigator?.mediaDevices;
  if (!md || typeof md.getUserMedia !== 'function') {
    problems.push({ kind: 'camera and microphone', name: 'NotSupportedError', message: 'this browser or page (not a secure context?) cannot capture media' });
    return { stream: null, problems };
  }
  const attempt = async (c) => {
    try {
      return { stream: await md.getUserMedia(c) };
    } catch (err) {
      return { error: err };
    }
  };
  const both = await attempt(constraints);
  if (both.stream) return { stream: both.stream, problems };
  // One of the two may still work on its own (e.g. no camera, or camera in use).
  const audio = constraints.audio ? await attempt({ audio: constraints.audio }) : {};
  const video = constraints.video ? await attempt({ video: constraints.video }) : {};
  if (constraints.audio && !audio.stream) problems.push(describeMediaError('microphone', audio.error ?? both.error));
  if (constraints.video && !video.stream) problems.push(describeMediaError('camera', video.error ?? both.error));
  const tracks = [...(audio.stream?.getTracks() ?? []), ...(video.stream?.getTracks() ?? [])];
  return { stream: tracks.length ? new MediaStream(tracks) : null, problems };
}

function describeMediaError(kind, err) {
  const name = err?.name ?? 'Error';
  let message;
  switch (name) {
    case 'NotAllowedError':
    case 'SecurityError':
      message = `access to the ${kind} was denied`;
      break;
    case 'NotFoundError':
    case 'OverconstrainedError':
      message = `no ${kind} was found`;
      break;
    case 'NotReadableError':
    case 'AbortError':
      message = `the ${kind} is in use or could not be started`;
      break;
    default:
      message = `the ${kind} is unavailable (${err?.message || name})`;
  }
  return { kind, name, message };
}

function randomId() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

/**
 * One side of a call between `userID` and `peerID`.
 *
 * Events (all `CustomEvent`s; read `event.detail`):
 * - `statechange`: `{state, reason}`; `state` is one of STATES, `reason` a human-readable sentence.
 * - `remotestream`: `{stream}`; the peer's MediaStream, or `null` when the peer left.
 * - `signal`: `{message}`; every JSON message received from the server (welcome, events, relayed frames).
 * - `servererror`: `{code, message}`; an `error` frame from the server.
 * - `signalingchange`: `{connected}`; the signaling socket got its welcome (true) or closed (false).
 * - `peermediastate`: `{audio, video}`; the peer turned its microphone or camera on or off.
 */
export class SwitchboardCall extends EventTarget {
  /**
   * @param {object} options
   * @param {string} options.userID  this user's ID
   * @param {string} options.peerID  the other user's ID
   * @param {string} [options.token] opaque token passed on to `/ws` as `token`
   * @param {MediaStream|null} [options.localStream] tracks to send; without it the call only receives
   * @param {string} [options.url]   WebSocket URL; default: `/ws` on the page's host (see signalingUrl)
   * @param {object} [options.reconnect] `{initialDelayMs, maxDelayMs, factor, drainJitterMs, stallTimeoutMs, byeTimeoutMs}`
   * @param {boolean} [options.stopTracksOnFinish] stop the tracks of `localStream` when the call
   *   finishes or is closed, which releases the camera and microphone (default: true)
   * @param {boolean} [options.resume] ask the server to resume the session across reconnects and
   *   to confirm what it relayed (default: true; a server that does not offer it is used as before)
   * @param {(...args: unknown[]) => void} [options.log] debug logger (default: none)
   */
  constructor(options) {
    super();
    const { userID, peerID, token = null, localStream = null, url, reconnect, stopTracksOnFinish = true, resume = true, log } = options ?? {};
    if (!ID_PATTERN.test(userID ?? '') || !ID_PATTERN.test(peerID ?? '')) {
      throw new TypeError('userID and peerID must be 1-64 characters from A-Z a-z 0-9 _ . -');
    }
    if (userID === peerID) throw new TypeError('userID and peerID must differ');
    this.userID = userID;
    this.peerID = peerID;
    this.token = token;
    this.url = url ?? signalingUrl({ userID, peerID, token });
    this.localStream = localStream;
    this.stopTracksOnFinish = stopTracksOnFinish !== false;
    /** Whether this client asks the server to resume its session (the `resume` option). */
    this.resume = resume !== false;
    this.reconnectOptions = { ...DEFAULT_RECONNECT, ...(reconnect ?? {}) };
    this._log = typeof log === 'function' ? log : () => {};

    /** Current state, one of STATES. */
    this.state = 'idle';
    /** Human-readable explanation of the current state. */
    this.reason = '';
    /** `polite` from the last welcome (null before the first one). */
    this.polite = null;
    /** Whether the server last said the peer is connected. */
    this.peerOnline = false;
    /** ICE servers from the server (welcome / ice-servers). */
    this.iceServers = [];
    /** Whether the signaling socket is up (from its welcome until it closes). */
    this.signalingConnected = false;
    /** `{audio, video}` from the peer's last `media-state` frame (null before the first). */
    this.peerMedia = null;
    /**
     * Why the call finished, once it has: `hangup` (this side hung up), `bye` (the peer hung
     * up), `replaced` (close 4001: opened again elsewhere) or `error` (could not be opened).
     */
    this.finishCause = null;

    this._ws = null;
    this._attempt = 0;
    this._reconnectTimer = null;
    this._stopped = false; // hang-up, bye received, replaced, or close(): never reconnect
    this._byePending = false; // hung up while the socket was down: reconnect only to send `bye`
    this._byeTimer = null;

    // Resume and confirmed sends (docs/client.md, "Resume and confirmed sends").
    this._welcomed = false; // the current socket has its welcome: frames go out at once
    this._resumeToken = null; // token of the latest welcome; null: the next connect starts afresh
    this._resumeSeq = null; // `seq` of the latest relayed frame (or welcome) received
    this._resuming = false; // the current socket's welcome offered resume (frames arrive as `relay`)
    this._serverResumes = false; // the last welcome offered resume: queue our own frames while down
    this._confirming = false; // ...and numbers our frames (`resume.next`): they wait for an `ack`
    this._nextNumber = 1; // number the server gives our next frame on this lineage
    // Frames not yet confirmed, oldest first: `{n, text}`, `n` null while not yet sent on
    // a confirming socket. Sent again after each welcome until an `ack` covers them.
    this._outbox = [];

    this._pc = null;
    this._lastRemoteOfferAt = 0; // when the peer's last offer arrived (Date.now())
    this._sid = null; // random id of our current RTCPeerConnection
    this._remoteSid = null; // sid of the remote RTCPeerConnection ours is negotiated with
    this._makingOffer = false;
    this._ignoreOffer = false;
    this._offerId = null; // id of our last offer; answers name the offer they answer
    this._pendingCandidates = []; // [{sid, candidate}]
    this._sentCandidates = []; // our candidates since our last offer (sent again with it)
    this._terminal = false; // state is `ended` or a final `failed`
    this._watchdogTimer = null;
    this._watchdogTries = 0;
    this._remoteStream = null;
    this._inbox = Promise.resolve(); // signaling messages are handled one at a time, in order
  }

  /** True once the call is over (`ended`, or `failed` for good): it will not reconnect. */
  get finished() {
    return this._terminal;
  }

  /** The current RTCPeerConnection, or null. */
  get peerConnection() {
    return this._pc;
  }

  /** The peer's MediaStream while the peer is present, or null. */
  get remoteStream() {
    return this.peerOnline ? this._remoteStream : null;
  }

  /** True while the signaling socket's session can be resumed (its welcome offered resume). */
  get resumable() {
    return this._resuming && this._resumeToken !== null;
  }

  /** How many messages given to `send` (or sent by the call itself) wait to be sent or confirmed. */
  get unconfirmed() {
    return this._outbox.length;
  }

  /** Opens the signaling connection. Call once. */
  start() {
    if (this._ws || this._stopped) return this;
    this._setState('connecting', 'Connecting to the signaling server…');
    this._connect();
    return this;
  }

  /**
   * Hangs up: tells the peer (`{"type":"bye"}`), closes the peer connection and
   * the WebSocket, stops the local tracks, and never reconnects. State becomes
   * `ended`. If the signaling socket is down at that moment, the call still
   * ends here at once; the socket keeps reconnecting (for up to
   * `reconnect.byeTimeoutMs`) only to deliver the `bye`, and `reason` says so
   * until it has (a second `statechange` with the same state reports the outcome).
   */
  hangup() {
    if (this._stopped) return;
    if (this._send({ type: 'bye' }, false)) {
      this._finish('ended', 'You hung up.', 'hangup');
      return;
    }
    const reconnecting = !!(this._ws || this._reconnectTimer);
    this._byePending = reconnecting;
    this._finish(
      'ended',
      reconnecting ? `You hung up. ${this.peerID} will be told once the connection to the server is back…` : 'You hung up.',
      'hangup',
    );
    if (reconnecting) this._byeTimer = setTimeout(() => this._byeDone(false), this.reconnectOptions.byeTimeoutMs);
  }

  /** True while a `bye` from a hang-up waits for the signaling socket to come back. */
  get byePending() {
    return this._byePending;
  }

  /**
   * Leaves without hanging up (for example on page unload): closes everything
   * without telling the peer, so the peer waits for us to come back. Stops the
   * local tracks unless `stopTracksOnFinish` is false.
   */
  close() {
    this._stopped = true;
    this._byePending = false;
    this._outbox = [];
    clearTimeout(this._byeTimer);
    clearTimeout(this._reconnectTimer);
    this._disarmWatchdog();
    this._closePeerConnection();
    this._closeSocket(1000, 'client closed');
    this._setSignalingConnected(false);
    if (this.stopTracksOnFinish) this._stopLocalTracks();
  }

  /**
   * Enables or disables the local microphone tracks (no renegotiation), and
   * tells the peer (`media-state`).
   */
  setMicrophoneEnabled(enabled) {
    for (const t of this.localStream?.getAudioTracks() ?? []) t.enabled = !!enabled;
    this._sendMediaState();
  }

  /**
   * Enables or disables the local camera tracks (a disabled camera sends black
   * frames), and tells the peer (`media-state`).
   */
  setCameraEnabled(enabled) {
    for (const t of this.localStream?.getVideoTracks() ?? []) t.enabled = !!enabled;
    this._sendMediaState();
  }

  /** `{audio, video}`: whether this side sends a live, enabled microphone / camera track. */
  get mediaState() {
    const on = (tracks) => tracks.some((t) => t.enabled && t.readyState === 'live');
    return {
      audio: on(this.localStream?.getAudioTracks() ?? []),
      video: on(this.localStream?.getVideoTracks() ?? []),
    };
  }

  /**
   * Sends any JSON object to the peer through the relay. While the socket is
   * down (or has no welcome yet) the message waits and goes out after the next
   * welcome; on a resumable session it is kept until the server confirms it
   * (`ack`) and sent again after a reconnect. Returns false only once the call
   * is finished or closed.
   */
  send(message) {
    if (this._stopped) return false;
    this._send(message, true);
    return true;
  }

  // ---------------------------------------------------------------- signaling socket

  _connect() {
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    if (this._stopped && !this._byePending) return;
    let ws;
    this._welcomed = false;
    this._resuming = false;
    this._confirming = false;
    try {
      ws = new WebSocket(this._connectUrl());
    } catch (err) {
      this._log('websocket constructor failed', err);
      this._finish('failed', `Cannot open the signaling connection: ${err.message}`, 'error');
      return;
    }
    this._ws = ws;
    ws.onmessage = (ev) => {
      if (ws !== this._ws) return;
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        this._log('ignoring a non-JSON frame', ev.data);
        return;
      }
      if (!msg || typeof msg !== 'object' || typeof msg.type !== 'string') return;
      if (this._resuming && msg.type === 'relay') {
        // A frame of the peer's, wrapped: keep its place, then handle `data` as if unwrapped.
        if (typeof msg.seq === 'string') this._resumeSeq = msg.seq;
        msg = msg.data;
        if (!msg || typeof msg !== 'object' || typeof msg.type !== 'string') return;
      } else if (msg.type === 'welcome') {
        this._onWelcome(ws, msg);
      } else if (msg.type === 'ack' && this._confirming) {
        this._onAck(msg.n);
        return;
      }
      this._log('<-', msg.type, msg.sid ?? '', msg.oid ?? '');
      this._emit('signal', { message: msg });
      this._enqueue(() => this._onMessage(msg));
    };
    ws.onclose = (ev) => {
      if (ws !== this._ws) return;
      this._ws = null;
      this._onSocketClosed(ev.code, ev.reason);
    };
    ws.onerror = () => this._log('websocket error');
  }

  _onSocketClosed(code, reason) {
    this._log('websocket closed', code, reason);
    this._welcomed = false;
    this._setSignalingConnected(false);
    if (this._stopped && !this._byePending) return;
    if (code === CLOSE_RESUME_REFUSED) {
      // The server would not resume this session: start a new one at once.
      this._log('resume refused; starting a new session');
      this._resumeToken = null;
      this._resumeSeq = null;
      this._reconnectTimer = setTimeout(() => this._connect(), Math.random() * this.reconnectOptions.drainJitterMs);
      return;
    }
    if (code === CLOSE_REPLACED) {
      if (this._byePending) {
        this._byeDone(false);
        return;
      }
      this._finish('failed', 'This call was opened again somewhere else (another tab or device), so this page stopped.', 'replaced');
      return;
    }
    let delay;
    const o = this.reconnectOptions;
    if (code === CLOSE_SERVICE_RESTART) {
      delay = Math.random() * o.drainJitterMs;
    } else {
      // Full jitter over an exponentially growing window: random in [cap/2, cap].
      const cap = Math.min(o.maxDelayMs, o.initialDelayMs * o.factor ** this._attempt);
      delay = cap / 2 + Math.random() * (cap / 2);
      this._attempt += 1;
    }
    if (!this._pcConnected()) {
      const why = code === CLOSE_SERVICE_RESTART ? 'The server is restarting' : 'Lost the signaling connection';
      this._setState('connecting', `${why}; reconnecting in ${(delay / 1000).toFixed(1)} s…`);
    }
    this._reconnectTimer = setTimeout(() => this._connect(), delay);
  }

  /**
   * Sends `message` if the socket has its welcome, and returns true. Otherwise
   * it returns false, after queueing the message for the next welcome if
   * `queue` is true, or if it is undefined and the server resumes sessions
   * (what the call itself sends is then delivered too; without resume it is
   * dropped, as the next welcome or `peer-joined` negotiates afresh).
   */
  _send(message, queue) {
    const ws = this._ws;
    const text = JSON.stringify(message);
    if (!ws || ws.readyState !== WebSocket.OPEN || !this._welcomed) {
      if (queue ?? this._serverResumes) {
        this._log('queued', message.type);
        this._outbox.push({ n: null, text });
      }
      return false;
    }
    this._log('->', message.type, message.sid ?? '', message.oid ?? '');
    this._transmit(ws, { n: null, text });
    return true;
  }

  /** Sends one frame on `ws`; on a confirming session it is numbered and kept until its `ack`. */
  _transmit(ws, frame) {
    if (this._confirming) {
      frame.n = this._nextNumber;
      this._nextNumber += 1;
      this._outbox.push(frame);
    }
    ws.send(frame.text);
  }

  /** The URL of the next connect: a new session (`resume=1`), or the resume of the last one. */
  _connectUrl() {
    if (!this.resume) return this.url;
    const url = new URL(this.url);
    if (this._resumeToken === null) {
      url.searchParams.set('resume', '1');
      return url.toString();
    }
    url.searchParams.set('resume', this._resumeToken);
    if (this._resumeSeq !== null) url.searchParams.set('after', this._resumeSeq);
    url.searchParams.set('next', String(this._outbox.find((f) => f.n !== null)?.n ?? this._nextNumber));
    return url.toString();
  }

  /**
   * A welcome arrived on `ws`: take its `resume` (token, place, numbering), then
   * send what waits: frames not yet confirmed, in order, then what was queued
   * while the socket was down. Runs before the welcome's other handling, so
   * that anything sent from then on goes out after them.
   */
  _onWelcome(ws, msg) {
    const resume = this.resume && msg.resume && typeof msg.resume === 'object' ? msg.resume : null;
    const wasResume = this._resumeToken !== null;
    this._welcomed = true;
    this._resuming = typeof resume?.token === 'string';
    this._serverResumes = this._resuming;
    this._confirming = this._resuming && Number.isSafeInteger(resume.next) && resume.next >= 1;
    this._resumeToken = this._resuming ? resume.token : null;
    this._resumeSeq = this._resuming && typeof resume.seq === 'string' ? resume.seq : null;
    if (this._confirming) this._nextNumber = resume.next;
    const waiting = this._outbox;
    this._outbox = [];
    if (waiting.length) this._log(wasResume && this._resuming ? 'resuming; sending again:' : 'sending queued:', waiting.length);
    for (const frame of waiting) this._transmit(ws, { n: null, text: frame.text });
  }

  /** `{"type":"ack","n":N}`: the server has dealt with our frames up to number N. */
  _onAck(n) {
    if (!Number.isSafeInteger(n)) return;
    let i = 0;
    while (i < this._outbox.length && this._outbox[i].n !== null && this._outbox[i].n <= n) i += 1;
    if (i) this._outbox.splice(0, i);
  }

  _closeSocket(code, reason) {
    const ws = this._ws;
    this._ws = null;
    if (ws && ws.readyState <= WebSocket.OPEN) {
      try {
        ws.close(code, reason);
      } catch {
        /* already closing */
      }
    }
  }

  _enqueue(task) {
    this._inbox = this._inbox.then(task).catch((err) => this._log('signaling step failed', err));
  }

  async _onMessage(msg) {
    if (this._stopped) {
      if (this._byePending) this._sendPendingBye(msg);
      return;
    }
    switch (msg.type) {
      case 'welcome':
        this._attempt = 0;
        this.polite = !!msg.polite;
        this._applyIceServers(msg.iceServers);
        this.peerOnline = !!msg.peerOnline;
        this._setSignalingConnected(true);
        if (this.peerOnline) this._sendMediaState();
        if (!this.peerOnline) {
          if (!this._pcConnected()) this._setState('waiting', `Waiting for ${this.peerID} to join…`);
        } else if (this._pcConnected()) {
          // Only our socket was away and media still flows: nothing to negotiate
          // (the peer sees peer-joined and restarts ICE).
          this._afterNegotiation(this._pc);
        } else {
          await this._kick('peer is online');
        }
        return;
      case 'peer-joined': {
        const wasOnline = this.peerOnline;
        this.peerOnline = true;
        this._sendMediaState();
        if (wasOnline && this.resumable && this._pcConnected() && this._pc.signalingState === 'stable') {
          // The peer's session moved (a reconnect we never saw it leave), and ours
          // resumes: nothing between us was lost, and media flows. A peer that
          // came back afresh (a reload) offers on its own.
          this._afterNegotiation(this._pc);
          return;
        }
        await this._kick('peer joined');
        return;
      }
      case 'peer-left':
        this.peerOnline = false;
        // Hide the peer's video, but keep the stream: if the peer only lost its
        // socket, the same connection carries on after an ICE restart.
        this._emit('remotestream', { stream: null });
        this._setState('waiting', `${this.peerID} left; waiting for them to come back…`);
        return;
      case 'resync':
        if (this.peerOnline) this._sendMediaState();
        if (!this._pc) return;
        if (!this.polite) {
          await this._restartIce('resync');
          return;
        }
        {
          const heard = Date.now();
          setTimeout(() => {
            if (this._stopped || !this._pc || this._lastRemoteOfferAt >= heard) return;
            this._restartIce('resync (the peer did not restart)');
          }, RESYNC_POLITE_WAIT_MS);
        }
        return;
      case 'ice-servers':
        this._applyIceServers(msg.iceServers);
        return;
      case 'error':
        this._log('server error', msg.code, msg.message);
        this._emit('servererror', { code: msg.code, message: msg.message });
        return;
      case 'bye':
        this._finish('ended', `${this.peerID} hung up.`, 'bye');
        return;
      case MEDIA_STATE_TYPE:
        if (typeof msg.audio !== 'boolean' || typeof msg.video !== 'boolean') return;
        this.peerMedia = { audio: msg.audio, video: msg.video };
        this._emit('peermediastate', { ...this.peerMedia });
        return;
      case 'offer':
      case 'answer':
        await this._onDescription(msg);
        return;
      case 'candidate':
        await this._onCandidate(msg);
        return;
      default:
        this._log('ignoring message type', msg.type);
    }
  }

  /**
   * After a hang-up while the socket was down: the socket is back. Sends the
   * `bye` as soon as the peer is there to receive it.
   */
  _sendPendingBye(msg) {
    if (msg.type === 'welcome') {
      this._attempt = 0;
      this.peerOnline = !!msg.peerOnline;
    } else if (msg.type === 'peer-joined') {
      this.peerOnline = true;
    } else if (msg.type === 'peer-left') {
      this.peerOnline = false;
    }
    if (this.peerOnline && this._send({ type: 'bye' }, false)) this._byeDone(true);
  }

  /** Ends the wait for a pending `bye`: sent (`told`) or given up. */
  _byeDone(told) {
    if (!this._byePending) return;
    this._byePending = false;
    clearTimeout(this._byeTimer);
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._closeSocket(1000, 'ended');
    this.reason = told ? 'You hung up.' : `You hung up, but ${this.peerID} could not be told: the server was out of reach.`;
    this._emit('statechange', { state: this.state, reason: this.reason });
  }

  _sendMediaState() {
    this._send({ type: MEDIA_STATE_TYPE, ...this.mediaState });
  }

  _applyIceServers(servers) {
    if (!Array.isArray(servers)) return;
    this.iceServers = servers;
    if (this._pc) {
      try {
        this._pc.setConfiguration({ ...this._pc.getConfiguration(), iceServers: servers });
      } catch (err) {
        this._log('setConfiguration failed', err);
      }
    }
  }

  // ---------------------------------------------------------------- peer connection

  /**
   * The peer just became reachable (welcome with peerOnline, or peer-joined).
   * Anything we sent before may have been lost, so make sure a fresh offer goes
   * out: negotiate on a new connection, or restart ICE on an existing one.
   */
  async _kick(why) {
    // While media flows, an ICE restart happens underneath a `connected` call.
    if (!this._pcConnected()) this._setState('connecting', `Connecting to ${this.peerID}…`);
    this._armWatchdog();
    if (!this._pc) {
      this._startOver(why);
      return;
    }
    await this._restartIce(why);
  }

  /**
   * Restarts ICE on the current connection. A connection that never finished
   * an offer/answer exchange is replaced by a fresh one instead: it has
   * nothing worth keeping, and rolling back its pending offer can leave
   * Chromium gathering no ICE candidates at all.
   */
  async _restartIce(why) {
    const pc = this._pc;
    if (!pc || pc.signalingState === 'closed') return;
    if (!pc.currentRemoteDescription) {
      if (pc.signalingState === 'have-remote-offer') return; // answering right now
      this._startOver(why);
      return;
    }
    this._log('restarting ICE:', why);
    pc.restartIce();
    // Our last offer may have gone nowhere (the peer was away): send it again,
    // with its candidates. The ICE restart follows once it is answered.
    if (pc.signalingState === 'have-local-offer' && !this._makingOffer) this._resendOffer(pc);
  }

  /** Replaces the connection by a fresh one and offers on it. */
  _startOver(why) {
    const pc = this._createPeerConnection(why);
    // Without local tracks no negotiationneeded fires; an offer still lets us receive.
    this._negotiate(pc);
    return pc;
  }

  _resendOffer(pc) {
    const offer = pc.localDescription;
    if (!offer || offer.type !== 'offer') return;
    this._log('sending our pending offer again');
    this._send({ type: 'offer', sdp: offer.sdp, sid: this._sid, to: this._remoteSid, oid: this._offerId });
    for (const candidate of this._sentCandidates) this._send({ type: 'candidate', candidate, sid: this._sid, to: this._remoteSid });
  }

  _createPeerConnection(why) {
    this._closePeerConnection();
    this._sentCandidates = [];
    this._log('new RTCPeerConnection:', why);
    const pc = new RTCPeerConnection({ iceServers: this.iceServers });
    this._pc = pc;
    this._sid = randomId();
    this._remoteSid = null;
    this._makingOffer = false;
    this._ignoreOffer = false;

    const stream = this.localStream;
    for (const track of stream?.getTracks() ?? []) pc.addTrack(track, stream);

    pc.onnegotiationneeded = () => this._negotiate(pc);
    pc.onicecandidate = ({ candidate }) => {
      if (pc !== this._pc || !candidate) return;
      const init = candidate.toJSON();
      this._sentCandidates.push(init);
      this._send({ type: 'candidate', candidate: init, sid: this._sid, to: this._remoteSid });
    };
    pc.ontrack = ({ track, streams }) => {
      if (pc !== this._pc) return;
      const remote = streams[0] ?? this._remoteStream ?? new MediaStream();
      if (!remote.getTracks().includes(track)) remote.addTrack(track);
      this._setRemoteStream(remote);
    };
    pc.onconnectionstatechange = () => {
      if (pc !== this._pc) return;
      this._onConnectionState(pc);
    };
    pc.onicegatheringstatechange = () => this._log('iceGatheringState', pc.iceGatheringState);
    pc.onsignalingstatechange = () => this._log('signalingState', pc.signalingState);
    pc.onicecandidateerror = (e) => this._log('icecandidateerror', e.errorCode, e.errorText, e.url);
    return pc;
  }

  async _negotiate(pc) {
    if (pc !== this._pc || this._stopped || this._makingOffer) return;
    if (!this.peerOnline && !this._remoteSid) return; // nobody to talk to yet; peer-joined will kick
    try {
      this._makingOffer = true;
      this._sentCandidates = [];
      await pc.setLocalDescription();
      if (pc !== this._pc) return;
      if (pc.localDescription?.type !== 'offer') return;
      this._offerId = randomId();
      this._send({ type: 'offer', sdp: pc.localDescription.sdp, sid: this._sid, to: this._remoteSid, oid: this._offerId });
    } catch (err) {
      this._log('creating an offer failed', err);
    } finally {
      if (pc === this._pc) this._makingOffer = false;
    }
  }

  async _onDescription(msg) {
    if (typeof msg.sdp !== 'string') return;
    const sid = typeof msg.sid === 'string' ? msg.sid : null;
    if (this._addressedElsewhere(msg)) return;
    let pc = this._pc;

    // A description from a different remote connection (the peer reloaded, or
    // is another client instance) cannot be applied to a connection negotiated
    // with the old one: start over with a fresh RTCPeerConnection.
    if (pc && this._remoteSid && sid !== this._remoteSid) {
      this._log('peer has a new connection', this._remoteSid, '->', sid);
      pc = this._createPeerConnection('peer has a new connection');
      if (msg.type === 'answer') {
        // The answer belongs to an offer from our old connection; the new one
        // makes its own offer, which the peer's connection will pick up.
        this._negotiate(pc);
        return;
      }
    }
    if (!pc) pc = this._createPeerConnection('received an offer');

    const description = { type: msg.type, sdp: msg.sdp };
    if (description.type === 'offer') this._lastRemoteOfferAt = Date.now();
    if (description.type === 'answer') {
      // An answer is only good for the offer it answers; an older offer's
      // answer (ours was rolled back or replaced meanwhile) would mismatch.
      if (pc.signalingState !== 'have-local-offer' || (msg.oid && msg.oid !== this._offerId)) {
        this._log('ignoring a stale answer in state', pc.signalingState);
        return;
      }
    }
    const offerCollision = description.type === 'offer' && (this._makingOffer || pc.signalingState !== 'stable');
    this._ignoreOffer = !this.polite && offerCollision;
    if (this._ignoreOffer) {
      this._log('ignoring a colliding offer (impolite side)');
      return;
    }
    if (pc.connectionState !== 'connected') this._setState('connecting', `Connecting to ${this.peerID}…`);
    if (offerCollision && !pc.currentRemoteDescription) {
      // Glare on a connection that never negotiated: take the peer's offer on
      // a fresh connection rather than rolling ours back (see _restartIce).
      this._log('glare: answering on a fresh connection');
      pc = this._createPeerConnection('glare on a new connection');
    }
    // Otherwise the polite side rolls back its own offer implicitly here.
    await pc.setRemoteDescription(description);
    if (pc !== this._pc) return;
    this._remoteSid = sid;
    await this._flushCandidates(pc);
    if (description.type === 'offer') {
      await pc.setLocalDescription();
      if (pc !== this._pc) return;
      this._send({ type: 'answer', sdp: pc.localDescription.sdp, sid: this._sid, to: sid, oid: msg.oid ?? null });
    }
    this._armWatchdog();
    this._afterNegotiation(pc);
  }

  /**
   * A renegotiation (e.g. an ICE restart after the peer's socket came back)
   * may complete while connectionState stays `connected`, so no
   * connectionstatechange fires: report `connected` here in that case.
   */
  _afterNegotiation(pc) {
    if (pc === this._pc && pc.signalingState === 'stable' && pc.connectionState === 'connected' && this.peerOnline) {
      if (this._remoteStream) this._emit('remotestream', { stream: this._remoteStream });
      this._setState('connected', `In a call with ${this.peerID}.`);
    }
  }

  /**
   * True if `msg` was meant for an earlier RTCPeerConnection of ours (its `to`
   * names another sid). Typical after a reload: the peer's old connection
   * restarts ICE towards the page that is gone; the new page's own offer
   * reaches the peer and replaces that old connection.
   */
  _addressedElsewhere(msg) {
    const to = typeof msg.to === 'string' ? msg.to : null;
    if (!to || to === this._sid) return false;
    this._log('ignoring a', msg.type, 'meant for an earlier connection of ours');
    return true;
  }

  async _onCandidate(msg) {
    if (!msg.candidate || typeof msg.candidate !== 'object') return;
    const sid = typeof msg.sid === 'string' ? msg.sid : null;
    const to = typeof msg.to === 'string' ? msg.to : null;
    if (to && to !== this._sid) return; // for an earlier connection of ours
    const pc = this._pc;
    if (!pc || !pc.remoteDescription || sid !== this._remoteSid) {
      // Arrived before the description it belongs to: keep it for later.
      this._pendingCandidates.push({ sid, candidate: msg.candidate });
      if (this._pendingCandidates.length > MAX_PENDING_CANDIDATES) this._pendingCandidates.shift();
      return;
    }
    await this._addCandidate(pc, msg.candidate);
  }

  async _flushCandidates(pc) {
    const keep = [];
    const ready = [];
    for (const item of this._pendingCandidates) {
      (item.sid === this._remoteSid ? ready : keep).push(item);
    }
    this._pendingCandidates = keep;
    for (const { candidate } of ready) await this._addCandidate(pc, candidate);
  }

  async _addCandidate(pc, candidate) {
    try {
      await pc.addIceCandidate(candidate);
    } catch (err) {
      if (!this._ignoreOffer) this._log('addIceCandidate failed', err);
    }
  }

  _onConnectionState(pc) {
    const s = pc.connectionState;
    this._log('connectionState', s);
    switch (s) {
      case 'connected':
        this._disarmWatchdog();
        // While the peer is away from signaling (peer-left) we keep showing `waiting`.
        if (!this.peerOnline) break;
        if (this._remoteStream) this._emit('remotestream', { stream: this._remoteStream });
        this._setState('connected', `In a call with ${this.peerID}.`);
        break;
      case 'connecting':
        if (this.state === 'failed') this._setState('connecting', `Reconnecting to ${this.peerID}…`);
        break;
      case 'disconnected':
        this._setState('connecting', `The connection to ${this.peerID} was interrupted; trying to recover…`);
        this._armWatchdog();
        break;
      case 'failed':
        this._setState('failed', `The connection to ${this.peerID} failed; retrying…`);
        this._enqueue(() => this._restartIce('connection failed'));
        this._armWatchdog();
        break;
      default:
        break;
    }
  }

  /**
   * Safety net: if the peer is online but the connection does not come up
   * within a while (a lost message, a wedged negotiation), restart ICE, and
   * later start over on a fresh connection. The delay doubles on each try, up
   * to the reconnect maximum.
   */
  _armWatchdog() {
    if (this._watchdogTimer || this._stopped) return;
    const o = this.reconnectOptions;
    const delay = Math.min(o.stallTimeoutMs * 2 ** this._watchdogTries, Math.max(o.maxDelayMs, o.stallTimeoutMs));
    this._watchdogTimer = setTimeout(() => {
      this._watchdogTimer = null;
      if (this._stopped || !this._pc || this._pcConnected() || !this.peerOnline) return;
      this._watchdogTries += 1;
      // First an ICE restart; if even that does not help, a fresh connection
      // (the peer follows, as it sees descriptions from a new connection).
      if (this._watchdogTries === 1) this._enqueue(() => this._restartIce('no connection yet (watchdog)'));
      else this._enqueue(async () => this._startOver('still no connection (watchdog)'));
      this._armWatchdog();
    }, delay * (0.8 + 0.4 * Math.random()));
  }

  _disarmWatchdog() {
    clearTimeout(this._watchdogTimer);
    this._watchdogTimer = null;
    this._watchdogTries = 0;
  }

  _pcConnected() {
    return this._pc?.connectionState === 'connected';
  }

  _setRemoteStream(stream) {
    this._remoteStream = stream;
    this._emit('remotestream', { stream });
  }

  _closePeerConnection() {
    const pc = this._pc;
    this._pc = null;
    this._sid = null;
    this._remoteSid = null;
    this._makingOffer = false;
    this._ignoreOffer = false;
    this._offerId = null;
    if (pc) {
      pc.onnegotiationneeded = pc.onicecandidate = pc.ontrack = pc.onconnectionstatechange = null;
      pc.close();
    }
    if (this._remoteStream) this._setRemoteStream(null);
  }

  // ---------------------------------------------------------------- state

  _finish(state, reason, cause) {
    if (this._terminal) return;
    this._stopped = true;
    // Final before anything is reported: `statechange` listeners see `finished`.
    this._terminal = true;
    this.finishCause = cause;
    this._disarmWatchdog();
    this._closePeerConnection();
    if (!this._byePending) {
      clearTimeout(this._reconnectTimer);
      this._reconnectTimer = null;
      this._closeSocket(1000, state);
      this._setSignalingConnected(false);
    }
    if (this.stopTracksOnFinish) this._stopLocalTracks();
    this.state = state;
    this.reason = reason;
    this._emit('statechange', { state, reason });
  }

  _stopLocalTracks() {
    for (const t of this.localStream?.getTracks() ?? []) t.stop();
  }

  _setSignalingConnected(connected) {
    if (this.signalingConnected === connected) return;
    this.signalingConnected = connected;
    this._emit('signalingchange', { connected });
  }

  _setState(state, reason) {
    if (this._terminal) return; // `ended` and a final `failed` stay
    if (this.state === state && this.reason === reason) return;
    this.state = state;
    this.reason = reason;
    this._emit('statechange', { state, reason });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
