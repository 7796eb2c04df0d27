/**
 * The broker message format: a JSON batch of events, bigints as strings.
 *
 * `encodeBatch` serialises events the store has already parsed. The relay's hot path builds
 * the same JSON from the database's own text instead (`envelopeJson`, `encodeEnvelopes`): the
 * payload and metadata are spliced in as PostgreSQL rendered them, never parsed and
 * re-serialised, which halves the relay's cost per event. Both produce the same keys in the
 * same order, and `decodeBatch` reads either.
 */
import type { StoredEvent } from './store.ts';

/** A stored event as JSON carries it: the bigints as decimal strings, the time as ISO 8601. */
type WireEvent = Omit<StoredEvent, 'position' | 'transactionId' | 'recordedAt'> & {
  position: string;
  transactionId: string;
  recordedAt: string;
};

const encoder = new TextEncoder();
const decoder = new TextDecoder();

export function encodeBatch(events: StoredEvent[]): Uint8Array {
  const wire: WireEvent[] = events.map((e) => ({
    ...e,
    position: e.position.toString(),
    transactionId: e.transactionId.toString(),
    recordedAt: e.recordedAt.toISOString(),
  }));
  return encoder.encode(JSON.stringify({ events: wire }));
}

/**
 * One event as PostgreSQL renders its columns, as text. `data` and `metadata` are jsonb
 * output, which is always valid JSON; the numbers are integer renderings.
 */
export interface EventText {
  position: string;
  transactionId: string;
  partition: string;
  id: string;
  streamType: string;
  streamId: string;
  version: string;
  type: string;
  schemaVersion: string;
  data: string;
  metadata: string;
  /** Already in the wire's form (`Date.prototype.toISOString`). */
  recordedAt: string;
}

/** One event's JSON, byte for byte what `encodeBatch` would give for it (jsonb's spacing aside). */
export function envelopeJson(e: EventText): string {
  // Only the free-text columns need escaping; the ids, numbers and the time are plain.
  return (
    `{"position":"${e.position}","transactionId":"${e.transactionId}","partition":${e.partition},"id":"${e.id}",` +
    `"streamType":${JSON.stringify(e.streamType)},"streamId":${JSON.stringify(e.streamId)},"version":${e.version},` +
    `"type":${JSON.stringify(e.type)},"schemaVersion":${e.schemaVersion},"data":${e.data},"metadata":${e.metadata},` +
    `"recordedAt":"${e.recordedAt}"}`
  );
}

/** A batch message from envelopes made by `envelopeJson`. */
export function encodeEnvelopes(envelopes: readonly string[]): Uint8Array {
  return encoder.encode(`{"events":[${envelopes.join(',')}]}`);
}

/** A UUID as PostgreSQL prints one (the relay sends the column's text). */
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const DIGITS = /^(0|[1-9][0-9]{0,19})$/;
/** events.position is a bigint; transaction ids are xid8, unsigned 64-bit. */
const POSITION_MAX = 2n ** 63n - 1n;
const TRANSACTION_ID_MAX = 2n ** 64n - 1n;

export class MalformedBatchError extends Error {
  override readonly name = 'MalformedBatchError';
}

export function decodeBatch(data: Uint8Array): StoredEvent[] {
  let parsed: unknown;
  try {
    parsed = JSON.parse(decoder.decode(data));
  } catch (error) {
    throw new MalformedBatchError('event batch is not JSON', { cause: error });
  }
  const events = typeof parsed === 'object' && parsed !== null ? (parsed as { events?: unknown }).events : undefined;
  if (!Array.isArray(events)) throw new MalformedBatchError('event batch has no events array');
  // Converted in place: the objects are fresh from JSON.parse, and copying them cost as much
  // as parsing. The events of one transaction share their recorded time, so it is parsed once.
  let recordedText = '';
  let recordedMs = 0;
  for (const w of events as unknown[]) {
    if (!looksLikeWireEvent(w)) throw new MalformedBatchError('event batch holds a malformed event');
    if (w.recordedAt !== recordedText) {
      recordedText = w.recordedAt;
      recordedMs = Date.parse(recordedText);
    }
    // What the inbox and the dead-letter table cast (uuid, bigint) is checked here, so that a
    // foreign message fails as undecodable, once, instead of failing every attempt in the
    // database and holding its partition's lane for good.
    if (!UUID.test(w.id)) throw new MalformedBatchError('event batch holds an event id that is not a UUID');
    if (!DIGITS.test(w.position) || !DIGITS.test(w.transactionId)) throw new MalformedBatchError('event batch holds a malformed position');
    const e = w as unknown as StoredEvent;
    e.position = BigInt(w.position);
    e.transactionId = BigInt(w.transactionId);
    if (e.position > POSITION_MAX || e.transactionId > TRANSACTION_ID_MAX) throw new MalformedBatchError('event batch holds a position out of range');
    if (Number.isNaN(recordedMs)) throw new MalformedBatchError('event batch holds a malformed recorded time');
    e.recordedAt = new Date(recordedMs);
  }
  return events as StoredEvent[];
}

/** The fields decodeBatch converts or every consumer relies on; the rest are passed through. */
function looksLikeWireEvent(w: unknown): w is WireEvent {
  if (typeof w !== 'object' || w === null) return false;
  const e = w as Partial<Record<keyof WireEvent, unknown>>;
  return typeof e.id === 'string' && typeof e.position === 'string' && typeof e.transactionId === 'string' &&
    typeof e.type === 'string' && typeof e.recordedAt === 'string';
}
