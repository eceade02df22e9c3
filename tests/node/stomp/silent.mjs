// A raw STOMP client (the ws package, no STOMP library) that promises heart-beats:
// node silent.mjs <stomp url> <heart-beat> <beat every ms|0> <watch ms>
// Sends CONNECT with heart-beat:<heart-beat>, then an EOL every <beat every ms> (0: never)
// for <watch ms>; prints RESULT {connected, serverBeats, error, close, closedAfter}. With env
// NO_CONNECT set it never sends CONNECT (closedAfter counts from the open).
import WebSocket from 'ws';
import { sleep, out, SUBPROTOCOLS } from './lib.mjs';

const [url, heartBeat, every, watch] = process.argv.slice(2);
const ws = new WebSocket(url, SUBPROTOCOLS);
const seen = { connected: null, serverBeats: 0, error: null, close: null, closedAfter: null };
let started = 0;
ws.on('message', (data) => {
  const text = data.toString();
  if (text === '\n') seen.serverBeats += 1;
  else if (text.startsWith('CONNECTED')) { seen.connected = text.split('\n').slice(1, -2); started = Date.now(); }
  else if (text.startsWith('ERROR')) seen.error = text.split('\n')[0] + ' ' + (text.match(/message:([^\n]*)/) || [])[1];
});
ws.on('close', (code, reason) => {
  seen.close = { code, reason: reason.toString() };
  seen.closedAfter = Date.now() - started;
});
await new Promise((r) => ws.on('open', r));
if (process.env.NO_CONNECT) started = Date.now();
else ws.send(`CONNECT\naccept-version:1.1,1.2\nhost:x\nlogin:raw\nheart-beat:${heartBeat}\n\n\0`);
const end = Date.now() + Number(watch);
while (Date.now() < end && !seen.close) {
  if (Number(every) > 0) {
    ws.send('\n');
    await sleep(Number(every));
  } else {
    await sleep(50);
  }
}
out('RESULT', seen);
ws.terminate();
process.exit(0);
