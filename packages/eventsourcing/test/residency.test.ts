/**
 * Data residency and retention: the store refuses writes and reads that break the policy, an
 * export to a region the policy forbids writes nothing, and retention honours legal holds.
 */
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type pg from 'pg';
import {
  assertResidency,
  CHECKPOINT_START,
  checkpointOf,
  EventStore,
  partitionByResidency,
  ResidencyViolationError,
  StreamRegionMismatchError,
  type Checkpoint,
  type ResidencyPolicy,
  type StoredEvent,
} from '@ledgerline/events';
import { AggregateStore, applyRetention, exportEvents, NO_LEGAL_HOLDS, paymentAggregate, type LegalHolds } from '../src/index.ts';
import { runCli } from '../src/cli.ts';
import { count, esTestEnv, inTx, passReaders, waitFor, type EsTestEnv } from './support.ts';

const policy: ResidencyPolicy = { allowed: { eu: ['eu-west-1', 'eu-central-1'], us: ['us-east-1'], global: ['eu-west-1', 'us-east-1'] } };

let env: EsTestEnv;
let dir: string;
before(async () => {
  env = await esTestEnv({ residency: { policy, location: 'eu-west-1' } });
  dir = mkdtempSync(join(tmpdir(), 'll-export-'));
});
after(async () => {
  rmSync(dir, { recursive: true, force: true });
  await env.close();
});

const event = { type: 'note.Written', data: { text: 'hello' } };

/**
 * Three streams of one note each, written in this order for the calling test: `eu-<tag>`
 * (eu-resident), `g-<tag>` (global) and `free-<tag>` (untagged); with the range that holds
 * exactly them (`after` lies just before the first), so that an export of that range sees no
 * other test's streams in the same store.
 */
async function threeStreams(tag: string): Promise<{ events: StoredEvent[]; after: Checkpoint; until: Checkpoint }> {
  const [eu, g, free] = [`eu-${tag}`, `g-${tag}`, `free-${tag}`];
  await inTx(env.pool, (c) => env.store.append(c, { type: 'note', id: eu }, [event], { expectedVersion: 'no_stream', region: 'eu' }));
  await inTx(env.pool, (c) => env.store.append(c, { type: 'note', id: g }, [event], { expectedVersion: 'no_stream', region: 'global' }));
  await inTx(env.pool, (c) => env.store.append(c, { type: 'note', id: free }, [event], { expectedVersion: 'no_stream' }));
  const events: StoredEvent[] = [];
  for (const id of [eu, g, free]) events.push(...(await env.store.readStream(env.pool, 'note', id)));
  const first = events[0]!;
  // No event lies between (t, p - 1) and (t, p) in the global order.
  const after = { transactionId: first.transactionId, position: first.position - 1n };
  return { events, after, until: checkpointOf(events.at(-1)!) };
}

function violation(operation: string, stream: string, location: string): (e: unknown) => boolean {
  return (e: unknown) => {
    assert.ok(e instanceof ResidencyViolationError, String(e));
    assert.equal(e.operation, operation);
    assert.equal(`${e.streamType}/${e.streamId}`, stream);
    assert.equal(e.location, location);
    return true;
  };
}

/**
 * `pool` with `before` run ahead of every query it is given (with the query's text): the seam
 * for another process's work between two statements of a read, with no timing to win.
 */
function beforeEachQuery(pool: pg.Pool, before: (text: string) => Promise<void> | void): pg.Pool {
  return new Proxy(pool, {
    get(target, prop, receiver) {
      if (prop !== 'query') return Reflect.get(target, prop, receiver) as unknown;
      return async (text: unknown, values?: unknown) => {
        await before(typeof text === 'string' ? text : '');
        return (target.query as (t: unknown, v?: unknown) => Promise<unknown>).call(target, text, values);
      };
    },
  });
}

/** Retention deletes every stream of `streamType` (its events and its tag, one transaction a stream), as another process would. */
async function retentionDeletes(streamType: string): Promise<number> {
  const report = await applyRetention(env.pool, { rules: [{ streamType, deleteAfterDays: 1 }], holds: NO_LEGAL_HOLDS, now: new Date(Date.now() + 30 * 86_400_000) });
  return report.eventsDeleted;
}

