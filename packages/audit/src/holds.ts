/**
 * The audit trail's legal holds, for the retention of other stores. A hold placed here (`npm run
 * audit -- hold place`, AuditStore#placeHold) on a resource keeps that resource's data
 * everywhere, not only its audit records: packages/eventsourcing's `applyRetention` asks this
 * before it archives or deletes an event stream.
 */
import type pg from 'pg';

type Queryable = Pick<pg.ClientBase, 'query'>;

/** An event stream, as retention names it. */
export interface HeldStream {
  streamType: string;
  streamId: string;
}

/** The audit resource a stream's data belongs to. */
export interface HeldResource {
  type: string;
  id: string;
}

/**
 * A LegalHolds implementation backed by `audit.legal_holds`: a stream is held while an active
 * hold names its resource. By default a stream is its own resource (`ticket`/`t-1` is held by a
 * hold on resource type `ticket`, id `t-1`); `resourceOf` maps stream types whose audit
 * resources are named differently. The hold row is read FOR SHARE inside the caller's
 * transaction, so a release cannot commit while the stream is being kept or removed on the
 * strength of it.
 */
export function auditLegalHolds(resourceOf: (stream: HeldStream) => HeldResource = (s) => ({ type: s.streamType, id: s.streamId })): {
  isHeld(db: Queryable, stream: HeldStream): Promise<boolean>;
} {
  return {
    async isHeld(db, stream) {
      const resource = resourceOf(stream);
      const r = await db.query(
        `SELECT 1 FROM audit.legal_holds
          WHERE released_at IS NULL AND resource_type = $1 AND resource_id = $2
          LIMIT 1 FOR SHARE`,
        [resource.type, resource.id],
      );
      return r.rows.length > 0;
    },
  };
}
