/**
 * The ledger service's audit trail, end to end on real PostgreSQL: every command (accepted or
 * rejected, with the reason), every ledger event, every read of account or transfer data, and
 * the audit routes (search, itself audited; checkpoints; proofs a third party can check).
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { after, before, test } from 'node:test';
import fc from 'fast-check';
import { AuditSequencer, AuditStore, loadSigningKey, parsePublicKey, signKeyTransition, verifyBundle, verifyLog, type AuditEntry, type CheckpointSigner, type InclusionBundle, type PostgresAuditSink } from '@ledgerline/audit';
import { newId, type LedgerEngine } from '@ledgerline/ledger';
import type { Service } from '@ledgerline/service-runtime';
import { assertFuzzAnswer, propertySeed } from '@ledgerline/testing';
import { buildLedgerService } from '../src/app.ts';
import type { LedgerTestDb } from '../../../packages/ledger/test/support.ts';
import { auditedLedgerTestDb, type AuditedLedgerFixture } from './support.ts';

interface RecordJson {
  seq: number;
  action: string;
  outcome: string;
  reason: string | null;
  actor: { type: string; id: string };
  resource: { type: string; id: string };
  origin: { service: string; ip: string | null; request_id: string | null; trace_id: string | null };
  payload: Record<string, unknown> | null;
  record_class: string;
}

let t: LedgerTestDb;
let engine: LedgerEngine;
let sink: PostgresAuditSink;
let sequencer: AuditSequencer;
let app: Service;
let signer: CheckpointSigner;

let fx: AuditedLedgerFixture;

before(async () => {
  fx = await auditedLedgerTestDb();
  ({ t, engine, sink, signer } = fx);
  sequencer = new AuditSequencer({ pool: t.pool, signer, origin: 'ledgerline/ledger-test', checkpointIntervalMs: 0, tailEvents: true });
  const store = new AuditStore({ pool: t.pool, sink, service: 'ledger' });
  app = await buildLedgerService({ engine, pool: t.pool, logger: false, audit: { sink, eventsAudited: true, store: { store, publicKey: signer.publicKey } } });
});
after(async () => {
  await app.close();
  await sequencer.close();
  await fx.close();
});

/** Flushes the sink and integrates until the queue is empty and the event tail has caught up. */
async function settle(): Promise<void> {
  // The event store's readers wait for every older transaction in the cluster (another
  // test's long one included): be patient, but bounded (about a minute).
  for (let attempt = 0; attempt < 6000; attempt += 1) {
    await sink.flush();
    const { records } = await sequencer.round();
    const r = await t.pool.query<{ behind: boolean }>(
      `SELECT EXISTS (SELECT 1 FROM audit.queue) OR EXISTS (SELECT 1 FROM events.events e, audit.sequencer_state s
         WHERE (e.transaction_id, e.position) > (s.event_transaction_id, s.event_position)) AS behind`,
    );
    if (records === 0 && r.rows[0]?.behind === false) return;
    if (records === 0) await new Promise((resolve) => setTimeout(resolve, 10));
  }
  throw new Error('the sequencer did not catch up');
}

async function search(query: string): Promise<RecordJson[]> {
  const res = await app.inject({ method: 'GET', url: `/v1/audit/records?order=asc&limit=1000&${query}`, headers: { 'x-client-id': 'auditor-1' } });
  assert.equal(res.statusCode, 200, res.body);
  return (res.json<{ records: RecordJson[] }>()).records;
}

/**
 * Opens `n` accounts as `client` and integrates their events: records of the calling test's
 * own, whatever ran before it. Returns their seqs, in order.
 */
async function accountsOpened(client: string, n: number): Promise<number[]> {
  const accounts = Array.from({ length: n }, () => ({ id: newId(), ledger: 'USD', code: 1 }));
  const res = await app.inject({ method: 'POST', url: '/v1/accounts/batch', headers: { 'x-client-id': client }, payload: { accounts } });
  assert.equal(res.statusCode, 200, res.body);
  await settle();
  const seqs = (await search(`actor=claimed:${client}&action=ledger.AccountOpened`)).map((r) => r.seq);
  assert.equal(seqs.length, n);
  return seqs;
}

