/**
 * Reading and governing the audit trail: search for compliance reviews, checkpoints and
 * proofs, legal holds, GDPR erasure and retention. Every operation that reads the trail or
 * changes what it discloses is itself recorded through the sink, with who asked.
 *
 * Writes run as the writer role; erasure and expiry go through the SECURITY DEFINER functions
 * of the migration, the only paths that remove data (payloads and keys, never records).
 */
import type pg from 'pg';
import { validate as isUuid } from 'uuid';
import { newUuidV7, storablePrefix, type StoredEvent } from '@ledgerline/events';
import { eventEntry, eventLeafDataAt, eventRecordId, searchEventLeaves } from './event-leaves.ts';
import type { KeyObject } from 'node:crypto';
import { checkpointJson, keyTransitionJson, type ConsistencyBundle, type InclusionBundle, type KeyTransitionJson } from './bundle.ts';
import { clearSubjectKey, keyIdOf, open, SigningKeyError, trustThroughTransitions, type Checkpoint, type KeyEncryptionKey, type KeyTransition } from './keys.ts';
import { storedKeyTransitions } from './verify.ts';
import { asAuditWriter } from './migrate.ts';
import { queueEntryWith } from './writer.ts';
import { canonicalResourceId, checkEntry, leafData, resourceIdForms } from './record.ts';
import { CHECKPOINT_COLUMNS, checkpointOf, fieldsOf, RECORD_COLUMNS, type CheckpointRow, type RecordRow } from './rows.ts';
import type { AuditActor, AuditEntry, AuditOrigin, AuditSink } from './sink.ts';
import { consistencyProof, inclusionProof, recordInTile, type Queryable } from './tree.ts';

export const SEARCH_LIMIT_MAX = 1000;
export const SEARCH_LIMIT_DEFAULT = 100;

/** Who is asking: recorded with every audited operation. */
export interface Requester {
  actor: AuditActor;
  origin: AuditOrigin;
}

export interface SearchFilter {
  actorId?: string;
  resourceType?: string;
  resourceId?: string;
  action?: string;
  outcome?: 'success' | 'failure';
  subject?: string;
  recordClass?: string;
  /** Inclusive. */
  from?: Date;
  /** Exclusive. */
  to?: Date;
}

export interface SearchPage {
  limit?: number;
  order?: 'asc' | 'desc';
  /** The `nextCursor` of the previous page: the last sequence number it returned. */
  after?: number;
}

/** A record as a reviewer sees it. */
export interface AuditRecordView {
  seq: number;
  id: string;
  occurredAt: Date;
  recordClass: string;
  actor: AuditActor;
  action: string;
  outcome: 'success' | 'failure';
  reason: string | null;
  origin: { service: string; ip: string | null; requestId: string | null; traceId: string | null };
  resource: { type: string; id: string };
  subject: string | null;
  payload: Record<string, unknown> | null;
  /** `expired`: retention removed it; the leaf still commits to its hash. */
  payloadState: 'present' | 'expired' | 'none';
  personal: Record<string, unknown> | null;
  /** `erased`: the subject's key was destroyed. */
  personalState: 'present' | 'erased' | 'expired' | 'none';
}

export class LegalHoldError extends Error {
  override readonly name = 'LegalHoldError';
}

/**
 * A read's own audit record could not be made durable (the sink's flush failed), so its
 * results are withheld: a search or a proof is never disclosed without its record. The record
 * may still reach the trail through a later flush of the same sink, so the trail can show a
 * read whose results were withheld, never the reverse.
 */
export class AuditUnrecordedError extends Error {
  override readonly name = 'AuditUnrecordedError';
}

/** Most payloads `expirePayloads` removes in one transaction: `audit.expire_payloads` takes no more a call. */
export const EXPIRE_BATCH_MAX = 100_000;
export const EXPIRE_BATCH_DEFAULT = 10_000;

export interface LegalHold {
  id: string;
  subject: string | null;
  resource: { type: string; id: string } | null;
  reason: string;
  placedBy: string;
  placedAt: Date;
}

/**
 * The requester as the governance functions of migration 1769300000000 take it (`p_by`): they
 * release a hold, erase a subject or expire payloads and queue the record of it in the same
 * transaction, naming the requester and the database login, so that no caller with EXECUTE
 * does any of it unrecorded. An expiry's record is on the log of the requester's service.
 */
