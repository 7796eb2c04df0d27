/**
 * Aggregates on the event store: load a stream (from its latest snapshot, when there is one),
 * run the decider, append the new events with the loaded version as the expected one, and
 * apply inline projections in the same transaction.
 */
import type pg from 'pg';
import type { AsOf, EventMetadata, EventStore, StoredEvent } from '@ledgerline/events';
import { fold, type Decider, type DomainEvent } from './decider.ts';
import { applyInline, type Projection } from './projection.ts';
import type { Upcasters } from './upcast.ts';

type Queryable = Pick<pg.ClientBase, 'query'>;

export interface SnapshotOptions<State> {
  /** A snapshot is written whenever an append crosses a multiple of `every` versions. */
  every: number;
  /** Bump when the encoded shape changes: older snapshots are then ignored, not misread. */
  stateVersion: number;
  encode(state: State): Record<string, unknown>;
  decode(json: Record<string, unknown>): State;
}

export interface AggregateDefinition<Command, Event extends DomainEvent, State> {
  streamType: string;
  decider: Decider<Command, Event, State>;
  upcasters: Upcasters;
  /** Checks upcast data and returns the typed event; throws on anything malformed. */
  parse(type: string, data: Record<string, unknown>): Event;
  snapshots?: SnapshotOptions<State>;
}

export interface LoadedAggregate<State> {
  state: State;
  /** The stream's version the state includes (0: no events). */
  version: number;
  /** The snapshot's version the load started from, or null when it folded from the start. */
  snapshotVersion: number | null;
  /** Events read and folded after the snapshot. */
  eventsFolded: number;
}

export interface HandleResult<Event, State> {
  events: Event[];
  version: number;
  state: State;
  snapshotTaken: boolean;
}

export class AggregateStore<Command, Event extends DomainEvent, State> {
  readonly #store: EventStore;
  readonly #def: AggregateDefinition<Command, Event, State>;
  readonly #inline: readonly Projection[];

  constructor(store: EventStore, definition: AggregateDefinition<Command, Event, State>, options: { inline?: readonly Projection[] } = {}) {
    const every = definition.snapshots?.every;
    if (every !== undefined && !(Number.isSafeInteger(every) && every >= 1)) {
      throw new RangeError(`snapshots.every must be a positive integer, got ${every}`);
    }
    this.#store = store;
    this.#def = definition;
    this.#inline = options.inline ?? [];
  }

  /** A stored event in the current schema, checked. */
  toDomain(event: Pick<StoredEvent, 'type' | 'schemaVersion' | 'data'>): Event {
    return this.#def.parse(event.type, this.#def.upcasters.upcast(event.type, event.schemaVersion, event.data));
  }

