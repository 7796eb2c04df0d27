/**
 * The sequencer in a worker thread: its hashing, encryption and row parsing (tens of
 * microseconds per record) then run beside the service's event loop instead of on it, so
 * integrating the trail adds no latency to requests. The worker opens its own small pool.
 *
 *   const worker = startSequencerWorker({ databaseUrl, signingKeyPem, origin, ... });
 *   ...
 *   await worker.close();   // integrates what is left, signs a last checkpoint, exits
 */
import { readlinkSync } from 'node:fs';
import { setPriority } from 'node:os';
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads';
import pg from 'pg';
import { ExponentialBackoff, type IBackoff } from 'cockatiel';
import { parseIntoClientConfig } from 'pg-connection-string';
// The module alone: the runtime's index would load Fastify and the rest into this thread.
import { guardPool } from '@ledgerline/service-runtime/pg-pool';
import { loadSigningKey, parseKeyEncryptionKey, parsePublicKey } from './keys.ts';
import { AuditSequencer, AuditTreeMismatchError } from './sequencer.ts';

export interface SequencerWorkerOptions {
  /** The sequencer's login. */
  databaseUrl: string;
  /** The event store's owner's login (the service's), when not `databaseUrl`'s: see SequencerOptions.eventsPool. */
  eventsDatabaseUrl?: string;
  /** PKCS#8 PEM; empty for the development key (refused when `production`). */
  signingKeyPem: string;
  production: boolean;
  /**
   * PEMs of the public keys the log was signed with before this key (a rotation): a restarted
   * sequencer trusts the latest checkpoint only under a key it knows (SequencerOptions.previousKeys).
   */
  previousPublicKeysPem?: readonly string[];
  origin: string;
  /** Integrate the events of this database's event store (the identity service's database has none). */
  tailEvents?: boolean;
  intervalMs?: number;
  checkpointIntervalMs?: number;
  batchRecordsMax?: number;
  /** `AUDIT_KEY_ENCRYPTION_KEY`: wraps the subject keys at rest (see keys.ts); empty or absent: in clear. */
  keyEncryptionKey?: string;
  /**
   * The worker thread's nice value (Linux; 0..19, default SEQUENCER_NICE_DEFAULT). Requests
   * on the service's own threads then come first when the cores are busy, and the sequencer
   * uses what they leave: at nice 10 the scheduler still gives it about a tenth of a core
   * against a busy one, some ten times what it needs at the ledger's full rate, so it keeps up.
   * 0 leaves it at the process's priority.
   */
  nice?: number;
}

/** See `SequencerWorkerOptions.nice`. */
export const SEQUENCER_NICE_DEFAULT = 10;

/**
 * Lowers this thread's CPU priority, on Linux, where a nice value is a thread's own:
 * `setpriority` given a thread id changes that thread only. Elsewhere (no /proc/thread-self),
 * or when refused, it does nothing and says why.
 */
function lowerThreadPriority(nice: number): string | null {
  if (nice === 0) return null;
  try {
    // "/proc/thread-self" links to "<pid>/task/<tid>".
    const tid = Number(readlinkSync('/proc/thread-self').split('/').at(-1));
    setPriority(tid, nice);
    return null;
  } catch (error) {
    return `the sequencer thread keeps the process's priority: ${error instanceof Error ? error.message : String(error)}`;
  }
}

/** Marks the worker's data, so importing this module in any other worker starts nothing. */
const WORKER_MARK = 'ledgerline.audit.sequencer-worker';

type FromWorker = { kind: 'error'; message: string; treeMismatch?: boolean } | { kind: 'warning'; message: string } | { kind: 'closed' } | { kind: 'started' };

/** What the worker reports: a failed round (it retries from storage), a worker that died (it is started again), or something that works on less well (e.g. a priority it could not lower). */
export interface SequencerWorkerHandlers {
  onError?: (message: string) => void;
  onWarning?: (message: string) => void;
}

export interface SequencerWorker {
  /** Stops the rounds, integrates what is left, signs a final checkpoint and ends the worker; cancels a restart that is waiting. */
  close(): Promise<void>;
  /** The running thread's own CPU time, in microseconds (zero while none runs; its PostgreSQL backends, named by SEQUENCER_APPLICATION_NAME, are apart). */
  cpuUsage(): Promise<{ user: number; system: number }>;
  /** How many times a thread that died was replaced by a new one. */
  restarts(): number;
  /**
   * Rounds refused because the stored tree no longer matches the latest checkpoint
   * (AuditTreeMismatchError): nothing is signed or integrated until storage is repaired, so
   * any rise deserves an alert.
   */
  treeMismatches(): number;
  /**
   * The running thread, or null while a new one is awaited. For diagnostics: a thread ended
   * other than by `close()` (`terminate()`, an uncaught error, running out of memory) counts
   * as a death, and a new one is started.
   */
  thread(): Worker | null;
}

