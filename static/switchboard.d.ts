// Type declarations for switchboard.js, the browser client of the switchboard
// signaling relay. The API is documented in docs/client.md.

/** States reported by `statechange` (and mirrored by the call page's `#status[data-state]`). */
export type CallState = 'idle' | 'waiting' | 'connecting' | 'connected' | 'ended' | 'failed';

/** Why a call finished: this side hung up, the peer did, close 4001, or it could not be opened. */
export type FinishCause = 'hangup' | 'bye' | 'replaced' | 'error';

export declare const STATES: readonly CallState[];

/** IDs the server accepts: 1 to 64 characters from A-Z a-z 0-9 _ . - */
export declare const ID_PATTERN: RegExp;

/** Close code the server uses when the same user joined the same pair again elsewhere. */
export declare const CLOSE_REPLACED: 4001;
/** Close code the server uses while draining (service restart): reconnect promptly. */
export declare const CLOSE_SERVICE_RESTART: 1012;
/** Close code the server uses when it refuses a resume token: the client starts a new session. */
export declare const CLOSE_RESUME_REFUSED: 4003;
/** `type` of the relayed frame that tells the peer whether microphone and camera are on. */
export declare const MEDIA_STATE_TYPE: 'media-state';

export interface CallIds {
  userID: string;
  peerID: string;
  token?: string | null;
}

/** Builds the `/ws` URL on the host of `base` (default: the page), `wss:` for `https:` pages. */
export declare function signalingUrl(ids: CallIds, base?: string | URL): string;

export interface MediaProblem {
  /** `microphone`, `camera`, or `camera and microphone` */
  kind: string;
  /** The DOMException name, e.g. `NotAllowedError`, `NotFoundError`, `NotReadableError`. */
  name: string;
  /** A sentence for people. */
  message: string;
}

/**
 * Asks for camera and microphone, falling back to either one alone. Never rejects.
 * `stream` holds what could be captured (null if nothing); `problems` lists what was missing or denied.
 */
export declare function getLocalMedia(
  constraints?: MediaStreamConstraints,
): Promise<{ stream: MediaStream | null; problems: MediaProblem[] }>;

export interface ReconnectOptions {
  initialDelayMs: number;
  maxDelayMs: number;
  factor: number;
  drainJitterMs: number;
  stallTimeoutMs: number;
  byeTimeoutMs: number;
}

export interface SwitchboardCallOptions {
  userID: string;
  peerID: string;
  /** Passed on to `/ws` as the `token` query parameter (signed links). */
  token?: string | null;
  /** Tracks to send; without it the call only receives. */
  localStream?: MediaStream | null;
  /** WebSocket URL; default `signalingUrl({userID, peerID, token})`. */
  url?: string;
  reconnect?: Partial<ReconnectOptions>;
  /** Stop the tracks of `localStream` when the call finishes or is closed (default true). */
  stopTracksOnFinish?: boolean;
  /**
   * Ask the server to resume the session across reconnects and to confirm what it relayed
   * (default true). A server that does not offer it is used as without.
   */
  resume?: boolean;
  log?: (...args: unknown[]) => void;
}

/** Whether a side sends a live, enabled microphone (`audio`) and camera (`video`) track. */
export interface MediaState {
  audio: boolean;
  video: boolean;
}

/** Any JSON object; the relay refuses frames whose `type` is a server event type. */
export type RelayMessage = { type?: string } & Record<string, unknown>;

export interface SwitchboardCallEventMap {
  statechange: CustomEvent<{ state: CallState; reason: string }>;
  remotestream: CustomEvent<{ stream: MediaStream | null }>;
  signal: CustomEvent<{ message: { type: string } & Record<string, unknown> }>;
  servererror: CustomEvent<{ code: string; message: string }>;
  signalingchange: CustomEvent<{ connected: boolean }>;
  peermediastate: CustomEvent<MediaState>;
}

/** One side of a call between `userID` and `peerID`. */
export declare class SwitchboardCall extends EventTarget {
  constructor(options: SwitchboardCallOptions);

  readonly userID: string;
  readonly peerID: string;
  readonly token: string | null;
  readonly url: string;
  readonly localStream: MediaStream | null;
  readonly stopTracksOnFinish: boolean;
  /** The `resume` option. */
  readonly resume: boolean;
  readonly reconnectOptions: Readonly<ReconnectOptions>;

  /** Current state. */
  readonly state: CallState;
  /** Human-readable explanation of the current state. */
  readonly reason: string;
  /** `polite` from the last welcome (null before the first one). */
  readonly polite: boolean | null;
  /** Whether the server last said the peer is connected. */
  readonly peerOnline: boolean;
  /** ICE servers from the server (welcome / ice-servers). */
  readonly iceServers: RTCIceServer[];
  /** Whether the signaling socket is up (from its welcome until it closes). */
  readonly signalingConnected: boolean;
  /** The peer's last `media-state` (null before the first). */
  readonly peerMedia: MediaState | null;
  /** Why the call finished; null while it is not finished. */
  readonly finishCause: FinishCause | null;
  /** True once the call is over (`ended`, or `failed` for good): it will not reconnect. */
  readonly finished: boolean;
  /** True while a `bye` from a hang-up waits for the signaling socket to come back. */
  readonly byePending: boolean;
  /** What this side sends: live, enabled microphone / camera tracks. */
  readonly mediaState: MediaState;
  /** The current RTCPeerConnection, or null. */
  readonly peerConnection: RTCPeerConnection | null;
  /** The peer's MediaStream while the peer is present, or null. */
  readonly remoteStream: MediaStream | null;
  /** True while the signaling socket's session can be resumed (its welcome offered resume). */
  readonly resumable: boolean;
  /** How many sent messages wait to be sent or to be confirmed by the server. */
  readonly unconfirmed: number;

  /** Opens the signaling connection. Call once. */
  start(): this;
  /** Sends `bye`, closes everything, stops the local tracks; state `ended`. */
  hangup(): void;
  /** Leaves without telling the peer (e.g. on page unload). */
  close(): void;
  setMicrophoneEnabled(enabled: boolean): void;
  setCameraEnabled(enabled: boolean): void;
  /**
   * Sends any JSON object to the peer through the relay. While the socket is down it queues
   * the message (sent after the next welcome, and again after a reconnect until the server
   * confirms it). False only once the call is finished or closed.
   */
  send(message: RelayMessage): boolean;

  addEventListener<K extends keyof SwitchboardCallEventMap>(
    type: K,
    listener: (this: SwitchboardCall, ev: SwitchboardCallEventMap[K]) => unknown,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
  removeEventListener<K extends keyof SwitchboardCallEventMap>(
    type: K,
    listener: (this: SwitchboardCall, ev: SwitchboardCallEventMap[K]) => unknown,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions,
  ): void;
}
