// A connected pair of real TCP sockets on 127.0.0.1, for tests of one side's socket handling.
import net from 'node:net';
import { afterEach } from 'vitest';

export async function tcpPair(): Promise<{ server: net.Socket; client: net.Socket; close: () => void }> {
  const listener = net.createServer();
  await new Promise<void>((r) => listener.listen(0, '127.0.0.1', r));
  const accepted = new Promise<net.Socket>((r) => listener.once('connection', r));
  const client = net.connect((listener.address() as net.AddressInfo).port, '127.0.0.1');
  const server = await accepted;
  const close = (): void => {
    client.destroy();
    server.destroy();
    listener.close();
  };
  return { server, client, close };
}

/** tcpPair for a test file: every pair it opens is closed after each test. */
export function tcpPairs(): () => Promise<{ server: net.Socket; client: net.Socket }> {
  const open: Array<() => void> = [];
  afterEach(() => open.splice(0).forEach((close) => close()));
  return async () => {
    const { server, client, close } = await tcpPair();
    open.push(close);
    return { server, client };
  };
}
