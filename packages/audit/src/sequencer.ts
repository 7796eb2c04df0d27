/**
 * The sequencer: the single writer of the tree. Each round, in one transaction, it takes
 * queued entries and the next events of the event store, gives them consecutive sequence
 * numbers, encrypts personal data under the subjects' keys, hashes the leaves, stores the
 * records, payloads, one tile of event leaves and the completed subtrees, moves its event
 * cursor, deletes the queue rows it integrated and (when due) signs a checkpoint. Everything
 * commits together or not at all, so each queued entry and each event is recorded exactly once.
 *
 * One sequencer per log at a time: each round's transaction locks the cursor's row
 * (audit.sequencer_state), which only a role that may update it can. A second instance's round
 * finds the row locked and does nothing, so instances may all run one.
 */
import { readHorizon, sqlArrayLiteral, storablePrefix, type Checkpoint as EventCheckpoint } from '@ledgerline/events';
import { v5 as uuidv5 } from 'uuid';
import { compareOrder, EVENT_RECORD_NAMESPACE, eventCursor, readEventTile, type EventTile } from './event-leaves.ts';
import { checkpointSignatureValid, clearSubjectKey, KeyEncryptionKeyError, keyIdOf, newSubjectKey, seal, signCheckpoint, storedSubjectKey, trustThroughTransitions, type Checkpoint, type CheckpointSigner, type KeyEncryptionKey } from './keys.ts';
import { leafHash, type Frontier, type Subtree } from './merkle.ts';
import { AUDIT_SEQUENCER_ROLE, PINNED_SEARCH_PATH } from './migrate.ts';
import { onlyTheDatabaseQueues, QUEUED_BY_DATABASE } from './provenance.ts';
import { canonicalJson, canonicalResourceId, checkFields, checkJsonText, InvalidAuditEntryError, leafData, sha256, type AuditRecordFields } from './record.ts';
import { CHECKPOINT_COLUMNS, checkpointOf, type CheckpointRow } from './rows.ts';
import type { AuditEntry } from './sink.ts';
import { loadFrontier, STORED_LEVEL_MIN, storedLeafHashRange, storedTreeSize, type Queryable } from './tree.ts';
import { storedKeyTransitions } from './verify.ts';
import type { QueuedEntry } from './writer.ts';
import type { KeyObject } from 'node:crypto';
import type pg from 'pg';

/**
 * A round's size and the pause between rounds. A round has a fixed cost (about a dozen
 * statements, a commit and a checkpoint: some 3 ms), and the ledger pays for every round in
 * throughput: at its bench:audit rate (about 12,000 events a second) the sequencer's CPU per
 * event was 9.8 µs with a 250 ms pause and rounds of at most 5000, 8.6 µs with 1 s and 20,000,
 * and smaller bursts did not shorten the ledger's p99 (docs/audit.md, "What it costs"). An
 * event is then in a signed checkpoint within about two seconds.
 */
export const BATCH_RECORDS_MAX_DEFAULT = 20_000;
export const INTERVAL_MS_DEFAULT = 1000;
export const CHECKPOINT_INTERVAL_MS_DEFAULT = 1000;
/** Subject keys wrapped again, at most, per round. */
const REWRAP_KEYS_PER_ROUND = 1000;
/** Records prepared between yields to the event loop. */
const YIELD_EVERY_RECORDS = 256;
/** Leaf hashes read per query when the frontier is rebuilt past the latest checkpoint. */
const FRONTIER_LEAVES_PER_READ = 20_000;

/**
 * The stored tree does not match what the latest checkpoint signed (a stored node or leaf
 * hash was changed, or leaves were removed), or the latest checkpoint itself carries no
 * signature the sequencer can trust (its root or time rewritten, or signed by a key it does
 * not know). The sequencer then signs nothing and integrates nothing: extending the tree would
 * sign a root over the damage, and verification would blame the new, intact records. Every
 * round reports it again until the storage is repaired (or, after a rotation of the signing
 * key, until the sequencer is given the earlier public key: `SequencerOptions.previousKeys`).
 */
export class AuditTreeMismatchError extends Error {
  override readonly name = 'AuditTreeMismatchError';
}

export interface SequencerOptions {
  pool: pg.Pool;
  signer: CheckpointSigner;
  /**
   * Public keys the log was signed with before `signer`'s (a rotation of the signing key). A
   * sequencer that loads its tree holds storage to the latest checkpoint only once that
   * checkpoint's signature verifies: under the signer's key, one of these, or a key that their
   * transitions stored in audit.key_transitions lead to (keys.ts `trustThroughTransitions`,
   * each transition signed by a key already trusted). The database cannot vouch for an earlier
   * key (a transition names only the key it leads to), so a sequencer restarted with a new key
   * over a checkpoint of the old one needs the old public key here, until it has signed a
   * checkpoint of its own. Default none.
   */
  previousKeys?: readonly KeyObject[];
  /** Names the log in every checkpoint, e.g. `ledgerline/ledger`. */
  origin: string;
  /**
   * Integrate the events of this database's event store (`events.events`) as leaves, in its
   * global order: hashed where they are and stored as tiles (event-leaves.ts), not copied.
   */
  tailEvents?: boolean;
  /**
   * Where the event store is read, when its table belongs to another login than `pool`'s: a
   * pool of that login (the service's own). Reading a table runs whatever its owner attached to
   * it (a row-level security policy's function, an index expression the planner folds, a view
   * in its place), so the sequencer reads the service's table with the service's rights, never
   * its own: planted code then runs as the service, which could do it anyway. Default `pool`
   * (one login for both, as in `apply` mode).
   */
  eventsPool?: pg.Pool;
  batchRecordsMax?: number;
  /** Pause between rounds that found less than a full batch. */
  intervalMs?: number;
  /** A checkpoint is signed when records were added and this long has passed since the last (0: every round). */
  checkpointIntervalMs?: number;
  /** The clock of checkpoints. */
  now?: () => Date;
  /**
   * Wraps the subject keys at rest (keys.ts): new keys are stored wrapped, and the keys still
   * in clear are wrapped a batch per round. Without it keys are stored in clear, and a wrapped
   * key stops the round that needs it (KeyEncryptionKeyError).
   */
  keyEncryptionKey?: KeyEncryptionKey;
  onError?: (error: unknown) => void;
}