test('commands accepted and rejected, ledger events and sensitive reads are all in the trail, with reasons', async () => {
  const [a, b, strict] = [newId(), newId(), newId()];
  const opened = await app.inject({
    method: 'POST',
    url: '/v1/accounts/batch',
    headers: { 'x-client-id': 'svc-onboarding' },
    payload: { accounts: [{ id: a, ledger: 'USD', code: 1 }, { id: b, ledger: 'USD', code: 1 }, { id: strict, ledger: 'USD', code: 1, flags: { debits_must_not_exceed_credits: true } }] },
  });
  assert.equal(opened.statusCode, 200);
  const traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
  const ok = newId();
  const posted = await app.inject({ method: 'POST', url: '/v1/transfers', headers: { 'x-client-id': 'svc-payments', traceparent }, payload: { id: ok, debit_account_id: a, credit_account_id: b, amount: '700', ledger: 'USD', code: 1 } });
  assert.equal(posted.statusCode, 201);
  const refused = newId();
  const rejected = await app.inject({ method: 'POST', url: '/v1/transfers', headers: { 'x-client-id': 'svc-payments' }, payload: { id: refused, debit_account_id: strict, credit_account_id: b, amount: '5', ledger: 'USD', code: 1 } });
  assert.equal(rejected.statusCode, 422);
  const invalid = await app.inject({ method: 'POST', url: '/v1/transfers', headers: { 'x-client-id': 'svc-payments' }, payload: { id: newId(), debit_account_id: a, credit_account_id: b, amount: '-1', ledger: 'USD', code: 1 } });
  assert.equal(invalid.statusCode, 400);
  assert.equal((await app.inject({ method: 'GET', url: `/v1/accounts/${a}`, headers: { 'x-client-id': 'user:teller-7' } })).statusCode, 200);
  assert.equal((await app.inject({ method: 'GET', url: `/v1/transfers/${ok}` })).statusCode, 200);
  const missing = newId();
  assert.equal((await app.inject({ method: 'GET', url: `/v1/accounts/${missing}/balance?at=1` })).statusCode, 404);
  await settle();

  // A command the ledger applied is recorded by its event (below), in its own transaction;
  // one it refused, or never ran, has a command record of its own.
  const commands = await search('action=ledger.transfer.create');
  assert.deepEqual(
    commands.map((r) => [r.resource.id, r.outcome, r.reason, r.actor.id, r.record_class, r.payload?.status]),
    [
      [refused, 'failure', 'exceeds_credits', 'claimed:svc-payments', 'command', 422],
      [commands[1]?.resource.id, 'failure', 'validation-error', 'claimed:svc-payments', 'command', 400],
    ],
  );
  assert.deepEqual(await search('action=ledger.account.create_batch'), []);

  // The events: the same money movements, from the event store, each exactly once, each
  // naming who asked, from where, in which request and trace.
  const events = await search('resource_type=ledger.transfer');
  assert.deepEqual(
    events.map((r) => [r.resource.id, r.action, r.outcome, r.reason, r.actor.id, r.record_class, r.origin.ip]),
    [
      [ok, 'ledger.TransferPosted', 'success', null, 'claimed:svc-payments', 'financial', '127.0.0.1'],
      [refused, 'ledger.TransferRejected', 'failure', 'exceeds_credits', 'claimed:svc-payments', 'financial', '127.0.0.1'],
    ],
  );
  assert.equal(events[0]?.origin.trace_id, '4bf92f3577b34da6a3ce929d0e0e4736');
  assert.equal(events[0]?.origin.request_id, posted.headers['x-request-id']);
  const opened3 = await search('action=ledger.AccountOpened');
  assert.deepEqual(opened3.map((r) => [r.actor.id, r.origin.ip, r.origin.request_id]), Array(3).fill(['claimed:svc-onboarding', '127.0.0.1', opened.headers['x-request-id']]));

  const reads = await search('record_class=access&outcome=success');
  assert.deepEqual(
    reads.filter((r) => r.action.startsWith('ledger.')).map((r) => [r.action, r.resource.id, r.actor]),
    [
      // Auth is off here: a header is the caller's claim, never an identity, whatever it spells.
      ['ledger.account.read', a, { type: 'anonymous', id: 'claimed:user:teller-7' }],
      ['ledger.transfer.read', ok, { type: 'anonymous', id: 'anonymous' }],
    ],
  );
  const notFound = await search('action=ledger.account.balance.read');
  assert.deepEqual(notFound.map((r) => [r.outcome, r.reason, r.resource.id]), [['failure', 'not-found', missing]]);

  // Reading the trail was audited too, naming the auditor and the filter.
  await settle();
  const searches = await search('action=audit.search&actor=claimed:auditor-1');
  assert.ok(searches.length >= 6);
  assert.deepEqual((searches[0]?.payload?.filter as Record<string, unknown>).action, 'ledger.transfer.create');

  const report = await verifyLog(t.pool, { publicKey: signer.publicKey });
  assert.equal(report.ok, true, JSON.stringify(report.firstDifference));
});

