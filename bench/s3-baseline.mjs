#!/usr/bin/env node
// Baseline S3 throughput of the local Ceph RGW (scripts/s3/start.sh) with the AWS SDK v3:
// PUT then GET of many 4 MiB objects, a fixed number in flight. Backup benchmarks compare
// against these figures. Also samples the daemons' RSS (peak while busy).
//
//   node bench/s3-baseline.mjs [--total-mib 512] [--size-mib 4] [--inflight 4] [--rounds 1]
//                              [--expect-continue] [--dir .cache/s3/ceph] [--json FILE]
//
// Starts (or joins) the cluster; stops it at the end unless another user holds a lease or it
// was started by hand (scripts/s3/start.sh .cache/s3/ceph).
// The SDK's default `Expect: 100-continue` on bodies >= 2 MiB costs a round trip per PUT;
// it is off here unless --expect-continue.
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  CreateBucketCommand, DeleteBucketCommand, DeleteObjectsCommand, GetObjectCommand, PutObjectCommand, S3Client,
} from '@aws-sdk/client-s3';

process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true'; // the version is pinned

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const argv = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = argv.indexOf(`--${name}`);
  return i < 0 ? dflt : argv[i + 1];
};
const MiB = 1024 * 1024;
const size = Number(opt('size-mib', 4)) * MiB;
const count = Math.ceil((Number(opt('total-mib', 512)) * MiB) / size);
const inflight = Number(opt('inflight', 4));
const rounds = Number(opt('rounds', 1));
const dir = path.resolve(ROOT, opt('dir', '.cache/s3/ceph'));
const jsonOut = opt('json', '');

const envFile = path.join(dir, 'env');
const pids = () => Object.fromEntries(['mon', 'osd', 'rgw'].flatMap((n) => {
  try { return [[n, Number(fs.readFileSync(path.join(dir, 'run', `${n}.pid`), 'utf8'))]]; } catch { return []; }
}));
// Join under a lease: stopped at the end only if nobody else uses it and it was not started by hand.
const lease = `bench-${process.pid}`;
execFileSync('bash', [path.join(ROOT, 'scripts/s3/start.sh'), dir], {
  stdio: ['ignore', 'ignore', 'inherit'],
  env: { ...process.env, S3_LEASE: lease, S3_LEASE_PID: String(process.pid) },
});
const env = Object.fromEntries([...fs.readFileSync(envFile, 'utf8').matchAll(/^export (\w+)='([^']*)'$/gm)].map((m) => [m[1], m[2]]));

const rssKiB = (pid) => Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0);
const daemonPids = pids();
const peak = Object.fromEntries(Object.keys(daemonPids).map((n) => [n, 0]));
const idle = Object.fromEntries(Object.entries(daemonPids).map(([n, p]) => [n, rssKiB(p)]));
const sampler = setInterval(() => {
  for (const [n, p] of Object.entries(daemonPids)) peak[n] = Math.max(peak[n], rssKiB(p));
}, 100);

const client = new S3Client({
  endpoint: env.S3_ENDPOINT,
  region: env.S3_REGION,
  credentials: { accessKeyId: env.AWS_ACCESS_KEY_ID, secretAccessKey: env.AWS_SECRET_ACCESS_KEY },
  forcePathStyle: true,
  requestChecksumCalculation: 'WHEN_REQUIRED',
  responseChecksumValidation: 'WHEN_REQUIRED',
  expectContinueHeader: argv.includes('--expect-continue') ? 2 * MiB : false,
});
const bucket = `bench-${Date.now().toString(36)}`;
await client.send(new CreateBucketCommand({ Bucket: bucket }));
// A few distinct random payloads (each object differs from its neighbours).
const payloads = Array.from({ length: 8 }, () => randomBytes(size));

// CPU seconds (user+sys) of a daemon, from /proc/PID/stat (fields 14, 15 in clock ticks of 1/100 s).
const cpuSecs = (pid) => {
  const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
};
const cpuNow = () => ({
  ...Object.fromEntries(Object.entries(daemonPids).map(([n, p]) => [n, cpuSecs(p)])),
  client: (process.cpuUsage().user + process.cpuUsage().system) / 1e6,
});

async function phase(name, op) {
  const lat = [];
  let next = 0;
  const cpu0 = cpuNow();
  const t0 = performance.now();
  await Promise.all(Array.from({ length: inflight }, async () => {
    for (let i = next++; i < count; i = next++) {
      const s = performance.now();
      await op(i);
      lat.push(performance.now() - s);
    }
  }));
  const secs = (performance.now() - t0) / 1000;
  lat.sort((a, b) => a - b);
  const q = (p) => lat[Math.min(lat.length - 1, Math.floor(p * lat.length))].toFixed(0);
  const cpu1 = cpuNow();
  const gib = (count * size) / 1024 / MiB;
  const cpuPerGiB = Object.fromEntries(Object.keys(cpu1).map((k) => [k, +((cpu1[k] - cpu0[k]) / gib).toFixed(2)]));
  const load = fs.readFileSync('/proc/loadavg', 'utf8').split(' ')[0];
  const r = { phase: name, objects: count, mib: (count * size) / MiB, secs: +secs.toFixed(2), mibPerSec: +((count * size) / MiB / secs).toFixed(1), p50ms: +q(0.5), p99ms: +q(0.99), cpuSecsPerGiB: cpuPerGiB, loadavg: +load };
  console.log(`${name.padEnd(4)} ${r.objects} x ${size / MiB} MiB, ${inflight} in flight: ${r.mibPerSec} MiB/s (${r.secs} s; latency p50 ${r.p50ms} ms, p99 ${r.p99ms} ms)`);
  console.log(`     CPU s/GiB: ${Object.entries(cpuPerGiB).map(([k, v]) => `${k} ${v}`).join(', ')}; loadavg ${load}`);
  return r;
}

const results = [];
for (let round = 0; round < rounds; round++) {
  results.push(await phase('PUT', (i) => client.send(new PutObjectCommand({ Bucket: bucket, Key: `o${i}`, Body: payloads[i % payloads.length] }))));
  results.push(await phase('GET', async (i) => {
    const res = await client.send(new GetObjectCommand({ Bucket: bucket, Key: `o${i}` }));
    let n = 0;
    for await (const chunk of res.Body) n += chunk.length;
    if (n !== size) throw new Error(`o${i}: got ${n} bytes, expected ${size}`);
  }));
}
clearInterval(sampler);
for (let i = 0; i < count; i += 1000) {
  const keys = Array.from({ length: Math.min(1000, count - i) }, (_, k) => ({ Key: `o${i + k}` }));
  await client.send(new DeleteObjectsCommand({ Bucket: bucket, Delete: { Objects: keys, Quiet: true } }));
}
await client.send(new DeleteBucketCommand({ Bucket: bucket }));
client.destroy();

const mib = (k) => (k / 1024).toFixed(0);
console.log(`RSS MiB idle/peak: ${Object.keys(peak).map((n) => `${n} ${mib(idle[n])}/${mib(peak[n])}`).join(', ')}; ` +
  `total ${mib(Object.values(idle).reduce((a, b) => a + b, 0))}/${mib(Object.values(peak).reduce((a, b) => a + b, 0))}`);
if (jsonOut) fs.writeFileSync(jsonOut, JSON.stringify({ size, count, inflight, expectContinue: argv.includes('--expect-continue'), results, rssKiB: { idle, peak } }, null, 2));
execFileSync('bash', [path.join(ROOT, 'scripts/s3/stop.sh'), dir, '--release', lease], { stdio: ['ignore', 'ignore', 'inherit'] });
