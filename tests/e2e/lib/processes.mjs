// Real processes for the end-to-end tests: a private redis-server and
// switchboard instances, each on a free loopback port, all killed at the end.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { SWITCHBOARD_BIN } from './paths.mjs';

/** Every child still running; killed on exit whatever happens. */
const live = new Set();

function killAllSync() {
  for (const child of live) {
    try {
      child.kill('SIGKILL');
    } catch {
      /* gone */
    }
  }
  live.clear();
}
process.once('exit', killAllSync);
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.once(sig, () => {
    killAllSync();
    process.exit(130);
  });
}

/** Asks the kernel for a free TCP port on 127.0.0.1. */
export async function freePort() {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** A spawned child with its output kept (the last lines) for proofs and failure reports. */
export class Child {
  constructor(name, command, args, options) {
    this.name = name;
    this.lines = [];
    this.proc = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], ...options });
    live.add(this.proc);
    this.exited = new Promise((resolve) => {
      this.proc.once('exit', (code, signal) => {
        live.delete(this.proc);
        resolve({ code, signal });
      });
      this.proc.once('error', (err) => {
        live.delete(this.proc);
        this.lines.push(`[spawn error] ${err.message}`);
        resolve({ code: null, signal: null, error: err });
      });
    });
    this.listeners = [];
    for (const [stream, tag] of [[this.proc.stdout, ''], [this.proc.stderr, '[stderr] ']]) {
      if (!stream) continue; // a caller's `stdio` may leave it out
      readline.createInterface({ input: stream }).on('line', (line) => {
        this.lines.push(tag + line);
        if (this.lines.length > 20000) this.lines.shift();
        for (const fn of this.listeners) fn(line);
      });
    }
  }

  /** Resolves with the first `pick(line)` that is not undefined; rejects on exit or deadline. */
  waitForLine(pick, what, timeoutMs) {
    return new Promise((resolve, reject) => {
      const done = (fn, v) => {
        clearTimeout(timer);
        this.listeners = this.listeners.filter((l) => l !== listener);
        fn(v);
      };
      const listener = (line) => {
        const v = pick(line);
        if (v !== undefined) done(resolve, v);
      };
      const timer = setTimeout(
        () => done(reject, new Error(`${this.name}: no ${what} within ${timeoutMs} ms\n${this.tail()}`)),
        timeoutMs,
      );
      this.listeners.push(listener);
      for (const line of this.lines) {
        const v = pick(line.startsWith('[stderr] ') ? line.slice(9) : line);
        if (v !== undefined) return done(resolve, v);
      }
      this.exited.then(({ code, signal }) =>
        done(reject, new Error(`${this.name} exited (code ${code}, signal ${signal}) before ${what}\n${this.tail()}`)),
      );
    });
  }

  get running() {
    return this.proc.exitCode === null && this.proc.signalCode === null && live.has(this.proc);
  }

  tail(n = 40) {
    return this.lines.slice(-n).join('\n');
  }

  /** `signal` (SIGTERM), then SIGKILL if it has not exited after `graceMs`. */
  async stop(graceMs = 5000, signal = 'SIGTERM') {
    if (!this.running) return this.exited;
    this.proc.kill(signal);
    const timer = setTimeout(() => this.proc.kill('SIGKILL'), graceMs);
    const result = await this.exited;
    clearTimeout(timer);
    return result;
  }
}

/**
 * Starts a private redis-server on a free port (no persistence) and waits
 * until it accepts connections.
 * @returns {Promise<{url: string, port: number, child: Child, stop: () => Promise<unknown>}>}
 */
export async function startRedis() {
  let lastError;
  for (let tries = 0; tries < 5; tries += 1) {
    const port = await freePort();
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'switchboard-e2e-redis-'));
    const child = new Child(`redis-server :${port}`, 'redis-server', [
      '--port', String(port),
      '--bind', '127.0.0.1',
      '--save', '',
      '--appendonly', 'no',
      '--dir', dir,
    ]);
    try {
      await child.waitForLine((l) => (/Ready to accept connections/.test(l) ? true : undefined), 'ready line', 20000);
      return {
        url: `redis://127.0.0.1:${port}`,
        port,
        child,
        stop: async () => {
          await child.stop();
          fs.rmSync(dir, { recursive: true, force: true });
        },
      };
    } catch (err) {
      lastError = err; // most likely the port was taken in between: try another
      await child.stop(1000);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }
  throw lastError;
}

/** Picks `fields.addr` from the JSON `listening` log line, if `line` is one. */
export function listeningAddr(line) {
  if (!line.startsWith('{')) return undefined;
  try {
    const rec = JSON.parse(line);
    const f = rec.fields ?? {};
    if (f.message === 'listening' && typeof f.addr === 'string') return f.addr;
  } catch {
    /* not JSON */
  }
  return undefined;
}

/**
 * Starts one switchboard instance on a free port (SWITCHBOARD_LISTEN=127.0.0.1:0)
 * and learns its address from the `listening` log line.
 * @param {object} [opts]
 * @param {string} [opts.name]
 * @param {string} [opts.redisUrl]  SWITCHBOARD_REDIS_URL; without it the in-memory broker is used
 * @param {string} [opts.listen]    a fixed address instead of a free port (to restart an instance in place)
 * @param {Record<string,string>} [opts.env] extra environment
 * @returns {Promise<{name: string, addr: string, baseUrl: string, child: Child, stop: () => Promise<unknown>}>}
 */
export async function startSwitchboard({ name = 'switchboard', redisUrl, listen = '127.0.0.1:0', env = {} } = {}) {
  if (!fs.existsSync(SWITCHBOARD_BIN)) {
    throw new Error(`switchboard binary not found at ${SWITCHBOARD_BIN}: run \`cargo build -p switchboard\` or set SWITCHBOARD_BIN`);
  }
  const childEnv = {
    ...process.env,
    RUST_LOG: process.env.RUST_LOG || 'info',
    // Stop at once on SIGTERM (close with 1001) unless a test asks for a paced drain.
    SWITCHBOARD_DRAIN_SECS: '0',
    ...env,
    SWITCHBOARD_LISTEN: listen,
    SWITCHBOARD_LOG_FORMAT: 'json',
  };
  delete childEnv.SWITCHBOARD_REDIS_URL;
  // The harness's own variable is no server setting (the server would warn of it).
  delete childEnv.SWITCHBOARD_BIN;
  if (redisUrl) childEnv.SWITCHBOARD_REDIS_URL = redisUrl;
  const child = new Child(name, SWITCHBOARD_BIN, [], { env: childEnv });
  try {
    const addr = await child.waitForLine(listeningAddr, '`listening` log line', 30000);
    // A paced drain takes up to twice SWITCHBOARD_DRAIN_SECS: allow that before SIGKILL.
    const graceMs = (2 * Number(childEnv.SWITCHBOARD_DRAIN_SECS) + 10) * 1000;
    return { name, addr, baseUrl: `http://${addr}`, child, stop: () => child.stop(graceMs) };
  } catch (err) {
    await child.stop(1000);
    throw err;
  }
}