test('with auth off, the event and the command record of one request name the same actor, even for an odd x-client-id', async () => {
  const [a, strict] = [newId(), newId()];
  const opened = await app.inject({ method: 'POST', url: '/v1/accounts/batch', payload: { accounts: [{ id: a, ledger: 'USD', code: 1 }, { id: strict, ledger: 'USD', code: 1, flags: { debits_must_not_exceed_credits: true } }] } });
  assert.equal(opened.statusCode, 200);
  // Printable but over 200 characters: not an actor name, so anonymous in both. (Before, the
  // event named the header and the command record named nobody.)
  const long = `svc-${'x'.repeat(250)}`;
  // A batch with one refused item: its events name the actor, and so does its command record.
  const [ok, refused] = [newId(), newId()];
  const res = await app.inject({
    method: 'POST',
    url: '/v1/transfers/batch',
    headers: { 'x-client-id': long },
    payload: { transfers: [{ id: ok, debit_account_id: a, credit_account_id: strict, amount: '3', ledger: 'USD', code: 1 }, { id: refused, debit_account_id: strict, credit_account_id: a, amount: '9', ledger: 'USD', code: 1 }] },
  });
  assert.equal(res.statusCode, 200, res.body);
  const fine = await app.inject({ method: 'POST', url: '/v1/transfers', headers: { 'x-client-id': 'svc-batch-7' }, payload: { id: newId(), debit_account_id: a, credit_account_id: strict, amount: '1', ledger: 'USD', code: 1 } });
  assert.equal(fine.statusCode, 201);
  await settle();
  const requestId = res.headers['x-request-id'];
  const trail = (await search('record_class=financial')).concat(await search('action=ledger.transfer.create_batch'));
  const ofRequest = trail.filter((r) => r.origin.request_id === requestId);
  assert.deepEqual(
    ofRequest.map((r) => [r.action, r.actor]).sort(),
    [
      ['ledger.TransferPosted', { type: 'anonymous', id: 'anonymous' }],
      ['ledger.TransferRejected', { type: 'anonymous', id: 'anonymous' }],
      ['ledger.transfer.create_batch', { type: 'anonymous', id: 'anonymous' }],
    ],
  );
  assert.ok(trail.some((r) => r.origin.request_id === fine.headers['x-request-id'] && r.actor.id === 'claimed:svc-batch-7'), 'a well-formed header is recorded as the claim it is');
});

