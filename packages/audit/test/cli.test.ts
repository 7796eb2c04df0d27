/**
 * The CLI: verify (clean, then after a committed tampering), public-key, prove and the
 * standalone verify-proof, search, holds, erasure and expiry, and usage errors.
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { runCli } from '../src/cli.ts';
import { AuditSequencer, loadSigningKey, parseKeyEncryptionKey, publicKeyPem, verifyBundle } from '../src/index.ts';
import { auditTestEnv, entry, REVIEWER, type AuditTestEnv } from './support.ts';

let t: AuditTestEnv;
const dir = mkdtempSync(join(tmpdir(), 'll-audit-cli-'));
before(async () => {
  t = await auditTestEnv({ withEvents: false });
  for (let i = 0; i < 20; i += 1) t.sink.record(entry(i, i === 4 ? { subject: 'cust-4', personal: { name: 'Dora' } } : {}));
  await t.settle();
});
after(async () => {
  await t.close();
});

async function cli(...args: string[]): Promise<{ code: number; out: string; err: string }> {
  return cliOn(t.db.url, ...args);
}

async function cliOn(url: string, ...args: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const code = await runCli(args, { env: { DATABASE_URL: url }, stdout: (s) => (out += `${s}\n`), stderr: (s) => (err += `${s}\n`) });
  return { code, out, err };
}

/** Commits a tampering with the record at `seq` (past the append-only trigger, as a superuser could). */
async function tamper(seq: number): Promise<void> {
  const c = await t.pool.connect();
  try {
    await c.query('BEGIN');
    await c.query('SET LOCAL session_replication_role = replica');
    await c.query("UPDATE audit.records SET outcome = 'success', reason = NULL WHERE seq = $1", [seq]);
    await c.query('COMMIT');
  } finally {
    c.release();
  }
}

test('public-key, prove and verify-proof: a third party checks bundles with the PEM alone', async () => {
  const key = await cli('public-key');
  assert.equal(key.code, 0);
  assert.match(key.out, /^-----BEGIN PUBLIC KEY-----/);
  const pem = join(dir, 'key.pem');
  writeFileSync(pem, key.out);

  assert.equal((await cli('prove', '--seq', '7')).code, 2, '--as is required: the bundle discloses the record');
  const inclusion = await cli('prove', '--seq', '7', '--as', 'auditor:ann');
  assert.equal(inclusion.code, 0, inclusion.err);
  const bundle = join(dir, 'inclusion.json');
  writeFileSync(bundle, inclusion.out);
  const ok = await runCli(['verify-proof', '--public-key', pem, bundle], { env: {}, stdout: () => {}, stderr: () => {} });
  assert.equal(ok, 0);

  const tamperedBundle = JSON.parse(inclusion.out) as { leafData: string };
  const data = Buffer.from(tamperedBundle.leafData, 'base64').toString('utf8').replace('svc-3', 'svc-0');
  writeFileSync(join(dir, 'bad.json'), JSON.stringify({ ...tamperedBundle, leafData: Buffer.from(data).toString('base64') }));
  const bad = await cli('verify-proof', '--public-key', pem, join(dir, 'bad.json'));
  assert.deepEqual([bad.code, bad.out.trim()], [1, 'FAILED: the inclusion proof does not lead to the root']);

  const consistency = await cli('prove', '--from', '20', '--to', '20');
  assert.equal(consistency.code, 0);
  assert.equal((await cli('prove', '--seq', '99', '--as', 'auditor:ann')).code, 2);
  assert.equal((await cli('prove')).code, 2);
  assert.equal((await cli('verify-proof', join(dir, 'bad.json'))).code, 2, 'the public key is required');
});

