// Debian chromium driven by playwright-core, plus helpers for the call page.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { CHROMIUM } from './paths.mjs';

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
 * @returns {Promise<{context: import('playwright-core').BrowserContext, close: () => Promise<void>}>}
 */
export async function launchChromium({ viewport = { width: 960, height: 640 }, fakeDevices = true } = {}) {
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)`);
  }
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'switchboard-e2e-chromium-'));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: fakeDevices ? CHROMIUM_FLAGS : CHROMIUM_FLAGS.filter((f) => f !== '--use-fake-device-for-media-stream'),
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
    /** Types of the JSON frames the page received on them, in order. */
    this.received = [];
    this.console = [];
    page.on('websocket', (ws) => {
      if (new URL(ws.url()).pathname !== '/ws') return;
      this.sockets.push(ws);
      ws.on('framereceived', ({ payload }) => {
        try {
          this.received.push(JSON.parse(payload).type);
        } catch {
          this.received.push('?');
        }
      });
    });
    page.on('console', (m) => this.console.push(`[${m.type()}] ${m.text()}`));
    page.on('pageerror', (e) => this.console.push(`[pageerror] ${e.message}`));
  }

  static async open(context, label) {
    const page = await context.newPage();
    await page.addInitScript(STATE_LOG_SCRIPT);
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
   * Waits until the remote video shows frames: it has a size, and both
   * `currentTime` and the count of decoded frames advance.
   * @returns {Promise<{width: number, height: number, streamId: string}>}
   */
  async waitForRemoteFrames(timeoutMs = 45000) {
    const sample = () =>
      this.page.evaluate(() => {
        const v = document.getElementById('remote_video');
        return {
          width: v.videoWidth,
          height: v.videoHeight,
          time: v.currentTime,
          frames: v.getVideoPlaybackQuality?.().totalVideoFrames ?? 0,
          streamId: v.srcObject?.id ?? null,
        };
      });
    try {
      await this.page.waitForFunction(
        () => {
          const v = document.getElementById('remote_video');
          return v.srcObject && v.videoWidth > 0 && v.readyState >= 2;
        },
        null,
        { timeout: timeoutMs, polling: 100 },
      );
      const first = await sample();
      await this.page.waitForFunction(
        ({ time, frames, streamId }) => {
          const v = document.getElementById('remote_video');
          const f = v.getVideoPlaybackQuality?.().totalVideoFrames ?? 0;
          return v.srcObject?.id === streamId && v.currentTime > time + 0.2 && f > frames + 3;
        },
        first,
        { timeout: timeoutMs, polling: 100 },
      );
      return await sample();
    } catch (err) {
      const now = await sample().catch(() => ({}));
      throw new Error(`${this.label}: remote video shows no advancing frames within ${timeoutMs} ms (${JSON.stringify(now)})`, { cause: err });
    }
  }

  /** The remote video's MediaStream id, or null. */
  remoteStreamId() {
    return this.page.evaluate(() => document.getElementById('remote_video').srcObject?.id ?? null);
  }
}
