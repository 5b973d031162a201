// Debian chromium driven by playwright-core, plus helpers for the call page.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { CHROMIUM } from './paths.mjs';

/**
 * A received frame as the app sees it. With resume on (the server's default),
 * switchboard.js asks `resume=1`, and the peer's frames come wrapped in `relay`
 * events (`{"type":"relay","seq":…,"data":<frame>}`): those give the frame
 * they carry. Returns its `type` ('?' for none, or not JSON) and its text.
 * @param {string} payload
 */
export function unwrapped(payload) {
  try {
    const frame = JSON.parse(payload);
    if (frame?.type === 'relay' && frame.data !== undefined) {
      return { type: frame.data?.type ?? '?', text: JSON.stringify(frame.data) };
    }
    return { type: frame?.type ?? '?', text: payload };
  } catch {
    return { type: '?', text: payload };
  }
}

/** The flags every browser test uses (fake camera/microphone, no prompts, quiet). */
export const CHROMIUM_FLAGS = [
  '--use-fake-device-for-media-stream',
  '--use-fake-ui-for-media-stream',
  '--no-sandbox',
  '--headless',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
  '--disable-features=WebRtcHideLocalIpsWithMdns',
];

/**
 * Launches chromium with a fresh, private user-data dir.
 * @param {object} [opts]
 * @param {boolean} [opts.fakeDevices] false: leave out --use-fake-device-for-media-stream, so the
 *   browser has no camera or microphone at all (this machine has none)
 * @param {boolean} [opts.denyMedia] true: the fake devices exist, but every permission prompt is
 *   denied (as when the user blocked the camera for the site): getUserMedia fails with NotAllowedError
 * @returns {Promise<{context: import('playwright-core').BrowserContext, close: () => Promise<void>}>}
 */
export async function launchChromium({ viewport = { width: 960, height: 640 }, fakeDevices = true, denyMedia = false } = {}) {
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)`);
  }
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'switchboard-e2e-chromium-'));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      ...CHROMIUM_FLAGS.filter((f) =>
        !(f === '--use-fake-device-for-media-stream' && !fakeDevices) && !(f === '--use-fake-ui-for-media-stream' && denyMedia)),
      ...(denyMedia ? ['--deny-permission-prompts'] : []),
    ],
    viewport,
    timeout: 60000,
  });
  return {
    context,
    userDataDir,
    close: async () => {
      await context.close().catch(() => {});
      fs.rmSync(userDataDir, { recursive: true, force: true });
    },
  };
}

/** Polls `predicate` every 50 ms until it is true; throws `message()` after `timeoutMs`. */
export async function waitUntil(predicate, timeoutMs, message) {
  const deadline = Date.now() + timeoutMs;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(message());
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/**
 * The share of a remote frame's pixels that must have green > 100 for the frame to count as
 * the fake camera's picture (it is close to 1 for that picture, 0 for a black frame).
 */
export const MIN_GREEN_FRACTION = 0.5;

/** Records every `data-state` the call page's `#status` takes, in `window.__stateLog`. */
const STATE_LOG_SCRIPT = `(() => {
  window.__stateLog = [];
  const hook = () => {
    const el = document.getElementById('status');
    if (!el) return false;
    const push = () => {
      const s = el.dataset.state;
      if (window.__stateLog[window.__stateLog.length - 1] !== s) window.__stateLog.push(s);
    };
    push();
    new MutationObserver(push).observe(el, { attributes: true, attributeFilter: ['data-state'] });
    return true;
  };
  if (!hook()) document.addEventListener('DOMContentLoaded', hook, { once: true });
})();`;

/**
 * One person in a call: a page in its own tab, with its WebSockets to /ws counted
 * and its console kept for failure reports.
 */
export class Participant {
  constructor(label, page) {
    this.label = label;
    this.page = page;
    /** Every WebSocket the page opened to /ws (playwright WebSocket objects). */
    this.sockets = [];
    /** Types of the JSON frames the page received on them, in order (relayed ones unwrapped). */
    this.received = [];
    this.console = [];
    page.on('websocket', (ws) => {
      if (new URL(ws.url()).pathname !== '/ws') return;
      this.sockets.push(ws);
      ws.on('framereceived', ({ payload }) => {
        this.received.push(unwrapped(payload).type);
      });
    });
    page.on('console', (m) => this.console.push(`[${m.type()}] ${m.text()}`));
    page.on('pageerror', (e) => this.console.push(`[pageerror] ${e.message}`));
  }

