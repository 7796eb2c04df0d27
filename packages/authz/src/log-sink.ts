/**
 * An `AuditSink` that writes each entry as one structured log line (`audit: true`), for
 * services run before a durable audit store is configured. It holds nothing in memory, so it
 * cannot grow without bound the way `MemoryAuditSink` would in a long-running process.
 */
import type { AuditEntry, AuditSink } from '@ledgerline/audit';

export interface AuditLogger {
  info(object: object, message: string): void;
}

export class LogAuditSink implements AuditSink {
  readonly #logger: AuditLogger;
  constructor(logger: AuditLogger) {
    this.#logger = logger;
  }
  record(entry: AuditEntry): void {
    this.#logger.info({ audit: true, ...entry, occurredAt: (entry.occurredAt ?? new Date()).toISOString() }, entry.action);
  }
  flush(): Promise<void> {
    return Promise.resolve();
  }
}
