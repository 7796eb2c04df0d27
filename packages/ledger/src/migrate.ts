import { fileURLToPath } from 'node:url';
import { runner } from 'node-pg-migrate';

const MIGRATIONS_DIR = fileURLToPath(new URL('../migrations', import.meta.url));

/**
 * Brings the `ledger` schema up to date. Safe to call from every instance at start: the
 * runner serialises concurrent callers with an advisory lock and applies each migration once,
 * in its own transaction.
 */
export async function migrateLedger(databaseUrl: string): Promise<void> {
  await runner({
    databaseUrl,
    dir: MIGRATIONS_DIR,
    direction: 'up',
    schema: 'ledger',
    createSchema: true,
    migrationsSchema: 'ledger',
    migrationsTable: 'migrations',
    advisoryLockMode: 'wait',
    checkOrder: true,
    log: () => {},
  });
}
