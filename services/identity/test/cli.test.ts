/**
 * `npm run identity -- create-user`: staff accounts, which an admin may not make over HTTP, made
 * by an operator with the database's credentials, each creation and refusal recorded in the
 * audit trail's queue before the command reports it.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { randomBytes } from 'node:crypto';
import { AUDIT_WRITER_ROLE, migrateAudit } from '@ledgerline/audit';
import type { Identity } from '@ledgerline/identity';
import { ROLES } from '@ledgerline/authz';
import { runIdentityCli } from '../src/cli.ts';
import { identityDatabase, PASSWORD, type IdentityDatabase } from './support.ts';

let t: IdentityDatabase<Identity>;

before(async () => {
  t = await identityDatabase('ll_identity_cli', {});
  await migrateAudit(t.db.url);
});

after(async () => {
  await t?.pool.end();
  await t?.db.drop();
});

async function cli(args: string[], env: Record<string, string> = { DATABASE_URL: t.db.url, IDENTITY_USER_PASSWORD: PASSWORD }): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const code = await runIdentityCli(args, { env, stdout: (s) => (out += `${s}\n`), stderr: (s) => (err += `${s}\n`) });
  return { code, out, err };
}

interface QueuedCreation {
  actor: { id: string };
  origin: { service: string };
  outcome: string;
  reason?: string;
  resource: { type: string; id: string };
  payloadJson: string;
}

/** The queued records of user creations, oldest first. */
async function creations(): Promise<QueuedCreation[]> {
  const r = await t.pool.query<{ entry: string }>(`SELECT entry FROM audit.queue WHERE entry::json->>'action' = 'identity.user.create' ORDER BY id`);
  return r.rows.map((row) => JSON.parse(row.entry) as QueuedCreation);
}

test('an operator creates a teller: the user logs in with the teller role, and the creation is recorded naming the operator', async () => {
  const made = await cli(['create-user', '--username', 'Tess', '--roles', ROLES.teller, '--as', 'ops:olu']);
  assert.equal(made.code, 0, made.err);
  const { id, username, roles } = JSON.parse(made.out) as { id: string; username: string; roles: string[] };
  assert.deepEqual([username, roles], ['tess', [ROLES.teller]]);
  const token = await t.identity.login({ username: 'tess', password: PASSWORD, audience: 'ledger' });
  const claims = JSON.parse(Buffer.from(token.access_token.split('.')[1] ?? '', 'base64url').toString()) as { sub: string; roles: string[] };
  assert.deepEqual([claims.sub, claims.roles], [id, [ROLES.teller]]);
  const [record] = await creations();
  assert.deepEqual([record?.actor.id, record?.origin.service, record?.outcome, record?.resource.id], ['ops:olu', 'identity-cli', 'success', 'tess']);
  assert.deepEqual(JSON.parse(record?.payloadJson ?? 'null'), { user_id: id, roles: [ROLES.teller] });
});

test('a login that is only a writer of the trail (and may write the identity tables) creates and records: the trail check refuses no one the insert would take', async () => {
  const role = `ll_cli_writer_${randomBytes(4).toString('hex')}`;
  await t.pool.query(`CREATE ROLE ${role} LOGIN IN ROLE ${AUDIT_WRITER_ROLE}`);
  await t.pool.query(`GRANT USAGE ON SCHEMA identity TO ${role}; GRANT ALL ON ALL TABLES IN SCHEMA identity TO ${role}`);
  try {
    const url = new URL(t.db.url);
    url.username = role;
    const made = await cli(['create-user', '--username', 'wren', '--roles', ROLES.auditor, '--as', 'ops:olu'], { DATABASE_URL: url.toString(), IDENTITY_USER_PASSWORD: PASSWORD });
    assert.equal(made.code, 0, made.err);
    assert.deepEqual((await creations()).at(-1)?.resource, { type: 'user', id: 'wren' });
  } finally {
    await t.pool.query(`DROP OWNED BY ${role}; DROP ROLE ${role}`);
  }
});

test('where the trail cannot take the record (no audit schema), nothing is created', async () => {
  const bare = await identityDatabase('ll_identity_cli_bare', {});
  try {
    const r = await cli(['create-user', '--username', 'ghost', '--roles', ROLES.teller, '--as', 'ops:olu'], { DATABASE_URL: bare.db.url, IDENTITY_USER_PASSWORD: PASSWORD });
    assert.equal(r.code, 1, r.err);
    assert.match(r.err, /the audit trail cannot take the record of this creation .*: nothing was created/);
    assert.equal((await bare.pool.query('SELECT 1 FROM identity.users WHERE username = $1', ['ghost'])).rowCount, 0);
  } finally {
    await bare.pool.end();
    await bare.db.drop();
  }
});

test('a refusal (the user exists, a service role) exits 1 and is recorded; usage errors exit 2 and record nothing', async () => {
  const before = (await creations()).length;
  const again = await cli(['create-user', '--username', 'tess', '--roles', ROLES.auditor, '--as', 'ops:olu']);
  assert.equal(again.code, 1);
  assert.match(again.err, /not created/);
  const service = await cli(['create-user', '--username', 'robo', '--roles', 'svc:payments', '--as', 'ops:olu']);
  assert.equal(service.code, 1);
  assert.match(service.err, /role svc:payments is a service role/);
  const refused = (await creations()).slice(before);
  assert.deepEqual(refused.map((r) => [r.outcome, r.reason, r.resource.id]), [['failure', 'conflict', 'tess'], ['failure', 'invalid_request', 'robo']]);
  for (const [args, env, said] of [
    [['create-user', '--username', 'x', '--roles', ROLES.teller], undefined, /--as is required/],
    [['create-user', '--username', 'x', '--as', 'ops:olu'], undefined, /--roles is required/],
    [['create-user', '--username', 'x', '--roles', ROLES.teller, '--as', 'ops:olu'], { DATABASE_URL: t.db.url }, /IDENTITY_USER_PASSWORD is required/],
    [['create-user', '--username', 'x', '--roles', ROLES.teller, '--as', 'ops:olu', '--password', PASSWORD], undefined, /Unknown option '--password'/],
    [['delete-user'], undefined, /^usage:/],
  ] as const) {
    const r = await cli([...args], env);
    assert.equal(r.code, 2, r.err);
    assert.match(r.err, said);
  }
  assert.equal((await creations()).length, before + 2);
});
