// The Linux kernel's own NBD client (nbd-client in a QEMU guest) and the host's
// nbdfuse + loop device against `snapblock serve`: mkfs, mount, write, verify;
// then a snapshot mounted read-only and a clone mounted read-write.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureGuestBuilt, nbdfuseFs, nbdfuseSkipReason, runGuest } from './helpers/guest.js';
import { endedSessions, roomForDirtyPages, startServer, type RunningServer } from './helpers/server.js';

let srv: RunningServer;
beforeAll(async () => {
  await ensureGuestBuilt();
  srv = await startServer({ volumes: { disk: '512M', multi: '512M', raw: '256M', fuse: '256M' } });
}, 900_000);
afterAll(async () => {
  expect(await srv.stop()).toBe(0);
});

const show = (r: { ok: boolean; log: string; result?: string }) => (r.ok ? '' : `${r.result ?? ''}\n${r.log.slice(-4000)}`);

describe('kernel nbd client in a QEMU guest', () => {
  let sums = '';

  it('mkfs, mount, write, reattach and verify over one connection', async () => {
    const r = await runGuest({ port: srv.port, exportName: 'disk', scenario: 'fs', connections: 1 });
    expect(r.ok, show(r)).toBe(true);
    sums = r.sums;
    expect(sums.split('\n').filter(Boolean).length).toBeGreaterThan(30);
  }, 300_000);

  it('the same over four connections (multi-conn)', async () => {
    const r = await runGuest({ port: srv.port, exportName: 'multi', scenario: 'fs', connections: 4 });
    expect(r.ok, show(r)).toBe(true);
  }, 300_000);

  it('fio with crc32c verification on the raw device', async () => {
    const r = await runGuest({ port: srv.port, exportName: 'raw', scenario: 'fio', extra: { FIO_SIZE: '32M' } });
    expect(r.ok, show(r)).toBe(true);
  }, 300_000);

  it('fio again over the same blocks, 64k-1m: overwrites land in the page cache in place, verified by the kernel client', async () => {
    await roomForDirtyPages(); // past the server's dirty budget nothing goes in place
    const r = await runGuest({ port: srv.port, exportName: 'raw', scenario: 'fio', extra: { FIO_SIZE: '32M', FIO_BS: '64k-1m' } });
    expect(r.ok, show(r)).toBe(true);
    // the server's per-connection counts (logged when each connection ends)
    const inPlace = endedSessions(srv.logs(), 'raw').reduce((n, c) => n + c.inPlaceWrites, 0);
    expect(inPlace).toBeGreaterThan(0);
  }, 300_000);

  it('snapshot, overwrite, then the snapshot mounts read-only and a clone read-write with the old files', async () => {
    expect(sums).not.toBe('');
    expect(srv.cli(['snapshot', 'create', 'disk', 'before']).status).toBe(0);
    // Overwrite the whole filesystem on the live volume.
    const again = await runGuest({ port: srv.port, exportName: 'disk', scenario: 'fs', extra: { FS_FILES: '4096 2048' } });
    expect(again.ok, show(again)).toBe(true);
    const ro = await runGuest({ port: srv.port, exportName: 'disk@before', scenario: 'verify-ro', extra: { CHECKSUMS: sums } });
    expect(ro.ok, show(ro)).toBe(true);
    expect(srv.cli(['volume', 'clone', 'disk', 'before', 'disk-clone']).status).toBe(0);
    const rw = await runGuest({ port: srv.port, exportName: 'disk-clone', scenario: 'verify-rw', extra: { CHECKSUMS: sums } });
    expect(rw.ok, show(rw)).toBe(true);
    // The snapshot is untouched by the clone's writes.
    const ro2 = await runGuest({ port: srv.port, exportName: 'disk@before', scenario: 'verify-ro', extra: { CHECKSUMS: sums } });
    expect(ro2.ok, show(ro2)).toBe(true);
    expect(JSON.parse(srv.cli(['--json', 'check']).stdout).ok).toBe(true);
  }, 900_000);
});

describe('host block device: nbdfuse, loop, ext4, fio', () => {
  const skip = nbdfuseSkipReason();
  it.skipIf(skip !== null && !process.env.CI)('mkfs, mount, write, remount, verify, fio --verify=crc32c', async () => {
    const r = await nbdfuseFs('127.0.0.1', srv.port, 'fuse');
    expect(r.ok, r.log.slice(-4000)).toBe(true);
  }, 300_000);
});
