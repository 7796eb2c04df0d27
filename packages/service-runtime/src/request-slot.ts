/**
 * A value kept on each request for the hooks of one plugin, as a request decoration under a
 * symbol of its own. Fastify sets decorations in its Request constructor, so every request
 * keeps one shape. A WeakMap keyed by the request costs more: each entry is an ephemeron the
 * garbage collector must trace (about 50,000 instructions a request for the observability
 * hooks' two maps, counted by callgrind; bench/README.md). Each call makes a new slot: a
 * plugin registered twice gets two.
 */
import type { FastifyInstance, FastifyRequest } from 'fastify';

export interface RequestSlot<T> {
  get(request: FastifyRequest): T | undefined;
  set(request: FastifyRequest, value: T): void;
}

export function requestSlot<T>(app: FastifyInstance, description: string): RequestSlot<T> {
  const key = Symbol(description);
  app.decorateRequest(key, null);
  type Holder = Record<typeof key, T | null>;
  return {
    get: (request) => (request as unknown as Holder)[key] ?? undefined,
    set: (request, value) => {
      (request as unknown as Holder)[key] = value;
    },
  };
}
