/**
 * Requests the service's rate limiter refused (429) on audited routes, recorded in summaries
 * rather than one record each. A client over its limit is refused at whatever rate it sends;
 * recorded one by one, its refusals grew the audit queue at that rate, and a retry storm
 * could fill the sink's buffer, after which every client's audited requests were refused 503
 * (the sink's back-pressure): one client's flood became everyone's outage.
 *
 * One summary per actor, client address, route and resource (and whatever else a single
 * refusal's record would say: `details`) for each interval: how many were
 * refused, from when to when, the first and last request ids and the limit they were over. A
 * search by actor, resource, action or time still finds them. The table is bounded
 * (`keysMax`): refusals under a key it has no room for go into one overflow summary for the
 * interval, which counts them and names the actors that sent the most. Nothing refused is
 * left out of every record.
 */
import type { RateLimit } from '@ledgerline/service-runtime';
import type { AuditActor, AuditEntry, AuditResource } from './sink.ts';

/** How often the summaries are written (AuditHttpOptions.rateLimitedSummary). */
export const RATE_LIMITED_SUMMARY_INTERVAL_MS_DEFAULT = 10_000;
/** Summaries held at once before refusals under new keys go to the overflow summary. */
export const RATE_LIMITED_SUMMARY_KEYS_MAX_DEFAULT = 1000;
/** The action of the overflow summary: refusals under keys the table had no room for. */
export const RATE_LIMITED_OVERFLOW_ACTION = 'audit.rate_limited.overflow';
/** The overflow summary names at most this many actors, those that sent the most. */
const OVERFLOW_ACTORS_NAMED_MAX = 20;

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
  limit: Readonly<RateLimit>;
  /** When it was refused, in ms since the epoch. */
  at: number;
  /**
   * What else a single refusal's record would say in its payload (the identity service: the
   * audience asked for): part of the key, so a summary stands only for refusals alike in it.
   */
  details?: Readonly<Record<string, unknown>>;
}

interface Summary {
  first: RateLimitedRefusal;
  refused: number;
  to: number;
  lastRequestId: string;
}

interface Overflow {
  refused: number;
  from: number;
  to: number;
  /** Refusals per actor (`type:id`), for as many actors as the table holds keys. */
  byActor: Map<string, number>;
  /** Refusals of actors the map above had no room for. */
  unnamed: number;
}

export interface RateLimitedSummariesOptions {
  /** Summaries held at once (default RATE_LIMITED_SUMMARY_KEYS_MAX_DEFAULT). */
  keysMax?: number;
  /**
   * The reason each summary is recorded with: the one a single refusal was recorded with, so
   * that a summary reads as the records it stands for (default `rate-limited`, the problem
   * type's slug, as auditHttp records it; the identity service writes its slugs `rate_limited`).
   */
  reason?: string;
}

export class RateLimitedSummaries {
  readonly #keysMax: number;
  readonly #reason: string;
  #summaries = new Map<string, Summary>();
  #overflow: Overflow | null = null;

  constructor(options: RateLimitedSummariesOptions = {}) {
    const { keysMax = RATE_LIMITED_SUMMARY_KEYS_MAX_DEFAULT, reason = 'rate-limited' } = options;
    if (!(Number.isInteger(keysMax) && keysMax >= 1)) throw new RangeError(`keysMax must be a positive integer, not ${keysMax}`);
    this.#keysMax = keysMax;
    this.#reason = reason;
  }

  /** Refusals counted and not yet drained. */
  get pending(): number {
    let n = this.#overflow?.refused ?? 0;
    for (const s of this.#summaries.values()) n += s.refused;
    return n;
  }

  add(r: RateLimitedRefusal): void {
    // NUL cannot occur in any part: the actor, address and resource are checked storable text
    // before they are recorded, and routes and methods come from the route table.
    const key = [r.recordClass, r.action, r.actor.type, r.actor.id, r.ip, r.method, r.route, r.resource.type, r.resource.id, JSON.stringify(r.details ?? {})].join('\u0000');
    const held = this.#summaries.get(key);
    if (held !== undefined) {
      held.refused += 1;
      held.to = Math.max(held.to, r.at);
      held.lastRequestId = r.requestId;
      return;
    }
    if (this.#summaries.size < this.#keysMax) {
      this.#summaries.set(key, { first: r, refused: 1, to: r.at, lastRequestId: r.requestId });
      return;
    }
    const o = (this.#overflow ??= { refused: 0, from: r.at, to: r.at, byActor: new Map<string, number>(), unnamed: 0 });
    o.refused += 1;
    o.from = Math.min(o.from, r.at);
    o.to = Math.max(o.to, r.at);
    const actor = `${r.actor.type}:${r.actor.id}`;
    const count = o.byActor.get(actor);
    if (count !== undefined) o.byActor.set(actor, count + 1);
    else if (o.byActor.size < this.#keysMax) o.byActor.set(actor, 1);
    else o.unnamed += 1;
  }

  /** The records of everything counted since the last drain, and an empty table. */
  drain(service: string): { entry: AuditEntry; refused: number }[] {
    const out: { entry: AuditEntry; refused: number }[] = [];
    for (const s of this.#summaries.values()) {
      const { first } = s;
      out.push({
        refused: s.refused,
        entry: {
          recordClass: first.recordClass,
          actor: first.actor,
          action: first.action,
          outcome: 'failure',
          // The count and span are in the payload.
          reason: this.#reason,
          origin: { service, ip: first.ip, requestId: first.requestId },
          resource: first.resource,
          occurredAt: new Date(s.to),
          payload: {
            ...first.details,
            method: first.method,
            route: first.route,
            status: 429,
            refused: s.refused,
            from: new Date(first.at).toISOString(),
            to: new Date(s.to).toISOString(),
            firstRequestId: first.requestId,
            lastRequestId: s.lastRequestId,
            ratePerSecond: first.limit.ratePerSecond,
            burst: first.limit.burst,
          },
        },
      });
    }
    const o = this.#overflow;
    if (o !== null) {
      const named = [...o.byActor].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1));
      const listed = named.slice(0, OVERFLOW_ACTORS_NAMED_MAX);
      const unlisted = o.unnamed + named.slice(OVERFLOW_ACTORS_NAMED_MAX).reduce((n, [, c]) => n + c, 0);
      out.push({
        refused: o.refused,
        entry: {
          recordClass: 'access',
          actor: { type: 'anonymous', id: 'anonymous' },
          action: RATE_LIMITED_OVERFLOW_ACTION,
          outcome: 'failure',
          reason: `${o.refused} request(s) refused (429) by the rate limiter under more (actor, address, route, resource) keys than the ${this.#keysMax} summarised one by one in this interval`,
          origin: { service },
          resource: { type: 'service', id: service },
          occurredAt: new Date(o.to),
          payload: {
            status: 429,
            refused: o.refused,
            from: new Date(o.from).toISOString(),
            to: new Date(o.to).toISOString(),
            actors: listed.map(([actor, refused]) => ({ actor, refused })),
            refusedByUnlistedActors: unlisted,
          },
        },
      });
    }
    this.#summaries = new Map();
    this.#overflow = null;
    return out;
  }
}
