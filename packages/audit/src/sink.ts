/**
 * The contract between the audit trail and everything that feeds it (the ledger service, the
 * authorization engine, the identity service). Producers depend on this interface only, so a
 * service can be built and tested with any sink, and the audit package implements it durably.
 *
 * The audit package may extend these types additively; it must not change what is here.
 */

/** Who did it: a user, a service identity, or nobody yet authenticated. */
export interface AuditActor {
  type: 'user' | 'service' | 'anonymous';
  id: string;
}

/** Where it came from (PCI DSS 10.2.2 "origination of event"). */
export interface AuditOrigin {
  service: string;
  ip?: string;
  requestId?: string;
  traceId?: string;
}

/** What it touched. */
export interface AuditResource {
  type: string;
  id: string;
}

export interface AuditEntry {
  /** Retention class, for example `financial` (7 years) or `access` (1 year). */
  recordClass: string;
  actor: AuditActor;
  /** The action or event type, for example `ledger.transfer.create` or `authz.decision`. */
  action: string;
  outcome: 'success' | 'failure';
  /** Why, above all for a failure: a result code, a problem type, a matched rule. */
  reason?: string;
  origin: AuditOrigin;
  resource: AuditResource;
  /** When it happened; the sink's clock when absent. */
  occurredAt?: Date;
  /** Non-personal details, stored in the clear. */
  payload?: Record<string, unknown>;
  /** The data subject whose personal data `personal` holds; it is encrypted under that subject's key. */
  subject?: string;
  personal?: Record<string, unknown>;
}

export interface AuditSink {
  /**
   * Records one entry. A sink that buffers returns before the entry is durable and must
   * say so in its documentation; `flush()` makes everything recorded so far durable.
   */
  record(entry: AuditEntry): void;
  flush(): Promise<void>;
}

/** A sink that keeps entries in memory: for tests and for services run without an audit store. */
export class MemoryAuditSink implements AuditSink {
  readonly entries: AuditEntry[] = [];
  record(entry: AuditEntry): void {
    this.entries.push(entry);
  }
  flush(): Promise<void> {
    return Promise.resolve();
  }
}