test('search prints records as JSON lines and is itself audited; holds, erasure and expiry', async () => {
  const found = await cli('search', '--as', 'auditor:ann', '--actor', 'svc-1', '--order', 'asc', '--limit', '2');
  assert.equal(found.code, 0, found.err);
  const lines = found.out.trim().split('\n').map((l) => JSON.parse(l) as { actor: { id: string }; seq: number });
  assert.deepEqual(lines.map((r) => r.actor.id), ['svc-1', 'svc-1']);
  assert.match(found.err, /more: --after \d+/);
  assert.equal((await cli('search', '--actor', 'svc-1')).code, 2, '--as is required');
  assert.equal((await cli('search', '--as', 'x', '--outcome', 'maybe')).code, 2);
  assert.equal((await cli('search', '--as', 'x', '--from', 'yesterday')).code, 2);

  const hold = await cli('hold', 'place', '--subject', 'cust-4', '--reason', 'case 12', '--as', 'legal:lee');
  assert.equal(hold.code, 0);
  const holdId = hold.out.trim();
  assert.match((await cli('hold', 'list')).out, /case 12/);
  const refused = await cli('erase', '--subject', 'cust-4', '--as', 'dpo:dan');
  assert.deepEqual([refused.code, refused.err.trim()], [2, 'subject cust-4 is under legal hold: erasure refused']);
  assert.equal((await cli('hold', 'release', '--id', holdId, '--as', 'legal:lee')).code, 0);
  assert.equal((await cli('hold', 'release', '--id', holdId, '--as', 'legal:lee')).code, 2);
  assert.match((await cli('erase', '--subject', 'cust-4', '--as', 'dpo:dan')).out, /erased/);
  assert.match((await cli('expire', '--as', 'ops:olu', '--as-of', '2020-01-01T00:00:00Z')).out, /^0 payload/);

  await t.settle();
  const audited = await cli('search', '--as', 'auditor:ann', '--resource-type', 'audit.subject');
  const actions = audited.out.trim().split('\n').map((l) => JSON.parse(l) as { action: string; outcome: string; actor: { id: string } });
  assert.deepEqual(actions.map((r) => [r.action, r.outcome, r.actor.id]).sort(), [['audit.subject.erase', 'failure', 'dpo:dan'], ['audit.subject.erase', 'success', 'dpo:dan']]);
  await t.settle();
  const searches = await cli('search', '--as', 'auditor:ann', '--action', 'audit.search', '--actor', 'auditor:ann');
  assert.ok(searches.out.trim().split('\n').length >= 2);
});

test('a search or a proof whose own audit record cannot be written prints nothing and fails', async () => {
  await t.settle();
  // Given a queue that refuses this auditor's entries (as a database refusing the sink's
  // flush would: the search itself, a read, still succeeds),
  await t.pool.query(`CREATE FUNCTION public.refuse_withheld() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF NEW.entry::jsonb -> 'actor' ->> 'id' = 'auditor:withheld' THEN RAISE EXCEPTION 'the queue refuses this entry'; END IF;
      RETURN NEW;
    END $$`);
  await t.pool.query('CREATE TRIGGER refuse_withheld BEFORE INSERT ON audit.queue FOR EACH ROW EXECUTE FUNCTION public.refuse_withheld()');
  try {
    // a search finds records but discloses none of them: its record is not durable,
    const search = await cli('search', '--as', 'auditor:withheld', '--actor', 'svc-1');
    assert.deepEqual([search.code, search.out], [2, ''], search.err);
    assert.match(search.err, /could not be written/);
    // nor does a proof, whose bundle discloses the record;
    const prove = await cli('prove', '--seq', '7', '--as', 'auditor:withheld');
    assert.deepEqual([prove.code, prove.out], [2, ''], prove.err);
    assert.match(prove.err, /could not be written/);
    // A hold is placed with its record, in one transaction (audit.place_hold): a record the
    // queue refuses means no hold, and the command fails.
    const hold = await cli('hold', 'place', '--subject', 'cust-withheld', '--reason', 'case 13', '--as', 'auditor:withheld');
    assert.equal(hold.code, 2, hold.out);
    assert.equal(hold.out, '');
    assert.match(hold.err, /the queue refuses this entry/);
    assert.deepEqual((await t.store.activeHolds()).filter((h) => h.subject === 'cust-withheld'), [], 'no hold in force without its record');
    // another auditor's search, whose record is written, prints its records.
    const found = await cli('search', '--as', 'auditor:ann', '--actor', 'svc-1', '--limit', '1');
    assert.equal(found.code, 0, found.err);
    assert.equal(found.out.trim().split('\n').length, 1);
  } finally {
    await t.pool.query('DROP TRIGGER refuse_withheld ON audit.queue');
    await t.pool.query('DROP FUNCTION public.refuse_withheld()');
  }
  await t.settle();
  assert.equal((await t.store.search({ actorId: 'auditor:withheld' }, {}, REVIEWER)).records.length, 0, 'nothing of the refused reads was queued');
});

