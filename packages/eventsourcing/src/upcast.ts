/**
 * Schema evolution. Events are immutable, so a change to an event's shape is a new schema
 * version of its type, and the old rows stay as they were written. An upcaster turns data of
 * one version into the next; loading chains them up to the version the code understands.
 */

export interface Upcaster {
  type: string;
  /** The version this upcaster reads; it returns data of `fromVersion + 1`. */
  fromVersion: number;
  upcast(data: Readonly<Record<string, unknown>>): Record<string, unknown>;
}

/** An event written by a newer release, or an old version with no upcaster: never guessed at. */
export class UnknownSchemaVersionError extends Error {
  override readonly name = 'UnknownSchemaVersionError';
  constructor(type: string, version: number, current: number) {
    super(`event ${type} has schema version ${version}, and this code reads version ${current} with no upcaster path from ${version}`);
  }
}

export class Upcasters {
  readonly #byKey = new Map<string, Upcaster>();
  readonly #current: Readonly<Record<string, number>>;

  /** `current`: the schema version this code writes and reads for each event type (default 1). */
  constructor(current: Readonly<Record<string, number>>, upcasters: readonly Upcaster[] = []) {
    this.#current = current;
    for (const u of upcasters) {
      const key = `${u.type}@${u.fromVersion}`;
      if (this.#byKey.has(key)) throw new Error(`two upcasters for ${key}`);
      this.#byKey.set(key, u);
    }
  }

  /** The version new events of `type` are written with. */
  currentVersion(type: string): number {
    return this.#current[type] ?? 1;
  }

  /** The event's data in the current schema version of its type. */
  upcast(type: string, schemaVersion: number, data: Readonly<Record<string, unknown>>): Record<string, unknown> {
    const current = this.currentVersion(type);
    if (schemaVersion > current) throw new UnknownSchemaVersionError(type, schemaVersion, current);
    let out: Record<string, unknown> = { ...data };
    for (let v = schemaVersion; v < current; v += 1) {
      const u = this.#byKey.get(`${type}@${v}`);
      if (u === undefined) throw new UnknownSchemaVersionError(type, schemaVersion, current);
      out = u.upcast(out);
    }
    return out;
  }
}
