// A connected pair of real TCP sockets on 127.0.0.1, for tests of one side's socket handling.
import net from 'node:net';

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
