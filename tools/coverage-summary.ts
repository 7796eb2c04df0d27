/**
 * Turns the test run's lcov file into a per-package coverage summary and enforces the
 * ledger's line-coverage floor (issue 2: the run fails below 95% of the ledger's lines).
 *
 *   node tools/coverage-summary.ts
 *
 * Reads reports/lcov.info, writes reports/coverage-summary.json, prints a table, and exits
 * 1 when packages/ledger is under COVERAGE_LEDGER_MIN_LINES percent (default 95), or 2 when
 * its input is missing or its configuration is invalid.
 *
 * Node's coverage only knows the files some test loaded. A source file that no test imports
 * would simply be absent and the percentage would look better than it is, so every source
 * file under packages/<name>/src and services/<name>/src that lcov does not mention is
 * counted here as fully uncovered, with its runtime lines estimated (types stripped, blank
 * and comment lines dropped), and listed by name.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { stripTypeScriptTypes } from 'node:module';
import { isAbsolute, join, relative, sep } from 'node:path';

const ROOT = join(import.meta.dirname, '..');
const LCOV_PATH = join(ROOT, 'reports', 'lcov.info');
const SUMMARY_PATH = join(ROOT, 'reports', 'coverage-summary.json');
const GATED_PACKAGE = 'packages/ledger';
const GATE_ENV = 'COVERAGE_LEDGER_MIN_LINES';
const GATE_DEFAULT_PCT = 95;
const PACKAGE_ROOTS = ['packages', 'services'] as const;
/** Files outside packages/<name>/ and services/<name>/ (none are expected) land here. */
const OTHER = '(other)';

interface Counts {
  found: number;
  hit: number;
}

interface FileCoverage {
  file: string;
  package: string;
  loaded: boolean;
  lines: Counts;
  functions: Counts;
  branches: Counts;
}

function fail(exitCode: number, message: string): never {
  process.stderr.write(`coverage:check: ${message}\n`);
  process.exit(exitCode);
}

function readThresholdPct(): number {
  const raw = process.env[GATE_ENV];
  if (raw === undefined || raw.trim() === '') return GATE_DEFAULT_PCT;
  const value = Number(raw);
  if (!Number.isFinite(value) || value < 0 || value > 100) {
    fail(2, `${GATE_ENV} must be a number from 0 to 100, got ${JSON.stringify(raw)}`);
  }
  return value;
}

function toPosix(path: string): string {
  return path.split(sep).join('/');
}

function repoRelative(path: string): string {
  return toPosix(isAbsolute(path) ? relative(ROOT, path) : path);
}

function packageOf(file: string): string {
  const [root, name, ...rest] = file.split('/');
  if (root !== undefined && (PACKAGE_ROOTS as readonly string[]).includes(root)) {
    if (name !== undefined && rest.length > 0) return `${root}/${name}`;
  }
  return OTHER;
}

function pct(counts: Counts): number | null {
  if (counts.found === 0) return null;
  // Rounded down, so a coverage just under the floor never displays as the floor itself.
  return Math.floor((counts.hit * 10_000) / counts.found) / 100;
}

function add(into: Counts, from: Counts): void {
  into.found += from.found;
  into.hit += from.hit;
}

/**
 * Parses lcov: SF starts a record, DA lines are per-line hit counts, FNF/FNH and BRF/BRH
 * are totals, end_of_record ends it. DA lines decide the line counts; LF/LH are only a
 * fallback, since one source file may appear in several records and must be merged by line.
 */
