// STOMP versions on the raw wire (the ws package, no STOMP library):
// node versions.mjs <stomp url> <accept-version|-> <login> <room>
// CONNECT (without accept-version when "-"), SUBSCRIBE (with id:s-1 only if env WITH_ID is
// set), SEND with a receipt;
// prints RESULT {protocol, frames}: every frame the server sent, as raw text, until its
// own MESSAGE arrived or the server closed.
import WebSocket from 'ws';
import { until, out, fail, SUBPROTOCOLS } from './lib.mjs';

const [url, accept, login, room] = process.argv.slice(2);
const ws = new WebSocket(url, SUBPROTOCOLS);
const frames = [];
let closed = null;
ws.on('message', (data) => { if (data.toString() !== '\n') frames.push(data.toString()); });
ws.on('close', (code) => { closed = code; });
await new Promise((r) => ws.on('open', r));
const version = accept === '-' ? '' : `accept-version:${accept}\n`;
ws.send(`CONNECT\n${version}host:x\nlogin:${login}\n\n\0`);
await until('CONNECTED', 10000, () => frames.length || closed).catch((e) => fail(e.message));
if (frames[0].startsWith('CONNECTED')) {
  const id = process.env.WITH_ID ? 'id:s-1\n' : '';
  ws.send(`SUBSCRIBE\n${id}destination:/sub/chat/room/${room}\nreceipt:s\n\n\0`);
  await until('the subscription', 10000, () => frames.some((f) => f.startsWith('RECEIPT')) || closed).catch((e) => fail(e.message));
  ws.send(`SEND\ndestination:/pub/chat/room/${room}\nreceipt:p\n\nhello\0`);
  await until('MESSAGE', 10000, () => frames.some((f) => f.startsWith('MESSAGE')) || closed).catch((e) => fail(`${e.message}: ${JSON.stringify(frames)}`));
} else {
  await until('the close', 10000, () => closed).catch((e) => fail(e.message));
}
out('RESULT', { protocol: ws.protocol, frames, closed });
ws.terminate();
process.exit(0);
