/**
 * A fault-injection TCP proxy: put it between a service and any TCP dependency (PostgreSQL,
 * Redis, NATS, another service) and set, while it runs, the latency added to every chunk,
 * the share of new connections reset on arrival, a blackhole (connections accepted, nothing
 * forwarded), or cut every live connection at once (`dropConnections`).
 *
 * Bytes keep their order in each direction whatever the latency does meanwhile, and each
 * direction buffers at most BUFFER_BYTES_MAX before it stops reading from its source.
 */
import { createServer, connect, type AddressInfo, type Server, type Socket } from 'node:net';
import { seededRandom, type Random } from '../random.ts';
import { FAULTS_NONE, mergeFaults, type FaultSettings } from './settings.ts';

/**
 * After one side's graceful close, how long the other may keep the pair open before it is
 * ended (FaultProxyOptions.closeLingerMs): a peer that never closes its side holds nothing of
 * the proxy's for longer.
 */
const CLOSE_LINGER_MS_DEFAULT = 5000;
/** Per direction: past this many delayed bytes the source is paused until they are sent. */
const BUFFER_BYTES_MAX = 1024 * 1024;

export interface FaultProxyOptions {
  target: { host: string; port: number };
  port?: number;
  host?: string;
  settings?: Partial<Pick<FaultSettings, 'latencyMs' | 'latencyJitterMs' | 'dropRate' | 'blackhole'>>;
  seed?: number;
  /** After one side closes and its bytes are delivered, how long the other may stay open. Default 5 s. */
  closeLingerMs?: number;
}

export interface FaultProxyStats {
  connections: number;
  open: number;
  drops: number;
  bytesUp: number;
  bytesDown: number;
}

export class FaultProxy {
  readonly target: { host: string; port: number };
  readonly seed: number;
  readonly #closeLingerMs: number;
  #settings: FaultSettings;
  readonly #server: Server;
  readonly #random: Random;
  readonly #pairs = new Set<{ client: Socket; upstream: Socket }>();
  readonly #stats: FaultProxyStats = { connections: 0, open: 0, drops: 0, bytesUp: 0, bytesDown: 0 };
  #port = 0;
  #host = '';

  private constructor(options: FaultProxyOptions) {
    this.target = options.target;
    this.seed = options.seed ?? 1;
    this.#closeLingerMs = options.closeLingerMs ?? CLOSE_LINGER_MS_DEFAULT;
    this.#random = seededRandom(this.seed);
    this.#settings = mergeFaults(FAULTS_NONE, options.settings ?? {});
    this.#server = createServer((client) => { this.#accept(client); });
  }

  static async start(options: FaultProxyOptions): Promise<FaultProxy> {
    const proxy = new FaultProxy(options);
    await new Promise<void>((resolve, reject) => {
      proxy.#server.once('error', reject);
      proxy.#server.listen(options.port ?? 0, options.host ?? '127.0.0.1', () => { resolve(); });
    });
    const address = proxy.#server.address() as AddressInfo;
    proxy.#port = address.port;
    proxy.#host = address.address;
    return proxy;
  }

  get port(): number {
    return this.#port;
  }

  get host(): string {
    return this.#host;
  }

  get settings(): Readonly<FaultSettings> {
    return this.#settings;
  }

  get stats(): Readonly<FaultProxyStats> {
    return { ...this.#stats };
  }

  set(patch: Partial<FaultSettings>): void {
    this.#settings = mergeFaults(this.#settings, patch);
  }

  heal(): void {
    this.#settings = { ...FAULTS_NONE };
  }

  /** Resets every live connection (both sides see a TCP RST), like a dependency restarting. */
  dropConnections(): number {
    const n = this.#pairs.size;
    for (const pair of this.#pairs) {
      pair.client.resetAndDestroy();
      pair.upstream.resetAndDestroy();
    }
    this.#pairs.clear();
    this.#stats.drops += n;
    return n;
  }

  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.#server.close(() => { resolve(); }));
    for (const pair of this.#pairs) {
      pair.client.destroy();
      pair.upstream.destroy();
    }
    this.#pairs.clear();
    await closed;
  }