test('expire removes every due payload, however many, in transactions of at most 10,000, and reports the total', async () => {
  const e = await auditTestEnv({ withEvents: false });
  try {
    // Given more due payloads than one transaction removes (access: 366 days),
    const due = 10_000 + 7;
    const old = new Date('2019-01-01T00:00:00Z');
    for (let i = 0; i < due; i += 1) e.sink.record({ ...entry(i), recordClass: 'access', occurredAt: old });
    // one as old but held, and one not yet due,
    e.sink.record({ ...entry(1), recordClass: 'access', resource: { type: 'account', id: 'acc-held' }, occurredAt: old });
    await e.store.placeHold({ resource: { type: 'account', id: 'acc-held' } }, 'case 3', REVIEWER);
    e.sink.record({ ...entry(2), recordClass: 'access' });
    await e.settle();
    // one run removes every due payload and says how many,
    const run = await cliOn(e.db.url, 'expire', '--as', 'ops:olu');
    assert.equal(run.code, 0, run.err);
    assert.match(run.out, new RegExp(`^${due} payload\\(s\\) removed`));
    const left = await e.pool.query<{ old: number; all: number }>(
      "SELECT count(*) FILTER (WHERE r.occurred_at < '2020-01-01')::int AS old, count(*)::int AS all FROM audit.payloads p JOIN audit.records r ON r.seq = p.seq WHERE r.record_class = 'access'",
    );
    assert.deepEqual(left.rows[0], { old: 1, all: 2 }, 'only the held and the recent payloads stay');
    // in bounded transactions, each recorded with what it removed.
    await e.settle();
    const expiries = (await e.store.search({ action: 'audit.retention.expire' }, { order: 'asc' }, REVIEWER)).records;
    assert.deepEqual(expiries.map((r) => [(r.payload as { removed: number }).removed, r.actor.id]), [[10_000, 'ops:olu'], [7, 'ops:olu']]);
    assert.match((await cliOn(e.db.url, 'expire', '--as', 'ops:olu')).out, /^0 payload/);
  } finally {
    await e.close();
  }
});

test('verify: clean, then a committed tampering is reported with its location and exit 1', async () => {
  await t.settle();
  const clean = await cli('verify');
  assert.equal(clean.code, 0, clean.out);
  assert.match(clean.out, /^OK: \d+ records, \d+ checkpoints verified/);
  const held = join(dir, 'checkpoint.json');
  const cp = (await t.store.latestCheckpoint())!;
  writeFileSync(held, JSON.stringify({ origin: cp.origin, treeSize: cp.treeSize, rootHash: cp.rootHash.toString('base64'), issuedAtMs: cp.issuedAt.getTime(), keyId: cp.keyId, signature: cp.signature.toString('base64') }));

  await tamper(10);
  const report = await cli('verify', '--json', '--checkpoint', held);
  assert.equal(report.code, 1);
  const json = JSON.parse(report.out) as { firstDifference: { kind: string; seq: number } };
  assert.deepEqual([json.firstDifference.kind, json.firstDifference.seq], ['record_altered', 10]);
  const text = await cli('verify');
  assert.match(text.out, /^FAILED: .*\n {2}record_altered at seq 10: /);
  assert.equal((await cli('nonsense')).code, 2);
  assert.equal((await cli('verify', '--bogus')).code, 2);
  assert.equal((await cli('--help')).code, 0);
  assert.equal((await runCli(['verify'], { env: {}, stdout: () => {}, stderr: () => {} })), 2, 'no DATABASE_URL');
});