test('only a create whose every item was created is left to its events: replays and partial batches keep their command record', async () => {
  const [a, b, strict] = [newId(), newId(), newId()];
  const headers = { 'x-client-id': 'svc-treasury' };
  const opened = await app.inject({ method: 'POST', url: '/v1/accounts/batch', headers, payload: { accounts: [{ id: a, ledger: 'USD', code: 1 }, { id: b, ledger: 'USD', code: 1 }, { id: strict, ledger: 'USD', code: 1, flags: { debits_must_not_exceed_credits: true } }] } });
  assert.equal(opened.statusCode, 200);
  const id = newId();
  const transfer = { id, debit_account_id: a, credit_account_id: b, amount: '10', ledger: 'USD', code: 1 };
  assert.equal((await app.inject({ method: 'POST', url: '/v1/transfers', headers, payload: transfer })).statusCode, 201);
  // The same transfer again: answered `exists`, nothing new happened, no event: a command record.
  const replay = await app.inject({ method: 'POST', url: '/v1/transfers', headers, payload: transfer });
  assert.equal(replay.statusCode, 200);
  // A batch with one item refused: the applied one has its event, the request its command record.
  const partial = await app.inject({
    method: 'POST',
    url: '/v1/transfers/batch',
    headers,
    payload: { transfers: [{ ...transfer, id: newId() }, { id: newId(), debit_account_id: strict, credit_account_id: b, amount: '5', ledger: 'USD', code: 1 }] },
  });
  assert.equal(partial.statusCode, 200);
  // A batch wholly applied: its events only.
  const whole = await app.inject({ method: 'POST', url: '/v1/transfers/batch', headers, payload: { transfers: [{ ...transfer, id: newId() }, { ...transfer, id: newId() }] } });
  assert.equal(whole.statusCode, 200);
  await settle();
  const commands = await search('actor=claimed:svc-treasury&record_class=command');
  assert.deepEqual(
    commands.map((r) => [r.action, r.outcome, r.origin.request_id]),
    [
      ['ledger.transfer.create', 'success', replay.headers['x-request-id']],
      ['ledger.transfer.create_batch', 'success', partial.headers['x-request-id']],
    ],
  );
  const events = await search('actor=claimed:svc-treasury&record_class=financial');
  assert.equal(events.filter((r) => r.action === 'ledger.AccountOpened').length, 3);
  assert.deepEqual(
    events.filter((r) => r.resource.type === 'ledger.transfer').map((r) => [r.action, r.origin.request_id]),
    [
      ['ledger.TransferPosted', events.find((r) => r.resource.id === id)?.origin.request_id],
      ['ledger.TransferPosted', partial.headers['x-request-id']],
      ['ledger.TransferRejected', partial.headers['x-request-id']],
      ['ledger.TransferPosted', whole.headers['x-request-id']],
      ['ledger.TransferPosted', whole.headers['x-request-id']],
    ],
  );
});

test('checkpoints and proofs over HTTP verify with the published public key alone', async () => {
  // Given a trail of more than ten records of this test's own (on an empty trail, seqs 0 to 11),
  const [, , , seq] = await accountsOpened('svc-proofs', 12);
  await settle();
  const key = await app.inject({ method: 'GET', url: '/v1/audit/public-key' });
  const publicKey = parsePublicKey(key.json<{ public_key_pem: string }>().public_key_pem);
  const cp = (await app.inject({ method: 'GET', url: '/v1/audit/checkpoint' })).json<{ treeSize: number }>();
  assert.ok(cp.treeSize > 10);
  const proof = await app.inject({ method: 'GET', url: `/v1/audit/records/${seq}/proof` });
  assert.equal(proof.statusCode, 200);
  assert.match(verifyBundle(proof.json<InclusionBundle>(), publicKey), new RegExp(`record ${seq} is included`));
  const earlier = (await t.pool.query<{ n: string }>('SELECT min(tree_size)::text AS n FROM audit.checkpoints')).rows[0]?.n;
  const consistency = await app.inject({ method: 'GET', url: `/v1/audit/consistency?from=${earlier}&to=${cp.treeSize}` });
  assert.equal(consistency.statusCode, 200);
  assert.match(verifyBundle(consistency.json(), publicKey), /extends/);
  assert.equal((await app.inject({ method: 'GET', url: `/v1/audit/records/${cp.treeSize + 5}/proof` })).statusCode, 404);
  // Proofs disclose records: both reads were recorded, the second as a failure.
  await settle();
  const proofs = await search('action=audit.record.prove');
  assert.deepEqual(proofs.map((r) => [r.resource.id, r.outcome]), [[String(seq), 'success'], [String(cp.treeSize + 5), 'failure']]);
  assert.equal((await app.inject({ method: 'GET', url: '/v1/audit/consistency?from=9999&to=10000' })).statusCode, 404);
  const doc = (await app.inject({ method: 'GET', url: '/openapi.json' })).json<{ paths: Record<string, { get?: { parameters?: Array<{ in: string; name: string; required?: boolean }> } }> }>();
  assert.ok('/v1/audit/records' in doc.paths && '/v1/audit/records/{seq}/proof' in doc.paths);
  // limit and order have defaults: the document must not call them required (a search without them is 200).
  const required = (doc.paths['/v1/audit/records']?.get?.parameters ?? []).filter((p) => p.in === 'query' && p.required === true).map((p) => p.name);
  assert.deepEqual(required, []);
  assert.equal((await app.inject({ method: 'GET', url: '/v1/audit/records' })).statusCode, 200);
});

