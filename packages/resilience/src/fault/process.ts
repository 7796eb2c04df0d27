/**
 * Starts a fault double as a child process and drives it over its control API: for tests
 * where the dependency must really be another process (its own event loop, its own crash).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { FAULT_CONTROL_PATH } from './server.ts';
import type { FaultSettings } from './settings.ts';

const CLI = fileURLToPath(new URL('./cli.ts', import.meta.url));
const START_TIMEOUT_MS = 10_000;

export interface FaultControlPatch extends Partial<FaultSettings> {
  heal?: boolean;
  resetStats?: boolean;
  /** Proxy only: reset every live connection. */
  dropConnections?: boolean;
}

export interface FaultProcess {
  child: ChildProcess;
  /** The server's base URL (mode server), or undefined. */
  url: string | undefined;
  /** The proxy's listening port (mode proxy), or undefined. */
  port: number | undefined;
  controlUrl: string;
  set(patch: FaultControlPatch): Promise<unknown>;
  status(): Promise<{ settings: FaultSettings; stats: Record<string, number> }>;
  /** SIGTERM, then SIGKILL if it has not exited within a second. */
  stop(): Promise<void>;
}

export async function spawnFault(mode: 'server' | 'proxy', args: readonly string[] = []): Promise<FaultProcess> {
  const child = spawn(process.execPath, [CLI, mode, ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
  const exited = once(child, 'exit');
  const lines = createInterface({ input: child.stdout });
  const first = await Promise.race([
    once(lines, 'line').then(([line]) => line as string),
    exited.then(([code]) => { throw new Error(`fault ${mode} exited (${String(code)}) before it was ready`); }),
    new Promise<never>((_resolve, reject) => setTimeout(() => { reject(new Error(`fault ${mode} not ready in ${START_TIMEOUT_MS} ms`)); }, START_TIMEOUT_MS).unref()),
  ]).catch((error: unknown) => {
    child.kill('SIGKILL');
    throw error;
  });
  let url: string | undefined;
  let port: number | undefined;
  let controlUrl: string;
  const server = /^FAULT server (\S+)$/.exec(first);
  const proxy = /^FAULT proxy (\d+) control (\S+)$/.exec(first);
  if (server !== null) {
    url = server[1] ?? '';
    controlUrl = url;
  } else if (proxy !== null) {
    port = Number(proxy[1]);
    controlUrl = proxy[2] ?? '';
  } else {
    child.kill('SIGKILL');
    throw new Error(`fault ${mode}: unexpected first line ${JSON.stringify(first)}`);
  }
  const control = `${controlUrl}${FAULT_CONTROL_PATH}`;
  return {
    child,
    url,
    port,
    controlUrl,
    async set(patch) {
      const response = await fetch(control, { method: 'PUT', body: JSON.stringify(patch), headers: { 'content-type': 'application/json' } });
      const body: unknown = await response.json();
      if (!response.ok) throw new Error(`fault control: ${JSON.stringify(body)}`);
      return body;
    },
    async status() {
      const response = await fetch(control);
      return (await response.json()) as { settings: FaultSettings; stats: Record<string, number> };
    },
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 1000);
      await exited;
      clearTimeout(timer);
    },
  };
}
