/**
 * A fault-injection HTTP server: a stand-in dependency whose latency, error rate and dropped
 * connections each test sets, while it runs. Every path answers 200 with a small JSON body
 * that echoes what the caller propagated (deadline and trace headers), unless a fault applies.
 *
 * Control: methods on the object in-process; `GET|PUT /__fault` over HTTP (for a server in a
 * child process, see cli.ts). Control requests are never faulted. Randomness is seeded.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { seededRandom, type Random } from '../random.ts';
import { FAULTS_NONE, mergeFaults, type FaultSettings } from './settings.ts';

export const FAULT_CONTROL_PATH = '/__fault';

/** Control request bodies beyond this are refused. */
const CONTROL_BODY_BYTES_MAX = 16 * 1024;

export interface FaultServerStats {
  requests: number;
  ok: number;
  errors: number;
  drops: number;
  /** Requests being delayed or held (blackholed) right now. */
  inFlight: number;
}

export interface FaultServerOptions {
  port?: number;
  host?: string;
  settings?: Partial<FaultSettings>;
  seed?: number;
}

export class FaultServer {
  readonly seed: number;
  #settings: FaultSettings;
  readonly #server: Server;
  readonly #random: Random;
  readonly #sockets = new Set<Socket>();
  readonly #timers = new Set<NodeJS.Timeout>();
  #stats: FaultServerStats = { requests: 0, ok: 0, errors: 0, drops: 0, inFlight: 0 };
  #url = '';

  private constructor(options: FaultServerOptions) {
    this.seed = options.seed ?? 1;
    this.#random = seededRandom(this.seed);
    this.#settings = mergeFaults(FAULTS_NONE, options.settings ?? {});
    this.#server = createServer((req, res) => { this.#handle(req, res); });
    // Keep-alive connections are tracked so close() and drops can end them.
    this.#server.on('connection', (socket) => {
      this.#sockets.add(socket);
      socket.on('close', () => this.#sockets.delete(socket));
    });
  }

  static async start(options: FaultServerOptions = {}): Promise<FaultServer> {
    const server = new FaultServer(options);
    await new Promise<void>((resolve, reject) => {
      server.#server.once('error', reject);
      server.#server.listen(options.port ?? 0, options.host ?? '127.0.0.1', () => { resolve(); });
    });
    const address = server.#server.address() as AddressInfo;
    server.#url = `http://${address.address}:${address.port}`;
    return server;
  }

  get url(): string {
    return this.#url;
  }

  get settings(): Readonly<FaultSettings> {
    return this.#settings;
  }

  get stats(): Readonly<FaultServerStats> {
    return { ...this.#stats };
  }

  /** Changes some settings; the rest stay as they are. Applies to requests arriving from now on. */
  set(patch: Partial<FaultSettings>): void {
    this.#settings = mergeFaults(this.#settings, patch);
  }

  /** Back to a healthy dependency. */
  heal(): void {
    this.#settings = { ...FAULTS_NONE };
  }

  resetStats(): void {
    this.#stats = { requests: 0, ok: 0, errors: 0, drops: 0, inFlight: this.#stats.inFlight };
  }

  async close(): Promise<void> {
    for (const timer of this.#timers) clearTimeout(timer);
    this.#timers.clear();
    const closed = new Promise<void>((resolve) => this.#server.close(() => { resolve(); }));
    for (const socket of this.#sockets) socket.destroy();
    await closed;
  }

  #handle(req: IncomingMessage, res: ServerResponse): void {
    if (req.url?.startsWith(FAULT_CONTROL_PATH) === true) {
      this.#control(req, res);
      return;
    }
    const s = this.#settings;
    this.#stats.requests += 1;
    // Draw every random number up front and always in the same order, so a seed replays
    // the same sequence of outcomes whatever the settings.
    const dropDraw = this.#random();
    const errorDraw = this.#random();
    const jitterDraw = this.#random();
    if (dropDraw < s.dropRate) {
      this.#stats.drops += 1;
      // A TCP reset, not a clean close: the caller sees the connection fail mid-request.
      req.socket.resetAndDestroy();
      return;
    }
    if (s.blackhole) {
      this.#stats.inFlight += 1;
      res.on('close', () => { this.#stats.inFlight -= 1; });
      return;
    }
    const delayMs = s.latencyMs + jitterDraw * s.latencyJitterMs;
    const answer = (): void => {
      if (errorDraw < s.errorRate) {
        this.#stats.errors += 1;
        send(res, s.errorStatus, { error: 'injected fault', status: s.errorStatus });
        return;
      }
      this.#stats.ok += 1;
      send(res, 200, {
        ok: true,
        method: req.method,
        path: req.url,
        deadline_remaining_ms: req.headers['x-deadline-remaining-ms'] ?? null,
        traceparent: req.headers.traceparent ?? null,
      });
    };
    // Drain the request body before answering, so keep-alive connections stay usable.
    req.resume();
    if (delayMs <= 0) {
      answer();
      return;
    }
    this.#stats.inFlight += 1;
    const timer = setTimeout(() => {
      this.#timers.delete(timer);
      this.#stats.inFlight -= 1;
      if (!res.destroyed) answer();
    }, delayMs);
    this.#timers.add(timer);
  }

  #control(req: IncomingMessage, res: ServerResponse): void {
    if (req.method === 'GET') {
      send(res, 200, { settings: this.#settings, stats: this.stats, seed: this.seed });
      return;
    }
    if (req.method !== 'PUT') {
      send(res, 405, { error: 'use GET or PUT' });
      return;
    }
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (chunk: string) => {
      body += chunk;
      if (body.length > CONTROL_BODY_BYTES_MAX) req.destroy();
    });
    req.on('end', () => {
      try {
        const patch = JSON.parse(body) as Partial<FaultSettings> & { heal?: boolean; resetStats?: boolean };
        const { heal, resetStats, ...settings } = patch;
        if (heal === true) this.heal();
        if (resetStats === true) this.resetStats();
        this.set(settings);
        send(res, 200, { settings: this.#settings, stats: this.stats, seed: this.seed });
      } catch (error) {
        send(res, 400, { error: error instanceof Error ? error.message : String(error) });
      }
    });
  }
}

function send(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}
