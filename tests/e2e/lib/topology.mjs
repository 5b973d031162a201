// The production topology on loopback, for tests: a private redis-server,
// three switchboard replicas on fixed ports, and Debian's nginx running
// deploy/nginx/nginx.conf with only its upstream addresses and listen port
// substituted (unprivileged: pid and temp paths come from -p/-g on the command
// line). Also small helpers to read /metrics and to hold raw WebSockets in a page.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { REPO_ROOT, SWITCHBOARD_BIN } from './paths.mjs';
import { Child, freePort, listeningAddr } from './processes.mjs';

const NGINX_CONF = path.join(REPO_ROOT, 'deploy', 'nginx', 'nginx.conf');
const UPSTREAM_RE = /^(\s*server\s+)(switchboard-\d+:8080)(\b.*)$/gm;
const LISTEN_RE = /^(\s*listen\s+)(8080)(\s*;.*)$/gm;
// Session open/close lines (debug) name the user: they show which replica holds a socket.
const REPLICA_LOG = 'info,switchboard::session=debug';

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `fn` until it returns a value other than undefined/false; throws `what` at the deadline. */
export async function until(fn, what, timeoutMs = 20000, everyMs = 50) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${typeof what === 'function' ? what() : what}`);
    await sleep(everyMs);
  }
}

export async function httpGet(url) {
  const res = await fetch(url);
  return { status: res.status, body: await res.text(), type: res.headers.get('content-type') };
}

/** Prometheus text format -> [{name, labels, value}] (samples only). */
export function parseMetrics(text) {
  const out = [];
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = Object.fromEntries([...(m[2] ?? '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((x) => [x[1], x[2]]));
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

/** Sum of the samples of `name` whose labels include `labels`. */
export function sumOf(samples, name, labels = {}) {
  return samples
    .filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v))
    .reduce((acc, s) => acc + s.value, 0);
}

/** Series names the Grafana dashboard queries (histograms as their base name). */
export function dashboardSeries() {
  const dash = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'deploy', 'grafana', 'switchboard.json'), 'utf8'));
  const names = new Set();
  for (const p of dash.panels) {
    for (const t of p.targets ?? []) {
      for (const m of t.expr.matchAll(/\b(switchboard_\w+)/g)) names.add(m[1].replace(/_(bucket|sum|count)$/, ''));
    }
  }
  return names;
}

/**
 * A switchboard replica on a fixed loopback port, so that it can be restarted
 * behind the same nginx upstream address. Each start is a new process; the
 * logs of all of them are kept in `child.lines` (for the scenario's artifacts).
 */
export class Replica {
  constructor(name, port, redisUrl, env = {}) {
    this.env = env;
    this.name = name;
    this.port = port;
    this.addr = `127.0.0.1:${port}`;
    this.baseUrl = `http://${this.addr}`;
    this.redisUrl = redisUrl;
    this.child = { lines: [] }; // every run's lines, for Scenario.writeArtifacts
    this.proc = null;
    this.runs = 0;
  }

  async start() {
    if (!fs.existsSync(SWITCHBOARD_BIN)) throw new Error(`switchboard binary not found at ${SWITCHBOARD_BIN}`);
    this.runs += 1;
    const env = {
      ...process.env,
      SWITCHBOARD_LISTEN: this.addr,
      SWITCHBOARD_REDIS_URL: this.redisUrl,
      SWITCHBOARD_LOG_FORMAT: 'json',
      RUST_LOG: REPLICA_LOG,
      ...this.env,
    };
    // The harness's own variable is no server setting (the server would warn of it).
    delete env.SWITCHBOARD_BIN;
    const proc = new Child(`${this.name} run ${this.runs}`, SWITCHBOARD_BIN, [], { env });
    // Share the line buffer: marker first, then this run's lines as they come.
    this.child.lines.push(`=== ${this.name} run ${this.runs} ===`);
    const mirror = proc.lines;
    const all = this.child.lines;
    mirror.push = (...xs) => {
      all.push(...xs);
      return Array.prototype.push.apply(mirror, xs);
    };
    this.proc = proc;
    await until(() => (!proc.running ? Promise.reject(new Error(`${this.name} exited:\n${proc.tail()}`)) : proc.lines.map(listeningAddr).find(Boolean)),
      `${this.name}: listening line`, 30000);
    await until(async () => (await httpGet(`${this.baseUrl}/readyz`).catch(() => ({}))).status === 200, `${this.name} ready`, 30000);
    return this;
  }

  /** `{user, at, fields}` of every `message` log line of a session (all runs), in order. */
  sessionLog(message) {
    const out = [];
    for (const line of this.child.lines) {
      if (!line.startsWith('{')) continue;
      try {
        const rec = JSON.parse(line);
        if (rec.fields?.message === message) out.push({ user: rec.fields?.user, at: rec.timestamp, fields: rec.fields });
      } catch {
        /* not JSON */
      }
    }
    return out;
  }

  sessionsOpened() {
    return this.sessionLog('session open');
  }

  async metrics() {
    const res = await httpGet(`${this.baseUrl}/metrics`);
    assert.equal(res.status, 200, `${this.name} /metrics`);
    return parseMetrics(res.body);
  }

  stop(signal) {
    return this.proc ? this.proc.stop(15000, signal) : Promise.resolve({ code: 0 });
  }
}

