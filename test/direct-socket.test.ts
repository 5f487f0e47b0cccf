// DirectSocket over a real TCP connection: bytes land in scratch or straight in target
// pieces, including when the target is set after the next read was already aimed at scratch.
import { afterEach, expect, it } from 'vitest';
import crypto from 'node:crypto';
import { ByteQueue } from '../src/nbd/byte-queue.js';
import { DirectSocket } from '../src/nbd/direct-socket.js';
import { tcpPairs } from './helpers/tcp.js';

const cleanup: Array<() => void> = [];
afterEach(() => cleanup.splice(0).forEach((f) => f()));

const pair = tcpPairs();

const until = async (cond: () => boolean) => {
  for (let i = 0; i < 500 && !cond(); i++) await new Promise((r) => setTimeout(r, 10));
  expect(cond()).toBe(true);
};

it('delivers scratch bytes, then fills a target set outside a read callback, then scratch again', async () => {
  const { server, client } = await pair();
  const seen: Buffer[] = [];
  const queue = new ByteQueue();
  const direct = DirectSocket.adopt(server, queue, { onBytes: (v) => seen.push(Buffer.from(v)) })!;
  expect(direct).toBeDefined();
  cleanup.push(() => direct.socket.destroy());
  client.write('hello');
  await until(() => Buffer.concat(seen).toString() === 'hello');

  // The next read is already aimed at scratch: the target must still get every byte.
  const target = Buffer.alloc(300_000);
  const data = crypto.randomBytes(target.length - 10);
  let done = false;
  direct.receiveInto([target], 10, 65536, () => (done = true));
  target.fill(7, 0, 10);
  client.write(Buffer.concat([data, Buffer.from('tail')]));
  await until(() => done && Buffer.concat(seen).toString().endsWith('tail'));
  expect(target.subarray(10).equals(data)).toBe(true);
  expect(target.subarray(0, 10).equals(Buffer.alloc(10, 7))).toBe(true);
  expect(Buffer.concat(seen).toString()).toBe('hellotail');
});

it('fills several target pieces in order, the bytes already there counted across pieces', async () => {
  const { server, client } = await pair();
  const seen: Buffer[] = [];
  const direct = DirectSocket.adopt(server, new ByteQueue(), { onBytes: (v) => seen.push(Buffer.from(v)) })!;
  cleanup.push(() => direct.socket.destroy());
  // 1,500 bytes "arrived earlier": all of the first piece and 500 of the second.
  const pieces = [Buffer.alloc(1000, 7), Buffer.alloc(200_000, 7), Buffer.alloc(0), Buffer.alloc(5, 7), Buffer.alloc(150_000, 7)];
  const total = pieces.reduce((n, p) => n + p.length, 0);
  const data = crypto.randomBytes(total - 1500);
  let done = false;
  direct.receiveInto(pieces, 1500, 65536, () => (done = true));
  // In small writes, so that reads end at arbitrary points inside pieces.
  const stream = Buffer.concat([data, Buffer.from('tail')]);
  for (let at = 0; at < stream.length; at += 7777) client.write(stream.subarray(at, at + 7777));
  await until(() => done && Buffer.concat(seen).toString() === 'tail');
  const got = Buffer.concat(pieces);
  expect(got.subarray(0, 1500).equals(Buffer.alloc(1500, 7))).toBe(true);
  expect(got.subarray(1500).equals(data)).toBe(true);
});

it('after a target, reads only the next header, so the payload behind it lands whole in the next target', async () => {
  const { server, client } = await pair();
  const seen: Buffer[] = [];
  const second = Buffer.alloc(200_000);
  let secondDone = false;
  const direct: DirectSocket = DirectSocket.adopt(server, new ByteQueue(), {
    onBytes: (v) => {
      seen.push(Buffer.from(v));
      // As the session does: a 28-byte header announces the next payload.
      if (seen.length === 1) direct.receiveInto([second], 0, 28, () => (secondDone = true));
    },
  })!;
  cleanup.push(() => direct.socket.destroy());
  const first = Buffer.alloc(100_000);
  let firstDone = false;
  direct.receiveInto([first], 0, 28, () => (firstDone = true));
  const [a, header, b] = [crypto.randomBytes(first.length), crypto.randomBytes(28), crypto.randomBytes(second.length)];
  client.write(Buffer.concat([a, header, b])); // all queued at once: a read could take far more than the header
  await until(() => firstDone && secondDone);
  expect(first.equals(a)).toBe(true);
  expect(seen.map((v) => v.length)).toEqual([28]); // nothing of the second payload went through scratch
  expect(seen[0].equals(header)).toBe(true);
  expect(second.equals(b)).toBe(true);
});

it('hands over bytes Node had buffered before the adoption', async () => {
  const { server, client } = await pair();
  server.pause();
  client.write('early');
  await new Promise((r) => setTimeout(r, 100));
  server.read(0); // let Node pull the bytes into its own buffer
  await new Promise((r) => setTimeout(r, 100));
  const queue = new ByteQueue();
  const seen: Buffer[] = [];
  const direct = DirectSocket.adopt(server, queue, { onBytes: (v) => seen.push(Buffer.from(v)) })!;
  cleanup.push(() => direct.socket.destroy());
  client.write('late');
  await until(() => Buffer.concat(seen).toString() === 'late');
  expect(queue.take(queue.length).toString()).toBe('early');
});