  static async open(context, label) {
    const page = await context.newPage();
    await page.addInitScript(STATE_LOG_SCRIPT);
    // Whatever the page's Content-Security-Policy blocks shows in the console (scenarioTest fails on it).
    await page.addInitScript(() => {
      document.addEventListener('securitypolicyviolation', (e) => {
        console.error(`Content Security Policy violation: ${e.violatedDirective} blocked ${e.blockedURI || 'inline'}`);
      });
    });
    return new Participant(label, page);
  }

  /** Opens the call page on `instance` for `userID` calling `peerID`. */
  async join(instance, userID, peerID, extra = {}) {
    const url = new URL('/call', instance.baseUrl);
    url.searchParams.set('userID', userID);
    url.searchParams.set('peerID', peerID);
    url.searchParams.set('debug', '1'); // client log lines go to the console (kept for failures)
    for (const [k, v] of Object.entries(extra)) url.searchParams.set(k, v);
    const response = await this.page.goto(url.toString());
    if (!response?.ok()) throw new Error(`${this.label}: GET ${url} -> ${response?.status()}`);
    return this;
  }

  /** Waits until the page has received `count` frames of `type` in all. */
  async waitForReceived(type, count, timeoutMs = 45000) {
    await waitUntil(() => this.received.filter((t) => t === type).length >= count, timeoutMs, () =>
      `${this.label}: fewer than ${count} "${type}" frames within ${timeoutMs} ms (got: ${this.received.join(', ')})`);
  }

  /** `{state, text}` of `#status`. */
  status() {
    return this.page.evaluate(() => {
      const el = document.getElementById('status');
      return { state: el?.dataset.state, text: el?.textContent };
    });
  }

  stateLog() {
    return this.page.evaluate(() => window.__stateLog ?? []);
  }

  /** Waits until `#status[data-state]` is `state`. */
  async waitForState(state, timeoutMs = 45000) {
    try {
      await this.page.waitForFunction(
        (s) => document.getElementById('status')?.dataset.state === s,
        state,
        { timeout: timeoutMs, polling: 100 },
      );
    } catch (err) {
      const now = await this.status().catch(() => ({}));
      throw new Error(`${this.label}: state did not become "${state}" within ${timeoutMs} ms; it is "${now.state}" (${now.text})`, { cause: err });
    }
  }

  /**
   * Waits until the remote video shows the peer's camera: it has a size and plays, its
   * `currentTime` and count of decoded frames advance, the compositor has presented frames of
   * this stream (`requestVideoFrameCallback`), and the current frame, drawn into a canvas, is
   * the fake camera's green picture and not black.
   *
   * `currentTime` and `totalVideoFrames` count frames the media player has received, not
   * frames on screen: at the start of a call Chromium can take a second or more before it
   * presents the first of them, and a screenshot taken in between shows a black box.
   * @returns {Promise<{width: number, height: number, streamId: string, presented: number, green: number}>}
   */
  async waitForRemoteFrames(timeoutMs = 45000) {
    const deadline = Date.now() + timeoutMs;
    const wait = (fn, arg) =>
      this.page.waitForFunction(fn, arg, { timeout: Math.max(1, deadline - Date.now()), polling: 100 });
    const sample = () =>
      this.page.evaluate(() => {
        const v = document.getElementById('remote_video');
        const streamId = v.srcObject?.id ?? null;
        const paint = window.__remotePaint;
        return {
          width: v.videoWidth,
          height: v.videoHeight,
          time: v.currentTime,
          paused: v.paused,
          frames: v.getVideoPlaybackQuality?.().totalVideoFrames ?? 0,
          streamId,
          presented: paint?.streamId === streamId ? paint.presented : 0,
          green: paint?.streamId === streamId ? paint.green : null,
        };
      });
    try {
      await wait(() => {
        const v = document.getElementById('remote_video');
        return v.srcObject && v.videoWidth > 0 && v.readyState >= 2;
      });
      const first = await sample();
      // From now on count the frames the compositor presents for this stream.
      await this.page.evaluate((streamId) => {
        const v = document.getElementById('remote_video');
        window.__remotePaint?.stop();
        const paint = { streamId, presented: 0, green: null, handle: 0 };
        const tick = () => {
          if (v.srcObject?.id === streamId) paint.presented += 1;
          paint.handle = v.requestVideoFrameCallback(tick);
        };
        paint.stop = () => v.cancelVideoFrameCallback(paint.handle);
        paint.handle = v.requestVideoFrameCallback(tick);
        window.__remotePaint = paint;
      }, first.streamId);
      await wait(({ time, frames, streamId }) => {
        const v = document.getElementById('remote_video');
        const f = v.getVideoPlaybackQuality?.().totalVideoFrames ?? 0;
        return v.srcObject?.id === streamId && !v.paused && v.currentTime > time + 0.2 && f > frames + 3 &&
          window.__remotePaint.presented >= 3;
      }, first);
      // The picture itself. Chromium's fake camera paints a green test pattern (a green
      // background, a brighter rotating shape and a timer): nearly every pixel has green > 100.
      // A black frame (nothing painted, or a camera turned off) has none.
      await wait(
        ({ streamId, minGreen }) => {
          const v = document.getElementById('remote_video');
          if (v.srcObject?.id !== streamId || !v.videoWidth) return false;
          const canvas = document.createElement('canvas');
          canvas.width = 160;
          canvas.height = 120;
          const ctx = canvas.getContext('2d', { willReadFrequently: true });
          ctx.drawImage(v, 0, 0, canvas.width, canvas.height);
          const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
          let green = 0;
          for (let i = 0; i < px.length; i += 4) if (px[i + 1] > 100) green += 1;
          window.__remotePaint.green = green / (px.length / 4);
          return window.__remotePaint.green >= minGreen;
        },
        { streamId: first.streamId, minGreen: MIN_GREEN_FRACTION },
      );
      return await sample();
    } catch (err) {
      const now = await sample().catch(() => ({}));
      throw new Error(`${this.label}: remote video shows no advancing, painted, green frames within ${timeoutMs} ms (${JSON.stringify(now)})`, { cause: err });
    } finally {
      await this.page.evaluate(() => window.__remotePaint?.stop()).catch(() => {});
    }
  }

