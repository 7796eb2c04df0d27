/**
 * The application/json body parser every service gets from `createService`.
 *
 * Fastify's own parser is kept for what it does well (JSON.parse through secure-json-parse,
 * which refuses `__proto__` members and `constructor.prototype`), with the two checks it lacks:
 *
 * - The bytes must be UTF-8 (RFC 8259 §8.1). Decoding them leniently replaced each invalid
 *   sequence with U+FFFD, so a client's corrupted text was stored as if it had been sent.
 * - No object may name a member twice (RFC 8259 §4 leaves the meaning open; I-JSON, RFC 7493
 *   §2.3, forbids it). JSON.parse keeps the last one, so `"amount":"abc","amount":"7"` moved 7,
 *   while anything that reads the first (a gateway's filter, a log, another parser) saw "abc".
 *
 * No maintained npm parser refuses duplicates by itself: the choice was a second, general
 * parse of every body (an AST or a visitor) or this scanner, which only has to follow strings
 * and brackets because JSON.parse has already accepted the text.
 */
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { BodyRefusedError, PROBLEM_TYPES } from './problem-handlers.ts';

/** A member name that appears twice in one object. */
export interface DuplicateMember {
  /** JSON Pointer (RFC 6901) of the object; '' for the top-level value. */
  objectPointer: string;
  name: string;
  /** JSON Pointer of the member: the object's pointer and the name. */
  pointer: string;
}

/** An object or array the scanner is inside. */
interface Frame {
  parent: Frame | undefined;
  /** This container's member name or index in its parent. */
  key: string | number;
  /** An object's member names so far; undefined for an array. */
  names: Set<string> | undefined;
  /** An object: the next string is a member name (after `{` or `,`), not a value. */
  expectsName: boolean;
  /** An object: the last member name, which names the value being read. */
  name: string;
  /** An array: the index of the element being read. */
  index: number;
}

const QUOTE = 0x22;
const BACKSLASH = 0x5c;
const COMMA = 0x2c;
const OPEN_OBJECT = 0x7b;
const CLOSE_OBJECT = 0x7d;
const OPEN_ARRAY = 0x5b;
const CLOSE_ARRAY = 0x5d;

/**
 * The first member name repeated within one object of `text`, in text order, or undefined.
 * Names are compared as JSON.parse decodes them, so `"a"` and `"\u0061"` are the same name.
 * `text` must be JSON that JSON.parse accepts: the scanner follows strings and brackets only.
 * It keeps its own stack, so nesting depth costs memory (bounded by the body limit), not the
 * call stack.
 */
export function findDuplicateMember(text: string): DuplicateMember | undefined {
  let top: Frame | undefined;
  for (let i = 0; i < text.length; i += 1) {
    const c = text.charCodeAt(i);
    if (c === QUOTE) {
      const close = closingQuote(text, i);
      if (top?.names !== undefined && top.expectsName) {
        const raw = text.slice(i + 1, close);
        // Most names have no escape; those that do are decoded as JSON.parse decoded them.
        const name = raw.includes('\\') ? (JSON.parse(text.slice(i, close + 1)) as string) : raw;
        if (top.names.has(name)) return duplicate(top, name);
        top.names.add(name);
        top.name = name;
        top.expectsName = false;
      }
      i = close;
    } else if (c === OPEN_OBJECT || c === OPEN_ARRAY) {
      const key = top === undefined ? '' : top.names === undefined ? top.index : top.name;
      const isObject = c === OPEN_OBJECT;
      top = { parent: top, key, names: isObject ? new Set() : undefined, expectsName: isObject, name: '', index: 0 };
    } else if (c === CLOSE_OBJECT || c === CLOSE_ARRAY) {
      top = top?.parent;
    } else if (c === COMMA && top !== undefined) {
      if (top.names === undefined) top.index += 1;
      else top.expectsName = true;
    }
    // Anything else (whitespace, ':', numbers, true, false, null) says nothing about names.
  }
  return undefined;
}

/** The index of the quote that closes the string opening at `open` (one not escaped by a backslash). */
function closingQuote(text: string, open: number): number {
  for (let close = text.indexOf('"', open + 1); close !== -1; close = text.indexOf('"', close + 1)) {
    let backslashes = 0;
    while (text.charCodeAt(close - 1 - backslashes) === BACKSLASH) backslashes += 1;
    if (backslashes % 2 === 0) return close;
  }
  throw new Error('invariant: findDuplicateMember was given an unterminated string; it takes JSON that parsed');
}

function duplicate(frame: Frame, name: string): DuplicateMember {
  let objectPointer = '';
  for (let f: Frame = frame; f.parent !== undefined; f = f.parent) objectPointer = `/${pointerToken(String(f.key))}${objectPointer}`;
  return { objectPointer, name, pointer: `${objectPointer}/${pointerToken(name)}` };
}

/** RFC 6901 escaping of one reference token. */
function pointerToken(name: string): string {
  return name.replaceAll('~', '~0').replaceAll('/', '~1');
}

function malformed(detail: string, extensions?: Readonly<Record<string, unknown>>): BodyRefusedError {
  return new BodyRefusedError({ status: 400, type: PROBLEM_TYPES.malformedJson, title: 'Malformed JSON', detail, ...(extensions === undefined ? {} : { extensions }) });
}

/**
 * Fatal: an invalid sequence is an error, not U+FFFD. A leading byte-order mark is dropped, as
 * Fastify's parser dropped it (RFC 8259 §8.1 lets a parser ignore one).
 */
const UTF8 = new TextDecoder('utf-8', { fatal: true });

/** Replaces Fastify's application/json parser on `app` (see the top of this file). */
export function installJsonBodyParser(app: FastifyInstance): void {
  // Fastify's defaults, passed explicitly: a `__proto__` member or `constructor.prototype` is an
  // error. Its type allows a promise-returning parser too; the default is the callback form.
  const parse = app.getDefaultJsonParser('error', 'error') as (request: FastifyRequest, body: string, done: (error: Error | null, value?: unknown) => void) => void;
  app.addContentTypeParser('application/json', { parseAs: 'buffer' }, (request, body, done) => {
    let text: string;
    try {
      text = UTF8.decode(body as Buffer);
    } catch {
      done(malformed('The request body is not valid UTF-8.'), undefined);
      return;
    }
    // The default parser answers synchronously, through this callback.
    parse(request, text, (error, value) => {
      if (error !== null) {
        done(error, undefined);
        return;
      }
      const repeated = findDuplicateMember(text);
      if (repeated === undefined) {
        done(null, value);
        return;
      }
      const where = repeated.objectPointer === '' ? 'the top-level object' : `the object at ${repeated.objectPointer}`;
      done(
        malformed(`The member ${JSON.stringify(repeated.name)} appears more than once in ${where}; a name may appear once per object (RFC 8259 §4, RFC 7493 §2.3).`, {
          errors: [{ in: 'body', path: repeated.pointer, message: 'is a duplicate member name' }],
        }),
        undefined,
      );
    });
  });
}
