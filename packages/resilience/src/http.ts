/**
 * HTTP calls through a `DependencyPolicy`: the deadline goes downstream in DEADLINE_HEADER,
 * the attempt's signal cancels the request, the body is read inside the attempt (so the
 * timeout covers it), and 5xx and 429 answers count as the dependency failing, as does a
 * connection that fails (`DependencyConnectionError`, wrapping undici's `TypeError: fetch failed`).
 */
import { DEADLINE_HEADER } from './deadline.ts';
import type { Deadline } from './deadline.ts';
import { DependencyConnectionError, DependencyHttpError, DependencyResponseTooLargeError } from './errors.ts';
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
      const response = await fetch(url, { method, headers, body: options.body, signal })
        .catch((error: unknown) => { throw connectionFailure(policy.name, error, signal); });
      const length = Number(response.headers.get('content-length') ?? 0);
      if (length > HTTP_BODY_BYTES_MAX) {
        await response.body?.cancel();
        throw new DependencyResponseTooLargeError(policy.name, `response body of ${length} bytes exceeds ${HTTP_BODY_BYTES_MAX}`, HTTP_BODY_BYTES_MAX);
      }
      const body = await boundedText(response, policy.name, signal);
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
async function boundedText(response: Response, name: string, signal: AbortSignal): Promise<string> {
  if (response.body === null) return '';
  const chunks: Uint8Array[] = [];
  let bytes = 0;
  const reader = (response.body as ReadableStream<Uint8Array>).getReader();
  for (;;) {
    const { done, value } = await reader.read().catch((error: unknown) => { throw connectionFailure(name, error, signal); });
    if (done) break;
    bytes += value.byteLength;
    if (bytes > HTTP_BODY_BYTES_MAX) {
      await reader.cancel();
      throw new DependencyResponseTooLargeError(name, `response body exceeds ${HTTP_BODY_BYTES_MAX} bytes`, HTTP_BODY_BYTES_MAX);
    }
    chunks.push(value);
  }
  return new TextDecoder().decode(Buffer.concat(chunks));
}

/** How far down a chain of `cause`s the network code is looked for. */
const CAUSE_DEPTH_MAX = 4;

/**
 * undici's codes for a call that went wrong on the way to or from the dependency. Not its
 * argument errors (UND_ERR_INVALID_ARG, UND_ERR_NOT_SUPPORTED: our bug) nor UND_ERR_ABORTED
 * (the call was aborted on purpose).
 */
const UNDICI_NOT_NETWORK = new Set(['UND_ERR_INVALID_ARG', 'UND_ERR_NOT_SUPPORTED', 'UND_ERR_ABORTED']);

/**
 * The network code under a failed fetch or body read: a system error (ECONNREFUSED, ENOTFOUND,
 * EAI_AGAIN, ...), an undici one (UND_ERR_SOCKET, UND_ERR_CONNECT_TIMEOUT, ...) or the HTTP
 * parser's (HPE_*, an answer that is not HTTP). Undefined for anything else: a malformed URL
 * or header (ERR_INVALID_URL, or no code at all) is a bug here, not the dependency failing.
 */
function networkCode(error: unknown): string | undefined {
  let e: unknown = error;
  for (let depth = 0; typeof e === 'object' && e !== null && depth < CAUSE_DEPTH_MAX; depth += 1) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === 'string' && isNetworkCode(code)) return code;
    e = (e as { cause?: unknown }).cause;
  }
  return undefined;
}

function isNetworkCode(code: string): boolean {
  if (code.startsWith('UND_ERR_')) return !UNDICI_NOT_NETWORK.has(code);
  if (code.startsWith('HPE_')) return true;
  // Node's own ERR_ codes are its API's errors, but for one: a connect that timed out.
  if (code.startsWith('ERR_')) return code === 'ERR_SOCKET_CONNECTION_TIMEOUT';
  return /^E[A-Z]+(?:_[A-Z]+)?$/.test(code);
}

/**
 * What a failed fetch or body read throws out of the attempt: the abort as it is when the
 * attempt was aborted (the policy reports its timeout or the caller's leaving), a
 * `DependencyConnectionError` when the network failed, and anything else unchanged.
 */
function connectionFailure(name: string, error: unknown, signal: AbortSignal): unknown {
  if (signal.aborted) return error;
  const code = networkCode(error);
  return code === undefined ? error : new DependencyConnectionError(name, code, error);
}