/** deploy/nginx/nginx.conf with only the upstream addresses and the listen port replaced. */
export function renderNginxConf(listenPort, upstreams) {
  const text = fs.readFileSync(NGINX_CONF, 'utf8');
  const found = [...text.matchAll(UPSTREAM_RE)];
  assert.equal(found.length, upstreams.length, 'one upstream server line per replica');
  let i = 0;
  let out = text.replace(UPSTREAM_RE, (_, pre, _addr, post) => pre + upstreams[i++] + post);
  let listens = 0;
  out = out.replace(LISTEN_RE, (_, pre, _port, post) => {
    listens += 1;
    return `${pre}127.0.0.1:${listenPort}${post}`;
  });
  assert.equal(listens, 1, 'one `listen 8080;` line');
  return out;
}

export function nginxBinary() {
  for (const p of ['/usr/sbin/nginx', '/usr/bin/nginx', '/usr/local/sbin/nginx']) if (fs.existsSync(p)) return p;
  throw new Error("nginx not found: install Debian's nginx (apt-get install -y nginx)");
}

/** Starts nginx in the foreground on a free loopback port in front of `replicas`. */
export async function startNginx(sc, replicas) {
  const port = await freePort();
  const prefix = fs.mkdtempSync(path.join(os.tmpdir(), 'switchboard-e2e-nginx-'));
  fs.chmodSync(prefix, 0o755); // workers may run unprivileged when the test runs as root
  const conf = path.join(prefix, 'nginx.conf');
  fs.writeFileSync(conf, renderNginxConf(port, replicas.map((r) => r.addr)));
  // The config logs requests to /dev/stdout, which nginx opens by path: give
  // it a file (a socket, as Node's 'pipe' is, cannot be opened that way).
  const accessLog = path.join(prefix, 'access.log');
  const out = fs.openSync(accessLog, 'w');
  const proc = new Child('nginx', nginxBinary(), [
    '-p', `${prefix}/`, '-e', 'stderr', '-c', conf, '-g', `daemon off; pid ${prefix}/nginx.pid;`,
  ], { stdio: ['ignore', out, 'pipe'] });
  fs.closeSync(out);
  const lb = {
    name: 'nginx',
    port,
    baseUrl: `http://127.0.0.1:${port}`,
    proc,
    accessLines: () => fs.readFileSync(accessLog, 'utf8').split('\n').filter(Boolean),
    // For Scenario.writeArtifacts on failure: the access log, then nginx's stderr.
    child: { get lines() { return [...lb.accessLines(), ...proc.lines]; } },
  };
  sc.instances.push(lb);
  sc.cleanups.push(async () => {
    await proc.stop(5000);
    sc.instances.splice(sc.instances.indexOf(lb), 1); // its files go with the prefix
    fs.rmSync(prefix, { recursive: true, force: true });
  });
  await until(
    () =>
      new Promise((resolve, reject) => {
        if (!proc.running) return reject(new Error(`nginx exited:\n${proc.tail()}`));
        const s = net.connect(port, '127.0.0.1');
        s.once('connect', () => {
          s.destroy();
          resolve(true);
        });
        s.once('error', () => resolve(false));
      }),
    'nginx listening',
    20000,
  );
  return lb;
}

