/**
 * Requests the service's rate limiter refused (429) on audited routes, recorded in summaries
 * rather than one record each. A client over its limit is refused at whatever rate it sends;
 * recorded one by one, its refusals grew the audit queue at that rate, and a retry storm
 * could fill the sink's buffer, after which every client's audited requests were refused 503
 * (the sink's back-pressure): one client's flood became everyone's outage.
 *
 * Each interval, per limiter bucket (the client the limiter counted: the principal, or the
 * address) and route, one summary per actor, address, resource and `details` the bucket's
 * refusals named, up to `perClientMax` of them; the bucket's refusals past those go into one
 * summary of their own that counts them and samples what they named (actors, addresses,
 * resources). A client can vary what it sends (a new resource id, a new username every time),
 * but not which bucket it draws on, so it cannot use up the table: it takes at most
 * `perClientMax` + 1 of its `keysMax` entries. Refusals of buckets the table has no room for
 * go into one overflow summary per record class, which counts them and names the buckets
 * refused most. A summary the sink refuses because its buffer is full is kept and offered again
 * with the next interval's, up to `keysMax` of them; one it refuses for any other reason (a
 * closed sink, an entry it finds invalid) is dropped at once. The caller is told how many
 * refusals the dropped summaries stood for.
 *
 * A catch-all summary names an actor and a resource only when its refusals all named the same
 * one (the verified principal of a bucket keyed by principal); otherwise its actor is
 * `anonymous` and its resource id `several`, and the samples in its payload say whom and what
 * they named, so that no one is credited with refusals that were not theirs.
 */
import type { FastifyInstance } from 'fastify';
import { flushEveryInterval, type RateLimit } from '@ledgerline/service-runtime';
import type { AuditActor, AuditEntry, AuditResource, AuditSink } from './sink.ts';
import { AuditBufferFullError } from './writer.ts';

/** How often the summaries are written (AuditHttpOptions.rateLimitedSummary). */
export const RATE_LIMITED_SUMMARY_INTERVAL_MS_DEFAULT = 10_000;
/** Summaries held at once before refusals of new buckets go to the overflow summary. */
export const RATE_LIMITED_SUMMARY_KEYS_MAX_DEFAULT = 1000;
/** Summaries of one bucket and route before its further refusals go into its catch-all summary. */
export const RATE_LIMITED_SUMMARIES_PER_CLIENT_MAX_DEFAULT = 10;
/** The action of the overflow summary: refusals of buckets the table had no room for. */
export const RATE_LIMITED_OVERFLOW_ACTION = 'audit.rate_limited.overflow';
/** What a catch-all or overflow summary names of each kind: at most this many. */
const SAMPLES_MAX = 20;
/** The times an audit entry may carry (years 0001..9999 UTC, as checkEntry holds it to). */
const TIME_MS_MIN = Date.parse('0001-01-01T00:00:00.000Z');
const TIME_MS_MAX = Date.parse('9999-12-31T23:59:59.999Z');
const NUL = '\u0000';

/** One refused request, as the audit plugin saw it. */
export interface RateLimitedRefusal {
  recordClass: string;
  action: string;
  actor: AuditActor;
  ip: string;
  resource: AuditResource;
  method: string;
  route: string;
  requestId: string;
  /** The request's trace id, when it came with one (the first refusal's is recorded). */
  traceId?: string;
  limit: Readonly<RateLimit>;
  /** Whose bucket the limiter drew on (`rateLimitRefusal(request).client`). */
  client: string;
  /** When it was refused, in ms since the epoch. */
  at: number;
  /**
   * What else a single refusal's record would say in its payload (the identity service: the
   * audience asked for): part of the key, so a summary stands only for refusals alike in it.
   */
  details?: Readonly<Record<string, unknown>>;
}

/** What a bucket's catch-all summary samples of the refusals it counts. */
interface Samples {
  actors: Set<string>;
  addresses: Set<string>;
  resources: Set<string>;
  /** Refusals that named an actor, address or resource past the samples. */
  unsampled: number;
}

