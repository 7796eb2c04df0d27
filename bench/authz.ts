/**
 * Authorization benchmark (REQUIREMENTS §7: an authorization check adds at most 5 ms; issue 6
 * targets 50 µs per decision).
 *
 *   npm run bench:authz -- [--decisions 200000] [--verifies 2000] [--seconds 5] [--rounds 3]
 *                          [--connections 32] [--accounts 1000] [--seed N] [--no-http] [--no-audit]
 *
 * 1. Decisions: `Authorizer.check` on the reference policy (the decision and its audit record,
 *    handed to a sink that drops it), over a seeded mix of every role, permission and condition;
 *    each call timed on its own. `decide_only_*` is the compiled policy without the record.
 * 2. Token verification: distinct Ed25519 access tokens through `createTokenVerifier` with its
 *    cache off (every one a signature check), then one token again and again (the cache).
 * 3. HTTP: a fresh database and two ledger services (`services/ledger/src/main.ts`), one with
 *    LEDGER_AUTH=disabled and one verifying tokens against a JWKS this process serves; the
 *    outbox relay is off in both so that only auth differs. POST /v1/transfers with a
 *    svc:payments token, one fresh transfer per request, in alternating phases (off, on, on,
 *    off, ...) so drift in the shared machine's load falls on both alike. The load averages are
 *    printed beside each phase, and the CPU time per transfer (both service processes and every
 *    PostgreSQL backend of the run's database, from /proc), which the machine's load distorts
 *    far less than throughput does. With auth on, every decision is also an audit record, so the
 *    cost includes writing it; `--no-audit` turns the audit trail off in both services
 *    (AUDIT_ENABLED=false) to show the cost of verifying and deciding alone.
 *
 * Progress goes to stderr; the last line on stdout is one JSON object.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { createServer as createHttpServer, type Server } from 'node:http';
import { loadavg } from 'node:os';
import { createHistogram, type RecordableHistogram } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import autocannon, { type AutocannonRequest, type AutocannonResult } from 'autocannon';
import { importJWK } from 'jose';
import type { AuditEntry, AuditSink } from '../packages/audit/src/index.ts';
import { ALL_ROLES, Authorizer, compilePolicy, PERMISSIONS, REFERENCE_POLICY, type Permission, type Principal, type ResourceAttributes } from '../packages/authz/src/index.ts';
import { createTokenVerifier, localKeys, newSigningKey, signAccessToken } from '../packages/identity/src/index.ts';
import { newId } from '../packages/ledger/src/index.ts';
import { createTestDatabase, freePort } from '../packages/testing/src/index.ts';
import { benchLog, exitWhenDone, intArg, prng, seedArg } from './common.ts';

const log = benchLog('authz');
const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url));
const ISSUER = 'https://bench.identity';
/** A Monday, 10:00 UTC: the tellers' hours rule then has to compute the weekday and minute. */
const MONDAY_10 = Date.UTC(2026, 10, 23, 10, 0);
const SERVICE_START_TIMEOUT_MS = 30_000;
/** Idle time before each phase, so that work the previous phase left behind (the audit sequencer's backlog) is not billed to this one. */
const SETTLE_MS = 3000;

const { values } = parseArgs({
  options: {
    decisions: { type: 'string' },
    verifies: { type: 'string' },
    seconds: { type: 'string' },
    rounds: { type: 'string' },
    connections: { type: 'string' },
    accounts: { type: 'string' },
    seed: { type: 'string' },
    'no-http': { type: 'boolean', default: false },
    'no-audit': { type: 'boolean', default: false },
  },
});
const decisionsN = intArg('decisions', values.decisions, 200_000, 1000);
const verifiesN = intArg('verifies', values.verifies, 2000, 100);
const seconds = intArg('seconds', values.seconds, 5, 1);
const rounds = intArg('rounds', values.rounds, 3, 1);
const connections = intArg('connections', values.connections, 32, 1);
const accountsN = intArg('accounts', values.accounts, 1000, 2);
const seed = seedArg(values.seed);

/** Counts and drops: the cost measured is building the record, not storing it. */
class DroppingSink implements AuditSink {
  recorded = 0;
  record(_entry: AuditEntry): void {
    this.recorded += 1;
  }
  flush(): Promise<void> {
    return Promise.resolve();
  }
}

const us = (h: RecordableHistogram, p: number): number => Math.round(h.percentile(p) / 10) / 100;
const load = (): string => loadavg().map((l) => l.toFixed(2)).join(' ');

interface Case {
  principal: Principal;
  permission: Permission;
  resource: ResourceAttributes;
}

