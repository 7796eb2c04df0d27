/**
 * A reporter for Node's test runner that writes one JSON document: a summary and one entry
 * per test. Node ships no JSON reporter; CI keeps this file as the machine-readable record
 * of a run (`--test-reporter=./tools/json-reporter.ts --test-reporter-destination=...`).
 *
 * Suites are not entries: their pass or fail is the sum of their tests, and counting them
 * too would inflate the totals. A file that fails to load still appears, as the failing
 * test Node reports for it, so a broken file can never vanish from the report.
 */
import { relative } from 'node:path';
import { inspect } from 'node:util';
import type { TestEvent } from 'node:test/reporters';

type Status = 'passed' | 'failed' | 'skipped' | 'todo' | 'cancelled';

interface TestEntry {
  name: string;
  /** Names of the enclosing suites or tests, outermost first. */
  path: string[];
  file: string | null;
  line: number | null;
  status: Status;
  duration_ms: number;
  error: string | null;
}

interface Report {
  summary: {
    tests: number;
    passed: number;
    failed: number;
    skipped: number;
    todo: number;
    cancelled: number;
    duration_ms: number;
    success: boolean;
  };
  tests: TestEntry[];
}

/** Bounds what one failure can add to the report; a huge assertion diff is not useful here. */
const ERROR_CHARS_MAX = 4_000;

function relativeFile(file: string | undefined): string | null {
  if (file === undefined) return null;
  const path = file.startsWith('file://') ? new URL(file).pathname : file;
  return relative(process.cwd(), path) || path;
}

/** Node wraps what the test threw in an ERR_TEST_FAILURE whose `cause` is the real error. */
function errorMessage(error: unknown): string {
  let inner: unknown = error;
  if (error instanceof Error && error.cause !== undefined) inner = error.cause;
  let text: string;
  if (inner instanceof Error) text = inner.message || inner.name;
  else if (typeof inner === 'string') text = inner;
  else text = inspect(inner, { depth: 4 });
  return text.length > ERROR_CHARS_MAX ? `${text.slice(0, ERROR_CHARS_MAX)}…` : text;
}

function isCancelled(error: unknown): boolean {
  return (
    typeof error === 'object' &&
    error !== null &&
    'failureType' in error &&
    (error.failureType === 'cancelledByParent' || error.failureType === 'testTimeoutFailure')
  );
}

export default async function* jsonReporter(
  source: AsyncIterable<TestEvent>,
): AsyncGenerator<string, void> {
  const startedMs = performance.now();
  const tests: TestEntry[] = [];
  // Every test seen, by file and testId, so each entry can carry the names of its ancestors.
  // Ids are only unique within one file's process, hence the file in the key.
  const seen = new Map<string, { name: string; parentId: number | undefined }>();
  const key = (file: string | undefined, testId: number | undefined): string =>
    `${file ?? ''}\0${testId ?? 0}`;
  const ancestors = (file: string | undefined, parentId: number | undefined): string[] => {
    const names: string[] = [];
    let id = parentId;
    // Bounded by the nesting depth; the guard stops a malformed event stream from looping.
    for (let depth = 0; id !== undefined && id !== 0 && depth < 1_000; depth += 1) {
      const parent = seen.get(key(file, id));
      if (parent === undefined) break;
      names.unshift(parent.name);
      id = parent.parentId;
    }
    return names;
  };
  // A file that fails to load is reported only as "test failed"; the reason is on its stderr.
  const stderrByFile = new Map<string, string>();
  let runDurationMs: number | null = null;
  let runSuccess: boolean | null = null;

  for await (const event of source) {
    switch (event.type) {
      case 'test:start':
        seen.set(key(event.data.file, event.data.testId), {
          name: event.data.name,
          parentId: event.data.parentId,
        });
        break;
      case 'test:stderr': {
        // Keep the tail: a crash's reason is the last thing a dying process writes.
        const file = relativeFile(event.data.file) ?? '';
        const previous = stderrByFile.get(file) ?? '';
        stderrByFile.set(file, (previous + event.data.message).slice(-ERROR_CHARS_MAX));
        break;
      }
      case 'test:pass':
      case 'test:fail': {
        const { data } = event;
        if (data.details.type === 'suite') break;
        let status: Status;
        let error: string | null = null;
        if (event.type === 'test:fail') {
          status = isCancelled(event.data.details.error) ? 'cancelled' : 'failed';
          error = errorMessage(event.data.details.error);
          const file = relativeFile(data.file);
          const stderr = file === null ? undefined : stderrByFile.get(file);
          if (data.nesting === 0 && file !== null && data.name === file && stderr !== undefined) {
            error = `${error}\n${stderr.trim()}`;
          }
        } else if (data.skip !== undefined && data.skip !== false) {
          status = 'skipped';
        } else if (data.todo !== undefined && data.todo !== false) {
          status = 'todo';
        } else {
          status = 'passed';
        }
        tests.push({
          name: data.name,
          path: ancestors(data.file, data.parentId),
          file: relativeFile(data.file),
          line: data.line ?? null,
          status,
          duration_ms: Math.round(data.details.duration_ms * 1000) / 1000,
          error,
        });
        break;
      }
      case 'test:summary':
        // Node emits one summary per file and a last one for the whole run (file undefined).
        if (event.data.file === undefined) {
          runDurationMs = event.data.duration_ms;
          runSuccess = event.data.success;
        }
        break;
      default:
        break;
    }
  }

  const count = (status: Status): number => tests.filter((t) => t.status === status).length;
  const failed = count('failed');
  const cancelled = count('cancelled');
  const report: Report = {
    summary: {
      tests: tests.length,
      passed: count('passed'),
      failed,
      skipped: count('skipped'),
      todo: count('todo'),
      cancelled,
      duration_ms: Math.round((runDurationMs ?? performance.now() - startedMs) * 1000) / 1000,
      success: runSuccess ?? (failed === 0 && cancelled === 0),
    },
    tests,
  };
  yield `${JSON.stringify(report, null, 2)}\n`;
}