test('kek-status counts the subject keys per key-encryption key and what is left to wrap', async () => {
  t.sink.record({ recordClass: 'command', actor: { type: 'user', id: 'user:ops' }, action: 'ledger.account.read', outcome: 'success', origin: { service: 'ledger' }, resource: { type: 'account', id: 'acc-kek' }, subject: 'cust-kek', personal: { name: 'Gus' } });
  await t.settle();
  let out = '';
  const kekText = randomBytes(32).toString('base64url');
  const code = await runCli(['kek-status'], { env: { DATABASE_URL: t.db.url, AUDIT_KEY_ENCRYPTION_KEY: kekText }, stdout: (s) => (out += s), stderr: () => {} });
  assert.equal(code, 0);
  const status = JSON.parse(out) as { current: string; previous: string[]; keys: Record<string, number>; pending: number };
  assert.equal(status.current, parseKeyEncryptionKey(kekText).id);
  assert.deepEqual(status.previous, []);
  assert.ok((status.keys.clear ?? 0) >= 1 && status.pending === status.keys.clear, out);
});

/** A stack trace in what the CLI printed: only a bug of its own should show one. */
const STACK = /\n\s+at /;

test('files that cannot be read or parsed are usage errors naming the file, with no stack trace', async () => {
  const pem = join(dir, 'input-key.pem');
  writeFileSync(pem, (await cli('public-key')).out);
  const notPem = join(dir, 'not-a-key.pem');
  writeFileSync(notPem, 'hello\n');
  const notJson = join(dir, 'not.json');
  writeFileSync(notJson, '{ not json');
  const missing = join(dir, 'missing.json');
  const bundle = join(dir, 'input-bundle.json');
  const proof = await cli('prove', '--seq', '3', '--as', 'auditor:ann');
  assert.equal(proof.code, 0, proof.err);
  writeFileSync(bundle, proof.out);
  const cases: [string, string[], string][] = [
    ['verify-proof, bundle missing', ['verify-proof', '--public-key', pem, missing], `cannot read ${missing} (a proof bundle): ENOENT`],
    ['verify-proof, bundle not JSON', ['verify-proof', '--public-key', pem, notJson], `${notJson} is not JSON (a proof bundle)`],
    ['verify-proof, key missing', ['verify-proof', '--public-key', join(dir, 'missing.pem'), bundle], `cannot read ${join(dir, 'missing.pem')} (the public key): ENOENT`],
    ['verify-proof, key not a PEM', ['verify-proof', '--public-key', notPem, bundle], `${notPem} is not an Ed25519 public key in PEM`],
    ['verify, key missing', ['verify', '--public-key', join(dir, 'missing.pem')], `cannot read ${join(dir, 'missing.pem')} (the public key): ENOENT`],
    ['verify, key not a PEM', ['verify', '--public-key', notPem], `${notPem} is not an Ed25519 public key in PEM`],
    ['verify, --checkpoint missing', ['verify', '--checkpoint', missing], `cannot read ${missing} (a checkpoint: the JSON of /v1/audit/checkpoint): ENOENT`],
    ['verify, --checkpoint not JSON', ['verify', '--checkpoint', notJson], `${notJson} is not JSON (a checkpoint: the JSON of /v1/audit/checkpoint)`],
    ['key-transition, previous key missing', ['key-transition', '--previous-key', missing, '--as', 'ops:olga'], `cannot read ${missing} (the previous private key): ENOENT`],
    ['key-transition, previous key not a PEM', ['key-transition', '--previous-key', notPem, '--as', 'ops:olga'], `${notPem} is not a PEM private key`],
    ['sequence, previous public key not a PEM', ['sequence', '--previous-public-key', notPem], `${notPem} is not an Ed25519 public key in PEM`],
  ];
  for (const [name, args, message] of cases) {
    const r = await cli(...args);
    assert.equal(r.code, 2, `${name}: ${r.out}${r.err}`);
    assert.ok(r.err.includes(message), `${name}: ${r.err}`);
    assert.doesNotMatch(r.err, STACK, name);
    assert.equal(r.out, '', name);
  }
  // The well-formed bundle still verifies.
  assert.equal((await cli('verify-proof', '--public-key', pem, bundle)).code, 0);
  // A database that refuses the connection is no bug of the CLI's either: its message, no stack.
  const down = await cliOn('postgres://postgres@127.0.0.1:1/none', 'verify');
  assert.equal(down.code, 2);
  assert.match(down.err, /^failed: connect ECONNREFUSED 127\.0\.0\.1:1\n$/);
});

