import { fileURLToPath } from 'node:url';
import { runner } from 'node-pg-migrate';
import type pg from 'pg';
import { inTransaction } from '@ledgerline/events';

const MIGRATIONS_DIR = fileURLToPath(new URL('../migrations', import.meta.url));

/** The role every audit write runs as: INSERT and SELECT on the log, no UPDATE or DELETE. */
export const AUDIT_WRITER_ROLE = 'ledgerline_audit_writer';

/**
 * Brings the `audit` schema up to date. Safe to call from every instance at start: the runner
 * serialises concurrent callers with an advisory lock and applies each migration once. The
 * caller must be able to create roles (the migration creates AUDIT_WRITER_ROLE if missing).
 */
export async function migrateAudit(databaseUrl: string): Promise<void> {
  await runner({
    databaseUrl,
    dir: MIGRATIONS_DIR,
    direction: 'up',
    schema: 'audit',
    createSchema: true,
    migrationsSchema: 'audit',
    migrationsTable: 'migrations',
    advisoryLockMode: 'wait',
    checkOrder: true,
    log: () => {},
  });
}

/** Runs `fn` in a transaction as AUDIT_WRITER_ROLE, so the database's own grants bound what it can do. */
export function asAuditWriter<T>(pool: pg.Pool, fn: (client: pg.PoolClient) => Promise<T>): Promise<T> {
  return inTransaction(pool, async (client) => {
    await client.query(`SET LOCAL ROLE ${AUDIT_WRITER_ROLE}`);
    return fn(client);
  });
}
