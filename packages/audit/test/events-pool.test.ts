/**
 * The sequencer reads the event store through a pool of its own (SequencerOptions.eventsPool:
 * the event store's owner's login, so that nothing the owner attaches to the table runs with
 * the sequencer's rights). When that pool cannot read, the round still integrates the queue,
 * and says why the events waited; once it reads again, the events are integrated where the
 * cursor stood, each once. What that pool returns is held to the tile query's promises: a tile
 * that breaks one (a lying store, or a proxy in front of it) is refused, and nothing is written.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { AuditSequencer, verifyLog } from '../src/index.ts';
import { auditTestEnv, entry, type AuditTestEnv } from './support.ts';

let t: AuditTestEnv;
before(async () => {
  t = await auditTestEnv({ withEvents: false });
});
after(async () => {
  await t.close();
});

test('an event store that cannot be read leaves the round to the queue, reported; then its events come, each once', async () => {
  for (let i = 0; i < 3; i += 1) {
    await t.events.append(t.pool, { type: 'ticket', id: `t-${i}` }, [{ type: 'TicketOpened', data: { i } }], { expectedVersion: 'no_stream' });
  }
  // Nothing listens on port 1: every connection of this pool is refused.
  const dead = new pg.Pool({ connectionString: 'postgres://postgres@127.0.0.1:1/none', connectionTimeoutMillis: 1000, max: 1 });
  dead.on('error', () => {});
  const errors: string[] = [];
  const cut = new AuditSequencer({ pool: t.pool, eventsPool: dead, signer: t.signer, origin: 'ledgerline/test', tailEvents: true, checkpointIntervalMs: 0, onError: (e) => errors.push(String(e)) });
  try {
    t.sink.record(entry(1));
    t.sink.record(entry(2));
    await t.sink.flush();
    const round = await cut.round({ forceCheckpoint: true });
    assert.equal(round.records, 2, 'the queued entries, without the events');
    assert.equal(errors.length, 1);
    assert.match(errors[0] ?? '', /the event store could not be read, so this round integrates the queue only/);
    const leaves = async (): Promise<number> => Number((await t.pool.query<{ n: string }>('SELECT coalesce(sum(leaf_count), 0)::text AS n FROM audit.event_leaves')).rows[0]?.n);
    assert.equal(await leaves(), 0);
  } finally {
    await dead.end();
  }

  // A pool that reads: the three events, once, after the two records.
  const reader = new pg.Pool({ connectionString: t.db.url, max: 1 });
  const whole = new AuditSequencer({ pool: t.pool, eventsPool: reader, signer: t.signer, origin: 'ledgerline/test', tailEvents: true, checkpointIntervalMs: 0 });
  try {
    assert.equal((await whole.round({ forceCheckpoint: true })).records, 3);
    assert.equal((await whole.round({ forceCheckpoint: true })).records, 0);
  } finally {
    await reader.end();
  }
  const report = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.equal(report.ok, true, JSON.stringify(report.issues));
  assert.equal(report.records, 5);
});

/**
 * A pool on the real database whose answers to the tile query are altered by `forge` before
 * the sequencer sees them: the event store lying about what it holds.
 */
function lyingPool(url: string, forge: (row: Record<string, unknown>) => void): pg.Pool {
  const pool = new pg.Pool({ connectionString: url, max: 1 });
  const lying = new WeakSet<pg.PoolClient>();
  const connect = pool.connect.bind(pool) as () => Promise<pg.PoolClient>;
  const connectLying = async (): Promise<pg.PoolClient> => {
    const client = await connect();
    if (!lying.has(client)) {
      lying.add(client);
      const query = client.query.bind(client) as (config: pg.QueryConfig | string) => Promise<pg.QueryResult>;
      const forged = async (config: pg.QueryConfig | string): Promise<pg.QueryResult> => {
        const result = await query(config);
        const row = typeof config === 'string' || config.name !== 'ledgerline.audit.event-tile' ? undefined : (result.rows[0] as Record<string, unknown> | undefined);
        if (row !== undefined) forge(row);
        return result;
      };
      client.query = forged as typeof client.query;
    }
    return client;
  };
  pool.connect = connectLying as typeof pool.connect;
  return pool;
}

test('a tile that breaks the tile query\'s promises is refused, and nothing is written', async () => {
  const append = async (from: number, to: number): Promise<void> => {
    for (let i = from; i < to; i += 1) {
      await t.events.append(t.pool, { type: 'order', id: `o-${i}` }, [{ type: 'OrderPlaced', data: { i } }], { expectedVersion: 'no_stream' });
    }
  };
  const state = async (): Promise<string> => {
    const r = await t.pool.query<{ s: string }>(
      `SELECT (SELECT event_transaction_id::text || '/' || event_position FROM audit.sequencer_state)
              || ' ' || (SELECT count(*) FROM audit.event_leaves) || ' ' || (SELECT count(*) FROM audit.checkpoints) AS s`,
    );
    return r.rows[0]?.s ?? '';
  };
  const honest = new pg.Pool({ connectionString: t.db.url, max: 1 });
  const sequencer = (eventsPool: pg.Pool): AuditSequencer =>
    new AuditSequencer({ pool: t.pool, eventsPool, signer: t.signer, origin: 'ledgerline/test', tailEvents: true, checkpointIntervalMs: 0 });
  try {
    // Everything so far integrated, so the cursor stands after an event.
    for (let r = await sequencer(honest).round(); r.records > 0; r = await sequencer(honest).round());
    await append(0, 4);
    const cursor = await t.pool.query<{ tx: string; pos: string }>('SELECT event_transaction_id::text AS tx, event_position::text AS pos FROM audit.sequencer_state');
    const at = cursor.rows[0] as { tx: string; pos: string };
    const lies: [string, (row: Record<string, unknown>) => void, RegExp][] = [
      ['an event at the cursor', (row) => Object.assign(row, { first_tx: at.tx, positions: String(row.positions).replace(/^\{\d+/, `{${at.pos}`) }), /its first event is not after the cursor/],
      ['a last event not yet below the read horizon', (row) => Object.assign(row, { last_tx: '9223372036854775807' }), /its last event is not below the read horizon/],
      ['a last event before the first', (row) => Object.assign(row, { last_tx: at.tx, first_tx: String(BigInt(at.tx) + 1n) }), /its last event does not come after its first/],
      ['more failures than events', (row) => Object.assign(row, { failures: Number(row.n) + 1 }), /5 failures among 4 events/],
    ];
    const before = await state();
    for (const [lie, forge, refusal] of lies) {
      const pool = lyingPool(t.db.url, forge);
      try {
        await assert.rejects(sequencer(pool).round({ forceCheckpoint: true }), (e: Error) => {
          assert.match(e.message, /the event store returned a tile the sequencer will not integrate/, lie);
          assert.match(e.message, refusal, lie);
          return true;
        });
      } finally {
        await pool.end();
      }
      assert.equal(await state(), before, `${lie}: nothing written`);
    }
    // The honest store's four events, each once.
    assert.equal((await sequencer(honest).round({ forceCheckpoint: true })).records, 4);
    assert.equal((await sequencer(honest).round()).records, 0);
  } finally {
    await honest.end();
  }
  const report = await verifyLog(t.pool, { publicKey: t.signer.publicKey });
  assert.equal(report.ok, true, JSON.stringify(report.issues));
});