  #accept(client: Socket): void {
    this.#stats.connections += 1;
    const dropDraw = this.#random();
    if (dropDraw < this.#settings.dropRate) {
      this.#stats.drops += 1;
      client.resetAndDestroy();
      return;
    }
    const upstream = connect(this.target.port, this.target.host);
    const pair = { client, upstream };
    this.#pairs.add(pair);
    this.#stats.open += 1;
    let ended = false;
    const end = (): void => {
      if (ended) return;
      ended = true;
      this.#pairs.delete(pair);
      this.#stats.open -= 1;
      client.destroy();
      upstream.destroy();
    };
    client.on('error', end);
    upstream.on('error', end);
    // A side that closes gracefully (FIN) has its bytes still in the proxy delivered first, and
    // then the close, as TCP delivers a FIN after the data sent before it: a client that sends
    // a statement and then gives up and closes still has the statement reach the server. The
    // pair ends when both sides have closed (or closeLingerMs after the first one's bytes were
    // delivered, if the other keeps its side open); an error (a reset) ends it at once.
    // Half-open connections are not kept: a side that closes its sending half is closed whole
    // (the sockets are not allowHalfOpen), so it gets nothing the other side sends after that.
    const up = this.#pipe(client, upstream, (n) => { this.#stats.bytesUp += n; });
    const down = this.#pipe(upstream, client, (n) => { this.#stats.bytesDown += n; });
    let open = 2;
    const closed = (hadError: boolean, pipe: { finish(flushed: () => void): void }): void => {
      if (hadError) {
        end();
        return;
      }
      open -= 1;
      pipe.finish(() => {
        if (open === 0) end();
        else setTimeout(end, this.#closeLingerMs).unref();
      });
    };
    client.on('close', (hadError) => { closed(hadError, up); });
    upstream.on('close', (hadError) => { closed(hadError, down); });
  }

  /**
   * Forwards `from` → `to`, each chunk after the latency in force when it arrived, in order.
   * `finish(flushed)`: `from` has closed; once the chunks still queued are written (none, if
   * blackholed), `to` is ended and `flushed` called.
   */
  #pipe(from: Socket, to: Socket, count: (bytes: number) => void): { finish(flushed: () => void): void } {
    const queue: Array<{ atMs: number; chunk: Buffer }> = [];
    let queuedBytes = 0;
    let timer: NodeJS.Timeout | undefined;
    let lastAtMs = 0;
    let flushed: (() => void) | undefined;
    const close = (done: () => void): void => {
      if (!to.destroyed) to.end();
      done();
    };
    const pump = (): void => {
      timer = undefined;
      const now = performance.now();
      for (let head = queue[0]; head !== undefined && head.atMs <= now; head = queue[0]) {
        queue.shift();
        const { chunk } = head;
        queuedBytes -= chunk.length;
        if (!to.destroyed) to.write(chunk);
        count(chunk.length);
      }
      if (queuedBytes < BUFFER_BYTES_MAX && from.isPaused()) from.resume();
      const head = queue[0];
      if (head !== undefined) timer = setTimeout(pump, head.atMs - now);
      else if (flushed !== undefined) close(flushed);
    };
    from.on('data', (chunk: Buffer) => {
      const s = this.#settings;
      if (s.blackhole) return;
      const now = performance.now();
      const delayMs = s.latencyMs + this.#random() * s.latencyJitterMs;
      if (delayMs <= 0 && queue.length === 0) {
        to.write(chunk);
        count(chunk.length);
        return;
      }
      // Never before the previous chunk: a latency that drops mid-stream must not reorder bytes.
      const atMs = Math.max(now + delayMs, lastAtMs);
      lastAtMs = atMs;
      queue.push({ atMs, chunk });
      queuedBytes += chunk.length;
      if (queuedBytes >= BUFFER_BYTES_MAX) from.pause();
      if (timer === undefined) timer = setTimeout(pump, atMs - now);
    });
    to.on('close', () => {
      if (timer !== undefined) clearTimeout(timer);
    });
    return {
      finish: (done) => {
        if (this.#settings.blackhole || queue.length === 0) close(done);
        else flushed = done;
      },
    };
  }
}
