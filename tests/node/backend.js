// A Node `ws` server as a backend: `node backend.js [NAME]`.
// For each connection it first sends {"name", "path", "client_id", "cookie"} as JSON (the request
// target it got, query included), then echoes every message as it came (text or binary).
// Prints "LISTENING <port>" once bound (see iwsproxy/tools/process.py).
'use strict';
const { WebSocketServer } = require('ws');

const name = process.argv[2] || 'node-ws';
const server = new WebSocketServer({ host: '127.0.0.1', port: 0 });

server.on('listening', () => console.log(`LISTENING ${server.address().port}`));
server.on('connection', (ws, request) => {
  ws.send(JSON.stringify({
    name,
    path: request.url,
    client_id: request.headers['x-iwsproxy-client-id'] || null,
    cookie: request.headers.cookie || null,
  }));
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
});
