// Human-readable output for the CLI; --json prints the raw objects instead.
import { formatSize } from '../pool/size.js';
import type { VolumeInfo } from '../pool/pool.js';
import type { ChangedExtent, SnapshotInfo } from '../storage/volume.js';

export function table(rows: string[][]): string {
  const w = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => r.map((c, i) => c.padEnd(w[i])).join('  ').trimEnd()).join('\n');
}

export function volumeTable(vols: VolumeInfo[]): string {
  if (!vols.length) return 'no volumes';
  return table([
    ['NAME', 'SIZE', 'ALLOCATED', 'MODE', 'SNAPSHOTS', 'CONNECTIONS', 'CREATED'],
    ...vols.map((v) => [v.name, formatSize(v.size), formatSize(v.allocated), v.mode, String(v.snapshots), String(v.connections), v.created]),
  ]);
}

export function volumeDetails(v: VolumeInfo): string {
  const lines = [
    ['name', v.name],
    ['size', `${formatSize(v.size)} (${v.size} bytes)`],
    ['allocated', `${formatSize(v.allocated)} (${v.allocated} bytes)`],
    ['snapshot mode', v.mode],
    ['block size', formatSize(v.blockSize)],
    ...(v.mode === 'cow' ? [['cow reserve', formatSize(v.cowReserve)]] : []),
    ...(v.type ? [['type', v.type]] : []),
    ...(v.base ? [['clone of', `${v.base.volume}@${v.base.snapshot}`]] : []),
    ['snapshots', String(v.snapshots)],
    ['connections', String(v.connections)],
    ['created', v.created],
  ];
  return lines.map(([k, val]) => `${(k + ':').padEnd(15)}${val}`).join('\n');
}

export function snapshotTable(snaps: SnapshotInfo[]): string {
  if (!snaps.length) return 'no snapshots';
  return table([['NAME', 'STATUS', 'SIZE', 'OWN DATA', 'CREATED'], ...snaps.map((s) => [s.name, s.status, formatSize(s.size), formatSize(s.ownBytes), s.created])]);
}

export function diffTable(extents: ChangedExtent[]): string {
  const total = extents.reduce((n, e) => n + e.length, 0);
  return [...extents.map((e) => `${String(e.offset).padStart(14)}  ${String(e.length).padStart(12)}  changed`), `${extents.length} extent(s), ${formatSize(total)} changed`].join('\n');
}
