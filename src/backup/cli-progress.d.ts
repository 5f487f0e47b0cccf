// Minimal typings for cli-progress 3.x (the package ships none; @types is not a dependency).
declare module 'cli-progress' {
  interface Options {
    format?: string;
    stream?: NodeJS.WritableStream;
    fps?: number;
    etaBuffer?: number;
    hideCursor?: boolean;
    clearOnComplete?: boolean;
    barsize?: number;
  }
  class SingleBar {
    constructor(opts: Options, preset?: unknown);
    start(total: number, start: number, payload?: Record<string, unknown>): void;
    update(value: number, payload?: Record<string, unknown>): void;
    setTotal(total: number): void;
    stop(): void;
  }
  const Presets: { shades_classic: unknown; legacy: unknown; rect: unknown };
  const _default: { SingleBar: typeof SingleBar; Presets: typeof Presets };
  export default _default;
}