/** The sequencer worker's connections show this `application_name` in pg_stat_activity. */
export const SEQUENCER_APPLICATION_NAME = 'ledgerline-audit-sequencer';

/** The first wait before a dead worker is started again, and the longest (the waits grow between them, with jitter). */
export const SEQUENCER_RESTART_DELAY_MS_DEFAULT = 1000;
export const SEQUENCER_RESTART_DELAY_MAX_MS_DEFAULT = 30_000;
/** A thread that ran this long before it died starts the waits over from the first. */
const SEQUENCER_HEALTHY_MS = 60_000;

/** How a dead sequencer thread is replaced (the main thread's part; the worker never sees these). */
export interface SequencerSupervision {
  /** The first wait before a new thread starts, in ms (default SEQUENCER_RESTART_DELAY_MS_DEFAULT). */
  restartDelayMs?: number;
  /** The longest wait, in ms (default SEQUENCER_RESTART_DELAY_MAX_MS_DEFAULT). */
  restartDelayMaxMs?: number;
}

/** One worker thread: resolves once its sequencer runs; `died` is called at most once, when it ends other than by `close()`. */
interface SequencerThread {
  worker: Worker;
  startedAt: number;
  close(): Promise<void>;
}

function startThread(options: SequencerWorkerOptions, handlers: SequencerWorkerHandlers, died: (how: string) => void, treeMismatch: () => void): Promise<SequencerThread> {
  const worker = new Worker(new URL(import.meta.url), { workerData: { [WORKER_MARK]: options } });
  let started = false;
  let closing: (() => void) | null = null;
  let exited = false;
  let failure: Error | null = null;
  const close = (): Promise<void> =>
    exited
      ? Promise.resolve()
      : new Promise<void>((done) => {
          closing = done;
          worker.postMessage('close');
        });
  return new Promise((resolve, reject) => {
    worker.on('message', (m: FromWorker) => {
      if (m.kind === 'started') {
        started = true;
        resolve({ worker, startedAt: Date.now(), close });
      } else if (m.kind === 'closed') closing?.();
      else if (m.kind === 'warning') handlers.onWarning?.(m.message);
      else {
        if (m.treeMismatch === true) treeMismatch();
        handlers.onError?.(m.message);
      }
    });
    // 'exit' follows 'error'; the death is reported once, from 'exit', with the error's message.
    worker.on('error', (error: Error) => {
      failure = error;
    });
    worker.on('exit', (code) => {
      exited = true;
      if (!started) reject(failure ?? new Error(`audit sequencer worker exited with ${code}`));
      else if (closing === null) died(failure === null ? `exited with ${code}` : `failed (${failure.message})`);
      closing?.();
    });
  });
}

/**
 * Starts the worker; resolves once its sequencer runs (a worker that cannot start rejects).
 * After that it is supervised: a thread that dies is reported through `onError` and started
 * again after a wait that grows from `restartDelayMs` to `restartDelayMaxMs` (cockatiel's
 * exponential backoff with jitter), until `close()`. Nothing is lost meanwhile: records wait
 * in the queue, and the new thread's first rounds integrate them. `onError` also gets each
 * failed round (the sequencer retries from storage), `onWarning` the rest.
 */
export function startSequencerWorker(options: SequencerWorkerOptions & SequencerSupervision, handlers: SequencerWorkerHandlers = {}): Promise<SequencerWorker> {
  const nice = options.nice ?? SEQUENCER_NICE_DEFAULT;
  if (!(Number.isInteger(nice) && nice >= 0 && nice <= 19)) return Promise.reject(new RangeError(`nice must be an integer in 0..19, not ${nice}`));
  const { restartDelayMs = SEQUENCER_RESTART_DELAY_MS_DEFAULT, restartDelayMaxMs = SEQUENCER_RESTART_DELAY_MAX_MS_DEFAULT, ...threadOptions } = options;
  if (!(restartDelayMs > 0 && restartDelayMaxMs >= restartDelayMs)) return Promise.reject(new RangeError('restartDelayMs must be positive and at most restartDelayMaxMs'));
  const backoffs = new ExponentialBackoff({ initialDelay: restartDelayMs, maxDelay: restartDelayMaxMs });

  let current: SequencerThread | null = null;
  let starting: Promise<void> | null = null;
  let timer: NodeJS.Timeout | null = null;
  let closed = false;
  let restarts = 0;
  let treeMismatches = 0;
  const treeMismatch = (): void => {
    treeMismatches += 1;
  };
  let backoff: IBackoff<unknown> = backoffs.next();

  // `current` is the thread that died (or null, when a new one failed to start).
  const died = (how: string): void => {
    const ranFor = current === null ? 0 : Date.now() - current.startedAt;
    current = null;
    if (closed) return;
    if (ranFor >= SEQUENCER_HEALTHY_MS) backoff = backoffs.next();
    const delay = Math.round(backoff.duration);
    backoff = backoff.next(undefined);
    handlers.onError?.(`the sequencer worker ${how}; a new one starts in ${delay} ms (records wait in the queue meanwhile)`);
    timer = setTimeout(restart, delay);
    timer.unref();
  };
  const restart = (): void => {
    timer = null;
    if (closed) return;
    starting = startThread(threadOptions, handlers, died, treeMismatch).then(
      (thread) => {
        starting = null;
        restarts += 1;
        current = thread;
        handlers.onWarning?.(`audit sequencer worker started again (restart ${restarts})`);
      },
      (error: unknown) => {
        starting = null;
        died(`could not be started again (${error instanceof Error ? error.message : String(error)})`);
      },
    );
  };

  return startThread(threadOptions, handlers, died, treeMismatch).then((first) => {
    current = first;
    return {
      close: async () => {
        closed = true;
        if (timer !== null) clearTimeout(timer);
        timer = null;
        // A thread being started finishes starting, and is then closed like any other.
        await starting;
        await current?.close();
      },
      cpuUsage: () => current?.worker.cpuUsage() ?? Promise.resolve({ user: 0, system: 0 }),
      restarts: () => restarts,
      treeMismatches: () => treeMismatches,
      thread: () => current?.worker ?? null,
    };
  });
}

