'use strict';
// Baseline: Socket.IO with @socket.io/redis-adapter (ioredis clients), scaled out the standard
// way. Same pair semantics as switchboard: one room per sorted pair, a `welcome` event first,
// `signal` events relayed to the other user of the room, peer-joined / peer-left events.
// Presence is local to the process (a cross-node fetchSockets() per connect would be slower).

const http = require('http');
const { Server } = require('socket.io');
const { createAdapter } = require('@socket.io/redis-adapter');
const Redis = require('ioredis');
const { config, pairIds, pairKey, welcome, checkFrame, logListening } = require('./common');

const cfg = config();
const server = http.createServer((req, res) => {
  if (req.url === '/healthz' || req.url === '/readyz') { res.writeHead(200); res.end('ok'); return; }
  res.writeHead(404); res.end();
});
const io = new Server(server, {
  transports: ['websocket'],
  serveClient: false,
  perMessageDeflate: false,
  maxHttpBufferSize: cfg.maxMessageBytes,
});
let pub = null;
let sub = null;
if (cfg.redisUrl) {
  pub = new Redis(cfg.redisUrl);
  sub = pub.duplicate();
  io.adapter(createAdapter(pub, sub, { key: `${cfg.prefix}.io` }));
}

io.use((socket, next) => {
  const q = socket.handshake.query;
  const ids = pairIds(q.userID, q.peerID);
  if (!ids) return next(new Error('bad_ids'));
  socket.data.userID = ids[0];
  socket.data.peerID = ids[1];
  next();
});

io.on('connection', (socket) => {
  const { userID, peerID } = socket.data;
  const room = `pair:${pairKey(userID, peerID)}`;
  let peerOnline = false;
  const members = io.of('/').adapter.rooms.get(room);
  if (members) {
    for (const id of members) {
      const other = io.of('/').sockets.get(id);
      if (!other) continue;
      if (other.data.userID === userID) other.disconnect(true);
      else peerOnline = true;
    }
  }
  socket.join(room);
  socket.emit('welcome', welcome(userID, peerID, peerOnline, cfg.iceServers));
  socket.to(room).emit('peer-joined', { type: 'peer-joined', peerID: userID });
  socket.on('signal', (msg) => {
    if (msg === null || typeof msg !== 'object' || Array.isArray(msg)) {
      socket.emit('error', { type: 'error', code: 'invalid_json', message: 'not an object' });
      return;
    }
    if (checkFrame(JSON.stringify({ type: msg.type })) === 'reserved_type') {
      socket.emit('error', { type: 'error', code: 'reserved_type', message: 'reserved type' });
      return;
    }
    socket.to(room).emit('signal', msg);
  });
  socket.on('disconnect', () => {
    socket.to(room).emit('peer-left', { type: 'peer-left', peerID: userID });
  });
});

server.listen(cfg.port, cfg.host, () => {
  const a = server.address();
  logListening(`${a.address}:${a.port}`);
});

function shutdown() {
  io.close();
  if (pub) pub.disconnect();
  if (sub) sub.disconnect();
  setTimeout(() => process.exit(0), 200).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