export interface RoundResult {
  /** Records integrated this round (0 also when another instance holds the lock). */
  records: number;
  checkpoint: Checkpoint | null;
}

interface Prepared {
  fields: AuditRecordFields;
  payload: string | null;
  personal: Buffer | null;
}

export class AuditSequencer {
  readonly #o: Required<Omit<SequencerOptions, 'keyEncryptionKey' | 'eventsPool' | 'previousKeys'>>;
  /** The keys a stored checkpoint may be signed by, before transitions: the signer's and the earlier ones given. */
  readonly #trusted: readonly KeyObject[];
  readonly #eventsPool: pg.Pool | null;
  readonly #kek: KeyEncryptionKey | null;
  #frontier: Frontier | null = null;
  #lastCheckpointMs = Number.NEGATIVE_INFINITY;
  #running: Promise<void> | null = null;
  #stopping = false;
  #wake: (() => void) | null = null;
  /** Where the wrapping pass over the subject keys stands (#rewrapKeys). */
  #rewrapAfter = '';

  constructor(options: SequencerOptions) {
    this.#o = {
      batchRecordsMax: BATCH_RECORDS_MAX_DEFAULT,
      intervalMs: INTERVAL_MS_DEFAULT,
      checkpointIntervalMs: CHECKPOINT_INTERVAL_MS_DEFAULT,
      now: () => new Date(),
      onError: () => {},
      tailEvents: false,
      ...options,
    };
    this.#kek = options.keyEncryptionKey ?? null;
    this.#eventsPool = options.eventsPool ?? null;
    this.#trusted = [options.signer.publicKey, ...(options.previousKeys ?? [])];
    if (!(this.#o.batchRecordsMax >= 1 && this.#o.batchRecordsMax <= 50_000)) throw new RangeError('batchRecordsMax must be in 1..50000');
  }

  /** Runs rounds until `close()`: back to back while there is a backlog, else every `intervalMs`. */
  start(): void {
    if (this.#running !== null) return;
    this.#stopping = false;
    this.#running = (async () => {
      while (!this.#stopping) {
        let full = false;
        try {
          full = (await this.round()).records >= this.#o.batchRecordsMax;
        } catch (error) {
          this.#frontier = null;
          this.#o.onError(error);
        }
        if (!full && !this.#stopping) {
          await new Promise<void>((resolve) => {
            const t = setTimeout(resolve, this.#o.intervalMs);
            this.#wake = () => {
              clearTimeout(t);
              resolve();
            };
          });
          this.#wake = null;
        }
      }
    })();
  }