describe('residency', () => {
  test('writes: a stream tagged with a region not allowed here is refused, with a clear message', async () => {
    await inTx(env.pool, (c) => env.store.append(c, { type: 'note', id: 'eu-1' }, [event], { expectedVersion: 'no_stream', region: 'eu' }));
    await assert.rejects(
      inTx(env.pool, (c) => env.store.append(c, { type: 'note', id: 'us-1' }, [event], { expectedVersion: 'no_stream', region: 'us' })),
      (e: unknown) => {
        violation('write', 'note/us-1', 'eu-west-1')(e);
        assert.equal(
          (e as Error).message,
          'residency: write of stream note/us-1 refused: its data is us-resident and may not go to eu-west-1; allowed: us-east-1',
        );
        return true;
      },
    );
    await assert.rejects(
      inTx(env.pool, (c) => env.store.append(c, { type: 'note', id: 'mars-1' }, [event], { expectedVersion: 'no_stream', region: 'mars' })),
      /allowed: nowhere \(the policy does not name this region\)/,
    );
    await assert.rejects(
      inTx(env.pool, (c) => env.store.append(c, { type: 'note', id: 'eu-1' }, [event], { expectedVersion: 1, region: 'global' })),
      StreamRegionMismatchError,
    );
    assert.equal(await count(env.pool, `SELECT count(*) FROM events.events WHERE stream_id IN ('us-1', 'mars-1')`), 0);
    assert.equal(await count(env.pool, `SELECT count(*) FROM events.stream_regions`), 1);
  });

  test('a stream with untagged events cannot be tagged later: its earlier events were held to no region', async () => {
    await inTx(env.pool, (c) => env.store.append(c, { type: 'note', id: 'late-1' }, [event], { expectedVersion: 'no_stream' }));
    await assert.rejects(
      inTx(env.pool, (c) => env.store.append(c, { type: 'note', id: 'late-1' }, [event], { expectedVersion: 1, region: 'eu' })),
      (e: unknown) => {
        assert.ok(e instanceof StreamRegionMismatchError, String(e));
        assert.match(e.message, /stream note\/late-1 already has events without a region; an append may not tag it as eu/);
        return true;
      },
    );
    assert.equal(await count(env.pool, `SELECT count(*) FROM events.stream_regions WHERE stream_id = 'late-1'`), 0);
    assert.equal(await count(env.pool, `SELECT count(*) FROM events.events WHERE stream_id = 'late-1'`), 1);
    // Without a region the stream goes on as before.
    await inTx(env.pool, (c) => env.store.append(c, { type: 'note', id: 'late-1' }, [event], { expectedVersion: 1 }));
    await env.pool.query(`DELETE FROM events.events WHERE stream_id = 'late-1'`);
  });

  test('a stream tagged elsewhere (data already here by mistake) can be neither appended to nor read', async () => {
    // An EU stream beside it, which a reader in the US may not read either.
    await inTx(env.pool, (c) => env.store.append(c, { type: 'note', id: 'eu-2' }, [event], { expectedVersion: 'no_stream', region: 'eu' }));
    await env.pool.query(`INSERT INTO events.stream_regions (stream_type, stream_id, region) VALUES ('note', 'us-2', 'us')`);
    await assert.rejects(
      inTx(env.pool, (c) => env.store.appendMany(c, [{ streamType: 'note', streamId: 'us-2', version: 1, event }])),
      violation('write', 'note/us-2', 'eu-west-1'),
    );
    const open = await EventStore.open(env.pool); // no policy: nothing is checked
    await inTx(env.pool, (c) => open.appendMany(c, [{ streamType: 'note', streamId: 'us-2', version: 1, event }]));
    await assert.rejects(env.store.readStream(env.pool, 'note', 'us-2'), violation('read', 'note/us-2', 'eu-west-1'));
    await waitFor('the horizon', async () =>
      (await open.readAll(env.pool, { after: CHECKPOINT_START, limit: 10 })).filter((e) => e.streamId === 'eu-2' || e.streamId === 'us-2').length === 2);
    await assert.rejects(env.store.readAll(env.pool, { after: CHECKPOINT_START, limit: 10 }), violation('read', 'note/us-2', 'eu-west-1'));
    // A reader in the US may read the US stream, and not the EU one.
    assert.equal((await env.store.readStream(env.pool, 'note', 'us-2', 1, { location: 'us-east-1' })).length, 1);
    await assert.rejects(env.store.readStream(env.pool, 'note', 'eu-2', 1, { location: 'us-east-1' }), violation('read', 'note/eu-2', 'us-east-1'));
    // Aggregates read through the same checks.
    const payments = new AggregateStore(env.store, paymentAggregate());
    await assert.rejects(
      inTx(env.pool, (c) => payments.handle(c, 'p-us', { type: 'Initiate', amountMinor: 1n, currency: 'USD', payer: 'a', payee: 'b', channel: 'card' }, { region: 'us' })),
      violation('write', 'payment/p-us', 'eu-west-1'),
    );
    await env.pool.query(`DELETE FROM events.events WHERE stream_id = 'us-2'`);
    await env.pool.query(`DELETE FROM events.stream_regions WHERE stream_id = 'us-2'`);
  });

  test('replication: partitionByResidency withholds what may not go to the target', async () => {
    const { events } = await threeStreams('repl');
    const split = await partitionByResidency(env.pool, policy, events, 'us-east-1');
    assert.deepEqual(split.allowed.map((e) => e.streamId), ['g-repl', 'free-repl']);
    assert.deepEqual(split.withheld.map((w) => [w.event.streamId, w.error.operation, w.error.dataRegion]), [['eu-repl', 'replicate', 'eu']]);
    assert.doesNotThrow(() => assertResidency(policy, { streamType: 'x', streamId: 'y', region: null }, 'export', 'anywhere'));
  });

  test('export: all or nothing; a target the policy forbids for any stream gets no file', async () => {
    // eu-export is eu (eu-west-1, eu-central-1), g-export global (eu-west-1, us-east-1),
    // free-export untagged; the exports below are of their range alone.
    const { after, until } = await threeStreams('export');
    await waitFor('the horizon', async () => (await env.store.readAll(env.pool, { after, limit: 100 })).length === 3);
    const refused = join(dir, 'central.ndjson');
    await assert.rejects(
      exportEvents(env.pool, env.store, { policy, targetLocation: 'eu-central-1', out: refused, pageSize: 2, after, until }),
      violation('export', 'note/g-export', 'eu-central-1'),
    );
    assert.deepEqual([existsSync(refused), existsSync(`${refused}.partial`)], [false, false]);
    const west = join(dir, 'west.ndjson');
    const ok = await exportEvents(env.pool, env.store, { policy, targetLocation: 'eu-west-1', out: west, pageSize: 2, after, until });
    const lines = readFileSync(west, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { streamId: string; position: string });
    assert.deepEqual({ events: ok.events, streams: lines.map((l) => l.streamId) }, { events: 3, streams: ['eu-export', 'g-export', 'free-export'] });
    // A range that stops before g-export may go to eu-central-1.
    const first = await env.store.checkpointAt(env.pool, BigInt(lines[0]!.position));
    const ranged = await exportEvents(env.pool, env.store, { policy, targetLocation: 'eu-central-1', out: refused, after, until: first! });
    assert.equal(ranged.events, 1);
  });

  test('export: a stream deleted by retention between a page\'s read and its region check is left out, never judged untagged', async () => {
    await inTx(env.pool, (c) => env.store.append(c, { type: 'race', id: 'eu-race' }, [{ type: 'note.Written', data: { secret: 'eu only' } }], { expectedVersion: 'no_stream', region: 'eu' }));
    const position = (await env.pool.query<{ p: string }>("SELECT position::text AS p FROM events.events WHERE stream_id = 'eu-race'")).rows[0]!.p;
    const at = (await env.store.checkpointAt(env.pool, BigInt(position)))!;
    const range = { after: { transactionId: at.transactionId, position: at.position - 1n }, until: at };
    await passReaders(env.pool);
    // Retention deletes the stream (its events and its tag, one transaction) just before the
    // export asks for the page's region tags, as another process would.
    let deleted = 0;
    const racing = beforeEachQuery(env.pool, async (text) => {
      if (deleted === 0 && text.includes('events.stream_regions')) deleted = await retentionDeletes('race');
    });
    const out = join(dir, 'race.ndjson');
    // A store without a policy of its own: its readAll checks nothing, so the region check that
    // meets the deletion is the export's (readAll's own is the test below).
    const open = await EventStore.open(env.pool);
    const report = await exportEvents(racing, open, { policy, targetLocation: 'us-east-1', out, ...range });
    assert.equal(deleted, 1, 'retention deleted the stream mid-export');
    // Until 2026-12-07 the eu-only event went to us-east-1: the tag was read after it was gone.
    assert.equal(report.events, 0);
    assert.equal(readFileSync(out, 'utf8'), '');
  });

  test('readAll: a stream deleted by retention between a page\'s read and its region check is left out, never judged untagged, and the page is filled on', async () => {
    // An eu-only event, then two events of an untagged stream, each in a transaction of its own.
    await inTx(env.pool, (c) => env.store.append(c, { type: 'raceread', id: 'eu-read' }, [{ type: 'note.Written', data: { secret: 'eu only' } }], { expectedVersion: 'no_stream', region: 'eu' }));
    await inTx(env.pool, (c) => env.store.append(c, { type: 'racefree', id: 'free-read' }, [event], { expectedVersion: 'no_stream' }));
    await inTx(env.pool, (c) => env.store.append(c, { type: 'racefree', id: 'free-read' }, [event], { expectedVersion: 1 }));
    const [eu] = await env.store.readStream(env.pool, 'raceread', 'eu-read');
    const after = { transactionId: eu!.transactionId, position: eu!.position - 1n };
    await waitFor('the horizon', async () => (await env.store.readAll(env.pool, { after, limit: 100 })).length === 3);
    // Before retention: a reader in us-east-1 is refused the page.
    await assert.rejects(env.store.readAll(env.pool, { after, limit: 2, location: 'us-east-1' }), violation('read', 'raceread/eu-read', 'us-east-1'));
    await passReaders(env.pool);
    // Retention deletes the stream (its events and its tag, one transaction) just after the
    // page was read and before its region is checked, as another process would.
    let deleted = 0;
    const queries: string[] = [];
    const racing = beforeEachQuery(env.pool, async (text) => {
      queries.push(text);
      if (deleted === 0 && text.includes('events.stream_regions')) deleted = await retentionDeletes('raceread');
    });
    const page = await env.store.readAll(racing, { after, limit: 2, location: 'us-east-1' });
    assert.equal(deleted, 1, 'retention deleted the stream mid-read');
    // Until 2026-12-08 the eu-only event went to the us-east-1 reader: the tag was read after
    // it was gone. It is left out, and the page read on, so that it is still full: a caller
    // that takes a short page for the end (runBatch, replay, swapGeneration) does not stop here.
    assert.deepEqual(page.map((e) => `${e.streamType}/${e.streamId} v${e.version}`), ['racefree/free-read v1', 'racefree/free-read v2']);
    assert.equal(queries.filter((q) => q.includes('events.stream_regions')).length, 2, 'the page as read, then the one event read on');
  });

  test('readStream: a stream first appended with its tag between the check and the read is refused, not read unchecked', async () => {
    let appended = false;
    const racing = beforeEachQuery(env.pool, async (text) => {
      if (!appended && text.includes('version >= $3')) {
        appended = true;
        await inTx(env.pool, (c) => env.store.append(c, { type: 'late', id: 'l-1' }, [event], { expectedVersion: 'no_stream', region: 'eu' }));
      }
    });
    // Until 2026-12-08 the check ran only before the read: it found no stream, and the eu-only
    // event went to the us-east-1 reader.
    await assert.rejects(env.store.readStream(racing, 'late', 'l-1', 1, { location: 'us-east-1' }), violation('read', 'late/l-1', 'us-east-1'));
    assert.equal(appended, true, 'the stream was appended between the check and the read');
    assert.equal((await env.store.readStream(env.pool, 'late', 'l-1')).length, 1, 'read here, where eu data may be');
  });

  test('an event retention deleted is left out, and only it: a stream gone in part keeps its live events', async () => {
    await inTx(env.pool, (c) => env.store.append(c, { type: 'part', id: 'p-1' }, [event, event], { expectedVersion: 'no_stream' }));
    const [e1, e2] = await env.store.readStream(env.pool, 'part', 'p-1');
    assert.ok(e1 !== undefined && e2 !== undefined);
    // Retention's delete saw only the first (an append it could not see committed the second),
    // and commits between the read and the check.
    let deleted = false;
    const racing = beforeEachQuery(env.pool, async (text) => {
      if (!deleted && text.includes('events.deleted_events')) {
        deleted = true;
        await env.pool.query(
          `WITH gone AS (DELETE FROM events.events WHERE position = $1 RETURNING position, event_id, transaction_id)
           INSERT INTO events.deleted_events (position, event_id, transaction_id) SELECT position, event_id, transaction_id FROM gone`,
          [e1.position.toString()],
        );
      }
    });
    const read = await env.store.readStream(racing, 'part', 'p-1');
    assert.equal(deleted, true);
    // Until the fix, the stream was judged by its first event and both were dropped.
    assert.deepEqual(read.map((e) => e.version), [2]);
  });

  test('readAll without a residency policy reads with no residency query', async () => {
    const open = await EventStore.open(env.pool);
    const queries: string[] = [];
    const counting = beforeEachQuery(env.pool, (text) => {
      queries.push(text);
    });
    await open.readAll(counting, { after: CHECKPOINT_START, limit: 1000 });
    assert.equal(queries.length, 2, 'the read horizon and the read');
    assert.ok(queries.every((q) => !q.includes('stream_regions')));
  });

  test('export through the CLI: refused with exit 1 and the reason; usage errors exit 2', async () => {
    const out: string[] = [];
    const err: string[] = [];
    const io = (extra: Record<string, string>) => ({
      env: { DATABASE_URL: env.db.url, EVENTS_REGION: 'eu-west-1', EVENTS_RESIDENCY_POLICY: JSON.stringify(policy.allowed), ...extra },
      stdout: (t: string) => out.push(t),
      stderr: (t: string) => err.push(t),
    });
    // This test's own streams, and the positions that bound them.
    const [eu, g, free] = (await threeStreams('cli')).events.map((e) => String(e.position));
    const range = ['--from-position', eu!, '--to-position', free!];
    assert.equal(await runCli(['export', '--to', 'us-east-1', '--out', join(dir, 'us.ndjson'), ...range], io({})), 1);
    assert.match(err.join('\n'), /residency: export of stream note\/eu-cli refused/);
    assert.equal(existsSync(join(dir, 'us.ndjson')), false);
    assert.equal(await runCli(['export', '--to', 'eu-west-1', '--out', join(dir, 'cli.ndjson'), '--from-position', g!, '--to-position', free!], io({})), 0);
    assert.equal((JSON.parse(out.at(-1)!) as { events: number }).events, 2);
    assert.equal(await runCli(['export', '--to', 'eu-west-1', '--out', join(dir, 'x')], io({ EVENTS_RESIDENCY_POLICY: '{"eu":"eu-west-1"}' })), 2);
    assert.match(err.at(-1)!, /must map each data region to an array/);
    assert.equal(await runCli(['export', '--to', 'eu-west-1', '--out', join(dir, 'x')], io({ EVENTS_RESIDENCY_POLICY: 'nope' })), 2);
    assert.equal(await runCli(['export', '--to', 'eu-west-1', '--out', join(dir, 'x')], io({ EVENTS_REGION: '' })), 2);
    assert.equal(await runCli(['export', '--out', join(dir, 'x')], io({})), 2);
    assert.equal(await runCli(['export', '--to', 'eu-west-1', '--out', join(dir, 'x'), '--from-position', '999999'], io({})), 2);
    assert.match(err.at(-1)!, /no event at that position/);
  });
});

