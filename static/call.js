// Call page: wires the DOM of call.html to a SwitchboardCall.
import { SwitchboardCall, getLocalMedia, ID_PATTERN } from '/switchboard.js';

const $ = (id) => document.getElementById(id);
const statusEl = $('status');
const signalHint = $('signal_hint');
const localVideo = $('local_video');
const remoteVideo = $('remote_video');
const remotePlaceholder = $('remote_placeholder');
const peerCameraOff = $('peer_camera_off');
const peerMuted = $('peer_muted');
const invite = $('invite');
const copyInvite = $('copy_invite');
const inviteLink = $('invite_link');
const unmuteRemote = $('unmute_remote');
const warning = $('media_warning');
const muteBtn = $('mute');
const cameraBtn = $('camera');
const hangupBtn = $('hangup');
const rejoinBtn = $('rejoin');
const takeBackBtn = $('take_back');

const params = new URLSearchParams(location.search);
const userID = params.get('userID') ?? '';
const peerID = params.get('peerID') ?? '';
const token = params.get('token');
let call = null;
let hasAudio = false;
let hasVideo = false;
/** Media problems worth a Rejoin once the user fixed them (denied, missing, busy). */
let mediaFixable = false;

/** Brings every part of the page in line with the call's state. */
function render() {
  const state = call?.state ?? statusEl.dataset.state;
  const over = !!call?.finished;
  const replaced = call?.finishCause === 'replaced';
  hangupBtn.disabled = !call || over;
  muteBtn.disabled = over || !hasAudio;
  cameraBtn.disabled = over || !hasVideo;
  rejoinBtn.hidden = !(over ? !replaced : mediaFixable);
  takeBackBtn.hidden = !replaced;
  // The socket is down but media still flows: the call goes on, signaling comes back.
  signalHint.hidden = !call || over || state !== 'connected' || call.signalingConnected;
  // A link for the other person, while we wait for them. A signed link's token is this
  // user's only, so the page cannot make the peer's: then the inviter sends theirs.
  invite.hidden = !call || over || state !== 'waiting' || !!token;

  let placeholder = 'No video from the other side yet.';
  if (replaced) placeholder = 'This call went on in another tab or device.';
  else if (over) placeholder = 'The call has ended.';
  else if (state === 'waiting') placeholder = `Waiting for ${peerID} to join.`;
  remotePlaceholder.textContent = placeholder;
  // What the peer told us about its microphone and camera (`media-state`), while it is here.
  const media = !over && call?.peerOnline ? call.peerMedia : null;
  const cameraOff = !!media && !media.video;
  peerMuted.hidden = !media || media.audio;
  peerCameraOff.hidden = !cameraOff;
  remotePlaceholder.hidden = !!remoteVideo.srcObject || cameraOff;
}

function setStatus(state, text) {
  statusEl.dataset.state = state;
  statusEl.textContent = text;
  render();
}

function showWarning(text) {
  warning.textContent = text;
  warning.hidden = !text;
}

async function playRemote() {
  try {
    await remoteVideo.play();
    unmuteRemote.hidden = true;
  } catch (err) {
    if (err?.name !== 'NotAllowedError') return; // e.g. interrupted by a new srcObject
    // The browser blocks autoplay with sound until the user interacts:
    // play muted now and offer a button to turn the sound on.
    remoteVideo.muted = true;
    unmuteRemote.hidden = false;
    remoteVideo.play().catch(() => {});
  }
}

function showRemote(stream) {
  if (remoteVideo.srcObject !== stream) remoteVideo.srcObject = stream;
  if (stream) playRemote();
  render();
}

unmuteRemote.addEventListener('click', () => {
  remoteVideo.muted = false;
  unmuteRemote.hidden = true;
  remoteVideo.play().catch(() => {});
});

// Both start over with a fresh page: it asks for camera and microphone again, and its new
// session replaces the one in another tab (which then offers to take the call back).
rejoinBtn.addEventListener('click', () => location.reload());
takeBackBtn.addEventListener('click', () => location.reload());

/** The link the peer opens: this one with the two names swapped. */
function peerLink() {
  const url = new URL('/call', location.href);
  url.searchParams.set('userID', peerID);
  url.searchParams.set('peerID', userID);
  return url.toString();
}