/** A seeded mix: every role, every permission, amounts across the limits, owned and foreign accounts, several ledgers. */
function cases(random: () => number, n: number): Case[] {
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(random() * xs.length)] as T;
  const permissions = Object.values(PERMISSIONS);
  return Array.from({ length: n }, (_, i) => {
    const role = pick(ALL_ROLES);
    const id = `p${i % 97}`;
    return {
      principal: { id, kind: role.startsWith('svc:') ? 'service' : 'user', roles: [role] },
      permission: pick(permissions),
      resource: { type: 'transfer', id: `t${i}`, amount: BigInt(Math.floor(random() * 10_000_000)), ledger: pick(['USD', 'EUR', 'JPY', 'KWD']), owners: [random() < 0.5 ? id : 'someone-else'] },
    };
  });
}

function benchDecisions(): { decision_us_p50: number; decision_us_p99: number; decision_us_max: number; decide_only_us_p50: number; decide_only_us_p99: number; allowed_pct: number } {
  const sink = new DroppingSink();
  const authorizer = new Authorizer({ policy: REFERENCE_POLICY, audit: sink, clock: () => MONDAY_10 });
  const policy = compilePolicy(REFERENCE_POLICY);
  const mix = cases(prng(seed), 4096);
  const origin = { service: 'bench', ip: '127.0.0.1', requestId: 'r' };
  let allowed = 0;
  // Warm up both paths so the JIT has compiled them before anything is timed.
  for (let i = 0; i < 20_000; i++) {
    const c = mix[i % mix.length] as Case;
    authorizer.check(c.principal, c.permission, c.resource, origin);
    policy.decide(c.principal, c.permission, c.resource, MONDAY_10);
  }
  const full = createHistogram();
  const bare = createHistogram();
  for (let i = 0; i < decisionsN; i++) {
    const c = mix[i % mix.length] as Case;
    const t0 = process.hrtime.bigint();
    const d = authorizer.check(c.principal, c.permission, c.resource, origin);
    const t1 = process.hrtime.bigint();
    policy.decide(c.principal, c.permission, c.resource, MONDAY_10);
    const t2 = process.hrtime.bigint();
    full.record(Math.max(1, Number(t1 - t0)));
    bare.record(Math.max(1, Number(t2 - t1)));
    if (d.allowed) allowed += 1;
  }
  if (sink.recorded !== decisionsN + 20_000) throw new Error(`invariant: ${sink.recorded} audit records for ${decisionsN + 20_000} decisions`);
  return {
    decision_us_p50: us(full, 50),
    decision_us_p99: us(full, 99),
    decision_us_max: us(full, 100),
    decide_only_us_p50: us(bare, 50),
    decide_only_us_p99: us(bare, 99),
    allowed_pct: Math.round((allowed / decisionsN) * 1000) / 10,
  };
}

async function benchVerify(key: Awaited<ReturnType<typeof signingKey>>): Promise<{ token_verify_us_p50: number; token_verify_us_p99: number; token_verify_cached_us_p99: number }> {
  const nowMs = Date.now();
  const tokens = await Promise.all(
    Array.from({ length: verifiesN }, (_, i) => signAccessToken(key.signer, { sub: `svc-${i}`, kind: 'service', roles: ['svc:payments'], audience: 'ledger' }, { issuer: ISSUER, ttlSeconds: 600, nowMs })),
  );
  const keys = localKeys({ keys: [key.publicJwk] });
  const uncached = createTokenVerifier({ keys, issuer: ISSUER, audience: 'ledger', cacheEntriesMax: 0 });
  const cached = createTokenVerifier({ keys, issuer: ISSUER, audience: 'ledger' });
  for (const token of tokens.slice(0, 200)) await uncached(token);
  const cold = createHistogram();
  for (const token of tokens) {
    const t0 = process.hrtime.bigint();
    await uncached(token);
    cold.record(Math.max(1, Number(process.hrtime.bigint() - t0)));
  }
  const warm = createHistogram();
  const one = tokens[0] as string;
  await cached(one);
  for (let i = 0; i < verifiesN * 10; i++) {
    const t0 = process.hrtime.bigint();
    await cached(one);
    warm.record(Math.max(1, Number(process.hrtime.bigint() - t0)));
  }
  return { token_verify_us_p50: us(cold, 50), token_verify_us_p99: us(cold, 99), token_verify_cached_us_p99: us(warm, 99) };
}

async function signingKey() {
  const pair = await newSigningKey();
  const privateKey = await importJWK(pair.privateJwk, 'EdDSA');
  if (privateKey instanceof Uint8Array) throw new Error('invariant: an Ed25519 JWK imported as raw bytes');
  return { signer: { kid: pair.kid, privateKey }, publicJwk: pair.publicJwk };
}

