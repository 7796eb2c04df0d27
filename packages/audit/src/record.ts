/**
 * Audit records: how an entry is checked, and the exact bytes a leaf hashes.
 *
 * A leaf commits to the record's fields and to the *hashes* of its payload and of its
 * encrypted personal data, never to the clear payload itself. That is what lets retention
 * remove a payload, and erasure destroy a subject's key, while every leaf hash (and so every
 * root) stays the same.
 */
import { hash } from 'node:crypto';
import { storableText } from '@ledgerline/events';
import type { AuditEntry } from './sink.ts';

/** Largest canonical payload (or personal data) per record: bounds rows and batches. */
export const PAYLOAD_BYTES_MAX = 64 * 1024;
/** Largest of any short text field (actor id, action, resource id, reason, ...). */
export const FIELD_CHARS_MAX = 500;
/** The leaf encoding's version, hashed into every leaf. */
export const LEAF_VERSION = 1;

/**
 * JSON with object keys sorted (by UTF-16 code units) at every depth: one string per value.
 * Otherwise JSON.stringify's rules: undefined members are left out, undefined array items and
 * non-finite numbers become null, toJSON is honoured. Written out by hand because the
 * sequencer runs it for every record, on the service's event loop.
 */
export function canonicalJson(value: unknown): string {
  if (value === null) return 'null';
  switch (typeof value) {
    case 'string':
    case 'number':
    case 'boolean':
      return JSON.stringify(value);
    case 'object': {
      if (Array.isArray(value)) return `[${value.map((v: unknown) => (v === undefined || typeof v === 'function' || typeof v === 'symbol' ? 'null' : canonicalJson(v))).join(',')}]`;
      const toJson = (value as { toJSON?: unknown }).toJSON;
      if (typeof toJson === 'function') return canonicalJson((toJson as () => unknown).call(value));
      const o = value as Record<string, unknown>;
      const members: string[] = [];
      for (const k of Object.keys(o).sort()) {
        const v = o[k];
        if (v !== undefined && typeof v !== 'function' && typeof v !== 'symbol') members.push(`${JSON.stringify(k)}:${canonicalJson(v)}`);
      }
      return `{${members.join(',')}}`;
    }
    default:
      throw new TypeError(`a ${typeof value} is not JSON`);
  }
}

export const sha256 = (data: string | Uint8Array): Buffer => hash('sha256', data, 'buffer');

/** A record as stored and hashed: the entry's fields plus what the sequencer assigned. */
export interface AuditRecordFields {
  seq: number;
  id: string;
  occurredAt: Date;
  recordClass: string;
  actorType: string;
  actorId: string;
  action: string;
  outcome: 'success' | 'failure';
  reason: string | null;
  originService: string;
  originIp: string | null;
  originRequestId: string | null;
  originTraceId: string | null;
  resourceType: string;
  resourceId: string;
  subject: string | null;
  /** SHA-256 of the canonical payload JSON; null when the entry had no payload. */
  payloadHash: Buffer | null;
  /** SHA-256 of the personal data's ciphertext; null when the entry had none. */
  personalHash: Buffer | null;
}

/**
 * The bytes a leaf hashes: the canonical JSON (see `canonicalJson`) of
 * `{ v, seq, id, time, class, actor: { type, id }, action, outcome, reason,
 *    origin: { service, ip, requestId, traceId }, resource: { type, id }, subject,
 *    payloadHash, personalHash }` with absent values as null and hashes in hex. The sequence
 * number is inside, so moving a row changes its leaf. Spelled out in sorted key order rather
 * than built and sorted: this runs for every record.
 */
export function leafData(r: AuditRecordFields): Buffer {
  const j = JSON.stringify;
  const hex = (h: Buffer | null): string => (h === null ? 'null' : `"${h.toString('hex')}"`);
  return Buffer.from(
    `{"action":${j(r.action)},"actor":{"id":${j(r.actorId)},"type":${j(r.actorType)}},"class":${j(r.recordClass)},"id":${j(r.id)},` +
      `"origin":{"ip":${j(r.originIp)},"requestId":${j(r.originRequestId)},"service":${j(r.originService)},"traceId":${j(r.originTraceId)}},` +
      `"outcome":${j(r.outcome)},"payloadHash":${hex(r.payloadHash)},"personalHash":${hex(r.personalHash)},"reason":${j(r.reason)},` +
      `"resource":{"id":${j(r.resourceId)},"type":${j(r.resourceType)}},"seq":${r.seq},"subject":${j(r.subject)},` +
      `"time":${j(r.occurredAt.toISOString())},"v":${LEAF_VERSION}}`,
    'utf8',
  );
}

export class InvalidAuditEntryError extends TypeError {
  override readonly name = 'InvalidAuditEntryError';
}

const UUID_SHAPE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/**
 * A resource id as the trail stores, searches and holds it: a UUID in lower case, any other id
 * as it came. A UUID names the same thing in either case (RFC 9562 §4, lower case its canonical
 * text), so a ledger account read as `/v1/accounts/0F3A…` and held as `0f3a…` is one resource;
 * other ids may be case-sensitive (`ACC-1` and `acc-1` two accounts), so their case is kept.
 * `audit.canonical_resource_id` is the same rule in the database, where holds are matched.
 */
