// ReplyWriter over a real TCP connection: replies sent "soon" (to large writes) wait until the
// event loop's check phase and leave together with the others of that turn, in order.
import { expect, it } from 'vitest';
import { ReplyWriter } from '../src/nbd/reply-writer.js';
import { tcpPairs } from './helpers/tcp.js';

const pair = tcpPairs();

const reply = (n: number) => Buffer.alloc(16, n);

it('replies sent soon stay corked past the tick, leave at the check phase with the rest, in order', async () => {
  const { server, client } = await pair();
  const got: Buffer[] = [];
  client.on('data', (b: Buffer) => got.push(b));
  const out = new ReplyWriter(server, undefined);
  out.sendSoon([reply(1)]);
  out.sendSoon([reply(2)]);
  await new Promise((r) => process.nextTick(r));
  await Promise.resolve();
  // Past the tick (where an ordinary reply would have left): still held by the cork.
  expect(server.writableLength).toBe(32);
  out.send([reply(3)]); // joins the same cork
  await new Promise((r) => setImmediate(r));
  expect(server.writableLength).toBe(0);
  await out.flushed();
  for (let i = 0; i < 100 && Buffer.concat(got).length < 48; i++) await new Promise((r) => setTimeout(r, 10));
  expect(Buffer.concat(got).equals(Buffer.concat([reply(1), reply(2), reply(3)]))).toBe(true);
});

it('an ordinary reply leaves at the end of its tick', async () => {
  const { server } = await pair();
  const out = new ReplyWriter(server, undefined);
  out.send([reply(1)]);
  expect(server.writableLength).toBe(16); // corked for the rest of this tick
  await new Promise((r) => process.nextTick(r));
  await Promise.resolve();
  expect(server.writableLength).toBe(0);
});