/** Redis + three replicas on fixed ports + nginx. */
export async function topology(sc, env = {}) {
  const redis = await sc.startRedis();
  const replicas = [];
  for (let i = 1; i <= 3; i += 1) {
    const r = new Replica(`switchboard-${i}`, await freePort(), redis.url, env);
    sc.instances.push(r);
    sc.cleanups.push(() => r.stop('SIGKILL'));
    replicas.push(r);
  }
  await Promise.all(replicas.map((r) => r.start()));
  const lb = await startNginx(sc, replicas);
  return { redis, replicas, lb };
}

/** The replicas that logged `session open` for `user`, or undefined if none did yet. */
export function replicaOf(replicas, user) {
  const hits = replicas.filter((r) => r.sessionsOpened().some((s) => s.user === user));
  return hits.length ? hits : undefined;
}

/** The replica that opened `user`'s newest session (RFC 3339 UTC times sort as strings). */
export function currentReplica(replicas, user) {
  let best;
  for (const r of replicas) {
    for (const s of r.sessionsOpened()) if (s.user === user && (!best || s.at > best.at)) best = { at: s.at, r };
  }
  return best?.r;
}

// ---------------------------------------------------------------- raw sockets in a browser page

/** Many WebSockets held by one page; frames kept per socket. */
export class SocketPage {
  constructor(page) {
    this.page = page;
  }

  static async open(sc, origin) {
    const p = await sc.participant('sockets');
    await p.page.goto(`${origin}/healthz`);
    await p.page.evaluate(() => {
      window.__socks = {};
    });
    return new SocketPage(p.page);
  }

  async connect(key, url) {
    await this.page.evaluate(
      ([key, url]) =>
        new Promise((resolve, reject) => {
          const ws = new WebSocket(url);
          const rec = { ws, msgs: [], closed: null };
          window.__socks[key] = rec;
          ws.onmessage = (e) => rec.msgs.push(e.data);
          ws.onclose = (e) => {
            rec.closed = { code: e.code, reason: e.reason };
            reject(new Error(`socket ${key} closed ${e.code} before opening`));
          };
          ws.onopen = () => resolve();
        }),
      [key, url],
    );
  }

  send(key, text) {
    return this.page.evaluate(([key, text]) => window.__socks[key].ws.send(text), [key, text]);
  }

  messages(key) {
    return this.page.evaluate((key) => window.__socks[key].msgs.slice(), key);
  }

  /** Waits until socket `key` has received a frame equal to `text` (or for which `match` holds). */
  async waitFor(key, text, timeoutMs = 15000) {
    await this.page.waitForFunction(([key, text]) => window.__socks[key].msgs.includes(text), [key, text], {
      timeout: timeoutMs,
      polling: 50,
    });
  }

  async waitForType(key, type, timeoutMs = 15000) {
    const raw = await this.page.waitForFunction(
      ([key, type]) => window.__socks[key].msgs.find((m) => JSON.parse(m).type === type),
      [key, type],
      { timeout: timeoutMs, polling: 50 },
    );
    return JSON.parse(await raw.jsonValue());
  }

  closeAll() {
    return this.page.evaluate(() => Object.values(window.__socks).forEach((r) => r.ws.close(1000)));
  }
}
