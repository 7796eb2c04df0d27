/**
 * HTTP calls through a `DependencyPolicy`: the deadline goes downstream in DEADLINE_HEADER,
 * the attempt's signal cancels the request, the body is read inside the attempt (so the
 * timeout covers it), and 5xx and 429 answers count as the dependency failing.
 */
import { DEADLINE_HEADER } from './deadline.ts';
import type { Deadline } from './deadline.ts';
import { DependencyHttpError } from './errors.ts';
import type { DependencyPolicy } from './policy.ts';

/** RFC 9110 §9.2.2: repeating these has the same effect as sending them once. */
const IDEMPOTENT_METHODS = new Set(['GET', 'HEAD', 'PUT', 'DELETE', 'OPTIONS']);

/** The largest response body read into memory; a bigger one fails the call. */
export const HTTP_BODY_BYTES_MAX = 4 * 1024 * 1024;

export interface HttpCallOptions {
  method?: string;
  headers?: Record<string, string>;
  body?: string;
  /** Default: true for GET, HEAD, PUT, DELETE and OPTIONS. A POST is retried only when it carries an idempotency key and says so. */
  idempotent?: boolean;
  deadline?: Deadline;
  signal?: AbortSignal;
  /** Adds headers to each attempt, e.g. the runtime's `injectTraceHeaders`. */
  injectHeaders?: (headers: Record<string, string>) => void;
  fallback?: (error: unknown) => HttpResult | Promise<HttpResult>;
}

export interface HttpResult {
  status: number;
  headers: Headers;
  body: string;
  /** True when a fallback produced this answer, not the dependency. */
  fallback?: boolean;
}

export async function httpCall(policy: DependencyPolicy, url: string | URL, options: HttpCallOptions = {}): Promise<HttpResult> {
  const method = (options.method ?? 'GET').toUpperCase();
  return policy.execute(
    async ({ signal, deadline }) => {
      const headers: Record<string, string> = { ...options.headers, [DEADLINE_HEADER]: deadline.toHeader() };
      options.injectHeaders?.(headers);
      const response = await fetch(url, { method, headers, body: options.body, signal });
      const length = Number(response.headers.get('content-length') ?? 0);
      if (length > HTTP_BODY_BYTES_MAX) {
        await response.body?.cancel();
        throw new Error(`${policy.name}: response body of ${length} bytes exceeds ${HTTP_BODY_BYTES_MAX}`);
      }
      const body = await boundedText(response, policy.name);
      if (response.status >= 500 || response.status === 429) throw new DependencyHttpError(policy.name, response.status);
      return { status: response.status, headers: response.headers, body };
    },
    {
      idempotent: options.idempotent ?? IDEMPOTENT_METHODS.has(method),
      ...(options.deadline === undefined ? {} : { deadline: options.deadline }),
      ...(options.signal === undefined ? {} : { signal: options.signal }),
      ...(options.fallback === undefined ? {} : { fallback: options.fallback }),
    },
  );
}

/**
 * The body as text, read chunk by chunk and given up past HTTP_BODY_BYTES_MAX: a chunked
 * answer, or one that understates its Content-Length, names no length to check beforehand.
 */
async function boundedText(response: Response, name: string): Promise<string> {
  if (response.body === null) return '';
  const chunks: Uint8Array[] = [];
  let bytes = 0;
  const reader = (response.body as ReadableStream<Uint8Array>).getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    bytes += value.byteLength;
    if (bytes > HTTP_BODY_BYTES_MAX) {
      await reader.cancel();
      throw new Error(`${name}: response body exceeds ${HTTP_BODY_BYTES_MAX} bytes`);
    }
    chunks.push(value);
  }
  return new TextDecoder().decode(Buffer.concat(chunks));
}
