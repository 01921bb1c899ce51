// A Node `ws` client that reconnects whenever its connection closes, to the same URL (its id is in
// the query): `node client.js URL`.
// Reads commands on stdin, one a line: "send TEXT", "cut" (once what was sent has left, drop the
// connection without a Close, as a network does), "quit". Writes one JSON line per event on stdout:
// {"event": "open", "count"}, {"event": "message", "data"}, {"event": "close", "code"}, {"event": "error", "message"}.
'use strict';
const readline = require('readline');
const WebSocket = require('ws');

const url = process.argv[2];
const emit = (event) => process.stdout.write(JSON.stringify(event) + '\n');
const waiting = []; // sent while not connected: sent on the next open, in order
let ws = null;
let opens = 0;
let quitting = false;
let lastSend = Promise.resolve();

function send(text) {
  if (ws.readyState !== WebSocket.OPEN) return waiting.push(text);
  lastSend = new Promise((resolve) => ws.send(text, resolve)); // resolved once written to the socket
}

function connect() {
  ws = new WebSocket(url);
  ws.on('open', () => {
    emit({ event: 'open', count: ++opens });
    waiting.splice(0).forEach(send);
  });
  ws.on('message', (data) => emit({ event: 'message', data: data.toString() }));
  ws.on('error', (error) => emit({ event: 'error', message: error.message }));
  ws.on('close', (code) => {
    emit({ event: 'close', code });
    if (!quitting) setTimeout(connect, 100); // the reconnect-on-close loop of an ordinary app
  });
}

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const [command, ...rest] = line.split(' ');
  if (command === 'send') send(rest.join(' '));
  else if (command === 'cut') { const cut = ws; lastSend.then(() => cut.terminate()); }
  else if (command === 'quit') { quitting = true; ws.close(1000); }
}).on('close', () => { quitting = true; ws.terminate(); });

connect();