  /**
   * The aggregate's state now, or as of a past checkpoint or time (time travel folds from the
   * first event: a snapshot is of the present and cannot stand for the past).
   */
  async load(db: Queryable, id: string, options: { asOf?: AsOf; location?: string } = {}): Promise<LoadedAggregate<State>> {
    const { asOf } = options;
    const snap = asOf === undefined ? await this.#readSnapshot(db, id) : null;
    const byTime = asOf !== undefined && 'time' in asOf;
    // As of a time: recorded_at is the appending transaction's start, which need not follow
    // version order (a transaction that began earlier can commit a later version), so a
    // filter on it can return version 2 without version 1. The state as of `time` is the
    // prefix of the stream cut at the first version recorded after it. `last` bounds the
    // cut when nothing was recorded after `time`, so a version appended between the two
    // reads is not taken.
    const limit = byTime ? await this.#versionLimitAt(db, id, asOf.time) : null;
    const read = await this.#store.readStream(db, this.#def.streamType, id, (snap?.version ?? 0) + 1, {
      ...(asOf === undefined || byTime ? {} : { asOf }),
      ...(options.location === undefined ? {} : { location: options.location }),
    });
    const events = limit === null ? read : read.filter((e) => e.version < limit);
    const start = snap?.state ?? this.#def.decider.initialState;
    const state = fold(this.#def.decider, start, events.map((e) => this.toDomain(e)));
    const last = events.at(-1);
    return { state, version: last?.version ?? snap?.version ?? 0, snapshotVersion: snap?.version ?? null, eventsFolded: events.length };
  }

  /**
   * Runs a command inside the caller's transaction: load, decide, append (expecting the loaded
   * version, so a concurrent writer gets ConcurrencyError and nothing is written), apply the
   * inline projections, and write a snapshot when one is due. A DomainRejection writes nothing.
   */
  async handle(
    db: Queryable,
    id: string,
    command: Command,
    options: { metadata?: EventMetadata; region?: string } = {},
  ): Promise<HandleResult<Event, State>> {
    const loaded = await this.load(db, id);
    const events = this.#def.decider.decide(command, loaded.state);
    if (events.length === 0) return { events, version: loaded.version, state: loaded.state, snapshotTaken: false };
    const appended = await this.#store.append(
      db,
      { type: this.#def.streamType, id },
      events.map((e) => ({
        type: e.type,
        schemaVersion: this.#def.upcasters.currentVersion(e.type),
        data: e.data,
        ...(options.metadata === undefined ? {} : { metadata: options.metadata }),
      })),
      { expectedVersion: loaded.version === 0 ? 'no_stream' : loaded.version, ...(options.region === undefined ? {} : { region: options.region }) },
    );
    if (this.#inline.length > 0) await applyInline(db, this.#inline, await this.#store.readPositions(db, appended.positions));
    const state = fold(this.#def.decider, loaded.state, events);
    const every = this.#def.snapshots?.every;
    const snapshotTaken = every !== undefined && Math.floor(appended.version / every) > Math.floor(loaded.version / every);
    if (snapshotTaken) await this.#writeSnapshot(db, id, appended.version, state);
    return { events, version: appended.version, state, snapshotTaken };
  }

  /** The first version not in the stream as of `time`: the first recorded after it, else one past the last. */
  async #versionLimitAt(db: Queryable, id: string, time: Date): Promise<number> {
    const r = await db.query<{ cut: number | null; last: number | null }>(
      // The hot table and the archive: retention moves a stream whole, and readStream reads
      // its archived versions too (without the archive, an archived aggregate loaded empty).
      `SELECT min(version) FILTER (WHERE recorded_at > $3::timestamptz) AS cut, max(version) AS last
         FROM (SELECT version, recorded_at FROM events.events WHERE stream_type = $1 AND stream_id = $2
               UNION ALL
               SELECT version, recorded_at FROM events.archived_events WHERE stream_type = $1 AND stream_id = $2) e`,
      [this.#def.streamType, id, time],
    );
    const row = r.rows[0];
    return row?.cut ?? (row?.last ?? 0) + 1;
  }

  async #readSnapshot(db: Queryable, id: string): Promise<{ version: number; state: State } | null> {
    const options = this.#def.snapshots;
    if (options === undefined) return null;
    const r = await db.query<{ version: number; state: Record<string, unknown> }>(
      `SELECT version, state FROM events.snapshots WHERE stream_type = $1 AND stream_id = $2 AND state_version = $3`,
      [this.#def.streamType, id, options.stateVersion],
    );
    const row = r.rows[0];
    return row === undefined ? null : { version: row.version, state: options.decode(row.state) };
  }

  async #writeSnapshot(db: Queryable, id: string, version: number, state: State): Promise<void> {
    const options = this.#def.snapshots;
    if (options === undefined) return;
    // Never replace a newer snapshot (a later writer's) with an older one.
    await db.query(
      `INSERT INTO events.snapshots (stream_type, stream_id, version, state_version, state) VALUES ($1, $2, $3, $4, $5)
       ON CONFLICT (stream_type, stream_id) DO UPDATE
         SET version = EXCLUDED.version, state_version = EXCLUDED.state_version, state = EXCLUDED.state, taken_at = now()
       WHERE events.snapshots.version < EXCLUDED.version OR events.snapshots.state_version <> EXCLUDED.state_version`,
      [this.#def.streamType, id, version, options.stateVersion, JSON.stringify(options.encode(state))],
    );
  }
}
