// STARTTLS judged by libnbd (gnutls) clients.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { makeCerts, type Certs } from './helpers/certs.js';
import { nbdsh, run, startServer, tempDir, type RunningServer } from './helpers/server.js';

let certs: Certs;
let clientOnlyCa: string;
beforeAll(() => {
  certs = makeCerts(tempDir('certs-'));
  // A certificate directory with the CA but no client certificate.
  clientOnlyCa = tempDir('ca-only-');
  fs.copyFileSync(certs.ca, path.join(clientOnlyCa, 'ca-cert.pem'));
});

const tlsUri = (srv: RunningServer, name: string, dir: string) => `nbds://127.0.0.1:${srv.port}/${name}?tls-certificates=${dir}`;

describe('--tls require', () => {
  let srv: RunningServer;
  beforeAll(async () => {
    srv = await startServer({ volumes: { secret: '8M' }, args: ['--tls', 'require', '--tls-cert', certs.serverCert, '--tls-key', certs.serverKey] });
  });
  afterAll(async () => {
    await srv.stop();
  });

  it('serves data over TLS', () => {
    const info = run('nbdinfo', [tlsUri(srv, 'secret', clientOnlyCa)]);
    expect(info.status, info.stderr).toBe(0);
    expect(info.stdout).toMatch(/with TLS/);
    const out = nbdsh(
      undefined,
      `h.set_tls(nbd.TLS_REQUIRE)\nh.set_tls_certificates(${JSON.stringify(clientOnlyCa)})\nh.set_export_name('secret')\nh.connect_tcp('127.0.0.1', '${srv.port}')\n` +
        "h.pwrite(b'\\xaa' * 65536, 4096); print(h.pread(65536, 4096) == b'\\xaa' * 65536)",
    );
    expect(out.trim()).toBe('True');
  });

  it('refuses plaintext clients', () => {
    const r = run('nbdinfo', [srv.uri('secret')]);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/TLS|not supported/i);
    const list = run('nbdinfo', ['--list', `nbd://127.0.0.1:${srv.port}`]);
    expect(list.status).not.toBe(0);
  });

  it('a client that does not trust the server certificate fails', () => {
    const other = makeCerts(tempDir('other-ca-'));
    const r = run('nbdinfo', [tlsUri(srv, 'secret', other.dir)]);
    expect(r.status).not.toBe(0);
  });
});

describe('--tls optional with client certificates required by --tls-ca', () => {
  let srv: RunningServer;
  beforeAll(async () => {
    srv = await startServer({ volumes: { v: '8M' }, args: ['--tls-cert', certs.serverCert, '--tls-key', certs.serverKey, '--tls-ca', certs.ca] });
  });
  afterAll(async () => {
    await srv.stop();
  });

  it('plaintext still works when TLS is optional', () => {
    expect(run('nbdinfo', ['--size', srv.uri('v')]).stdout.trim()).toBe(String(8 * 1024 * 1024));
  });

  it('a TLS client with a certificate from the CA gets in; one without is refused', () => {
    const good = run('nbdinfo', [tlsUri(srv, 'v', certs.dir)]);
    expect(good.status, good.stderr).toBe(0);
    expect(good.stdout).toMatch(/with TLS/);
    const bad = run('nbdinfo', [tlsUri(srv, 'v', clientOnlyCa)]);
    expect(bad.status).not.toBe(0);
  });
});

describe('without TLS configured', () => {
  it('STARTTLS is answered as unsupported and a TLS-requiring client gives up', async () => {
    const srv = await startServer({ volumes: { v: '1M' } });
    const r = run('nbdinfo', [tlsUri(srv, 'v', certs.dir)]);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/TLS|not supported|closed/i);
    expect(run('nbdinfo', ['--size', srv.uri('v')]).status).toBe(0);
    await srv.stop();
  });
});