test('after a rotation of the signing key, proofs over HTTP carry the transition and verify with the old public key alone', async () => {
  // Given records of this test's own, signed under the old key (on an empty trail, seqs 0 to 3),
  const [, , , seq] = await accountsOpened('svc-rotation', 4);
  await settle();
  const rotated = loadSigningKey(generateKeyPairSync('ed25519').privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(), { production: false });
  const store = new AuditStore({ pool: t.pool, sink, service: 'ledger' });
  await store.recordKeyTransition(signKeyTransition(signer, 'ledgerline/ledger-test', rotated.publicKey, new Date()), signer.publicKey, {
    actor: { type: 'user', id: 'ops:olga' },
    origin: { service: 'audit-test' },
  });
  // One round under the new key: its checkpoint is the latest.
  // Given the old public key (AUDIT_PREVIOUS_PUBLIC_KEYS), it checks the old key's latest checkpoint before signing over it.
  const newer = new AuditSequencer({ pool: t.pool, signer: rotated, previousKeys: [signer.publicKey], origin: 'ledgerline/ledger-test', checkpointIntervalMs: 0, tailEvents: true });
  await sink.flush();
  await newer.round({ forceCheckpoint: true });
  const cp = (await app.inject({ method: 'GET', url: '/v1/audit/checkpoint' })).json<{ treeSize: number; keyId: string }>();
  assert.equal(cp.keyId, rotated.keyId);
  const proof = await app.inject({ method: 'GET', url: `/v1/audit/records/${seq}/proof?tree_size=${cp.treeSize}` });
  assert.equal(proof.statusCode, 200);
  const bundle = proof.json<InclusionBundle>();
  assert.equal(bundle.keyTransitions?.length, 1, 'the response schema keeps the transitions');
  assert.match(verifyBundle(bundle, signer.publicKey), new RegExp(`record ${seq} is included`));
  const report = await verifyLog(t.pool, { publicKey: signer.publicKey });
  assert.equal(report.ok, true, JSON.stringify(report.firstDifference));
  assert.deepEqual(report.keyTransitionsFollowed.map((x) => x.toKeyId), [rotated.keyId]);
});

test('a refused request whose id the trail cannot store as sent (a lone surrogate) is still recorded, the character replaced', async () => {
  const res = await app.inject({
    method: 'POST', url: '/v1/accounts', headers: { 'x-client-id': 'svc-odd-id', 'content-type': 'application/json' },
    payload: '{"id":"\\ud800x","ledger":"USD","code":1}',
  });
  assert.equal(res.statusCode, 400, res.body);
  await settle();
  const records = await search('actor=claimed:svc-odd-id');
  assert.deepEqual(records.map((r) => [r.action, r.outcome, r.reason, r.resource.id]), [['ledger.account.create', 'failure', 'validation-error', '\ufffdx']]);
  // The search's own record is written before its results come back (AuditUnrecordedError
  // otherwise), so it may wait in the queue; nothing else may.
  const stalled = await t.pool.query<{ n: number }>("SELECT count(*)::int AS n FROM audit.queue WHERE entry::jsonb ->> 'action' <> 'audit.search'");
  assert.equal(stalled.rows[0]?.n, 0, 'nothing is left in the queue');
});