  /**
   * Stops the loop, then integrates what there is as it is called (the queue's entries, and the
   * events up to the last in the global order) and signs a final checkpoint over them. Bounded:
   * other instances' writers may keep writing, and a close that waited for a round to find
   * nothing would not return while they do. What they write after is the next sequencer's.
   */
  async close(): Promise<void> {
    this.#stopping = true;
    this.#wake?.();
    await this.#running;
    this.#running = null;
    const target = await this.#closeTarget();
    for (;;) {
      const r = await this.round({ forceCheckpoint: true });
      if (r.records === 0 || (await this.#reached(target))) return;
    }
  }

  /** The last queued entry and the last event in the global order, now (no aggregate and no operator a search path could shadow). */
  async #closeTarget(): Promise<{ queueId: bigint | null; event: EventCheckpoint | null }> {
    const queued = await this.#o.pool.query<{ id: string }>('SELECT q.id::text AS id FROM audit.queue q ORDER BY q.id DESC LIMIT 1');
    let event: EventCheckpoint | null = null;
    if (this.#o.tailEvents) {
      try {
        const last = await (this.#eventsPool ?? this.#o.pool).query<{ tx: string; pos: string }>(
          'SELECT e.transaction_id::text AS tx, e.position::text AS pos FROM events.events e ORDER BY e.transaction_id DESC, e.position DESC LIMIT 1',
        );
        const row = last.rows[0];
        if (row !== undefined) event = { transactionId: BigInt(row.tx), position: BigInt(row.pos) };
      } catch {
        // An event store that cannot be read: the rounds report it; close on the queue alone.
      }
    }
    const id = queued.rows[0]?.id;
    return { queueId: id === undefined ? null : BigInt(id), event };
  }

  /** Whether the queue holds nothing up to the target's entry and the cursor has reached its event. */
  async #reached(target: { queueId: bigint | null; event: EventCheckpoint | null }): Promise<boolean> {
    if (target.queueId !== null) {
      const first = await this.#o.pool.query<{ id: string }>('SELECT q.id::text AS id FROM audit.queue q ORDER BY q.id LIMIT 1');
      const id = first.rows[0]?.id;
      if (id !== undefined && BigInt(id) <= target.queueId) return false;
    }
    if (target.event === null) return true;
    const cursor = await eventCursor(this.#o.pool);
    return compareOrder(cursor, target.event) >= 0;
  }

  /** One round; exported for tests and tools that drive the sequencer by hand. */
  async round(options: { forceCheckpoint?: boolean } = {}): Promise<RoundResult> {
    const client = await this.#o.pool.connect();
    let broken: Error | undefined;
    try {
      // The search path pinned for the round (PINNED_SEARCH_PATH in migrate.ts), whatever the connection's.
      await client.query(`BEGIN; SET LOCAL search_path = ${PINNED_SEARCH_PATH}`);
      // One sequencer per database: the round's transaction holds the cursor's row. Taking it needs
      // the right to update that row (the sequencer's role, the owner), so no other login can
      // hold it to stop the log; until 2026-12-07 it was an advisory lock on a public key, which
      // any login could take and keep, and every round then found nothing to do (a review's
      // finding). Another sequencer's round holding it: this one skips, as before.
      const locked = await client.query('SELECT 1 FROM audit.sequencer_state FOR UPDATE SKIP LOCKED');
      if (locked.rowCount !== 1) {
        await client.query('ROLLBACK');
        return { records: 0, checkpoint: null };
      }
      const result = await this.#roundLocked(client, options.forceCheckpoint === true);
      await client.query('COMMIT');
      return result;
    } catch (error) {
      // The frontier may hold this round's leaves: rebuild it from storage next time.
      this.#frontier = null;
      broken = error instanceof Error ? error : new Error(String(error));
      await client.query('ROLLBACK').catch(() => {});
      throw error;
    } finally {
      client.release(broken);
    }
  }

  async #roundLocked(client: pg.PoolClient, forceCheckpoint: boolean): Promise<RoundResult> {
    const size = await storedTreeSize(client);
    if (this.#frontier?.size !== size) this.#frontier = await checkedFrontier(client, size, this.#trusted);
    const start = this.#frontier;
    let frontier = start.clone();

    const queued = await client.query<{ id: string; entry: string; enqueued_at: Date; queued_by: string | null; by_database: boolean | null }>(
      // Who queued a row is looked up only for rows that may be governance records (a few: the
      // lookup costs some µs a row); one that names its class with escapes gets no answer and
      // is taken as the writer's (queuedEntry).
      `SELECT q.id::text AS id, q.entry, q.enqueued_at, q.queued_by::text,
              CASE WHEN strpos(q.entry, '"governance"') > 0 THEN ${QUEUED_BY_DATABASE('q')} END AS by_database
         FROM audit.queue q ORDER BY q.id LIMIT $1`,
      [this.#o.batchRecordsMax],
    );
    // A row queued before migration 1770200000000 names no role: it is judged as it was then.
    const entries: Pending[] = queued.rows.map((r) => queuedEntry(r.id, r.entry, r.enqueued_at, { role: r.queued_by, database: r.queued_by === null || r.by_database === true }, this.#o.now));
    const tile = this.#o.tailEvents && entries.length < this.#o.batchRecordsMax ? await this.#eventTile(client, size + entries.length, this.#o.batchRecordsMax - entries.length) : null;
    // Everything read from the event store is read; every write from here runs as the sequencer's role.
    await client.query(`SET LOCAL ROLE ${AUDIT_SEQUENCER_ROLE}`);
    if (this.#kek !== null) await this.#rewrapKeys(client, this.#kek);
    const records = entries.length + (tile?.count ?? 0);
    if (records === 0) return { records: 0, checkpoint: forceCheckpoint ? await this.#checkpoint(client, frontier, true) : null };
    let nodes: Subtree[] = [];
    const append = (h: Buffer): void => {
      for (const n of frontier.append(h)) if (n.level >= STORED_LEVEL_MIN) nodes.push(n);
    };
    if (entries.length > 0) {
      const keys = await this.#subjectKeys(client, entries);
      const prepared: Prepared[] = [];
      const leafHashes: Buffer[] = [];
      for (const [i, e] of entries.entries()) {
        // A batch costs ~10-20 µs of CPU per record: let the process's other work (requests,
        // when the sequencer shares their event loop) run between slices of it.
        if (i > 0 && i % YIELD_EVERY_RECORDS === 0) await new Promise((resolve) => setImmediate(resolve));
        const p = prepare(size + i, e, keys);
        const h = leafHash(leafData(p.fields));
        append(h);
        prepared.push(p);
        leafHashes.push(h);
      }
      // Under a savepoint (one statement more a round), so that a row PostgreSQL refuses
      // despite the checks is found and recorded as rejected rather than failing every round.
      await client.query('SAVEPOINT records');
      try {
        await insertRecords(client, prepared, leafHashes);
        await client.query('RELEASE SAVEPOINT records');
      } catch (error) {
        if (!rowRefused(error)) throw error;
        await client.query('ROLLBACK TO SAVEPOINT records; RELEASE SAVEPOINT records');
        await insertSalvaging(client, prepared, leafHashes, (i, refusal) =>
          prepare(size + i, rejectedEntry((entries[i] as Pending).source, `PostgreSQL refused the entry: ${refusal}`, (entries[i] as Pending).enqueuedAt, this.#o.now), keys),
        );
        // Some leaves changed: the round's tree is built again from the leaves as stored.
        frontier = start.clone();
        nodes = [];
        for (const h of leafHashes) append(h);
      }
      await client.query('DELETE FROM audit.queue WHERE id = ANY($1::bigint[])', [queued.rows.map((r) => r.id)]);
    }
    if (tile !== null) {
      nodes.push(...frontier.appendAll(tile.hashes, tile.count, STORED_LEVEL_MIN));
      await client.query(
        `INSERT INTO audit.event_leaves (first_seq, leaf_count, first_transaction_id, first_position, first_recorded_at, last_recorded_at, positions, leaf_hashes, actors, failures)
         VALUES ($1, $2, $3::text::xid8, $4, $5, $6, $7::bigint[], $8, $9::text[], $10)`,
        [size + entries.length, tile.count, tile.first.transactionId.toString(), tile.first.position.toString(), tile.firstRecordedAt, tile.lastRecordedAt, tile.positions, tile.hashes, tile.actors, tile.failures],
      );
      await client.query('UPDATE audit.sequencer_state SET event_transaction_id = $1::text::xid8, event_position = $2', [tile.last.transactionId.toString(), tile.last.position.toString()]);
    }
    if (nodes.length > 0) {
      // The hashes as one bytea, cut in SQL: pg's escaping of a bytea[] cost more than the insert.
      await client.query(
        `INSERT INTO audit.tree_nodes (level, idx, hash)
         SELECT u.level, u.idx, substring($3::bytea FROM (u.n::integer - 1) * 32 + 1 FOR 32) FROM unnest($1::smallint[], $2::bigint[]) WITH ORDINALITY AS u(level, idx, n)`,
        [sqlArrayLiteral(nodes.map((n) => n.level)), sqlArrayLiteral(nodes.map((n) => n.index)), Buffer.concat(nodes.map((n) => n.hash))],
      );
    }
    const checkpoint = await this.#checkpoint(client, frontier, forceCheckpoint);
    // Only now is this round's tree the sequencer's; until COMMIT succeeds `round` discards it.
    this.#frontier = frontier;
    return { records, checkpoint };
  }

  /**
   * The round's events, read as the event store's owner's login when it has a pool of its own
   * (SequencerOptions.eventsPool), and held to what the tile query promises before anything is
   * written: after the cursor, below the read horizon (taken here, on the sequencer's own
   * connection), in order, at most `limit`, their count in every column. The cursor is this
   * round's (the cursor's row lock keeps it ours); the events below the horizon are committed, the
   * same whichever connection reads them. A separate event store that cannot be read (down, or
   * its owner's table refusing) leaves the round to the queue, reported, so that commands,
   * reads and governance still get their place in the log.
   */
  async #eventTile(client: pg.PoolClient, firstSeq: number, limit: number): Promise<EventTile | null> {
    const cursor = await eventCursor(client);
    const horizon = await readHorizon(client);
    const read = (db: Queryable): Promise<EventTile | null> => readEventTile(db, cursor, firstSeq, limit, horizon);
    let tile: EventTile | null;
    if (this.#eventsPool === null) {
      // On the round's own connection, sorting priced out for this read only (readEventTile).
      await client.query('SET LOCAL enable_sort = off');
      tile = await read(client);
      await client.query('SET LOCAL enable_sort TO DEFAULT');
    } else {
      try {
        tile = await readApart(this.#eventsPool, read);
      } catch (error) {
        this.#o.onError(new Error(`the event store could not be read, so this round integrates the queue only: ${error instanceof Error ? error.message : String(error)}`, { cause: error }));
        return null;
      }
    }
    if (tile === null) return null;
    const problems = [
      tile.count >= 1 && tile.count <= limit ? null : `${tile.count} events for a tile of at most ${limit}`,
      compareOrder(tile.first, cursor) > 0 ? null : 'its first event is not after the cursor',
      tile.count === 1 || compareOrder(tile.last, tile.first) > 0 ? null : 'its last event does not come after its first',
      tile.last.transactionId < horizon ? null : 'its last event is not below the read horizon',
      tile.failures >= 0 && tile.failures <= tile.count ? null : `${tile.failures} failures among ${tile.count} events`,
    ].filter((p) => p !== null);
    if (problems.length > 0) throw new Error(`invariant: the event store returned a tile the sequencer will not integrate (${problems.join('; ')}); the round is refused`);
    return tile;
  }

  async #checkpoint(db: Queryable, frontier: Frontier, force: boolean): Promise<Checkpoint | null> {
    if (frontier.size === 0) return null;
    const now = this.#o.now();
    if (!force && now.getTime() - this.#lastCheckpointMs < this.#o.checkpointIntervalMs) return null;
    const latest = await db.query<{ n: string }>('SELECT coalesce(max(tree_size), 0)::text AS n FROM audit.checkpoints');
    if (Number(latest.rows[0]?.n) >= frontier.size) return null;
    const c = signCheckpoint(this.#o.signer, { origin: this.#o.origin, treeSize: frontier.size, rootHash: frontier.root(), issuedAt: now });
    await db.query('INSERT INTO audit.checkpoints (tree_size, origin, root_hash, issued_at, key_id, signature) VALUES ($1, $2, $3, $4, $5, $6)', [
      c.treeSize,
      c.origin,
      c.rootHash,
      c.issuedAt,
      c.keyId,
      c.signature,
    ]);
    this.#lastCheckpointMs = now.getTime();
    return c;
  }

  /**
   * The keys of every subject with personal data in the batch, created on first use, and when
   * each of them was last erased. The erasures are read after the keys' INSERT: an erasure
   * locks audit.subject_keys against it (migration 1769500000000), so one that committed while
   * this round waited there is seen here. An entry that occurred before its subject's erasure
   * but reached the queue after it (it waited in a producer's sink buffer) is kept readable only
   * if a hold now covers its resource (`prepare`): the erasure could not see it to refuse.
   */
  async #subjectKeys(db: Queryable, entries: Pending[]): Promise<SubjectKeys> {
    const subjects = [...new Set(entries.filter((e) => e.personal !== null).map((e) => e.entry.subject as string))];
    if (subjects.length === 0) return { keys: new Map(), erasedAt: new Map(), heldLate: new Set() };
    const made = subjects.map((subject) => storedSubjectKey(this.#kek, subject, newSubjectKey()));
    await db.query(
      'INSERT INTO audit.subject_keys (subject, key, kek_id) SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[]) ON CONFLICT (subject) DO NOTHING',
      [subjects, made.map((m) => m.key), made.map((m) => m.kekId)],
    );
    const erased = await db.query<{ subject: string; erased_at: Date }>('SELECT subject, erased_at FROM audit.erased_subjects WHERE subject = ANY($1::text[])', [subjects]);
    const r = await db.query<{ subject: string; key: Buffer; kek_id: string | null }>(
      'SELECT subject, key, kek_id FROM audit.subject_keys WHERE subject = ANY($1::text[])',
      [subjects],
    );
    const erasedAt = new Map(erased.rows.map((row) => [row.subject, row.erased_at]));
    const late = entries.filter((e) => e.personal !== null && predatesErasure(e, erasedAt.get(e.entry.subject as string)) === 'occurred');
    const heldLate = new Set<Pending>();
    if (late.length > 0) {
      const held = await db.query<{ held: boolean }>(
        'SELECT audit.is_held(NULL, u.type, u.id) AS held FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(type, id, n) ORDER BY u.n',
        [late.map((e) => e.entry.resource.type), late.map((e) => e.entry.resource.id)],
      );
      for (const [i, row] of held.rows.entries()) if (row.held) heldLate.add(late[i] as Pending);
    }
    return {
      keys: new Map(r.rows.map((row) => [row.subject, clearSubjectKey(this.#kek, row.subject, row.key, row.kek_id)])),
      erasedAt,
      heldLate,
    };
  }

  /**
   * Wraps up to a thousand subject keys a round under the current key-encryption key: those
   * still in clear (written before it was set) and those under a previous one (a rotation),
   * in subject order across rounds.
   * Every round asks: the partial indexes `subject_keys_clear_idx` and `subject_keys_kek_idx`
   * find them, so once none are left the question costs an empty index probe or two. A row
   * changed meanwhile (erased, or wrapped by another instance) is left as it is.
   */
  async #rewrapKeys(db: Queryable, kek: KeyEncryptionKey): Promise<void> {
    // In subject order from where the last round stopped, so keys that do not open are passed
    // over, not read again every round ahead of the rest; from the start again after the end.
    const found = await db.query<{ subject: string; key: Buffer; kek_id: string | null }>(
      `SELECT subject, key, kek_id FROM audit.subject_keys
        WHERE (kek_id IS NULL OR kek_id = ANY($1::text[])) AND subject > $2 ORDER BY subject LIMIT ${REWRAP_KEYS_PER_ROUND}`,
      [[...kek.previous.keys()], this.#rewrapAfter],
    );
    this.#rewrapAfter = found.rows.length < REWRAP_KEYS_PER_ROUND ? '' : (found.rows.at(-1)?.subject ?? '');
    // A key that does not open (changed in storage, or under a key no longer configured) is
    // left as it is and reported: it must not stop the round, which records everything else.
    const rows: typeof found.rows = [];
    const wrapped: { key: Buffer; kekId: string | null }[] = [];
    const refused: string[] = [];
    for (const row of found.rows) {
      try {
        wrapped.push(storedSubjectKey(kek, row.subject, clearSubjectKey(kek, row.subject, row.key, row.kek_id)));
        rows.push(row);
      } catch (error) {
        if (!(error instanceof KeyEncryptionKeyError)) throw error;
        refused.push(row.subject);
      }
    }
    if (refused.length > 0) this.#o.onError(new KeyEncryptionKeyError(`${refused.length} subject keys could not be opened to wrap again (first: ${refused.slice(0, 5).join(', ')}): they stay as they are`));
    if (rows.length === 0) return;
    await db.query(
      `UPDATE audit.subject_keys k SET key = u.key, kek_id = u.kek_id
         FROM unnest($1::text[], $2::bytea[], $3::text[], $4::text[]) AS u(subject, key, kek_id, was)
        WHERE k.subject = u.subject AND k.kek_id IS NOT DISTINCT FROM u.was`,
      [rows.map((row) => row.subject), wrapped.map((w) => w.key), wrapped.map((w) => w.kekId), rows.map((row) => row.kek_id)],
    );
  }
}

/** An entry about to be sequenced, its payload and personal data as canonical JSON text. */
interface Pending {
  id: string;
  entry: Omit<AuditEntry, 'payload' | 'personal'>;
  payload: string | null;
  personal: string | null;
  /** When it reached audit.queue, by the database's clock (an erasure's clock, `prepare`). */
  enqueuedAt: Date;
  /** The queue row it came from, kept for a rejection record should PostgreSQL refuse the entry. */
  source: { queueId: string; text: string };
}

/**
 * `read` in a transaction of its own on a connection of `pool`, sorting priced out
 * (readEventTile) and the search path pinned. Not READ ONLY: whatever the event store's owner
 * attaches to its tables runs as that owner, as it would for any reader, and may write.
 */
async function readApart<T>(pool: pg.Pool, read: (db: Queryable) => Promise<T>): Promise<T> {
  const client = await pool.connect();
  let broken: Error | undefined;
  try {
    await client.query(`BEGIN; SET LOCAL search_path = ${PINNED_SEARCH_PATH}; SET LOCAL enable_sort = off`);
    const result = await read(client);
    await client.query('COMMIT');
    return result;
  } catch (error) {
    broken = error instanceof Error ? error : new Error(String(error));
    await client.query('ROLLBACK').catch(() => {});
    throw error;
  } finally {
    client.release(broken);
  }
}

/**
 * A queue row as a Pending entry. The fields are checked again (the queue is only as trusted
 * as its writers), and a record only the database makes must have been queued by it
 * (provenance.ts); a row that fails becomes a record of its own rejection, so one bad row can
 * neither stop the sequencer nor disappear unrecorded.
 */
function queuedEntry(queueId: string, text: string, enqueuedAt: Date, queuedBy: { role: string | null; database: boolean }, now: () => Date): Pending {
  // queuedBy.database: the row was queued by a role that could be the database's code, or before roles were recorded.
  try {
    const { payloadJson, personalJson, ...q } = JSON.parse(text) as QueuedEntry;
    const entry = { ...q, occurredAt: new Date(q.occurredAt) };
    checkFields(entry);
    const payload = checkJsonText('payload', payloadJson);
    const personal = checkJsonText('personal', personalJson);
    if (personal !== null && entry.subject === undefined) throw new InvalidAuditEntryError('personal data without a subject');
    if (typeof q.id !== 'string' || !/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(q.id)) throw new InvalidAuditEntryError('the queued id is not a UUID');
    if (onlyTheDatabaseQueues(entry) && !queuedBy.database) {
      throw new InvalidAuditEntryError(`${entry.action} ${entry.outcome} is a record only the database's own code queues, and this one was queued by role ${JSON.stringify(queuedBy.role)}`);
    }
    return { id: q.id, entry, payload, personal, enqueuedAt, source: { queueId, text } };
  } catch (error) {
    return rejectedEntry({ queueId, text }, error instanceof Error ? error.message : 'unreadable', enqueuedAt, now);
  }
}

/**
 * The record of a queue row's rejection: what the row said, as an escaped JSON payload, and
 * why. Everything in it is storable whatever the row held: the reason is cut and made
 * well-formed (a message may quote the row, or be cut inside a surrogate pair), and
 * canonicalJson escapes NUL and lone surrogates in the payload.
 */
function rejectedEntry(source: { queueId: string; text: string }, reason: string, enqueuedAt: Date, now: () => Date): Pending {
  const { queueId, text } = source;
  return {
    id: uuidv5(`queue:${queueId}:${text}`, EVENT_RECORD_NAMESPACE),
    entry: { recordClass: 'security', actor: { type: 'service', id: 'audit-sequencer' }, action: 'audit.entry.rejected', outcome: 'failure', reason: storablePrefix(reason, 400), origin: { service: 'audit' }, resource: { type: 'audit.queue', id: queueId }, occurredAt: now() },
    payload: canonicalJson({ queued: withoutPersonalData(text).slice(0, 60_000) }),
    personal: null,
    enqueuedAt,
    source,
  };
}

/**
 * A rejected queue row as its record keeps it: the row's text, but not its personal data,
 * which would otherwise sit in clear in a record no subject key covers and no erasure reaches.
 * Its length is kept, so the record still says there was some.
 */
function withoutPersonalData(text: string): string {
  let row: unknown;
  try {
    row = JSON.parse(text);
  } catch {
    return text;
  }
  if (typeof row !== 'object' || row === null || Array.isArray(row) || !('personalJson' in row)) return text;
  const personal = row.personalJson;
  return JSON.stringify({ ...row, personalJson: personal === null ? null : { withheld: typeof personal === 'string' ? personal.length : true } });
}

/**
 * Whether PostgreSQL refused the rows' data (a data exception, class 22, or a constraint,
 * class 23: a value it cannot store), rather than failing for a reason of its own (a lost
 * connection, a timeout), after which the same rows must be tried again, not rejected.
 */
function rowRefused(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === 'string' && (code.startsWith('22') || code.startsWith('23'));
}

/**
 * Inserts `rows` after their batch insert was refused: by halves, in order, each under a
 * savepoint, down to the single rows PostgreSQL refuses; each of those is replaced, at its
 * sequence number, by `reject(i, why)` (its leaf hash in `leafHashes` too) and inserted before
 * the rows after it, so sequence numbers stay consecutive. One bad row costs about 2·log2(n)
 * statements.
 */
async function insertSalvaging(db: Queryable, rows: Prepared[], leafHashes: Buffer[], reject: (i: number, why: string) => Prepared): Promise<void> {
  const attempt = async (lo: number, hi: number): Promise<void> => {
    await db.query('SAVEPOINT records_part');
    try {
      await insertRecords(db, rows.slice(lo, hi), leafHashes.slice(lo, hi));
      await db.query('RELEASE SAVEPOINT records_part');
      return;
    } catch (error) {
      if (!rowRefused(error)) throw error;
      await db.query('ROLLBACK TO SAVEPOINT records_part; RELEASE SAVEPOINT records_part');
      if (hi - lo > 1) {
        const mid = lo + Math.floor((hi - lo) / 2);
        await attempt(lo, mid);
        await attempt(mid, hi);
        return;
      }
      const rejected = reject(lo, error instanceof Error ? error.message : String(error));
      rows[lo] = rejected;
      const h = leafHash(leafData(rejected.fields));
      leafHashes[lo] = h;
      // Not under a savepoint: a rejection record PostgreSQL also refused fails the round.
      await insertRecords(db, [rejected], [h]);
    }
  };
  await attempt(0, rows.length);
}

/**
 * The frontier of the stored tree of `size` leaves, held to the latest checkpoint first: its
 * signature must verify under a trusted key (`trustedCheckpoint`), the stored subtrees up to
 * its size must give the root it signed, and the leaves after it are folded in from their
 * stored hashes rather than from stored subtrees nothing signed yet. Throws
 * AuditTreeMismatchError when they do not (a rewritten checkpoint, a changed node in
 * audit.tree_nodes, a changed leaf hash, removed leaves): a sequencer that went on would sign
 * over the damage. Runs when the frontier is loaded (at start, after a failed round, or when
 * another instance moved the tree on), never in a round that follows one of its own.
 */
async function checkedFrontier(db: Queryable, size: number, trusted: readonly KeyObject[]): Promise<Frontier> {
  const latest = await db.query<CheckpointRow>(`SELECT ${CHECKPOINT_COLUMNS} FROM audit.checkpoints c ORDER BY c.tree_size DESC LIMIT 1`);
  const row = latest.rows[0];
  if (row === undefined) return loadFrontier(db, size);
  const cp = checkpointOf(row);
  await trustedCheckpoint(db, cp, trusted);
  const signed = cp.treeSize;
  if (signed > size) throw new AuditTreeMismatchError(`audit tree: the latest checkpoint signed ${signed} leaves but storage holds ${size}; refusing to sign or integrate anything until it is repaired (run audit:verify)`);
  let frontier: Frontier;
  try {
    frontier = await loadFrontier(db, signed);
  } catch (error) {
    throw new AuditTreeMismatchError(`audit tree: the stored tree of the latest checkpoint (size ${signed}) cannot be read (${error instanceof Error ? error.message : String(error)}); refusing to sign or integrate anything until it is repaired (run audit:verify)`);
  }
  if (!frontier.root().equals(cp.rootHash)) {
    throw new AuditTreeMismatchError(`audit tree: the stored tree of size ${signed} does not give the root its checkpoint signed (a node in audit.tree_nodes or a stored leaf hash was changed); refusing to sign or integrate anything until it is repaired (run audit:verify)`);
  }
  // Read as ranges (records and tiles alike), each checked whole before it is folded in: the
  // same leaves, in the same order, as reading each seq (`storedLeafHashRange`), so the same
  // frontier, and the same first missing leaf named.
  for (let from = signed; from < size; from += FRONTIER_LEAVES_PER_READ) {
    const to = Math.min(size, from + FRONTIER_LEAVES_PER_READ);
    const read = await storedLeafHashRange(db, from, to);
    if (read.hashes === null) {
      const what = read.malformed ? 'has a stored hash that is not 32 bytes' : 'is missing from storage';
      throw new AuditTreeMismatchError(`audit tree: leaf ${read.missing} ${what}; refusing to sign or integrate anything until it is repaired (run audit:verify)`);
    }
    // Only the frontier is wanted: the subtrees these leaves complete were stored by the rounds that integrated them.
    frontier.appendAll(read.hashes, to - from, Number.POSITIVE_INFINITY);
  }
  return frontier;
}

/**
 * Throws AuditTreeMismatchError unless `cp` (the latest stored checkpoint) is signed by one of
 * the `trusted` keys, or by a key the stored transitions of its log lead to from them, each
 * signed by a key already trusted (keys.ts `trustThroughTransitions`: a row written into
 * audit.key_transitions adds no trust). Without it a superuser who rewrote a record, its
 * leaf hash and the checkpoint's root would have the sequencer sign the next checkpoint,
 * with the real key, over the forgery. The transitions are read only when the trusted keys
 * alone do not verify it (after a rotation).
 */
async function trustedCheckpoint(db: Queryable, cp: Checkpoint, trusted: readonly KeyObject[]): Promise<void> {
  if (checkpointSignatureValid(trusted, cp)) return;
  const widened = trustThroughTransitions(trusted, await storedKeyTransitions(db), cp.origin).keys;
  if (checkpointSignatureValid(widened, cp)) return;
  const why = widened.some((k) => keyIdOf(k) === cp.keyId)
    ? `its signature does not verify under key ${cp.keyId}, which it names: the checkpoint was rewritten (its root, size or time) or its signature forged`
    : `it names key ${cp.keyId}, which is neither the signing key nor an earlier key the sequencer was given (previousKeys, --previous-public-key) nor one their signed key transitions lead to`;
  throw new AuditTreeMismatchError(`audit tree: the latest checkpoint (tree size ${cp.treeSize}) has no signature the sequencer can trust: ${why}; refusing to sign or integrate anything until it is repaired (run audit:verify)`);
}

/**
 * The subjects' keys for a round, when each subject was last erased, and the entries that
 * occurred before their subject's erasure, were queued after it, and whose resource a hold
 * covers (`#subjectKeys`).
 */
interface SubjectKeys {
  keys: Map<string, Buffer>;
  erasedAt: Map<string, Date>;
  heldLate: Set<Pending>;
}

/**
 * Whether an entry's personal data predates its subject's last erasure, and how: `queued`, it
 * reached audit.queue before it (both times the database's); `occurred`, it reached the queue
 * after it but occurred before it (it waited in a producer's sink buffer while the erasure ran;
 * `occurredAt` is the producer's clock, so a clock ahead of the database's by more than the
 * entry waited lets it through). Null: it occurred after the erasure, or there was none.
 */
function predatesErasure(p: Pending, erased: Date | undefined): 'queued' | 'occurred' | null {
  if (erased === undefined) return null;
  if (p.enqueuedAt.getTime() <= erased.getTime()) return 'queued';
  return (p.entry.occurredAt as Date).getTime() <= erased.getTime() ? 'occurred' : null;
}

/**
 * A pending entry as a record at `seq`: personal data encrypted, payloads hashed. Personal data
 * that predates its subject's erasure (`predatesErasure`) is sealed under a key nobody keeps: it
 * reads as erased, as the data sealed before the erasure does. The one exception is an entry
 * that was still in a sink buffer during the erasure and whose resource a hold covers: had it
 * been queued, the hold would have refused the erasure, so it keeps its data under the
 * subject's new key. Data that occurred after the erasure is the subject's anew.
 */
function prepare(seq: number, p: Pending, { keys, erasedAt, heldLate }: SubjectKeys): Prepared {
  const { id, entry: e, payload, personal } = p;
  let sealed: Buffer | null = null;
  if (personal !== null) {
    const erasure = predatesErasure(p, erasedAt.get(e.subject as string));
    const key = erasure === 'queued' || (erasure === 'occurred' && !heldLate.has(p)) ? newSubjectKey() : keys.get(e.subject as string);
    if (key === undefined) throw new Error(`invariant: no key for subject ${e.subject}`);
    sealed = seal(key, personal, id);
  }
  return {
    fields: {
      seq,
      id,
      occurredAt: e.occurredAt as Date,
      recordClass: e.recordClass,
      actorType: e.actor.type,
      actorId: e.actor.id,
      action: e.action,
      outcome: e.outcome,
      reason: e.reason ?? null,
      originService: e.origin.service,
      originIp: e.origin.ip ?? null,
      originRequestId: e.origin.requestId ?? null,
      originTraceId: e.origin.traceId ?? null,
      resourceType: e.resource.type,
      resourceId: canonicalResourceId(e.resource.id),
      subject: e.subject ?? null,
      payloadHash: payload === null ? null : sha256(payload),
      personalHash: sealed === null ? null : sha256(sealed),
    },
    payload,
    personal: sealed,
  };
}

/**
 * Stores a round's records and payloads, two statements. Numbers and ids travel as array
 * literals and text as one JSON array per column (hashes in hex), not as pg's per-element
 * escaped arrays: a fifth of the sequencer's CPU went to that encoding (measured).
 */
async function insertRecords(db: Queryable, rows: Prepared[], leafHashes: Buffer[]): Promise<void> {
  const json = (f: (r: AuditRecordFields) => string | null): string => JSON.stringify(rows.map((r) => f(r.fields)));
  const hex = (h: Buffer | null): string | null => (h === null ? null : h.toString('hex'));
  await db.query(
    `INSERT INTO audit.records (seq, id, occurred_at, record_class, actor_type, actor_id, action, outcome, reason, origin_service,
                                origin_ip, origin_request_id, origin_trace_id, resource_type, resource_id, subject, payload_hash,
                                personal_hash, leaf_hash)
     SELECT u.seq, u.id, u.occurred_at::timestamptz, u.record_class, u.actor_type, u.actor_id, u.action, u.outcome, u.reason,
            u.origin_service, u.origin_ip, u.origin_request_id, u.origin_trace_id, u.resource_type, u.resource_id, u.subject,
            decode(u.payload_hash, 'hex'), decode(u.personal_hash, 'hex'), decode(u.leaf_hash, 'hex')
       FROM ROWS FROM (unnest($1::bigint[], $2::uuid[]),
                       json_array_elements_text($3::json), json_array_elements_text($4::json), json_array_elements_text($5::json),
                       json_array_elements_text($6::json), json_array_elements_text($7::json), json_array_elements_text($8::json),
                       json_array_elements_text($9::json), json_array_elements_text($10::json), json_array_elements_text($11::json),
                       json_array_elements_text($12::json), json_array_elements_text($13::json), json_array_elements_text($14::json),
                       json_array_elements_text($15::json), json_array_elements_text($16::json), json_array_elements_text($17::json),
                       json_array_elements_text($18::json), json_array_elements_text($19::json))
            AS u(seq, id, occurred_at, record_class, actor_type, actor_id, action, outcome, reason, origin_service, origin_ip,
                 origin_request_id, origin_trace_id, resource_type, resource_id, subject, payload_hash, personal_hash, leaf_hash)`,
    [
      sqlArrayLiteral(rows.map((r) => r.fields.seq)),
      sqlArrayLiteral(rows.map((r) => r.fields.id)),
      json((r) => r.occurredAt.toISOString()),
      json((r) => r.recordClass),
      json((r) => r.actorType),
      json((r) => r.actorId),
      json((r) => r.action),
      json((r) => r.outcome),
      json((r) => r.reason),
      json((r) => r.originService),
      json((r) => r.originIp),
      json((r) => r.originRequestId),
      json((r) => r.originTraceId),
      json((r) => r.resourceType),
      json((r) => r.resourceId),
      json((r) => r.subject),
      json((r) => hex(r.payloadHash)),
      json((r) => hex(r.personalHash)),
      JSON.stringify(leafHashes.map((h) => h.toString('hex'))),
    ],
  );
  const withPayload = rows.filter((r) => r.payload !== null || r.personal !== null);
  if (withPayload.length > 0) {
    await db.query(
      `INSERT INTO audit.payloads (seq, payload, personal)
       SELECT u.seq, u.payload, decode(u.personal, 'hex')
         FROM ROWS FROM (unnest($1::bigint[]), json_array_elements_text($2::json), json_array_elements_text($3::json))
              AS u(seq, payload, personal)`,
      [
        sqlArrayLiteral(withPayload.map((r) => r.fields.seq)),
        JSON.stringify(withPayload.map((r) => r.payload)),
        JSON.stringify(withPayload.map((r) => hex(r.personal))),
      ],
    );
  }
}