function listen(server: Server): Promise<number> {
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      resolve(typeof address === 'object' && address !== null ? address.port : 0);
    });
  });
}

/** Linux reports process CPU time in USER_HZ ticks, 100 per second. */
const US_PER_TICK = 10_000;

/**
 * CPU ticks used so far, per process, by these processes and by every PostgreSQL backend of
 * `database`. Per process, because backends come and go (pools close idle connections): a
 * phase's CPU is the sum of each process's growth, see `ticksBetween`.
 */
function cpuTicks(pids: readonly number[], database: string): Map<string, number> {
  const ticks = new Map<string, number>();
  const read = (pid: string): void => {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      // utime and stime: fields 14 and 15 of stat, 11 and 12 after the state field.
      ticks.set(pid, Number(fields[11]) + Number(fields[12]));
    } catch {
      // the process ended meanwhile
    }
  };
  for (const pid of pids) read(String(pid));
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      // A backend's process title names its database: "postgres: 16/main: postgres <db> 127.0.0.1(…) idle".
      if (readFileSync(`/proc/${name}/cmdline`, 'utf8').includes(` ${database} `)) read(name);
    } catch {
      // the process ended meanwhile
    }
  }
  return ticks;
}

/** Ticks used between two snapshots by the processes alive at the second (a process that ended in between is missed, and it was idle). */
function ticksBetween(start: Map<string, number>, end: Map<string, number>): number {
  let sum = 0;
  for (const [pid, t] of end) sum += t - (start.get(pid) ?? 0);
  return sum;
}