test('bad audit queries get a 4xx problem and write nothing', async () => {
  await settle();
  const before = (await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM audit.records')).rows[0]?.n;
  for (const url of ['/v1/audit/records?limit=0', '/v1/audit/records?outcome=maybe', '/v1/audit/records?from=yesterday', '/v1/audit/records?after=-1', '/v1/audit/records?color=red', '/v1/audit/records/abc/proof', '/v1/audit/consistency?from=1']) {
    const res = await app.inject({ method: 'GET', url });
    assert.equal(res.statusCode, 400, url);
    assert.equal(res.headers['content-type'], 'application/problem+json; charset=utf-8');
  }
  // Numbers that are not spelled as integers are refused, not truncated or read as hex: record
  // 1.5 is not record 1, and 0x10 is not 16.
  for (const [url, part, path] of [
    ['/v1/audit/records/1.5/proof', 'params', '/seq'],
    ['/v1/audit/records/0x10/proof', 'params', '/seq'],
    ['/v1/audit/records/1e1/proof', 'params', '/seq'],
    ['/v1/audit/records/0/proof?tree_size=1.5', 'querystring', '/tree_size'],
    ['/v1/audit/consistency?from=1.5&to=2', 'querystring', '/from'],
    ['/v1/audit/consistency?from=1&to=true', 'querystring', '/to'],
    ['/v1/audit/records?limit=1.9', 'querystring', '/limit'],
    ['/v1/audit/records?after=%2B5', 'querystring', '/after'],
  ] as const) {
    const res = await app.inject({ method: 'GET', url });
    assert.equal(res.statusCode, 400, `${url}: ${res.body}`);
    assert.equal(res.headers['content-type'], 'application/problem+json; charset=utf-8');
    assert.deepEqual(res.json<{ errors: unknown }>().errors, [{ in: part, path, message: 'must be integer' }], url);
  }
  // Times the date-time format admits and a JavaScript Date cannot hold: a leap second, an
  // RFC 9557 suffix. Refused as the schema refuses, where they were a 500.
  for (const [name, value] of [['from', '2016-12-31T23:59:60Z'], ['to', '2026-01-01T00:00:00Z[UTC]']] as const) {
    const res = await app.inject({ method: 'GET', url: `/v1/audit/records?${name}=${encodeURIComponent(value)}` });
    assert.equal(res.statusCode, 400, `${name}=${value}: ${res.body}`);
    assert.equal(res.headers['content-type'], 'application/problem+json; charset=utf-8');
    assert.deepEqual(res.json<{ errors: Array<{ in: string; path: string }> }>().errors.map((e) => [e.in, e.path]), [['querystring', `/${name}`]]);
  }
  await settle();
  assert.equal((await t.pool.query<{ n: number }>('SELECT count(*)::int AS n FROM audit.records')).rows[0]?.n, before);
});

/** One sample's value from a /metrics text, or undefined. */
function metricValue(text: string, name: string): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  return line === undefined ? undefined : Number(line.slice(name.length + 1));
}

test('with the audit sink saturated, commands are refused with 503 before they run, and /metrics counts them', async () => {
  const full = { saturated: true, buffered: 9_000, record: (_e: AuditEntry) => undefined, flush: () => Promise.resolve() };
  const refusing = await buildLedgerService({ engine, pool: t.pool, logger: false, audit: { sink: full }, resilience: { metrics: { processMetrics: false } } });
  try {
    const id = newId();
    const res = await refusing.inject({ method: 'POST', url: '/v1/accounts', payload: { id, ledger: 'USD', code: 1 } });
    assert.equal(res.statusCode, 503);
    assert.equal(res.headers['retry-after'], '1');
    assert.equal(res.json<{ type: string }>().type, 'https://ledgerline.dev/problems/audit-unavailable');
    assert.equal(await engine.getAccount(id), null, 'the command did not run');
    // Unaudited routes still answer.
    assert.equal((await refusing.inject({ method: 'GET', url: '/v1/ledgers' })).statusCode, 200);
    const metrics = (await refusing.inject({ method: 'GET', url: '/metrics' })).body;
    assert.equal(metricValue(metrics, 'ledgerline_audit_requests_refused_total'), 1);
    assert.equal(metricValue(metrics, 'ledgerline_audit_requests_unrecorded_total'), 0);
    assert.equal(metricValue(metrics, 'ledgerline_audit_sink_buffered'), 9_000);
  } finally {
    await refusing.close();
  }
});

test('a request that ran and whose record the sink could not take is counted on /metrics', async () => {
  const refusingSink = { record: (_e: AuditEntry): void => { throw new Error('audit buffer full'); }, flush: () => Promise.resolve() };
  const app = await buildLedgerService({ engine, pool: t.pool, logger: false, audit: { sink: refusingSink }, resilience: { metrics: { processMetrics: false } } });
  try {
    const id = newId();
    assert.equal((await app.inject({ method: 'POST', url: '/v1/accounts', payload: { id, ledger: 'USD', code: 1 } })).statusCode, 201);
    assert.notEqual(await engine.getAccount(id), null, 'the command ran');
    const metrics = (await app.inject({ method: 'GET', url: '/metrics' })).body;
    assert.equal(metricValue(metrics, 'ledgerline_audit_requests_unrecorded_total'), 1);
    assert.equal(metricValue(metrics, 'ledgerline_audit_requests_refused_total'), 0);
    assert.equal(metricValue(metrics, 'ledgerline_audit_sink_buffered'), undefined, 'a sink that does not say what it holds has no gauge');
  } finally {
    await app.close();
  }
});

