/**
 * The decider pattern: an aggregate's rules are two pure functions and a starting state.
 * `decide` turns a command and the current state into new events (or throws a rejection);
 * `evolve` folds one event into the state. Storage, snapshots and projections wrap around
 * them (aggregate.ts), so the rules are tested without a database.
 */

/** A domain event as the rules see it; `data` must be JSON (amounts as strings). */
export interface DomainEvent {
  type: string;
  data: Record<string, unknown>;
}

export interface Decider<Command, Event extends DomainEvent, State> {
  initialState: State;
  /** Pure. Returns the events the command causes; throws DomainRejection to refuse it. */
  decide(command: Command, state: State): Event[];
  /** Pure. The state after `event`; never rejects (the event already happened). */
  evolve(state: State, event: Event): State;
}

/** A command refused by the rules. `code` is stable and machine-readable; nothing was written. */
export class DomainRejection extends Error {
  override readonly name = 'DomainRejection';
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.code = code;
  }
}

/** Folds events into a state, left to right. */
export function fold<Event extends DomainEvent, State>(
  decider: Pick<Decider<unknown, Event, State>, 'evolve'>,
  state: State,
  events: readonly Event[],
): State {
  let s = state;
  for (const e of events) s = decider.evolve(s, e);
  return s;
}
