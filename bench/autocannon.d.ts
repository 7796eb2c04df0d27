/**
 * The part of autocannon 9's API that bench/http.ts uses (the package ships no types).
 * See node_modules/autocannon/README.md, "API".
 */
declare module 'autocannon' {
  import type { EventEmitter } from 'node:events';

  /** Per-connection state, reset before each pass over `requests`. */
  export type AutocannonContext = Record<string, unknown>;

  export interface AutocannonRequest {
    method?: string;
    path?: string;
    headers?: Record<string, string>;
    body?: string | Buffer;
    /** Called before each request is sent; returns the request to send (a falsy value resets). */
    setupRequest?: (request: AutocannonRequest, context: AutocannonContext) => AutocannonRequest | null | undefined;
    /** Called with each complete response, before the connection's next request is built. */
    onResponse?: (status: number, body: string, context: AutocannonContext, headers: Record<string, unknown>) => void;
  }

  export interface AutocannonOptions {
    url: string | string[];
    connections?: number;
    /** Seconds. */
    duration?: number;
    /** Seconds to wait for a response before the connection is reset and an error counted. */
    timeout?: number;
    pipelining?: number;
    method?: string;
    headers?: Record<string, string>;
    requests?: AutocannonRequest[];
  }

  export interface AutocannonHistogram {
    average: number;
    mean: number;
    min: number;
    max: number;
    p50: number;
    p99: number;
    p99_9: number;
    total: number;
  }

  export interface AutocannonResult {
    /** Connection errors, including timeouts. */
    errors: number;
    timeouts: number;
    non2xx: number;
    /** Seconds. */
    duration: number;
    latency: AutocannonHistogram;
    requests: AutocannonHistogram;
    statusCodeStats: Record<string, { count: number }>;
  }

  export interface AutocannonInstance extends EventEmitter {
    stop(): void;
  }

  export default function autocannon(
    options: AutocannonOptions,
    callback: (error: Error | null, result: AutocannonResult) => void,
  ): AutocannonInstance;
}
