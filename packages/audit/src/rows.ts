/** Reading records back: one column list and one mapping, shared by search and verification. */
import type { Checkpoint } from './keys.ts';
import type { AuditRecordFields } from './record.ts';

/** `r` is audit.records, `p` the LEFT JOINed audit.payloads. */
export const RECORD_COLUMNS = `r.seq::text, r.id::text, r.occurred_at, r.record_class, r.actor_type, r.actor_id, r.action, r.outcome,
  r.reason, r.origin_service, r.origin_ip, r.origin_request_id, r.origin_trace_id, r.resource_type, r.resource_id, r.subject,
  r.payload_hash, r.personal_hash, r.leaf_hash, p.seq IS NOT NULL AS has_payload_row, p.payload, p.personal`;

export interface RecordRow {
  seq: string;
  id: string;
  occurred_at: Date;
  record_class: string;
  actor_type: string;
  actor_id: string;
  action: string;
  outcome: 'success' | 'failure';
  reason: string | null;
  origin_service: string;
  origin_ip: string | null;
  origin_request_id: string | null;
  origin_trace_id: string | null;
  resource_type: string;
  resource_id: string;
  subject: string | null;
  payload_hash: Buffer | null;
  personal_hash: Buffer | null;
  leaf_hash: Buffer;
  has_payload_row: boolean;
  payload: string | null;
  personal: Buffer | null;
}

export function fieldsOf(r: RecordRow): AuditRecordFields {
  return {
    seq: Number(r.seq),
    id: r.id,
    occurredAt: r.occurred_at,
    recordClass: r.record_class,
    actorType: r.actor_type,
    actorId: r.actor_id,
    action: r.action,
    outcome: r.outcome,
    reason: r.reason,
    originService: r.origin_service,
    originIp: r.origin_ip,
    originRequestId: r.origin_request_id,
    originTraceId: r.origin_trace_id,
    resourceType: r.resource_type,
    resourceId: r.resource_id,
    subject: r.subject,
    payloadHash: r.payload_hash,
    personalHash: r.personal_hash,
  };
}

export const CHECKPOINT_COLUMNS = 'tree_size::text, origin, root_hash, issued_at, key_id, signature';

export interface CheckpointRow {
  tree_size: string;
  origin: string;
  root_hash: Buffer;
  issued_at: Date;
  key_id: string;
  signature: Buffer;
}

export function checkpointOf(r: CheckpointRow): Checkpoint {
  return { treeSize: Number(r.tree_size), origin: r.origin, rootHash: r.root_hash, issuedAt: r.issued_at, keyId: r.key_id, signature: r.signature };
}