function governanceRequester(by: Requester): string {
  return JSON.stringify({ actor: by.actor, origin: by.origin });
}

/** A proof of an event leaf asked of a store that does not read the event store (`readEventStore: false`). */
export class EventStoreUnreadError extends Error {
  override readonly name = 'EventStoreUnreadError';
}

export class AuditStore {
  readonly #pool: pg.Pool;
  readonly #sink: AuditSink;
  readonly #service: string;
  readonly #kek: KeyEncryptionKey | null;
  readonly #readEventStore: boolean;

  /**
   * `keyEncryptionKey` opens the subject keys wrapped at rest (keys.ts); without it, a wrapped
   * key makes a read fail (KeyEncryptionKeyError). `readEventStore` false (default true): the
   * store reads nothing of the event store, whose events are leaves: a search returns records
   * only, and a proof of an event leaf throws EventStoreUnreadError (the audit CLI's choice for a
   * login that could alter the log, on a database that had no event store when it began).
   */
  constructor(options: { pool: pg.Pool; sink: AuditSink; service: string; keyEncryptionKey?: KeyEncryptionKey; readEventStore?: boolean }) {
    this.#pool = options.pool;
    this.#sink = options.sink;
    this.#service = options.service;
    this.#kek = options.keyEncryptionKey ?? null;
    this.#readEventStore = options.readEventStore !== false;
  }

