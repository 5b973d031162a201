// Call page: wires the DOM of call.html to a SwitchboardCall.
import { SwitchboardCall, getLocalMedia, ID_PATTERN } from '/switchboard.js';

const $ = (id) => document.getElementById(id);
const statusEl = $('status');
const localVideo = $('local_video');
const remoteVideo = $('remote_video');
const remotePlaceholder = $('remote_placeholder');
const unmuteRemote = $('unmute_remote');
const warning = $('media_warning');
const muteBtn = $('mute');
const cameraBtn = $('camera');
const hangupBtn = $('hangup');
const rejoinBtn = $('rejoin');

function setStatus(state, text) {
  statusEl.dataset.state = state;
  statusEl.textContent = text;
  const over = state === 'ended' || !!call?.finished;
  hangupBtn.disabled = over;
  rejoinBtn.hidden = !over;
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
  remotePlaceholder.hidden = !!stream;
  if (stream) playRemote();
}

unmuteRemote.addEventListener('click', () => {
  remoteVideo.muted = false;
  unmuteRemote.hidden = true;
  remoteVideo.play().catch(() => {});
});

const params = new URLSearchParams(location.search);
const userID = params.get('userID') ?? '';
const peerID = params.get('peerID') ?? '';
const token = params.get('token');
let call = null;

rejoinBtn.addEventListener('click', () => location.reload());

async function main() {
  if (!ID_PATTERN.test(userID) || !ID_PATTERN.test(peerID) || userID === peerID) {
    setStatus('failed', 'This link is not valid: it needs two different names (userID and peerID) of 1–64 letters, digits, "_", "." or "-". Start again from the home page.');
    hangupBtn.disabled = true;
    return;
  }
  document.title = `${userID} ↔ ${peerID} · switchboard`;
  $('local_label').textContent = `You (${userID})`;
  setStatus('connecting', 'Asking for camera and microphone…');

  const { stream, problems } = await getLocalMedia();
  if (problems.length) {
    const what = problems.map((p) => p.message).join('; ');
    const then = stream ? 'You join with what is available.' : 'You join anyway and can still see and hear the other side.';
    showWarning(`${what[0].toUpperCase()}${what.slice(1)}. ${then}`);
  }
  localVideo.srcObject = stream;
  const hasAudio = !!stream?.getAudioTracks().length;
  const hasVideo = !!stream?.getVideoTracks().length;
  muteBtn.disabled = !hasAudio;
  cameraBtn.disabled = !hasVideo;
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

  call.start();
}

main().catch((err) => {
  console.error(err);
  setStatus('failed', `Something went wrong: ${err.message}`);
});