  /**
   * Takes a screenshot of the page and measures, in that picture, the share of the remote
   * video's displayed frame (the part `object-fit: contain` fills, less what the local preview
   * covers) whose pixels have green > 100, as `waitForRemoteFrames` does for the frame itself.
   * @param {string} file where to write the PNG
   * @returns {Promise<number>} the fraction, 0..1
   */
  async screenshotRemoteGreen(file) {
    const png = await this.page.screenshot({ path: file });
    return this.page.evaluate(async (base64) => {
      const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
      const shot = await createImageBitmap(new Blob([bytes], { type: 'image/png' }));
      const scale = shot.width / window.innerWidth;
      const v = document.getElementById('remote_video');
      const box = v.getBoundingClientRect();
      const fit = Math.min(box.width / v.videoWidth, box.height / v.videoHeight);
      const w = v.videoWidth * fit;
      const h = v.videoHeight * fit;
      const left = box.left + (box.width - w) / 2;
      const top = box.top + (box.height - h) / 2;
      const local = document.getElementById('local_video').getBoundingClientRect();
      const canvas = new OffscreenCanvas(shot.width, shot.height);
      const ctx = canvas.getContext('2d', { willReadFrequently: true });
      ctx.drawImage(shot, 0, 0);
      const px = ctx.getImageData(0, 0, shot.width, shot.height).data;
      let green = 0;
      let all = 0;
      for (let y = Math.ceil(top); y < Math.floor(top + h); y += 2) {
        for (let x = Math.ceil(left); x < Math.floor(left + w); x += 2) {
          if (x >= local.left && x < local.right && y >= local.top && y < local.bottom) continue;
          all += 1;
          const i = (Math.floor(y * scale) * shot.width + Math.floor(x * scale)) * 4;
          if (px[i + 1] > 100) green += 1;
        }
      }
      return all ? green / all : 0;
    }, png.toString('base64'));
  }

  /** `readyState` of every local track the page shows in `#local_video` (`live` or `ended`). */
  localTracks() {
    return this.page.evaluate(() => document.getElementById('local_video').srcObject?.getTracks().map((t) => `${t.kind}:${t.readyState}`) ?? []);
  }

  /** Whether the element `selector` is shown (exists, not `hidden`, has a box). */
  visible(selector) {
    return this.page.isVisible(selector);
  }

  /** Waits until the element `selector` is shown. */
  async waitForVisible(selector, timeoutMs = 45000) {
    await this.page.waitForSelector(selector, { state: 'visible', timeout: timeoutMs });
  }

  /** Waits until the element `selector` is hidden (or gone). */
  async waitForHidden(selector, timeoutMs = 45000) {
    await this.page.waitForSelector(selector, { state: 'hidden', timeout: timeoutMs });
  }

  /** The remote video's MediaStream id, or null. */
  remoteStreamId() {
    return this.page.evaluate(() => document.getElementById('remote_video').srcObject?.id ?? null);
  }
}