test('a search or a proof whose own record cannot be written answers 503 audit-unavailable, its results withheld', async () => {
  // The trail's sink refusing every write, as a database refusing the queue would.
  const refusingSink = { record: (_e: AuditEntry) => undefined, flush: () => Promise.reject(new Error('the queue refused the entry')) };
  const store = new AuditStore({ pool: t.pool, sink: refusingSink, service: 'ledger' });
  const refusing = await buildLedgerService({ engine, pool: t.pool, logger: false, audit: { sink, eventsAudited: true, store: { store, publicKey: signer.publicKey } } });
  try {
    await settle();
    const seq = (await t.pool.query<{ seq: number }>('SELECT min(seq)::int AS seq FROM audit.records')).rows[0]?.seq;
    assert.notEqual(seq, undefined);
    for (const url of ['/v1/audit/records?limit=5', `/v1/audit/records/${String(seq)}/proof`]) {
      const res = await refusing.inject({ method: 'GET', url, headers: { 'x-client-id': 'auditor-1' } });
      assert.equal(res.statusCode, 503, `${url}: ${res.body}`);
      assert.equal(res.headers['retry-after'], '1');
      const body = res.json<{ type: string; records?: unknown; proof?: unknown }>();
      assert.equal(body.type, 'https://ledgerline.dev/problems/audit-unavailable');
      assert.equal(body.records ?? body.proof, undefined, 'nothing of the read is in the answer');
    }
  } finally {
    await refusing.close();
  }
});

/** A query value a reviewer's tool might send: numbers at and past the edges, odd dates, text. */
const auditParam = fc.oneof(
  { weight: 4, arbitrary: fc.constantFrom('0', '1', '-1', '1.5', '1e3', '1e30', '9007199254740991', '9007199254740992', '99999999999999999999', '', 'asc', 'DESC', 'failure', 'financial',
    '2026-01-01T00:00:00Z', '2026-13-45T00:00:00Z', '2026-02-30T00:00:00Z', '0000-01-01T00:00:00Z', '275760-09-13T00:00:00Z', '2026-01-01', 'now', '%00', '%ff') },
  { weight: 1, arbitrary: fc.string({ maxLength: 12 }).map(encodeURIComponent) },
);

test('property: no query makes the audit routes answer 5xx; every error is problem+json', async () => {
  const seed = propertySeed('audit routes query fuzz');
  const statuses = new Map<number, number>();
  await fc.assert(
    fc.asyncProperty(
      fc.constantFrom('/v1/audit/records', '/v1/audit/records/{seq}/proof', '/v1/audit/consistency', '/v1/audit/checkpoint'),
      auditParam,
      fc.dictionary(fc.constantFrom('actor', 'outcome', 'record_class', 'from', 'to', 'limit', 'order', 'after', 'tree_size', 'x'), auditParam, { maxKeys: 4 }),
      async (route, seq, query) => {
        const qs = Object.entries(query).map(([k, v]) => `${k}=${v}`).join('&');
        const url = `${route.replace('{seq}', seq)}${qs === '' ? '' : `?${qs}`}`;
        const res = await app.inject({ method: 'GET', url, headers: { 'x-client-id': 'auditor-fuzz' } });
        assertFuzzAnswer(res, `GET ${url}`, statuses);
      },
    ),
    { seed, numRuns: 1000 },
  );
  assert.ok((statuses.get(200) ?? 0) > 0 && (statuses.get(400) ?? 0) > 0, JSON.stringify([...statuses]));
  // Found by this test: a cursor past 2^53 reached PostgreSQL as "1e+30" and answered 500.
  for (const after of ['1e30', '99999999999999999999']) {
    const res = await app.inject({ method: 'GET', url: `/v1/audit/records?after=${after}`, headers: { 'x-client-id': 'auditor-fuzz' } });
    assert.equal(res.statusCode, 400, res.body);
  }
});
