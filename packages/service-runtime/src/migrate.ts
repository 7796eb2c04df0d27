import { fileURLToPath } from 'node:url';
import { runner } from 'node-pg-migrate';

const MIGRATIONS_DIR = fileURLToPath(new URL('../migrations', import.meta.url));

/**
 * Brings the service runtime's `runtime` schema (idempotency keys) up to date. Safe to call
 * from every instance at start: the runner serialises concurrent callers with an advisory lock
 * and applies each migration once, in its own transaction. Its migrations table lives in the
 * same schema, apart from every other package's.
 */
export async function migrateRuntime(databaseUrl: string): Promise<void> {
  await runner({
    databaseUrl,
    dir: MIGRATIONS_DIR,
    direction: 'up',
    schema: 'runtime',
    createSchema: true,
    migrationsSchema: 'runtime',
    migrationsTable: 'migrations',
    advisoryLockMode: 'wait',
    checkOrder: true,
    log: () => {},
  });
}
