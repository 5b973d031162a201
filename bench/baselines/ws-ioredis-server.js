'use strict';
// Baseline: raw WebSocket relay with `ws` and `ioredis` pub/sub, the way a Node team would
// write switchboard: one subscriber connection per process, one channel per pair
// (`{prefix}:pair:{lower}:{higher}`), an envelope "senderID\n<frame>" so a replica forwards
// only what the *other* user sent. Presence is local to the process (no Redis presence).

const http = require('http');
const { WebSocketServer } = require('ws');
const Redis = require('ioredis');
const { config, pairIds, pairKey, welcome, checkFrame, logListening } = require('./common');

const cfg = config();
const pub = cfg.redisUrl ? new Redis(cfg.redisUrl) : null;
const sub = cfg.redisUrl ? new Redis(cfg.redisUrl) : null;
/** channel -> Set of { ws, userID } on this process */
const local = new Map();

function deliver(channel, sender, payload) {
  const set = local.get(channel);
  if (!set) return;
  for (const c of set) if (c.userID !== sender) c.ws.send(payload);
}

function publish(channel, sender, payload) {
  if (pub) pub.publish(channel, `${sender}\n${payload}`);
  else deliver(channel, sender, payload);
}

if (sub) {
  sub.on('messageBuffer', (chan, msg) => {
    const nl = msg.indexOf(10);
    if (nl < 0) return;
    deliver(chan.toString(), msg.toString('utf8', 0, nl), msg.toString('utf8', nl + 1));
  });
}

const server = http.createServer((req, res) => {
  if (req.url === '/healthz' || req.url === '/readyz') { res.writeHead(200); res.end('ok'); return; }
  res.writeHead(404); res.end();
});
const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, maxPayload: cfg.maxMessageBytes });

server.on('upgrade', (req, socket, head) => {
  const url = new URL(req.url, 'http://x');
  const ids = url.pathname === '/ws' && pairIds(url.searchParams.get('userID'), url.searchParams.get('peerID'));
  if (!ids) { socket.end('HTTP/1.1 400 Bad Request\r\n\r\n'); return; }
  wss.handleUpgrade(req, socket, head, (ws) => onSocket(ws, ids[0], ids[1]));
});

function onSocket(ws, userID, peerID) {
  const channel = `${cfg.prefix}:pair:${pairKey(userID, peerID)}`;
  let set = local.get(channel);
  if (!set) {
    set = new Set();
    local.set(channel, set);
    if (sub) sub.subscribe(channel);
  }
  let peerOnline = false;
  for (const c of set) {
    if (c.userID === userID) { set.delete(c); c.ws.close(4001, 'replaced'); }
    else peerOnline = true;
  }
  const me = { ws, userID };
  set.add(me);
  ws.send(JSON.stringify(welcome(userID, peerID, peerOnline, cfg.iceServers)));
  publish(channel, userID, JSON.stringify({ type: 'peer-joined', peerID: userID }));

  ws.on('message', (data, isBinary) => {
    if (isBinary) { ws.close(1003, 'binary'); return; }
    const text = data.toString();
    const err = checkFrame(text);
    if (err) { ws.send(JSON.stringify({ type: 'error', code: err, message: err })); return; }
    publish(channel, userID, text);
  });
  ws.on('close', () => {
    if (!set.delete(me)) return;
    if (set.size === 0) {
      local.delete(channel);
      if (sub) sub.unsubscribe(channel);
    }
    publish(channel, userID, JSON.stringify({ type: 'peer-left', peerID: userID }));
  });
  ws.on('error', () => {});
}

server.listen(cfg.port, cfg.host, () => {
  const a = server.address();
  logListening(`${a.address}:${a.port}`);
});

function shutdown() {
  for (const c of wss.clients) c.close(1001, 'shutting down');
  server.close();
  if (pub) pub.disconnect();
  if (sub) sub.disconnect();
  setTimeout(() => process.exit(0), 200).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