export function canonicalResourceId(id: string): string {
  return UUID_SHAPE.test(id) ? id.toLowerCase() : id;
}

/**
 * The ids a search for resource `id` matches: the id as given and its canonical form. A record
 * stored before the trail canonicalised its ids, or an event whose stream id is a UUID in upper
 * case, is found by either spelling.
 */
export function resourceIdForms(id: string): string[] {
  const canonical = canonicalResourceId(id);
  return canonical === id ? [id] : [id, canonical];
}


function text(path: string, v: unknown, optional = false): void {
  if (optional && v === undefined) return;
  if (typeof v !== 'string' || v.length === 0 || v.length > FIELD_CHARS_MAX || !storableText(v)) {
    throw new InvalidAuditEntryError(`audit entry ${path} must be a string of 1..${FIELD_CHARS_MAX} characters, well-formed UTF-16 and without NUL, got ${JSON.stringify(v)}`);
  }
}

/**
 * Years PostgreSQL reads back from the ISO text the sequencer sends: `toISOString` writes a
 * year outside 0000..9999 with a sign and six digits ("+010000-..."), which PostgreSQL refuses
 * ("time zone displacement out of range"), and it has no year 0.
 */
export const OCCURRED_YEAR_MIN = 1;
export const OCCURRED_YEAR_MAX = 9999;

function json(path: string, v: unknown): string | null {
  if (v === undefined) return null;
  if (v === null || typeof v !== 'object' || Array.isArray(v)) throw new InvalidAuditEntryError(`audit entry ${path} must be an object`);
  let encoded: string;
  try {
    encoded = canonicalJson(v);
  } catch (error) {
    throw new InvalidAuditEntryError(`audit entry ${path} is not JSON: ${error instanceof Error ? error.message : String(error)}`);
  }
  if (Buffer.byteLength(encoded) > PAYLOAD_BYTES_MAX) throw new InvalidAuditEntryError(`audit entry ${path} exceeds ${PAYLOAD_BYTES_MAX} bytes`);
  return encoded;
}

/**
 * Checks an entry before it is accepted, so a producer's bug surfaces at its call site and
 * never as a batch the sequencer cannot store. Returns the canonical payload and personal
 * JSON (null when absent).
 */
export function checkEntry(e: AuditEntry): { payload: string | null; personal: string | null } {
  checkFields(e);
  const personal = json('personal', e.personal);
  if (personal !== null && e.subject === undefined) throw new InvalidAuditEntryError('audit entry personal data needs a subject whose key encrypts it');
  return { payload: json('payload', e.payload), personal };
}

/** Checks everything but the payload and the personal data. */
export function checkFields(e: Omit<AuditEntry, 'payload' | 'personal'>): void {
  if (e === null || typeof e !== 'object') throw new InvalidAuditEntryError('audit entry must be an object');
  text('recordClass', e.recordClass);
  if (!/^[a-z][a-z0-9_-]{0,62}$/.test(e.recordClass)) throw new InvalidAuditEntryError(`audit entry recordClass must match ^[a-z][a-z0-9_-]{0,62}$, got ${JSON.stringify(e.recordClass)}`);
  if (!['user', 'service', 'anonymous'].includes(e.actor?.type)) throw new InvalidAuditEntryError(`audit entry actor.type must be user, service or anonymous`);
  text('actor.id', e.actor.id);
  text('action', e.action);
  if (e.outcome !== 'success' && e.outcome !== 'failure') throw new InvalidAuditEntryError('audit entry outcome must be success or failure');
  text('reason', e.reason, true);
  text('origin.service', e.origin?.service);
  text('origin.ip', e.origin.ip, true);
  text('origin.requestId', e.origin.requestId, true);
  text('origin.traceId', e.origin.traceId, true);
  text('resource.type', e.resource?.type);
  text('resource.id', e.resource.id);
  if (e.occurredAt !== undefined) {
    const year = e.occurredAt instanceof Date ? e.occurredAt.getUTCFullYear() : Number.NaN;
    if (!(year >= OCCURRED_YEAR_MIN && year <= OCCURRED_YEAR_MAX)) {
      throw new InvalidAuditEntryError(`audit entry occurredAt must be a valid Date in the years ${OCCURRED_YEAR_MIN}..${OCCURRED_YEAR_MAX} (UTC)`);
    }
  }
  text('subject', e.subject, true);
}

/**
 * A canonical JSON text carried from the sink through the queue: its type and size are
 * rechecked, and that PostgreSQL can store it (canonicalJson escapes NUL and lone surrogates,
 * but another writer of the queue may not have).
 */
export function checkJsonText(path: string, v: unknown): string | null {
  if (v === undefined || v === null) return null;
  if (typeof v !== 'string' || Buffer.byteLength(v) > PAYLOAD_BYTES_MAX) throw new InvalidAuditEntryError(`audit entry ${path} must be JSON text of at most ${PAYLOAD_BYTES_MAX} bytes`);
  if (!storableText(v)) throw new InvalidAuditEntryError(`audit entry ${path} must be well-formed UTF-16 without NUL`);
  return v;
}