interface Summary {
  first: RateLimitedRefusal;
  refused: number;
  to: number;
  lastRequestId: string;
  /** A bucket's catch-all: what its refusals named. */
  samples: Samples | null;
}

interface Bucket {
  summaries: Map<string, Summary>;
  rest: Summary | null;
}

interface Overflow {
  refused: number;
  from: number;
  to: number;
  /** Refusals per bucket, for at most `keysMax` buckets, and those of the rest. */
  byClient: Map<string, number>;
  unnamed: number;
  actions: Set<string>;
}

export interface RateLimitedSummariesOptions {
  /** Summaries held at once (default RATE_LIMITED_SUMMARY_KEYS_MAX_DEFAULT). */
  keysMax?: number;
  /** Summaries of one bucket and route (default RATE_LIMITED_SUMMARIES_PER_CLIENT_MAX_DEFAULT). */
  perClientMax?: number;
  /**
   * The reason each summary is recorded with: the one a single refusal was recorded with, so
   * that a summary reads as the records it stands for (default `rate-limited`, the problem
   * type's slug, as auditHttp records it; the identity service writes its slugs `rate_limited`).
   */
  reason?: string;
}

/** How often the summaries are written, and how many are held (AuditHttpOptions.rateLimitedSummary). */
export interface RateLimitedSummarySettings {
  intervalMs?: number;
  keysMax?: number;
  perClientMax?: number;
}

/**
 * The summaries of a service's rate-limited requests, written to `sink` every `intervalMs`
 * (default 10 s) and once more when `app` closes (services close their audit sink after the
 * app, so the last ones are written too). A write the sink refuses is logged; `onLost` gets
 * the refusals of summaries dropped for good (RateLimitedSummaries.writeTo). `add` to count.
 */
export function writeRateLimitedSummaries(
  app: FastifyInstance,
  options: { sink: Pick<AuditSink, 'record'>; service: string; reason?: string; settings?: RateLimitedSummarySettings; onLost?: (refused: number) => void },
): RateLimitedSummaries {
  const { sink, service, settings = {} } = options;
  const intervalMs = settings.intervalMs ?? RATE_LIMITED_SUMMARY_INTERVAL_MS_DEFAULT;
  if (!(Number.isInteger(intervalMs) && intervalMs >= 100)) throw new RangeError(`rateLimitedSummary.intervalMs must be an integer of at least 100, not ${intervalMs}`);
  const summaries = new RateLimitedSummaries({
    ...(settings.keysMax === undefined ? {} : { keysMax: settings.keysMax }),
    ...(settings.perClientMax === undefined ? {} : { perClientMax: settings.perClientMax }),
    ...(options.reason === undefined ? {} : { reason: options.reason }),
  });
  const write = (): void => {
    const { lost, error } = summaries.writeTo(sink, service);
    if (error !== null) app.log.warn({ err: error, audit: true, pending: summaries.pending }, 'audit: the sink refused summaries of rate-limited requests; those refused for a full buffer are offered again at the next interval');
    if (lost > 0) {
      options.onLost?.(lost);
      app.log.error({ err: error, audit: true, refused: lost }, 'audit: summaries of rate-limited requests could not be recorded');
    }
  };
  flushEveryInterval(app, intervalMs, write);
  return summaries;
}

const positiveInteger = (name: string, n: number): number => {
  if (!(Number.isInteger(n) && n >= 1)) throw new RangeError(`${name} must be a positive integer, not ${n}`);
  return n;
};
const iso = (ms: number): string => new Date(ms).toISOString();

export class RateLimitedSummaries {
  readonly #keysMax: number;
  readonly #perClientMax: number;
  readonly #reason: string;
  #buckets = new Map<string, Bucket>();
  /** Summaries held in #buckets (each bucket's own and its catch-all). */
  #held = 0;
  #overflow = new Map<string, Overflow>();
  /** Entries a sink refused, offered again first at the next write. */
  #unwritten: { entry: AuditEntry; refused: number }[] = [];