test('verify refuses a held checkpoint with a field missing or malformed, naming it, and reports one whose signature fails', async () => {
  await t.settle();
  const cp = (await t.store.latestCheckpoint())!;
  const json = { origin: cp.origin, treeSize: cp.treeSize, rootHash: cp.rootHash.toString('base64'), issuedAtMs: cp.issuedAt.getTime(), keyId: cp.keyId, signature: cp.signature.toString('base64') };
  const held = join(dir, 'held.json');
  const malformed: [string, unknown, RegExp][] = [
    ['no issuedAtMs', { ...json, issuedAtMs: undefined }, /checkpoint\.issuedAtMs must be an integer time/],
    ['issuedAtMs beyond a date', { ...json, issuedAtMs: Number.MAX_SAFE_INTEGER }, /checkpoint\.issuedAtMs must be an integer time/],
    ['issuedAtMs as text', { ...json, issuedAtMs: String(json.issuedAtMs) }, /checkpoint\.issuedAtMs must be an integer time/],
    ['no origin', { ...json, origin: undefined }, /checkpoint\.origin must be a one-line string/],
    ['a fractional size', { ...json, treeSize: 1.5 }, /checkpoint\.treeSize must be a positive integer/],
    ['a size of 0', { ...json, treeSize: 0 }, /checkpoint\.treeSize must be a positive integer/],
    ['a root in loose base64', { ...json, rootHash: `${json.rootHash.slice(0, -1)}!` }, /checkpoint\.rootHash is not canonical base64/],
    ['no signature', { ...json, signature: undefined }, /checkpoint\.signature must be base64/],
    ['an array', [json], /checkpoint is not a checkpoint/],
    ['null', null, /checkpoint is not a checkpoint/],
  ];
  for (const [name, value, message] of malformed) {
    writeFileSync(held, JSON.stringify(value));
    const r = await cli('verify', '--checkpoint', held);
    assert.equal(r.code, 2, `${name}: ${r.out}${r.err}`);
    assert.ok(r.err.startsWith(`${held} is not a checkpoint (the JSON of /v1/audit/checkpoint): `), `${name}: ${r.err}`);
    assert.match(r.err, message, name);
    assert.doesNotMatch(r.err, STACK, name);
    assert.equal(r.out, '', `${name}: nothing verified`);
  }
  // Well-formed, but not what the key signed: a verification result, not a usage error.
  const flipped = Buffer.from(cp.signature);
  flipped[0] = (flipped[0] ?? 0) ^ 1;
  writeFileSync(held, JSON.stringify({ ...json, signature: flipped.toString('base64') }));
  const r = await cli('verify', '--json', '--checkpoint', held);
  assert.equal(r.code, 1, r.err);
  const report = JSON.parse(r.out) as { issues: { kind: string; treeSize: number | null }[] };
  assert.deepEqual(report.issues.filter((i) => i.kind === 'checkpoint_signature_invalid').map((i) => i.treeSize), [cp.treeSize]);
  assert.doesNotMatch(r.err, STACK);
});