function parseLcov(text: string): Map<string, FileCoverage> {
  const files = new Map<string, FileCoverage>();
  const linesByFile = new Map<string, Map<number, number>>();
  let current: FileCoverage | null = null;
  let currentLines: Map<number, number> | null = null;
  let summaryLines: Counts | null = null;

  for (const rawLine of text.split('\n')) {
    const line = rawLine.trim();
    if (line.startsWith('SF:')) {
      const file = repoRelative(line.slice(3));
      current = files.get(file) ?? {
        file,
        package: packageOf(file),
        loaded: true,
        lines: { found: 0, hit: 0 },
        functions: { found: 0, hit: 0 },
        branches: { found: 0, hit: 0 },
      };
      files.set(file, current);
      currentLines = linesByFile.get(file) ?? new Map<number, number>();
      linesByFile.set(file, currentLines);
      summaryLines = { found: 0, hit: 0 };
      continue;
    }
    if (current === null || currentLines === null || summaryLines === null) continue;
    const [tag, value = ''] = line.split(/:(.*)/s, 2);
    switch (tag) {
      case 'DA': {
        const [lineNo, count] = value.split(',');
        const n = Number(lineNo);
        const hits = Number(count);
        if (Number.isInteger(n) && Number.isFinite(hits)) {
          currentLines.set(n, Math.max(currentLines.get(n) ?? 0, hits));
        }
        break;
      }
      case 'LF':
        summaryLines.found = Number(value) || 0;
        break;
      case 'LH':
        summaryLines.hit = Number(value) || 0;
        break;
      case 'FNF':
        current.functions.found += Number(value) || 0;
        break;
      case 'FNH':
        current.functions.hit += Number(value) || 0;
        break;
      case 'BRF':
        current.branches.found += Number(value) || 0;
        break;
      case 'BRH':
        current.branches.hit += Number(value) || 0;
        break;
      case 'end_of_record':
        if (currentLines.size === 0) add(current.lines, summaryLines);
        current = null;
        currentLines = null;
        summaryLines = null;
        break;
      default:
        break;
    }
  }
  for (const [file, lines] of linesByFile) {
    const entry = files.get(file);
    if (entry === undefined || lines.size === 0) continue;
    entry.lines = {
      found: lines.size,
      hit: [...lines.values()].filter((hits) => hits > 0).length,
    };
  }
  return files;
}

function listSourceFiles(): string[] {
  const result: string[] = [];
  for (const root of PACKAGE_ROOTS) {
    const rootDir = join(ROOT, root);
    if (!existsSync(rootDir)) continue;
    for (const entry of readdirSync(rootDir, { withFileTypes: true })) {
      if (!entry.isDirectory()) continue;
      const srcDir = join(rootDir, entry.name, 'src');
      if (!existsSync(srcDir)) continue;
      for (const name of readdirSync(srcDir, { recursive: true, encoding: 'utf8' })) {
        const isSource = /\.(ts|mts|js|mjs)$/.test(name) && !/\.d\.ts$|\.test\.[mc]?[jt]s$/.test(name);
        if (isSource && !name.split(sep).includes('node_modules')) {
          result.push(toPosix(join(root, entry.name, 'src', name)));
        }
      }
    }
  }
  return result.sort();
}

/** stripTypeScriptTypes is experimental in Node 24 and says so on every first call. */
function stripTypes(source: string): string {
  const emitWarning = process.emitWarning.bind(process);
  process.emitWarning = () => undefined;
  try {
    return stripTypeScriptTypes(source, { mode: 'strip' });
  } catch {
    return source;
  } finally {
    process.emitWarning = emitWarning;
  }
}

/** An estimate of the lines that would run: what remains after types and comments go. */
function estimateRuntimeLines(file: string): number {
  const source = readFileSync(join(ROOT, file), 'utf8');
  const code = file.endsWith('ts') ? stripTypes(source) : source;
  let count = 0;
  let inBlockComment = false;
  for (const rawLine of code.split('\n')) {
    const line = rawLine.trim();
    if (inBlockComment) {
      if (line.includes('*/')) {
        inBlockComment = false;
        if (line.slice(line.indexOf('*/') + 2).trim() !== '') count += 1;
      }
      continue;
    }
    if (line === '' || line.startsWith('//')) continue;
    if (line.startsWith('/*')) {
      const end = line.indexOf('*/', 2);
      if (end === -1) inBlockComment = true;
      else if (line.slice(end + 2).trim() !== '') count += 1;
      continue;
    }
    count += 1;
  }
  return count;
}

