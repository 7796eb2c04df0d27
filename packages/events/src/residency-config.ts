/**
 * Residency settings from environment variables, shared by the services (the outbox relay)
 * and the command lines (exports), so that the same text means the same policy everywhere:
 *
 * - EVENTS_RESIDENCY_POLICY: JSON, each data region mapped to the locations allowed to hold
 *   it, e.g. `{"eu":["eu-west-1","eu-central-1"]}`;
 * - a location: EVENTS_REGION (where this store runs, for exports) or EVENTS_BROKER_LOCATION
 *   (where the relay's JetStream stream lives).
 *
 * A bad value throws ResidencyConfigError naming the variable, so that a process stops at
 * start instead of publishing under a policy it misread.
 */
import type { ResidencyPolicy } from './store.ts';

export class ResidencyConfigError extends Error {
  override readonly name = 'ResidencyConfigError';
  readonly variable: string;
  constructor(variable: string, message: string) {
    super(`${variable} ${message}`);
    this.variable = variable;
  }
}

/** Data regions as `events.stream_regions` accepts them: a key that no tag can match is a typo. */
const DATA_REGION = /^[a-z][a-z0-9-]{0,31}$/;
/** Printable ASCII without spaces: a stray space would make a location match nothing. */
const LOCATION = /^[\x21-\x7e]{1,64}$/;
/** Keeps a pasted secret or a whole file out of the error message. */
const SHOWN_CHARS_MAX = 80;

function shown(text: string): string {
  return JSON.stringify(text.length > SHOWN_CHARS_MAX ? `${text.slice(0, SHOWN_CHARS_MAX)}...` : text);
}

/** EVENTS_RESIDENCY_POLICY (or `variable`), checked: an object of data region → array of locations. */
export function parseResidencyPolicy(text: string, variable = 'EVENTS_RESIDENCY_POLICY'): ResidencyPolicy {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw new ResidencyConfigError(variable, `is not JSON (got ${shown(text)})`);
  }
  const ok =
    parsed !== null && typeof parsed === 'object' && !Array.isArray(parsed) &&
    Object.values(parsed).every((v) => Array.isArray(v) && v.every((x) => typeof x === 'string'));
  if (!ok) throw new ResidencyConfigError(variable, 'must map each data region to an array of locations, e.g. {"eu":["eu-west-1"]}');
  const allowed = parsed as Record<string, string[]>;
  for (const [region, locations] of Object.entries(allowed)) {
    if (!DATA_REGION.test(region)) throw new ResidencyConfigError(variable, `names data region ${shown(region)}, which is not a region tag (${DATA_REGION.source})`);
    for (const l of locations) {
      if (!LOCATION.test(l)) throw new ResidencyConfigError(variable, `allows ${region} at location ${shown(l)}, which is not a location (1 to 64 printable characters, no spaces)`);
    }
  }
  return { allowed };
}

/** A location variable such as EVENTS_BROKER_LOCATION, checked. */
export function parseLocation(text: string, variable: string): string {
  if (!LOCATION.test(text)) throw new ResidencyConfigError(variable, `must be a location such as eu-west-1: 1 to 64 printable characters, no spaces (got ${shown(text)})`);
  return text;
}

/**
 * The relay's residency settings from EVENTS_RESIDENCY_POLICY and EVENTS_BROKER_LOCATION, as
 * strings where empty means unset. Neither set: null, no filtering. One without the other is an
 * error: a policy without the broker's location cannot be applied, and ignoring it would publish
 * everything while the operator believes the policy holds.
 */
export function relayResidencyFromEnv(env: { EVENTS_RESIDENCY_POLICY?: string; EVENTS_BROKER_LOCATION?: string }): { policy: ResidencyPolicy; location: string } | null {
  const policy = env.EVENTS_RESIDENCY_POLICY ?? '';
  const location = env.EVENTS_BROKER_LOCATION ?? '';
  if (policy === '' && location === '') return null;
  if (location === '') throw new ResidencyConfigError('EVENTS_BROKER_LOCATION', 'is required when EVENTS_RESIDENCY_POLICY is set: the relay checks the policy against where its broker lives');
  if (policy === '') throw new ResidencyConfigError('EVENTS_RESIDENCY_POLICY', 'is required when EVENTS_BROKER_LOCATION is set');
  return { policy: parseResidencyPolicy(policy), location: parseLocation(location, 'EVENTS_BROKER_LOCATION') };
}