describe('retention', () => {
  test('archives and deletes streams by age, except those under a legal hold', async () => {
    for (const id of ['old-a', 'old-b', 'held-c']) {
      await inTx(env.pool, (c) => env.store.append(c, { type: 'ticket', id }, [event, event], { expectedVersion: 'no_stream' }));
    }
    await env.pool.query(`INSERT INTO events.snapshots (stream_type, stream_id, version, state_version, state) VALUES ('ticket', 'old-a', 2, 1, '{}')`);
    // As the relay records events it withheld (residency): the record names the stream.
    await env.pool.query(`INSERT INTO events.relay_withheld (event_id, partition, position, transaction_id, stream_type, stream_id, region, location, reason)
      SELECT event_id, partition, position, transaction_id, stream_type, stream_id, 'eu', 'us-east-1', 'refused' FROM events.events WHERE stream_type = 'ticket'`);
    const held = new Set(['held-c']);
    const holds: LegalHolds = { isHeld: (_db, s) => Promise.resolve(held.has(s.streamId)) };
    const now = new Date();
    const day = 86_400_000;
    // The relay has published every event: retention waits for it (retention-guards.test.ts).
    await passReaders(env.pool);
    // Nothing is due yet.
    const early = await applyRetention(env.pool, { rules: [{ streamType: 'ticket', archiveAfterDays: 30, deleteAfterDays: 365 }], holds, now });
    assert.deepEqual([early.archived.length, early.deleted.length, early.held.length], [0, 0, 0]);
    // 40 days on: archive every ticket stream except the held one.
    const archived = await applyRetention(env.pool, { rules: [{ streamType: 'ticket', archiveAfterDays: 30, deleteAfterDays: 365 }], holds, now: new Date(now.getTime() + 40 * day) });
    assert.deepEqual(archived.archived.map((s) => s.streamId), ['old-a', 'old-b']);
    assert.deepEqual(archived.held.map((s) => s.streamId), ['held-c']);
    assert.equal(archived.eventsArchived, 4);
    assert.equal(await count(env.pool, `SELECT count(*) FROM events.events WHERE stream_type = 'ticket'`), 2);
    assert.equal(await count(env.pool, `SELECT count(*) FROM events.archived_events WHERE stream_type = 'ticket'`), 4);
    assert.equal(await count(env.pool, `SELECT count(*) FROM events.snapshots WHERE stream_type = 'ticket'`), 0);
    // 400 days on: delete the archived ones; the hold still keeps held-c. Lifting it lets it go.
    const deleted = await applyRetention(env.pool, { rules: [{ streamType: 'ticket', deleteAfterDays: 365 }], holds, now: new Date(now.getTime() + 400 * day), streamsMax: 10 });
    assert.deepEqual({ deleted: deleted.deleted.map((s) => s.streamId), held: deleted.held.map((s) => s.streamId), events: deleted.eventsDeleted }, { deleted: ['old-a', 'old-b'], held: ['held-c'], events: 4 });
    const withheld = await env.pool.query<{ stream_id: string }>(`SELECT DISTINCT stream_id FROM events.relay_withheld WHERE stream_type = 'ticket'`);
    assert.deepEqual(withheld.rows.map((r) => r.stream_id), ['held-c'], 'the relay\'s records go with the deleted streams, not the held one');
    held.clear();
    const lifted = await applyRetention(env.pool, { rules: [{ streamType: 'ticket', deleteAfterDays: 365 }], holds: NO_LEGAL_HOLDS, now: new Date(now.getTime() + 400 * day) });
    assert.deepEqual(lifted.deleted.map((s) => s.streamId), ['held-c']);
    assert.equal(await count(env.pool, `SELECT (SELECT count(*) FROM events.events WHERE stream_type = 'ticket') + (SELECT count(*) FROM events.archived_events)`), 0);
    assert.equal(await count(env.pool, `SELECT count(*) FROM events.relay_withheld WHERE stream_type = 'ticket'`), 0);
    await assert.rejects(applyRetention(env.pool, { rules: [{ streamType: 'ticket', deleteAfterDays: -1 }], holds, now }), /deleteAfterDays must be a number of days >= 1/);
  });
});
