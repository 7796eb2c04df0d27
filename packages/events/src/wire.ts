/**
 * The broker message format: a JSON batch of events, bigints as strings.
 */
import type { EventMetadata, StoredEvent } from './store.ts';

interface WireEvent {
  position: string;
  transactionId: string;
  partition: number;
  id: string;
  streamType: string;
  streamId: string;
  version: number;
  type: string;
  schemaVersion: number;
  data: Record<string, unknown>;
  metadata: EventMetadata;
  recordedAt: string;
}

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
  const events = (parsed as { events?: unknown }).events;
  if (!Array.isArray(events)) throw new MalformedBatchError('event batch has no events array');
  return (events as WireEvent[]).map((w) => {
    if (typeof w.id !== 'string' || typeof w.position !== 'string' || typeof w.type !== 'string') {
      throw new MalformedBatchError('event batch holds a malformed event');
    }
    return {
      ...w,
      position: BigInt(w.position),
      transactionId: BigInt(w.transactionId),
      recordedAt: new Date(w.recordedAt),
    };
  });
}