copyInvite.addEventListener('click', async () => {
  try {
    await navigator.clipboard.writeText(inviteLink.value);
  } catch {
    // No clipboard (e.g. plain http on another host): select the link for a manual copy.
    inviteLink.select();
    document.execCommand?.('copy');
  }
  copyInvite.textContent = 'Copied';
  setTimeout(() => (copyInvite.textContent = `Copy link for ${peerID}`), 1500);
});

/** What to do about each kind of media problem, for the notice. */
function remedy(problems) {
  const names = new Set(problems.map((p) => p.name));
  if (names.has('NotSupportedError')) return 'The browser allows the camera only on https:// pages (or on localhost).';
  const steps = [];
  if (names.has('NotAllowedError') || names.has('SecurityError')) {
    steps.push("allow the camera and microphone for this site in the browser's site settings (the icon left of the address)");
  }
  if (names.has('NotFoundError') || names.has('OverconstrainedError')) steps.push('connect a camera or microphone');
  if (names.has('NotReadableError') || names.has('AbortError')) steps.push('close other apps or tabs that use the camera');
  return steps.length ? `To fix it, ${steps.join(', or ')}, then press Rejoin.` : '';
}

function invalidLink() {
  statusEl.dataset.state = 'failed';
  statusEl.textContent =
    'This link is not valid: it needs two different names (userID and peerID) of 1–64 letters, digits, "_", "." or "-". ';
  const home = document.createElement('a');
  home.href = '/';
  home.textContent = 'Start again from the home page';
  statusEl.append(home, '.');
  render();
}

async function main() {
  if (!ID_PATTERN.test(userID) || !ID_PATTERN.test(peerID) || userID === peerID) {
    invalidLink();
    return;
  }
  document.title = `${userID} ↔ ${peerID} · switchboard`;
  $('local_label').textContent = `You (${userID})`;
  copyInvite.textContent = `Copy link for ${peerID}`;
  inviteLink.value = peerLink();
  setStatus('connecting', 'Asking for camera and microphone…');

  const { stream, problems } = await getLocalMedia();
  if (problems.length) {
    const what = problems.map((p) => p.message).join('; ');
    const then = stream ? 'You join with what is available.' : 'You join anyway and can still see and hear the other side.';
    const fix = remedy(problems);
    mediaFixable = fix.endsWith('press Rejoin.');
    showWarning(`${what[0].toUpperCase()}${what.slice(1)}. ${then} ${fix}`.trim());
  }
  localVideo.srcObject = stream;
  hasAudio = !!stream?.getAudioTracks().length;
  hasVideo = !!stream?.getVideoTracks().length;
  if (!hasVideo) localVideo.classList.add('off');

  call = new SwitchboardCall({
    userID,
    peerID,
    token,
    localStream: stream,
    log: params.has('debug') ? (...a) => console.debug('[switchboard]', ...a) : undefined,
  });
  window.switchboardCall = call; // handy in the developer console
  call.addEventListener('statechange', (e) => setStatus(e.detail.state, e.detail.reason));
  call.addEventListener('remotestream', (e) => showRemote(e.detail.stream));
  call.addEventListener('signalingchange', render);
  call.addEventListener('peermediastate', render);
  call.addEventListener('servererror', (e) => console.warn('switchboard server error', e.detail));

  let micOn = true;
  muteBtn.addEventListener('click', () => {
    micOn = !micOn;
    call.setMicrophoneEnabled(micOn);
    muteBtn.setAttribute('aria-pressed', String(!micOn));
    muteBtn.textContent = micOn ? 'Mute microphone' : 'Unmute microphone';
  });
  let camOn = true;
  cameraBtn.addEventListener('click', () => {
    camOn = !camOn;
    call.setCameraEnabled(camOn);
    cameraBtn.setAttribute('aria-pressed', String(!camOn));
    cameraBtn.textContent = camOn ? 'Turn camera off' : 'Turn camera on';
    localVideo.classList.toggle('off', !camOn);
  });
  hangupBtn.addEventListener('click', () => call.hangup());
  // Leaving or reloading is not a hang-up: the peer waits for us to come back.
  window.addEventListener('pagehide', () => call.close());

  render();
  call.start();
}

main().catch((err) => {
  console.error(err);
  setStatus('failed', `Something went wrong: ${err.message}`);
});
