// Sanity check of the end-to-end block-device harness itself, against a peer
// NBD server (nbdkit), independent of snapblock: if these fail, fix the
// harness (scripts/guest/*, scripts/nbdfuse-fs.sh) before blaming the server.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureGuestBuilt, requireTools, runGuest, startNbdkit, type Nbdkit } from './helpers/guest.js';

describe('e2e harness against nbdkit (memory 1G)', () => {
  let nbdkit: Nbdkit;

  beforeAll(async () => {
    requireTools(['nbdkit', 'qemu-system-x86_64', 'socat', 'cpio', 'nbd-client', 'mke2fs', 'busybox']);
    nbdkit = await startNbdkit(['memory', '1G']);
    await ensureGuestBuilt(); // cold: apt-get download of the kernel, ~20 s
  }, 600_000);

  afterAll(async () => {
    await nbdkit?.stop();
  });

  // Checksums of the files the 4-connection run leaves on export "sanity4".
  let sums4 = '';

  it('guest fs scenario, 4 connections', async () => {
    const r = await runGuest({ port: nbdkit.port, exportName: 'sanity4', scenario: 'fs', connections: 4 });
    expect(r.ok, r.log).toBe(true);
    // nbd-client opened 4 sockets, each through its own socat -> nbdkit.
    expect((r.log.match(/^Negotiation: /gm) ?? []).length).toBe(8); // 4 per attach, 2 attaches
    sums4 = r.sums;
  }, 240_000);

  it('guest verify-ro passes on the data written, fails on a wrong checksum', async () => {
    expect(sums4, 'needs the 4-connection test').not.toBe('');
    const good = await runGuest({ port: nbdkit.port, exportName: 'sanity4', scenario: 'verify-ro', extra: { CHECKSUMS: sums4 } });
    expect(good.ok, good.log).toBe(true);
    const bad = sums4.replace(/^./, (c) => (c === '0' ? '1' : '0'));
    const r = await runGuest({ port: nbdkit.port, exportName: 'sanity4', scenario: 'verify-ro', extra: { CHECKSUMS: bad } });
    expect(r.ok).toBe(false);
    expect(r.result, r.log).toBe('SNAPBLOCK-GUEST FAIL checksum mismatch');
  }, 480_000);

});

describe('e2e harness detects a broken server', () => {
  let nbdkit: Nbdkit;
  beforeAll(async () => {
    // tmpdisk gives every connection a fresh, freshly formatted disk: data
    // written before a reattach is gone, which the fs scenario must notice.
    nbdkit = await startNbdkit(['tmpdisk', '1G']);
  }, 60_000);
  afterAll(async () => {
    await nbdkit?.stop();
  });

  it('guest fs scenario fails on a server that forgets data', async () => {
    const r = await runGuest({ port: nbdkit.port, exportName: '', scenario: 'fs' });
    expect(r.ok).toBe(false);
    expect(r.result, r.log).toMatch(/^SNAPBLOCK-GUEST FAIL /);
  }, 240_000);
});
