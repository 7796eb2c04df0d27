/**
 * Parameters for set-based statements on the hot paths (the ledger's batch write, the event
 * append).
 */

/** Elements that an array literal may carry unquoted: integers and canonical UUIDs. */
const BARE_ELEMENT = /^(?:-?[0-9]+|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$/;
/** Elements that an array literal may carry in double quotes without escaping. */
const QUOTABLE_ELEMENT = /^[A-Za-z0-9_(),.-]*$/;

/**
 * A PostgreSQL array literal of integers, UUIDs or short codes, built in one pass, to pass as
 * one parameter: pg would otherwise quote and escape every element with two regular
 * expressions (measured: a few percent of the ledger engine's CPU). Codes and tuple ids go in
 * quotes, so that no code can read as the NULL keyword or split at its comma. The checks make
 * anything else a loud bug; free text belongs in a JSON array parameter instead.
 */
export function sqlArrayLiteral(values: ReadonlyArray<string | number | null>, quoted = false): string {
  let out = '{';
  for (let i = 0; i < values.length; i += 1) {
    const v = values[i];
    if (i > 0) out += ',';
    if (v === null || v === undefined) {
      out += 'NULL';
      continue;
    }
    const text = typeof v === 'number' ? String(v) : v;
    if (quoted ? !QUOTABLE_ELEMENT.test(text) : !BARE_ELEMENT.test(text)) {
      throw new Error(`invariant: not an array element here: ${JSON.stringify(text)}`);
    }
    out += quoted ? `"${text}"` : text;
  }
  return `${out}}`;
}

/**
 * Any text as a PostgreSQL string constant, for statements sent with the simple query
 * protocol, where values cannot travel as parameters. The escape-string form (`E'…'`) with
 * every backslash and quote doubled reads the same whatever `standard_conforming_strings` is,
 * so nothing in the text can end the constant early. The connection's client_encoding is
 * UTF8 (node-postgres sets it when it connects), in which no multibyte character can carry a
 * quote or backslash byte. A NUL cannot be written in a constant (nor stored in text), so one
 * is refused here instead of being cut off by the server.
 */
export function sqlLiteral(text: string): string {
  if (text.includes('\0')) throw new Error('invariant: a NUL character cannot travel in an SQL constant');
  return `E'${text.replaceAll('\\', '\\\\').replaceAll("'", "''")}'`;
}

/**
 * Text PostgreSQL stores as it is: well-formed UTF-16 (a lone surrogate has no UTF-8 form) and
 * no NUL (text, json and jsonb cannot hold one). Callers refuse anything else before it
 * reaches the database, where it would fail the whole statement.
 */
export function storableText(text: string): boolean {
  return text.isWellFormed() && !text.includes('\u0000');
}

/** `text` cut to at most `max` code units and made storable (storableText): a cut surrogate pair, a lone surrogate and NUL become U+FFFD. */
export function storablePrefix(text: string, max: number): string {
  return text.slice(0, max).toWellFormed().replaceAll('\u0000', '\ufffd');
}