function main(): void {
  const thresholdPct = readThresholdPct();
  if (!existsSync(LCOV_PATH)) {
    fail(
      2,
      `${repoRelative(LCOV_PATH)} not found. Run \`npm test\` first: it writes the lcov ` +
        'report with Node\'s --experimental-test-coverage.',
    );
  }
  const files = parseLcov(readFileSync(LCOV_PATH, 'utf8'));

  for (const file of listSourceFiles()) {
    if (files.has(file)) continue;
    files.set(file, {
      file,
      package: packageOf(file),
      loaded: false,
      lines: { found: estimateRuntimeLines(file), hit: 0 },
      functions: { found: 0, hit: 0 },
      branches: { found: 0, hit: 0 },
    });
  }

  const packages = new Map<
    string,
    { lines: Counts; functions: Counts; branches: Counts; files: number; unloaded: string[] }
  >();
  const totals = { lines: { found: 0, hit: 0 }, functions: { found: 0, hit: 0 }, branches: { found: 0, hit: 0 } };
  const sortedFiles = [...files.values()].sort((a, b) => a.file.localeCompare(b.file));
  for (const f of sortedFiles) {
    const pkg = packages.get(f.package) ?? {
      lines: { found: 0, hit: 0 },
      functions: { found: 0, hit: 0 },
      branches: { found: 0, hit: 0 },
      files: 0,
      unloaded: [],
    };
    packages.set(f.package, pkg);
    add(pkg.lines, f.lines);
    add(pkg.functions, f.functions);
    add(pkg.branches, f.branches);
    pkg.files += 1;
    if (!f.loaded) pkg.unloaded.push(f.file);
    add(totals.lines, f.lines);
    add(totals.functions, f.functions);
    add(totals.branches, f.branches);
  }

  const gated = packages.get(GATED_PACKAGE);
  const gatedPct = gated === undefined ? null : pct(gated.lines);
  const gatePassed =
    gated !== undefined && gated.lines.found > 0 && gated.lines.hit * 100 >= thresholdPct * gated.lines.found;

  const describe = (c: Counts) => ({ found: c.found, hit: c.hit, pct: pct(c) });
  const summary = {
    generated_at: new Date().toISOString(),
    lcov: repoRelative(LCOV_PATH),
    gate: {
      package: GATED_PACKAGE,
      metric: 'lines',
      min_pct: thresholdPct,
      actual_pct: gatedPct,
      passed: gatePassed,
    },
    totals: {
      lines: describe(totals.lines),
      functions: describe(totals.functions),
      branches: describe(totals.branches),
    },
    packages: Object.fromEntries(
      [...packages.entries()]
        .sort(([a], [b]) => a.localeCompare(b))
        .map(([name, p]) => [
          name,
          {
            lines: describe(p.lines),
            functions: describe(p.functions),
            branches: describe(p.branches),
            files: p.files,
            files_not_loaded_by_any_test: p.unloaded,
          },
        ]),
    ),
    files: sortedFiles.map((f) => ({
      file: f.file,
      package: f.package,
      loaded: f.loaded,
      lines: describe(f.lines),
      functions: describe(f.functions),
      branches: describe(f.branches),
    })),
  };
  mkdirSync(join(ROOT, 'reports'), { recursive: true });
  writeFileSync(SUMMARY_PATH, `${JSON.stringify(summary, null, 2)}\n`);

  const show = (c: Counts): string => {
    const p = pct(c);
    return p === null ? '-' : `${p.toFixed(2)}%`;
  };
  type Row = [string, string, string, string, string];
  const header: Row = ['package', 'lines hit/found', 'lines', 'branches', 'functions'];
  const row = (name: string, p: { lines: Counts; branches: Counts; functions: Counts }): Row => [
    name,
    `${p.lines.hit}/${p.lines.found}`,
    show(p.lines),
    show(p.branches),
    show(p.functions),
  ];
  const body = [...packages.entries()]
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([name, p]) => row(name, p));
  const footer = row('total', totals);
  const widths = header.map((_, i) => Math.max(...[header, ...body, footer].map((r) => r[i]?.length ?? 0)));
  const format = (r: Row): string =>
    r.map((cell, i) => (i === 0 ? cell.padEnd(widths[i] ?? 0) : cell.padStart(widths[i] ?? 0))).join('  ');
  const rule = widths.map((w) => '-'.repeat(w)).join('  ');
  const lines = [format(header), rule, ...body.map(format), rule, format(footer)];
  process.stdout.write(`Coverage by package (from ${repoRelative(LCOV_PATH)})\n${lines.join('\n')}\n`);

  const unloaded = sortedFiles.filter((f) => !f.loaded);
  if (unloaded.length > 0) {
    process.stdout.write('\nNot loaded by any test (counted as 0% with estimated lines):\n');
    for (const f of unloaded) process.stdout.write(`  ${f.file} (${f.lines.found} lines)\n`);
  }
  process.stdout.write(`\nWrote ${repoRelative(SUMMARY_PATH)}\n`);

  if (gated === undefined || gated.lines.found === 0) {
    fail(1, `no line coverage recorded for ${GATED_PACKAGE}; the gate needs at least one covered line`);
  }
  if (!gatePassed) {
    fail(
      1,
      `${GATED_PACKAGE} covers ${show(gated.lines)} of its lines (${gated.lines.hit}/${gated.lines.found}), ` +
        `below the required ${thresholdPct}% (${GATE_ENV})`,
    );
  }
  process.stdout.write(`${GATED_PACKAGE} line coverage ${show(gated.lines)} >= ${thresholdPct}%: ok\n`);
}

main();