/**
 * The pool's settings from the service's URL, with `application_name` set to `name`. Parsed
 * here rather than passed as `connectionString`: pg lets a connection string's parameters win
 * over the options beside it, so an operator's `?application_name=` in the URL would otherwise
 * hide which connections are the sequencer's. Bounded waits: a connection that cannot be made
 * in 10 s, or a statement unanswered in 120 s, fails the round, which is tried again, rather
 * than holding its transaction open for ever.
 */
export function namedConnection(url: string, name: string): pg.ClientConfig {
  return { ...parseIntoClientConfig(url), application_name: name, connectionTimeoutMillis: 10_000, query_timeout: 120_000, keepAlive: true };
}

function runInWorker(o: SequencerWorkerOptions): void {
  const port = parentPort;
  if (port === null) throw new Error('invariant: no parent port in the sequencer worker');
  const refused = lowerThreadPriority(o.nice ?? SEQUENCER_NICE_DEFAULT);
  if (refused !== null) port.postMessage({ kind: 'warning', message: refused } satisfies FromWorker);
  const pool = new pg.Pool({ ...namedConnection(o.databaseUrl, SEQUENCER_APPLICATION_NAME), max: 2 });
  const eventsPool = o.eventsDatabaseUrl === undefined || o.eventsDatabaseUrl === o.databaseUrl ? null : new pg.Pool({ ...namedConnection(o.eventsDatabaseUrl, SEQUENCER_APPLICATION_NAME), max: 1 });
  // A connection lost under a checked-out client emits 'error' on it, which would end the
  // thread unless something listens; the round it broke fails and is retried from storage.
  guardPool(pool, () => {});
  if (eventsPool !== null) guardPool(eventsPool, () => {});
  const sequencer = new AuditSequencer({
    pool,
    signer: loadSigningKey(o.signingKeyPem, { production: o.production }),
    ...(o.previousPublicKeysPem === undefined ? {} : { previousKeys: o.previousPublicKeysPem.map(parsePublicKey) }),
    origin: o.origin,
    tailEvents: o.tailEvents === true,
    ...(eventsPool === null ? {} : { eventsPool }),
    ...(o.intervalMs === undefined ? {} : { intervalMs: o.intervalMs }),
    ...(o.checkpointIntervalMs === undefined ? {} : { checkpointIntervalMs: o.checkpointIntervalMs }),
    ...(o.batchRecordsMax === undefined ? {} : { batchRecordsMax: o.batchRecordsMax }),
    ...(o.keyEncryptionKey === undefined || o.keyEncryptionKey === '' ? {} : { keyEncryptionKey: parseKeyEncryptionKey(o.keyEncryptionKey) }),
    onError: (error) =>
      port.postMessage({ kind: 'error', message: error instanceof Error ? error.message : String(error), treeMismatch: error instanceof AuditTreeMismatchError } satisfies FromWorker),
  });
  sequencer.start();
  port.on('message', (m: unknown) => {
    if (m !== 'close') return;
    sequencer
      .close()
      .catch((error: unknown) => port.postMessage({ kind: 'error', message: error instanceof Error ? error.message : String(error) } satisfies FromWorker))
      .finally(() => {
        void Promise.allSettled([pool.end(), eventsPool?.end()]).finally(() => {
          port.postMessage({ kind: 'closed' } satisfies FromWorker);
          port.close();
        });
      });
  });
  port.postMessage({ kind: 'started' } satisfies FromWorker);
}

const mine = isMainThread ? undefined : (workerData as Record<string, SequencerWorkerOptions | undefined> | null)?.[WORKER_MARK];
if (mine !== undefined) runInWorker(mine);