  /** Reads (searches, proofs) are class `access`; holds, erasures and expiries class `governance` (no retention policy: kept). */
  #audit(by: Requester, action: string, outcome: 'success' | 'failure', resource: { type: string; id: string }, payload: Record<string, unknown>, reason?: string): void {
    this.#sink.record(auditEntryOf(by, action, outcome, resource, payload, reason));
  }

  /**
   * Makes the record of a read durable before the read's results leave the store: the sink
   * buffers (a few milliseconds, and a process killed meanwhile loses the buffer), and a
   * reviewer's read must never be disclosed without its record. Flushes the whole sink.
   */
  async #durable(action: string): Promise<void> {
    try {
      await this.#sink.flush();
    } catch (error) {
      throw new AuditUnrecordedError(`${action}: its audit record could not be written, so its results are withheld: ${error instanceof Error ? error.message : String(error)}`, { cause: error });
    }
  }

  /**
   * Keyset-paginated search; the search itself is recorded (action `audit.search`), and the
   * record is durable before the results are returned: if it cannot be written, the search
   * throws AuditUnrecordedError and returns nothing.
   */
  async search(filter: SearchFilter, page: SearchPage, by: Requester): Promise<{ records: AuditRecordView[]; nextCursor: number | null }> {
    const limit = page.limit ?? SEARCH_LIMIT_DEFAULT;
    const desc = page.order === 'desc';
    const iso = (time: Date | undefined): string | undefined => (time === undefined ? undefined : Number.isNaN(time.getTime()) ? 'Invalid Date' : time.toISOString());
    const asked = { filter: { ...filter, from: iso(filter.from), to: iso(filter.to) }, limit, order: desc ? 'desc' : 'asc', after: page.after ?? null };
    let found: { records: AuditRecordView[]; nextCursor: number | null };
    try {
      // Inside: a refused search is audited too.
      if (!(Number.isInteger(limit) && limit >= 1 && limit <= SEARCH_LIMIT_MAX)) throw new RangeError(`limit must be an integer in 1..${SEARCH_LIMIT_MAX}`);
      for (const [name, time] of [['from', filter.from], ['to', filter.to]] as const) {
        if (time !== undefined && Number.isNaN(time.getTime())) throw new RangeError(`${name} is not a valid time`);
      }
      const r = await this.#pool.query<RecordRow>(
        `SELECT ${RECORD_COLUMNS} FROM audit.records r LEFT JOIN audit.payloads p ON p.seq = r.seq
          WHERE ($1::text IS NULL OR r.actor_id = $1) AND ($2::text IS NULL OR r.resource_type = $2)
            AND ($3::text[] IS NULL OR r.resource_id = ANY ($3::text[])) AND ($4::text IS NULL OR r.action = $4)
            AND ($5::text IS NULL OR r.outcome = $5) AND ($6::text IS NULL OR r.subject = $6)
            AND ($7::timestamptz IS NULL OR r.occurred_at >= $7) AND ($8::timestamptz IS NULL OR r.occurred_at < $8)
            AND ($9::bigint IS NULL OR ${desc ? 'r.seq < $9' : 'r.seq > $9'}) AND ($11::text IS NULL OR r.record_class = $11)
            AND NOT ${recordInTile('r')}
          ORDER BY r.seq ${desc ? 'DESC' : 'ASC'} LIMIT $10`,
        [filter.actorId ?? null, filter.resourceType ?? null, filter.resourceId === undefined ? null : resourceIdForms(filter.resourceId), filter.action ?? null, filter.outcome ?? null, filter.subject ?? null, filter.from ?? null, filter.to ?? null, page.after ?? null, limit, filter.recordClass ?? null],
      );
      // Event leaves are financial records with no subject: a search for a subject or another class finds none.
      const withEvents = this.#readEventStore && filter.subject === undefined && (filter.recordClass === undefined || filter.recordClass === 'financial');
      const events = withEvents ? await searchEventLeaves(this.#pool, filter, { desc, after: page.after ?? null, limit }) : [];
      const records = [...(await this.#views(r.rows)), ...events.map((e) => this.#eventView(e.seq, e.event))]
        .sort((a, b) => (desc ? b.seq - a.seq : a.seq - b.seq))
        .slice(0, limit);
      this.#audit(by, 'audit.search', 'success', { type: 'audit.log', id: this.#service }, { ...asked, returned: records.length });
      found = { records, nextCursor: records.length === limit ? (records.at(-1)?.seq ?? null) : null };
    } catch (error) {
      this.#audit(by, 'audit.search', 'failure', { type: 'audit.log', id: this.#service }, asked, error instanceof Error ? error.message.slice(0, 200) : 'failed');
      throw error;
    }
    await this.#durable('audit.search');
    return found;
  }

  async #views(rows: RecordRow[]): Promise<AuditRecordView[]> {
    const subjects = [...new Set(rows.filter((r) => r.personal !== null).map((r) => r.subject as string))];
    const keys = new Map<string, Buffer>();
    if (subjects.length > 0) {
      const k = await this.#pool.query<{ subject: string; key: Buffer; kek_id: string | null }>(
        'SELECT subject, key, kek_id FROM audit.subject_keys WHERE subject = ANY($1::text[])',
        [subjects],
      );
      for (const row of k.rows) keys.set(row.subject, clearSubjectKey(this.#kek, row.subject, row.key, row.kek_id));
    }
    return rows.map((r) => {
      const f = fieldsOf(r);
      const key = r.subject === null ? undefined : keys.get(r.subject);
      const clear = r.personal === null || key === undefined ? null : open(key, r.personal, f.id);
      return {
        seq: f.seq,
        id: f.id,
        occurredAt: f.occurredAt,
        recordClass: f.recordClass,
        actor: { type: f.actorType as AuditActor['type'], id: f.actorId },
        action: f.action,
        outcome: f.outcome,
        reason: f.reason,
        origin: { service: f.originService, ip: f.originIp, requestId: f.originRequestId, traceId: f.originTraceId },
        resource: { type: f.resourceType, id: f.resourceId },
        subject: f.subject,
        payload: r.payload === null ? null : (JSON.parse(r.payload) as Record<string, unknown>),
        payloadState: f.payloadHash === null ? 'none' : r.payload === null ? 'expired' : 'present',
        personal: clear === null ? null : (JSON.parse(clear) as Record<string, unknown>),
        personalState: f.personalHash === null ? 'none' : !r.has_payload_row || r.personal === null ? 'expired' : clear === null ? 'erased' : 'present',
      };
    });
  }

  /** An event leaf as a reviewer sees it: the record `eventEntry` makes of the event. */
  #eventView(seq: number, event: StoredEvent): AuditRecordView {
    const e = eventEntry(event, this.#service);
    return {
      seq,
      id: eventRecordId(event.id),
      occurredAt: event.recordedAt,
      recordClass: e.recordClass,
      actor: e.actor,
      action: e.action,
      outcome: e.outcome,
      reason: e.reason ?? null,
      origin: { service: e.origin.service, ip: e.origin.ip ?? null, requestId: e.origin.requestId ?? null, traceId: e.origin.traceId ?? null },
      resource: e.resource,
      subject: null,
      payload: e.payload ?? null,
      payloadState: 'present',
      personal: null,
      personalState: 'none',
    };
  }

  /**
   * How the subject keys are stored: a count per key-encryption key (`clear` for none), and
   * whether any is left for the sequencer to wrap under the configured current key. A
   * rotation is done when `pending` is 0; the previous keys may then be dropped.
   */
  async keyEncryptionStatus(): Promise<{ current: string | null; previous: string[]; keys: Record<string, number>; pending: number }> {
    const r = await this.#pool.query<{ kek_id: string | null; n: number }>('SELECT kek_id, count(*)::int AS n FROM audit.subject_keys GROUP BY kek_id ORDER BY kek_id NULLS FIRST');
    const keys = Object.fromEntries(r.rows.map((row) => [row.kek_id ?? 'clear', row.n]));
    const current = this.#kek?.id ?? null;
    const pending = current === null ? 0 : r.rows.filter((row) => row.kek_id !== current).reduce((sum, row) => sum + row.n, 0);
    return { current, previous: [...(this.#kek?.previous.keys() ?? [])], keys, pending };
  }

  async latestCheckpoint(db: Queryable = this.#pool): Promise<Checkpoint | null> {
    const r = await db.query<CheckpointRow>(`SELECT ${CHECKPOINT_COLUMNS} FROM audit.checkpoints c ORDER BY c.tree_size DESC LIMIT 1`);
    const row = r.rows[0];
    return row === undefined ? null : checkpointOf(row);
  }

  async checkpointAt(treeSize: number): Promise<Checkpoint | null> {
    const r = await this.#pool.query<CheckpointRow>(`SELECT ${CHECKPOINT_COLUMNS} FROM audit.checkpoints WHERE tree_size = $1`, [treeSize]);
    const row = r.rows[0];
    return row === undefined ? null : checkpointOf(row);
  }

  /**
   * Proves record `seq` is in the log: against the checkpoint of `treeSize`, or the latest.
   * Null when there is no such record or checkpoint, or the checkpoint does not cover it yet.
   * The bundle discloses the record's fields, so with `by` the read is recorded
   * (`audit.record.prove`) and the record is durable before the bundle is returned
   * (AuditUnrecordedError if it cannot be written); only tools measuring the store itself
   * leave it out.
   */
  async inclusionBundle(seq: number, treeSize?: number, by?: Requester): Promise<InclusionBundle | null> {
    const cp = treeSize === undefined ? await this.latestCheckpoint() : await this.checkpointAt(treeSize);
    const r =
      cp === null || !(Number.isSafeInteger(seq) && seq >= 0 && seq < cp.treeSize)
        ? null
        : await this.#pool.query<RecordRow>(`SELECT ${RECORD_COLUMNS} FROM audit.records r LEFT JOIN audit.payloads p ON p.seq = r.seq WHERE r.seq = $1 AND NOT ${recordInTile('r')}`, [seq]);
    const row = r?.rows[0];
    if (r !== null && row === undefined && !this.#readEventStore) {
      throw new EventStoreUnreadError(`seq ${seq} is not a record row but an event leaf (or nothing), and this store does not read the event store`);
    }
    // Not a record row: an event leaf, whose bytes PostgreSQL renders from the event itself.
    const data = cp === null || r === null ? null : row === undefined ? await eventLeafDataAt(this.#pool, seq) : leafData(fieldsOf(row));
    // In range with no data: an event leaf whose event the event store no longer holds.
    const reason = data !== null ? undefined : r === null ? 'no checkpoint covers it' : 'its event is no longer held (retention)';
    if (by !== undefined) this.#audit(by, 'audit.record.prove', data === null ? 'failure' : 'success', { type: 'audit.record', id: String(seq) }, { treeSize: treeSize ?? null }, reason);
    if (cp === null || data === null) return null;
    const proof = await inclusionProof(this.#pool, seq, cp.treeSize);
    if (by !== undefined) await this.#durable('audit.record.prove');
    return {
      kind: 'inclusion',
      checkpoint: checkpointJson(cp),
      leafIndex: seq,
      leafData: data.toString('base64'),
      proof: proof.map((h) => h.toString('base64')),
      ...(await this.#transitionsJson(cp.origin)),
    };
  }

  /** Proves the checkpoint of `toSize` extends that of `fromSize`; null when either is missing. */
  async consistencyBundle(fromSize: number, toSize: number): Promise<ConsistencyBundle | null> {
    if (!(fromSize <= toSize)) return null;
    const [from, to] = [await this.checkpointAt(fromSize), await this.checkpointAt(toSize)];
    if (from === null || to === null) return null;
    const proof = await consistencyProof(this.#pool, fromSize, toSize);
    return { kind: 'consistency', from: checkpointJson(from), to: checkpointJson(to), proof: proof.map((h) => h.toString('base64')), ...(await this.#transitionsJson(to.origin)) };
  }

  /** The log's signing-key transitions, for a bundle: absent when there are none. */
  async #transitionsJson(origin: string): Promise<{ keyTransitions?: KeyTransitionJson[] }> {
    const transitions = (await storedKeyTransitions(this.#pool)).filter((t) => t.origin === origin);
    return transitions.length === 0 ? {} : { keyTransitions: transitions.map(keyTransitionJson) };
  }

  /**
   * Records a rotation of the signing key, signed by the outgoing key (keys.ts
   * `signKeyTransition`), and audits it as `audit.key.transition`. Checked before it is
   * stored: a transition whose signature does not verify under its own outgoing key is refused.
   * A transition between the same two keys is stored once: the first stays (each call is
   * audited).
   */
  async recordKeyTransition(t: KeyTransition, outgoing: KeyObject, by: Requester): Promise<void> {
    const toKeyId = keyIdOf(t.toPublicKey);
    if (keyIdOf(outgoing) !== t.fromKeyId || trustThroughTransitions(outgoing, [t], t.origin).followed.length !== 1) {
      throw new SigningKeyError(`the transition ${t.fromKeyId} -> ${toKeyId} is not signed by the outgoing key`);
    }
    const record = auditEntryOf(by, 'audit.key.transition', 'success', { type: 'audit.signing_key', id: toKeyId }, { fromKeyId: t.fromKeyId, toKeyId, origin: t.origin, issuedAt: t.issuedAt.toISOString() });
    checkEntry(record);
    // The transition and its record in one transaction: a transition the trail does not show
    // (the record handed to the sink after the commit, and lost with the process) cannot be.
    await this.#asWriter(async (c) => {
      await c.query(
        `INSERT INTO audit.key_transitions (from_key_id, to_key_id, origin, to_public_key, issued_at, signature)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (from_key_id, to_key_id) DO NOTHING`,
        [t.fromKeyId, toKeyId, t.origin, t.toPublicKey.export({ type: 'spki', format: 'der' }), t.issuedAt, t.signature],
      );
      await queueEntryWith(c, record);
    });
  }

  #asWriter<T>(fn: (client: pg.PoolClient) => Promise<T>): Promise<T> {
    return asAuditWriter(this.#pool, fn);
  }

  /**
   * Places a legal hold on a subject or a resource, recorded as `audit.hold.place` in the same
   * transaction (`audit.place_hold`): a hold is never in force without its record.
   */
  async placeHold(target: { subject: string } | { resource: { type: string; id: string } }, reason: string, by: Requester): Promise<string> {
    const id = newUuidV7();
    const subject = 'subject' in target ? target.subject : null;
    // The id as the trail stores it (a UUID in lower case), so that the hold reads as it matches.
    const resource = 'resource' in target ? { type: target.resource.type, id: canonicalResourceId(target.resource.id) } : null;
    // Its record checked before the hold is placed: a hold in force whose record the sequencer
    // would refuse (an over-long reason or actor) would block erasure with no record of why.
    checkEntry(auditEntryOf(by, 'audit.hold.place', 'success', { type: 'audit.legal_hold', id }, { subject, resource, reason }));
    await this.#asWriter((c) =>
      c.query('SELECT audit.place_hold($1, $2, $3, $4, $5, $6::json)', [id, subject, resource?.type ?? null, resource?.id ?? null, reason, governanceRequester(by)]),
    );
    return id;
  }

  /**
   * Releases a hold; false when there was no active hold with that id. Recorded as
   * `audit.hold.release`: a release by `audit.release_hold` itself, a refusal through the sink.
   */
  async releaseHold(id: string, by: Requester): Promise<boolean> {
    if (!isUuid(id)) {
      // No hold has such an id: refused and recorded like an unknown one, without asking
      // PostgreSQL, which would answer a malformed uuid with an error.
      this.#audit(by, 'audit.hold.release', 'failure', { type: 'audit.legal_hold', id: storablePrefix(id, 100) || '(empty)' }, {}, 'not a hold id');
      return false;
    }
    const r = await this.#asWriter((c) => c.query<{ released: boolean }>('SELECT audit.release_hold($1, $2::json) AS released', [id, governanceRequester(by)]));
    const released = r.rows[0]?.released === true;
    if (!released) this.#audit(by, 'audit.hold.release', 'failure', { type: 'audit.legal_hold', id }, {}, 'no active hold with this id');
    return released;
  }

  async activeHolds(): Promise<LegalHold[]> {
    const r = await this.#pool.query<{ id: string; subject: string | null; resource_type: string | null; resource_id: string | null; reason: string; placed_by: string; placed_at: Date }>(
      'SELECT id::text, subject, resource_type, resource_id, reason, placed_by, placed_at FROM audit.legal_holds WHERE released_at IS NULL ORDER BY placed_at, id',
    );
    return r.rows.map((h) => ({
      id: h.id,
      subject: h.subject,
      resource: h.resource_type === null || h.resource_id === null ? null : { type: h.resource_type, id: h.resource_id },
      reason: h.reason,
      placedBy: h.placed_by,
      placedAt: h.placed_at,
    }));
  }

  /**
   * GDPR erasure: destroys the subject's key, so its personal data reads as erased while every
   * hash stays. Throws LegalHoldError under a hold. Recorded as `audit.subject.erase` (the
   * record names the subject, which is an identifier, not the erased data).
   */
  async eraseSubject(subject: string, by: Requester): Promise<boolean> {
    try {
      // The function queues the success's record itself, in its transaction (governanceRequester).
      const r = await this.#asWriter((c) => c.query<{ erased: boolean }>('SELECT audit.erase_subject($1, $2::json) AS erased', [subject, governanceRequester(by)]));
      return r.rows[0]?.erased === true;
    } catch (error) {
      if ((error as { code?: string }).code === '55006') {
        this.#audit(by, 'audit.subject.erase', 'failure', { type: 'audit.subject', id: subject }, {}, 'legal hold');
        throw new LegalHoldError(`subject ${subject} is under legal hold: erasure refused`);
      }
      throw error;
    }
  }

  /**
   * Removes every payload whose class's retention had run out by `asOf` (never later than the
   * database's clock when the call begins: the cut-off is fixed then, so the call ends) and
   * that no hold covers, in transactions of at most `batchMax` (1..EXPIRE_BATCH_MAX), one
   * after another until one removes fewer, as the ledger's expiry sweep does: a hold waits
   * for one transaction, never for the whole backlog. Returns the total. Each transaction
   * that removed any is recorded as `audit.retention.expire` with its count.
   */
  async expirePayloads(asOf: Date, by: Requester, batchMax = EXPIRE_BATCH_DEFAULT): Promise<number> {
    if (!(Number.isSafeInteger(batchMax) && batchMax >= 1 && batchMax <= EXPIRE_BATCH_MAX)) throw new RangeError(`batchMax must be an integer in 1..${EXPIRE_BATCH_MAX}`);
    if (Number.isNaN(asOf.getTime())) throw new RangeError('asOf is not a valid time');
    const cutoff = (await this.#pool.query<{ cutoff: Date }>('SELECT least($1::timestamptz, now()) AS cutoff', [asOf])).rows[0]?.cutoff ?? asOf;
    let removed = 0;
    for (;;) {
      // The function queues the record itself when it removed any (governanceRequester).
      const r = await this.#asWriter((c) => c.query<{ n: number }>('SELECT audit.expire_payloads($1, $2, $3::json) AS n', [cutoff, batchMax, governanceRequester(by)]));
      const n = r.rows[0]?.n ?? 0;
      removed += n;
      if (n < batchMax) return removed;
    }
  }
}

/** What the store records of a requester's act: `access` for searches and proofs, `governance` for the rest. */
function auditEntryOf(by: Requester, action: string, outcome: 'success' | 'failure', resource: { type: string; id: string }, payload: Record<string, unknown>, reason?: string): AuditEntry {
  return {
    recordClass: action === 'audit.search' || action === 'audit.record.prove' ? 'access' : 'governance',
    actor: by.actor,
    action,
    outcome,
    ...(reason === undefined ? {} : { reason }),
    origin: by.origin,
    resource,
    payload,
  };
}
