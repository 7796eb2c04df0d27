/**
 * The fault doubles as processes, for tests that need a dependency in another process:
 *
 *   node packages/resilience/src/fault/cli.ts server [--port 0] [--seed N] [--latency-ms N]
 *        [--error-rate R] [--error-status S] [--drop-rate R]
 *   node packages/resilience/src/fault/cli.ts proxy --target host:port [--port 0]
 *        [--control-port 0] [--seed N] [--latency-ms N] [--drop-rate R]
 *
 * Each prints one line when ready, `FAULT server <url>` or `FAULT proxy <port> control <url>`,
 * then takes its settings over HTTP: `PUT <url>/__fault` with a JSON patch of FaultSettings
 * (plus `"heal": true`, `"resetStats": true`, and for the proxy `"dropConnections": true`);
 * `GET` returns settings and stats. SIGTERM or SIGINT closes it.
 */
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { parseArgs } from 'node:util';
import { FaultProxy } from './proxy.ts';
import { FAULT_CONTROL_PATH, FaultServer } from './server.ts';
import type { FaultSettings } from './settings.ts';

const CONTROL_BODY_BYTES_MAX = 16 * 1024;

const { positionals, values } = parseArgs({
  allowPositionals: true,
  options: {
    port: { type: 'string', default: '0' },
    'control-port': { type: 'string', default: '0' },
    target: { type: 'string' },
    seed: { type: 'string', default: '1' },
    'latency-ms': { type: 'string' },
    'error-rate': { type: 'string' },
    'error-status': { type: 'string' },
    'drop-rate': { type: 'string' },
  },
});

const settings: Partial<FaultSettings> = {};
if (values['latency-ms'] !== undefined) settings.latencyMs = Number(values['latency-ms']);
if (values['error-rate'] !== undefined) settings.errorRate = Number(values['error-rate']);
if (values['error-status'] !== undefined) settings.errorStatus = Number(values['error-status']);
if (values['drop-rate'] !== undefined) settings.dropRate = Number(values['drop-rate']);
const seed = Number(values.seed);

const mode = positionals[0];
let close: () => Promise<void>;
if (mode === 'server') {
  const server = await FaultServer.start({ port: Number(values.port), settings, seed });
  close = () => server.close();
  process.stdout.write(`FAULT server ${server.url}\n`);
} else if (mode === 'proxy') {
  const [host, port] = (values.target ?? '').split(':');
  if (host === undefined || port === undefined || host === '') throw new Error('proxy needs --target host:port');
  const proxy = await FaultProxy.start({ target: { host, port: Number(port) }, port: Number(values.port), settings, seed });
  const control = createServer((req, res) => {
    const reply = (status: number, body: unknown): void => {
      res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
    };
    if (req.url !== FAULT_CONTROL_PATH) { reply(404, { error: 'not found' }); return; }
    if (req.method === 'GET') { reply(200, { settings: proxy.settings, stats: proxy.stats }); return; }
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (chunk: string) => {
      body += chunk;
      if (body.length > CONTROL_BODY_BYTES_MAX) req.destroy();
    });
    req.on('end', () => {
      try {
        const { heal, dropConnections, resetStats: _ignored, ...patch } = JSON.parse(body) as Partial<FaultSettings> & { heal?: boolean; dropConnections?: boolean; resetStats?: boolean };
        if (heal === true) proxy.heal();
        proxy.set(patch);
        const dropped = dropConnections === true ? proxy.dropConnections() : 0;
        reply(200, { settings: proxy.settings, stats: proxy.stats, dropped });
      } catch (error) {
        reply(400, { error: error instanceof Error ? error.message : String(error) });
      }
    });
  });
  await new Promise<void>((resolve) => control.listen(Number(values['control-port']), '127.0.0.1', () => { resolve(); }));
  const controlPort = (control.address() as AddressInfo).port;
  close = async () => {
    control.close();
    await proxy.close();
  };
  process.stdout.write(`FAULT proxy ${proxy.port} control http://127.0.0.1:${controlPort}\n`);
} else {
  process.stderr.write('usage: cli.ts server|proxy [options] (see the file header)\n');
  process.exit(2);
}

for (const signal of ['SIGTERM', 'SIGINT'] as const) {
  process.once(signal, () => {
    void close().finally(() => process.exit(0));
  });
}