test('a rotated signing key: the log verifies with every key it was signed with, and not with the new one alone', async () => {
  await t.settle();
  // Given a committed tampering at seq 10 (entry 10 of the fixture, a failure made a success),
  await tamper(10);
  const before = (await t.store.latestCheckpoint())?.treeSize ?? 0;
  // when the service restarts with a new signing key (its next checkpoints are signed with it),
  const { privateKey } = generateKeyPairSync('ed25519');
  const newPem = privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
  const signer = loadSigningKey(newPem, { production: false });
  // (given the old public key: the latest checkpoint is the old key's, and must verify before it signs),
  const sequencer = new AuditSequencer({ pool: t.pool, signer, previousKeys: [t.signer.publicKey], origin: 'ledgerline/test', checkpointIntervalMs: 0 });
  for (let i = 0; i < 5; i += 1) t.sink.record(entry(100 + i));
  await t.sink.flush();
  await sequencer.round();
  const after = (await t.store.latestCheckpoint())?.treeSize ?? 0;
  assert.ok(after > before && before > 0);
  const oldPem = join(dir, 'old.pem');
  const rotatedPem = join(dir, 'new.pem');
  writeFileSync(oldPem, publicKeyPem(t.signer.publicKey));
  writeFileSync(rotatedPem, publicKeyPem(signer.publicKey));
  // then, with every key, only the tampering is reported: the signatures are not in question.
  const both = await cli('verify', '--public-key', oldPem, '--public-key', rotatedPem);
  assert.doesNotMatch(both.out, /checkpoint_signature_invalid/);
  assert.match(both.out, /record_altered at seq 10/);
  const onlyNew = await cli('verify', '--public-key', rotatedPem);
  assert.equal(onlyNew.code, 1);
  assert.match(onlyNew.out, new RegExp(`checkpoint_signature_invalid \\(checkpoint ${before}\\): .*no valid signature under the trusted public keys`));
  assert.doesNotMatch(onlyNew.out, new RegExp(`checkpoint_signature_invalid \\(checkpoint ${after}\\)`));
  // A consistency proof across the change checks with both keys, and with neither alone.
  const bundle = await t.store.consistencyBundle(before, after);
  assert.ok(bundle !== null);
  assert.match(verifyBundle(bundle, [t.signer.publicKey, signer.publicKey]), new RegExp(`at tree size ${after} extends tree size ${before}`));
  assert.throws(() => verifyBundle(bundle, t.signer.publicKey), /"?to"?: the signature does not verify/);
  assert.throws(() => verifyBundle(bundle, signer.publicKey), /"?from"?: the signature does not verify/);
});

