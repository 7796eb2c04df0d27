import { fileURLToPath } from 'node:url';
import { runner } from 'node-pg-migrate';

const MIGRATIONS_DIR = fileURLToPath(new URL('../migrations', import.meta.url));

/**
 * Brings the `identity` schema (users, tokens, clients, keys) up to date. Safe to call from every instance at start: the
 * runner serialises concurrent callers with an advisory lock and applies each migration once,
 * in its own transaction.
 */
export async function migrateIdentity(databaseUrl: string): Promise<void> {
  await runner({
    databaseUrl,
    dir: MIGRATIONS_DIR,
    direction: 'up',
    schema: 'identity',
    createSchema: true,
    migrationsSchema: 'identity',
    migrationsTable: 'migrations',
    advisoryLockMode: 'wait',
    checkOrder: true,
    log: () => {},
  });
}
