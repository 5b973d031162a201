// Uses the API of static/switchboard.js as a TypeScript page would, against
// static/switchboard.d.ts. `npm test` runs `tsc --noEmit` on it (types.test.mjs).
// Each `@ts-expect-error` line must be an error: tsc fails if one is not, so
// these also prove the declarations are not `any`.
import {
  CLOSE_REPLACED,
  CLOSE_RESUME_REFUSED,
  ID_PATTERN,
  MEDIA_STATE_TYPE,
  STATES,
  SwitchboardCall,
  getLocalMedia,
  signalingUrl,
  type CallState,
  type FinishCause,
  type MediaState,
} from '/switchboard.js';

export async function startCall(video: HTMLVideoElement, remote: HTMLVideoElement): Promise<SwitchboardCall> {
  const { stream, problems } = await getLocalMedia({ audio: true, video: { width: 640 } });
  for (const p of problems) console.warn(p.kind, p.name, p.message.toUpperCase());
  video.srcObject = stream;

  const url: string = signalingUrl({ userID: 'alice', peerID: 'bob', token: null }, 'https://call.example.com/call');
  const call = new SwitchboardCall({
    userID: 'alice',
    peerID: 'bob',
    localStream: stream,
    url,
    reconnect: { maxDelayMs: 5000 },
    stopTracksOnFinish: true,
    resume: true,
    log: (...args) => console.debug(...args),
  });
  call.addEventListener('statechange', (e) => {
    const state: CallState = e.detail.state;
    const why: string = e.detail.reason;
    const cause: FinishCause | null = call.finishCause;
    console.log(state, why, cause, call.finished, STATES.includes(state));
  });
  call.addEventListener('remotestream', (e) => {
    remote.srcObject = e.detail.stream;
  });
  call.addEventListener('peermediastate', (e) => {
    const media: MediaState = e.detail;
    console.log(media.audio ? 'peer unmuted' : 'peer muted', media.video);
  });
  call.addEventListener('signalingchange', (e) => console.log(e.detail.connected === call.signalingConnected));
  call.addEventListener('servererror', (e) => console.warn(e.detail.code, e.detail.message));
  call.addEventListener('signal', (e) => console.log(e.detail.message.type));
  call.setMicrophoneEnabled(false);
  call.setCameraEnabled(true);
  const sent: boolean = call.send({ type: 'chat', text: 'hi' });
  const pc: RTCPeerConnection | null = call.peerConnection;
  console.log(sent, pc, call.remoteStream, call.peerMedia?.video, call.mediaState.audio, call.byePending);
  const waiting: number = call.unconfirmed;
  console.log(waiting, call.resumable, call.resume, CLOSE_RESUME_REFUSED === 4003);
  console.log(ID_PATTERN.test('alice'), CLOSE_REPLACED === 4001, MEDIA_STATE_TYPE);
  return call.start();
}

export function mistakes(call: SwitchboardCall): void {
  // @ts-expect-error: userID and peerID are required
  new SwitchboardCall({ userID: 'alice' });
  // @ts-expect-error: not a state
  const s: CallState = 'ringing';
  // @ts-expect-error: the state is read-only
  call.state = 'ended';
  // @ts-expect-error: statechange carries {state, reason}, not a stream
  call.addEventListener('statechange', (e) => e.detail.stream);
  // @ts-expect-error: setMicrophoneEnabled takes a boolean
  call.setMicrophoneEnabled('off');
  // @ts-expect-error: the close code is the literal 4001
  const code: 1000 = CLOSE_REPLACED;
  // @ts-expect-error: resume is a boolean
  new SwitchboardCall({ userID: 'alice', peerID: 'bob', resume: 'yes' });
  console.log(s, code);
}