  constructor(options: RateLimitedSummariesOptions = {}) {
    this.#keysMax = positiveInteger('keysMax', options.keysMax ?? RATE_LIMITED_SUMMARY_KEYS_MAX_DEFAULT);
    this.#perClientMax = positiveInteger('perClientMax', options.perClientMax ?? RATE_LIMITED_SUMMARIES_PER_CLIENT_MAX_DEFAULT);
    this.#reason = options.reason ?? 'rate-limited';
  }

  /** Refusals counted and not yet written (those of summaries a sink refused included). */
  get pending(): number {
    let n = this.#unwritten.reduce((sum, u) => sum + u.refused, 0);
    for (const o of this.#overflow.values()) n += o.refused;
    for (const b of this.#buckets.values()) {
      n += b.rest?.refused ?? 0;
      for (const s of b.summaries.values()) n += s.refused;
    }
    return n;
  }

  add(refusal: RateLimitedRefusal): void {
    // A time no entry may carry (an injected clock gone wrong) would fail every write of the
    // summary; it is taken as now.
    const r = Number.isFinite(refusal.at) && refusal.at >= TIME_MS_MIN && refusal.at <= TIME_MS_MAX ? refusal : { ...refusal, at: Date.now() };
    // NUL cannot occur in any part: actors, addresses and resources are storable text, and
    // routes and methods come from the route table.
    const bucketKey = [r.client, r.method, r.route, r.recordClass, r.action].join(NUL);
    const key = [r.actor.type, r.actor.id, r.ip, r.resource.type, r.resource.id, JSON.stringify(r.details ?? {})].join(NUL);
    let bucket = this.#buckets.get(bucketKey);
    const held = bucket?.summaries.get(key);
    if (held !== undefined) {
      count(held, r);
      return;
    }
    if (bucket === undefined) {
      if (this.#held >= this.#keysMax) {
        this.#overflowed(r);
        return;
      }
      bucket = { summaries: new Map(), rest: null };
      this.#buckets.set(bucketKey, bucket);
    }
    if (bucket.rest !== null) {
      count(bucket.rest, r);
      return;
    }
    if (this.#held >= this.#keysMax) {
      this.#overflowed(r);
      return;
    }
    this.#held += 1;
    if (bucket.summaries.size < this.#perClientMax) bucket.summaries.set(key, { first: r, refused: 1, to: r.at, lastRequestId: r.requestId, samples: null });
    else bucket.rest = { first: r, refused: 1, to: r.at, lastRequestId: r.requestId, samples: { actors: new Set([actorText(r.actor)]), addresses: new Set([r.ip]), resources: new Set([resourceText(r.resource)]), unsampled: 0 } };
  }

  #overflowed(r: RateLimitedRefusal): void {
    let o = this.#overflow.get(r.recordClass);
    if (o === undefined) {
      o = { refused: 0, from: r.at, to: r.at, byClient: new Map(), unnamed: 0, actions: new Set() };
      this.#overflow.set(r.recordClass, o);
    }
    o.refused += 1;
    o.from = Math.min(o.from, r.at);
    o.to = Math.max(o.to, r.at);
    if (o.actions.size < SAMPLES_MAX) o.actions.add(r.action);
    const n = o.byClient.get(r.client);
    if (n !== undefined) o.byClient.set(r.client, n + 1);
    else if (o.byClient.size < this.#keysMax) o.byClient.set(r.client, 1);
    else o.unnamed += 1;
  }

  /** The records of everything counted since the last drain, and an empty table. */
  drain(service: string): { entry: AuditEntry; refused: number }[] {
    const out: { entry: AuditEntry; refused: number }[] = [];
    for (const bucket of this.#buckets.values()) {
      for (const s of bucket.summaries.values()) out.push({ refused: s.refused, entry: this.#entry(s, service) });
      if (bucket.rest !== null) out.push({ refused: bucket.rest.refused, entry: this.#entry(bucket.rest, service) });
    }
    for (const [recordClass, o] of this.#overflow) {
      const named = [...o.byClient].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1));
      const listed = named.slice(0, SAMPLES_MAX);
      const unlisted = o.unnamed + named.slice(SAMPLES_MAX).reduce((n, [, c]) => n + c, 0);
      out.push({
        refused: o.refused,
        entry: {
          recordClass,
          actor: { type: 'anonymous', id: 'anonymous' },
          action: RATE_LIMITED_OVERFLOW_ACTION,
          outcome: 'failure',
          reason: `${o.refused} request(s) refused (429) by the rate limiter from more clients than the ${this.#keysMax} summaries of this interval hold`,
          origin: { service },
          resource: { type: 'service', id: service },
          occurredAt: new Date(o.to),
          payload: {
            status: 429,
            refused: o.refused,
            from: iso(o.from),
            to: iso(o.to),
            actions: [...o.actions],
            clients: listed.map(([client, refused]) => ({ client, refused })),
            refusedByUnlistedClients: unlisted,
          },
        },
      });
    }
    this.#buckets = new Map();
    this.#held = 0;
    this.#overflow = new Map();
    return out;
  }

  /**
   * Writes the summaries a sink refused before, then everything counted since, to `sink`. What
   * it refuses because its buffer is full (AuditBufferFullError) is kept for the next write, up
   * to `keysMax` entries; what it refuses otherwise is dropped. Returns how many refusals the
   * dropped entries stood for, and the sink's last error (null when it took everything).
   */
  writeTo(sink: Pick<AuditSink, 'record'>, service: string): { lost: number; error: unknown } {
    const entries = [...this.#unwritten, ...this.drain(service)];
    this.#unwritten = [];
    let error: unknown = null;
    let lost = 0;
    for (const e of entries) {
      try {
        sink.record(e.entry);
      } catch (refused) {
        error = refused;
        if (refused instanceof AuditBufferFullError) this.#unwritten.push(e);
        else lost += e.refused;
      }
    }
    const dropped = this.#unwritten.splice(0, Math.max(0, this.#unwritten.length - this.#keysMax));
    return { lost: lost + dropped.reduce((n, d) => n + d.refused, 0), error };
  }

  #entry(s: Summary, service: string): AuditEntry {
    const { first, samples } = s;
    // A catch-all names an actor (a resource) only when every refusal it counts named that one.
    const one = (set: Set<string> | undefined): boolean => samples === null || (set?.size === 1 && samples.unsampled === 0);
    return {
      recordClass: first.recordClass,
      actor: one(samples?.actors) ? first.actor : { type: 'anonymous', id: 'anonymous' },
      action: first.action,
      outcome: 'failure',
      reason: this.#reason,
      origin: { service, ip: first.ip, requestId: first.requestId, ...(first.traceId === undefined ? {} : { traceId: first.traceId }) },
      resource: one(samples?.resources) ? first.resource : { type: first.resource.type, id: 'several' },
      // Dated by its last refusal; the span is in the payload.
      occurredAt: new Date(s.to),
      payload: {
        ...(s.samples === null ? first.details : {}),
        method: first.method,
        route: first.route,
        status: 429,
        refused: s.refused,
        from: iso(first.at),
        to: iso(s.to),
        firstRequestId: first.requestId,
        lastRequestId: s.lastRequestId,
        ratePerSecond: first.limit.ratePerSecond,
        burst: first.limit.burst,
        ...(s.samples === null
          ? {}
          : {
              // The bucket's refusals past its own summaries: what they named, sampled.
              bucket: first.client,
              actors: [...s.samples.actors],
              addresses: [...s.samples.addresses],
              resources: [...s.samples.resources],
              unsampled: s.samples.unsampled,
            }),
      },
    };
  }
}

const actorText = (a: AuditActor): string => `${a.type}:${a.id}`;
const resourceText = (r: AuditResource): string => `${r.type}:${r.id}`;

function count(s: Summary, r: RateLimitedRefusal): void {
  s.refused += 1;
  s.to = Math.max(s.to, r.at);
  s.lastRequestId = r.requestId;
  const samples = s.samples;
  if (samples === null) return;
  let sampled = true;
  for (const [set, value] of [
    [samples.actors, actorText(r.actor)],
    [samples.addresses, r.ip],
    [samples.resources, resourceText(r.resource)],
  ] as const) {
    if (set.has(value)) continue;
    if (set.size < SAMPLES_MAX) set.add(value);
    else sampled = false;
  }
  if (!sampled) samples.unsampled += 1;
}
