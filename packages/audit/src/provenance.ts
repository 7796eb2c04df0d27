/**
 * The records only the database makes (migration 1770200000000_queue-provenance.sql). The
 * change trigger on audit.retention_policies and the SECURITY DEFINER functions that place and
 * release holds, erase subjects and expire payloads queue their own governance records;
 * verification lets some of them excuse a removal (a retention shortening, a hold's release:
 * retention-in-force.ts). The services queue records of the same actions only as failures (a
 * refused release or erasure, store.ts). So a governance record of one of these actions that
 * says it succeeded, or any retention change, is integrated only when the role that queued it
 * could have been the database's code (`audit.queued_by_database`): otherwise it would be the
 * application's login claiming what only the database may say, and the sequencer records the
 * row as `audit.entry.rejected`, its text kept. (The application's login may still release a
 * hold through `audit.release_hold`, naming the requester it likes: that release is real, the
 * hold's row released too, and its record names the database login that ran it.)
 */

/** The actions whose successful governance records the database's own code queues, and nothing else. */
export const DATABASE_ACTIONS: ReadonlySet<string> = new Set(['audit.hold.place', 'audit.hold.release', 'audit.subject.erase', 'audit.retention.expire', 'audit.retention.change']);

/** Whether a queued entry is one only the database may queue (see above). */
export function onlyTheDatabaseQueues(entry: { recordClass: string; action: string; outcome: string }): boolean {
  if (entry.recordClass !== 'governance' || !DATABASE_ACTIONS.has(entry.action)) return false;
  return entry.outcome === 'success' || entry.action === 'audit.retention.change';
}

/** SQL: whether the queue row of alias `q` was queued by a role that could be the database's code. */
export const QUEUED_BY_DATABASE = (q: string): string => `audit.queued_by_database(${q}.queued_by)`;