async function startLedger(name: string, env: NodeJS.ProcessEnv): Promise<{ child: ChildProcess; url: string }> {
  const port = await freePort();
  const child = spawn(process.execPath, ['services/ledger/src/main.ts'], {
    cwd: REPO_ROOT,
    env: { ...process.env, ...env, PORT: String(port), HOST: '127.0.0.1', LOG_LEVEL: 'warn', EVENTS_RELAY_ENABLED: 'false' },
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + SERVICE_START_TIMEOUT_MS;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`${name}: exited with ${child.exitCode} before serving`);
    try {
      if ((await fetch(`${url}/health`)).ok) return { child, url };
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error(`${name}: not serving after ${SERVICE_START_TIMEOUT_MS} ms`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 15_000);
  await exited;
  clearTimeout(timer);
}

/** One load phase: `seconds` of POST /v1/transfers after a one-second warm-up; 201s per second. */
function phase(url: string, token: string | null, accountIds: readonly string[], random: () => number, cpu: () => Map<string, number>): Promise<{ perS: number; non2xx: number; p99Ms: number; cpuUsPerTransfer: number }> {
  const headers: Record<string, string> = { 'content-type': 'application/json', ...(token === null ? {} : { authorization: `Bearer ${token}` }) };
  const request: AutocannonRequest = {
    method: 'POST',
    path: '/v1/transfers',
    headers,
    setupRequest: (req) => {
      const debit = Math.floor(random() * accountIds.length);
      const credit = (debit + 1 + Math.floor(random() * (accountIds.length - 1))) % accountIds.length;
      return { ...req, body: JSON.stringify({ id: newId(), debit_account_id: accountIds[debit], credit_account_id: accountIds[credit], amount: '1', ledger: 'USD', code: 1 }) };
    },
  };
  return new Promise((resolve, reject) => {
    let measuring = false;
    let created = 0;
    request.onResponse = (status) => {
      if (measuring && status === 201) created += 1;
    };
    let tStart = 0;
    let ticksStart = new Map<string, number>();
    let ticksUsed = 0;
    const instance = autocannon({ url, connections, duration: seconds + 30, requests: [request] }, (error, result: AutocannonResult) => {
      if (error !== null) {
        reject(error);
        return;
      }
      const elapsedS = (Date.now() - tStart) / 1000;
      resolve({ perS: Math.round(created / elapsedS), non2xx: result.non2xx, p99Ms: result.latency.p99, cpuUsPerTransfer: Math.round((ticksUsed * US_PER_TICK) / Math.max(created, 1)) });
    });
    setTimeout(() => {
      measuring = true;
      tStart = Date.now();
      ticksStart = cpu();
      setTimeout(() => {
        ticksUsed = ticksBetween(ticksStart, cpu());
        measuring = false;
        instance.stop();
      }, seconds * 1000);
    }, 1000);
  });
}

async function benchHttp(key: Awaited<ReturnType<typeof signingKey>>) {
  const db = await createTestDatabase('ll_bench_authz');
  const jwks = createHttpServer((req, res) => {
    res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'public, max-age=60' });
    res.end(JSON.stringify({ keys: [key.publicJwk] }));
  });
  const jwksPort = await listen(jwks);
  const children: ChildProcess[] = [];
  try {
    const common = {
      DATABASE_URL: db.url,
      EVENTS_STREAM: `LL_BENCH_AUTHZ_${randomUUID().slice(0, 8)}`,
      ...(values['no-audit'] ? { AUDIT_ENABLED: 'false' } : {}),
    };
    const off = await startLedger('auth off', { ...common, LEDGER_AUTH: 'disabled' });
    children.push(off.child);
    const on = await startLedger('auth on', { ...common, LEDGER_AUTH: 'required', AUTH_ISSUER: ISSUER, AUTH_JWKS_URL: `http://127.0.0.1:${jwksPort}/jwks.json` });
    children.push(on.child);
    const accountIds = Array.from({ length: accountsN }, () => newId());
    const created = await fetch(`${off.url}/v1/accounts/batch`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ accounts: accountIds.map((id) => ({ id, ledger: 'USD', code: 1 })) }),
    });
    if (!created.ok) throw new Error(`creating accounts: ${created.status} ${await created.text()}`);
    // One service token for the whole run, as a real client holds one until it nears expiry.
    const token = await signAccessToken(key.signer, { sub: 'payments', kind: 'service', roles: ['svc:payments'], audience: 'ledger' }, { issuer: ISSUER, ttlSeconds: 3600, nowMs: Date.now() });
    const probe = await fetch(`${on.url}/v1/ledgers`, { headers: { authorization: `Bearer ${token}` } });
    if (probe.status !== 200 || (await fetch(`${on.url}/v1/ledgers`)).status !== 401) throw new Error('auth on: the service does not verify tokens as configured');
    const random = prng(seed ^ 0x9e3779b9);
    const perS = { off: [] as number[], on: [] as number[] };
    const cpuUs = { off: [] as number[], on: [] as number[] };
    const pids = children.map((c) => c.pid).filter((pid) => pid !== undefined);
    const cpu = () => cpuTicks(pids, db.name);
    const phases: object[] = [];
    for (let r = 0; r < rounds; r++) {
      for (const mode of r % 2 === 0 ? (['off', 'on'] as const) : (['on', 'off'] as const)) {
        await new Promise((resolve) => setTimeout(resolve, SETTLE_MS));
        const loadBefore = load();
        const result = await phase(mode === 'off' ? off.url : on.url, mode === 'off' ? null : token, accountIds, random, cpu);
        if (result.non2xx > 0) log(`round ${r} auth ${mode}: ${result.non2xx} non-2xx answers`);
        perS[mode].push(result.perS);
        cpuUs[mode].push(result.cpuUsPerTransfer);
        phases.push({ round: r, auth: mode, transfers_per_s: result.perS, cpu_us_per_transfer: result.cpuUsPerTransfer, p99_ms: result.p99Ms, load_before: loadBefore, load_after: load() });
        log(`round ${r} auth ${mode}: ${result.perS} transfers/s, ${result.cpuUsPerTransfer} µs CPU per transfer, p99 ${result.p99Ms} ms (load ${loadBefore} -> ${load()})`);
      }
    }
    const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
    return {
      http_audit: !values['no-audit'],
      http_transfers_per_s_auth_off: Math.round(mean(perS.off)),
      http_transfers_per_s_auth_on: Math.round(mean(perS.on)),
      http_throughput_cost_pct: Math.round((1 - mean(perS.on) / mean(perS.off)) * 1000) / 10,
      http_cpu_us_per_transfer_auth_off: Math.round(mean(cpuUs.off)),
      http_cpu_us_per_transfer_auth_on: Math.round(mean(cpuUs.on)),
      http_phases: phases,
    };
  } finally {
    for (const child of children) await stop(child);
    await new Promise((resolve) => jwks.close(resolve));
    await db.drop();
  }
}

async function main(): Promise<void> {
  log(`seed ${seed}; load ${load()}`);
  const decisions = benchDecisions();
  log(`decisions: p50 ${decisions.decision_us_p50} µs, p99 ${decisions.decision_us_p99} µs`);
  const key = await signingKey();
  const verify = await benchVerify(key);
  log(`token verification: p99 ${verify.token_verify_us_p99} µs uncached, ${verify.token_verify_cached_us_p99} µs cached`);
  const http = values['no-http'] ? {} : await benchHttp(key);
  console.log(JSON.stringify({ seed, ...decisions, ...verify, ...http, load: load() }));
}

exitWhenDone(main(), log);