test('governance commands refuse bad input as usage errors before doing anything, with no stack trace', async () => {
  const long = 'x'.repeat(501);
  const held = async (): Promise<number> => (await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM audit.legal_holds WHERE released_at IS NULL')).rows[0]?.n ?? -1;
  const erased = async (subject: string): Promise<boolean> => (await t.pool.query('SELECT 1 FROM audit.erased_subjects WHERE subject = $1', [subject])).rowCount === 1;
  const transitions = async (): Promise<number> => (await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM audit.key_transitions')).rows[0]?.n ?? -1;
  const holdId = (await cli('hold', 'place', '--subject', 'cust-bad-input', '--reason', 'case 13', '--as', 'legal:lee')).out.trim();
  const holds = await held();
  const currentPem = generateKeyPairSync('ed25519').privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
  const previous = join(dir, 'previous-private.pem');
  writeFileSync(previous, generateKeyPairSync('ed25519').privateKey.export({ type: 'pkcs8', format: 'pem' }).toString());
  const same = join(dir, 'same-private.pem');
  writeFileSync(same, currentPem);
  const stored = await transitions();
  const cases: [string, Record<string, string>, string[], RegExp][] = [
    ['hold place, an --as the trail cannot record', {}, ['hold', 'place', '--subject', 'cust-9', '--reason', 'r', '--as', long], /^--as must be 1\.\.500 characters/],
    ['hold place, an empty --subject', {}, ['hold', 'place', '--subject', '', '--reason', 'r', '--as', 'legal:lee'], /^--subject is required/],
    ['hold place, a subject and a resource', {}, ['hold', 'place', '--subject', 'cust-9', '--resource-type', 'account', '--resource-id', 'acc-9', '--reason', 'r', '--as', 'legal:lee'], /^hold place needs --subject S, or --resource-type T and --resource-id ID, not both/],
    ['hold place, a resource id the trail cannot record', {}, ['hold', 'place', '--resource-type', 'account', '--resource-id', long, '--reason', 'r', '--as', 'legal:lee'], /^--resource-id must be 1\.\.500/],
    ['hold release, an --as the trail cannot record', {}, ['hold', 'release', '--id', holdId, '--as', long], /^--as must be 1\.\.500/],
    ['erase, an --as the trail cannot record', {}, ['erase', '--subject', 'cust-unrecorded', '--as', long], /^--as must be 1\.\.500/],
    ['erase, a subject the trail cannot record', {}, ['erase', '--subject', long, '--as', 'dpo:dan'], /^--subject must be 1\.\.500/],
    ['expire, an --as the trail cannot record', {}, ['expire', '--as', `nul\u0000actor`], /^--as must be 1\.\.500/],
    ['kek-status, a malformed AUDIT_KEY_ENCRYPTION_KEY', { AUDIT_KEY_ENCRYPTION_KEY: 'not-a-key' }, ['kek-status'], /^AUDIT_KEY_ENCRYPTION_KEY must be 32 bytes/],
    ['erase, a malformed AUDIT_KEY_ENCRYPTION_KEY', { AUDIT_KEY_ENCRYPTION_KEY: 'not-a-key' }, ['erase', '--subject', 'cust-unrecorded', '--as', 'dpo:dan'], /^AUDIT_KEY_ENCRYPTION_KEY must be 32 bytes/],
    ['public-key, a malformed AUDIT_SIGNING_KEY', { AUDIT_SIGNING_KEY: 'not a key' }, ['public-key'], /^AUDIT_SIGNING_KEY is not a PEM private key/],
    ['key-transition, a malformed AUDIT_SIGNING_KEY', { AUDIT_SIGNING_KEY: 'not a key' }, ['key-transition', '--previous-key', previous, '--as', 'ops:olga'], /^AUDIT_SIGNING_KEY is not a PEM private key/],
    ['key-transition, from the current key to itself', { AUDIT_SIGNING_KEY: currentPem }, ['key-transition', '--previous-key', same, '--as', 'ops:olga'], /is the key AUDIT_SIGNING_KEY names/],
    ['key-transition, an origin no log can have', { AUDIT_SIGNING_KEY: currentPem }, ['key-transition', '--previous-key', previous, '--origin', 'two words', '--as', 'ops:olga'], /^--origin must be 1\.\.200 printable ASCII/],
    ['key-transition, an empty origin', { AUDIT_SIGNING_KEY: currentPem }, ['key-transition', '--previous-key', previous, '--origin', '', '--as', 'ops:olga'], /^--origin must be 1\.\.200 printable ASCII/],
    ['key-transition, an --as the trail cannot record', { AUDIT_SIGNING_KEY: currentPem }, ['key-transition', '--previous-key', previous, '--as', long], /^--as must be 1\.\.500/],
  ];
  // Every case is run and the wrong answers reported together.
  const wrong: string[] = [];
  for (const [name, env, args, message] of cases) {
    let out = '';
    let err = '';
    const code = await runCli(args, { env: { DATABASE_URL: t.db.url, ...env }, stdout: (s) => (out += `${s}\n`), stderr: (s) => (err += `${s}\n`) });
    if (code !== 2 || !message.test(err) || STACK.test(err) || out !== '') wrong.push(`${name}: exit ${code}, ${JSON.stringify(`${out}${err}`.slice(0, 160))}`);
  }
  assert.deepEqual(wrong, []);
  // and nothing was done: no hold placed or released, nothing erased, no transition stored.
  assert.equal(await held(), holds);
  assert.equal(await erased('cust-unrecorded'), false);
  assert.equal(await erased(long), false);
  assert.equal(await transitions(), stored);
  assert.equal((await cli('hold', 'release', '--id', holdId, '--as', 'legal:lee')).code, 0);
});
