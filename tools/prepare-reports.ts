/**
 * Runs before the test suite: makes sure reports/ exists and removes the previous run's
 * results, so that a run which dies early can never leave an older, passing coverage file
 * behind for `npm run coverage:check` to read.
 */
import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';

const reportsDir = join(import.meta.dirname, '..', 'reports');
mkdirSync(reportsDir, { recursive: true });
for (const name of ['test-results.json', 'lcov.info', 'coverage-summary.json']) {
  rmSync(join(reportsDir, name), { force: true });
}
