/**
 * The authorization engine: deny by default, each condition on its own and at its edges, the
 * policy checks at compile time, and the audit record of every decision.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { AuditBufferFullError, MemoryAuditSink, type AuditEntry } from '@ledgerline/audit';
import { propertySeed } from '@ledgerline/testing';
import {
  ALL_ROLES,
  Authorizer,
  DecisionUnrecordedError,
  LogAuditSink,
  compilePolicy,
  CUSTOMER_TRANSFER_FLAGS,
  CUSTOMER_TRANSFER_MAX_MINOR,
  PERMISSIONS,
  REFERENCE_POLICY,
  SERVICE_ROLE_PREFIX,
  SERVICE_ROLES,
  type Policy,
  type Principal,
  type Rule,
} from '../src/index.ts';

/** Monday 2026-11-23 at 10:00 UTC, and the same Monday at 07:59 and 18:00, and Saturday 10:00. */
const MONDAY_10 = Date.UTC(2026, 10, 23, 10, 0);
const MONDAY_0759 = Date.UTC(2026, 10, 23, 7, 59);
const MONDAY_18 = Date.UTC(2026, 10, 23, 18, 0);
const SATURDAY_10 = Date.UTC(2026, 10, 28, 10, 0);

const alice: Principal = { id: 'alice', kind: 'user', roles: ['customer'], tenant: 't1' };

function policyOf(...rules: Rule[]): Policy {
  return { version: 'test-1', rules };
}

describe('compilePolicy: decisions', () => {
  test('deny by default: no principal, no rule, or a rule for another role', () => {
    const p = compilePolicy(policyOf({ id: 'r', roles: ['teller'], permissions: ['account:read'] }));
    const resource = { type: 'account', id: 'a1' };
    assert.deepEqual(p.decide(null, 'account:read', resource, MONDAY_10), { allowed: false, permission: 'account:read', rule: null, reason: 'unauthenticated', policyVersion: 'test-1' });
    const d = p.decide(alice, 'account:read', resource, MONDAY_10);
    assert.equal(d.allowed, false);
    assert.equal(d.rule, null);
    assert.equal(d.reason, 'no rule grants account:read to roles [customer]');
    assert.equal(p.decide({ ...alice, roles: ['teller'] }, 'account:create', resource, MONDAY_10).allowed, false);
    assert.equal(p.decide({ ...alice, roles: ['teller'] }, 'account:read', resource, MONDAY_10).rule, 'r');
  });

  test('amount limit compares bigints exactly, beyond 2^53, and an absent amount fails', () => {
    const limit = 9_007_199_254_740_993n; // 2^53 + 1: a float comparison would get this wrong
    const p = compilePolicy(policyOf({ id: 'lim', roles: ['customer'], permissions: ['transfer:create'], when: { amountMax: limit } }));
    const at = (amount?: bigint) => p.decide(alice, 'transfer:create', { type: 'transfer', id: 't', ...(amount === undefined ? {} : { amount }) }, MONDAY_10);
    assert.equal(at(limit).allowed, true);
    assert.equal(at(limit + 1n).allowed, false);
    assert.equal(at(limit + 1n).reason, 'amount above limit');
    assert.equal(at(limit + 1n).rule, 'lim');
    assert.equal(at().allowed, false);
  });

  test('ledger in a set; own account; tenant', () => {
    const p = compilePolicy(
      policyOf(
        { id: 'ccy', roles: ['customer'], permissions: ['transfer:create'], when: { ledgerIn: ['USD', 'EUR'] } },
        { id: 'own', roles: ['customer'], permissions: ['account:read'], when: { ownAccount: true } },
        { id: 'ten', roles: ['customer'], permissions: ['report:read'], when: { sameTenant: true } },
      ),
    );
    const decide = (permission: 'transfer:create' | 'account:read' | 'report:read', extra: object, who: Principal = alice) =>
      p.decide(who, permission, { type: 'x', id: '1', ...extra }, MONDAY_10);
    assert.equal(decide('transfer:create', { ledger: 'USD' }).allowed, true);
    assert.equal(decide('transfer:create', { ledger: 'JPY' }).reason, 'ledger not allowed');
    assert.equal(decide('transfer:create', {}).allowed, false);
    assert.equal(decide('account:read', { owners: ['alice'] }).allowed, true);
    assert.equal(decide('account:read', { owners: ['bob', 'alice'] }).allowed, true);
    assert.equal(decide('account:read', { owners: ['bob'] }).reason, 'not own account');
    assert.equal(decide('account:read', { owners: [] }).allowed, false);
    assert.equal(decide('account:read', {}).allowed, false);
    assert.equal(decide('report:read', { tenant: 't1' }).allowed, true);
    assert.equal(decide('report:read', { tenant: 't2' }).reason, 'tenant differs');
    assert.equal(decide('report:read', {}).allowed, false);
    const { tenant: _t, ...noTenant } = alice;
    assert.equal(decide('report:read', { tenant: 't1' }, noTenant).allowed, false);
  });

  test('own credit account and allowed flags; an absent attribute fails', () => {
    const p = compilePolicy(
      policyOf(
        { id: 'plain', roles: ['customer'], permissions: ['transfer:create'], when: { ownAccount: true, flagsIn: ['pending'] } },
        { id: 'both', roles: ['customer'], permissions: ['transfer:create'], when: { ownAccount: true, ownCreditAccount: true } },
      ),
    );
    const decide = (extra: object) => p.decide(alice, 'transfer:create', { type: 'transfer', id: '1', owners: ['alice'], ...extra }, MONDAY_10);
    assert.equal(decide({ flags: [] }).rule, 'plain');
    assert.equal(decide({ flags: ['pending'] }).rule, 'plain');
    assert.deepEqual([decide({ flags: ['pending', 'closing_credit'], creditOwners: ['bob'] }).allowed, decide({ flags: ['closing_credit'], creditOwners: ['bob'] }).reason], [false, 'not own credit account']);
    assert.equal(decide({ flags: ['closing_credit'], creditOwners: ['bob', 'alice'] }).rule, 'both');
    // No flags attribute at all is not "no flags"; no credit owners is not "own".
    assert.equal(decide({}).allowed, false);
    assert.equal(decide({ flags: ['closing_credit'] }).allowed, false);
    const flagsOnly = compilePolicy(policyOf({ id: 'f', roles: ['customer'], permissions: ['transfer:create'], when: { flagsIn: [] } }));
    assert.equal(flagsOnly.decide(alice, 'transfer:create', { type: 't', id: '1', flags: ['linked'] }, 0).reason, 'flags not allowed');
    assert.equal(p.needsOwners(['customer'], 'transfer:create'), true);
    const creditOnly = compilePolicy(policyOf({ id: 'c', roles: ['customer'], permissions: ['transfer:create'], when: { ownCreditAccount: true } }));
    assert.equal(creditOnly.needsOwners(['customer'], 'transfer:create'), true);
  });

  test('grantable roles: each role granted must be in the set; none granted passes; no grants attribute fails', () => {
    const p = compilePolicy(policyOf({ id: 'g', roles: ['admin'], permissions: ['user:create'], when: { grantsIn: ['customer'] } }));
    const admin = { id: 'ada', kind: 'user' as const, roles: ['admin'] };
    const decide = (extra: object) => p.decide(admin, 'user:create', { type: 'user', id: 'u', ...extra }, 0);
    assert.equal(decide({ grants: ['customer'] }).rule, 'g');
    assert.equal(decide({ grants: [] }).rule, 'g');
    assert.deepEqual([decide({ grants: ['customer', 'teller'] }).allowed, decide({ grants: ['teller'] }).reason], [false, 'role not grantable']);
    assert.equal(decide({}).allowed, false);
  });

  test('a rule bound to a kind of principal never applies to the other kind', () => {
    const p = compilePolicy(
      policyOf(
        { id: 'svc', kind: 'service', roles: ['svc:payments'], permissions: ['transfer:create'] },
        { id: 'people', kind: 'user', roles: ['teller'], permissions: ['account:read'] },
        { id: 'any', roles: ['reader'], permissions: ['ledger:read'] },
      ),
    );
    const r = { type: 't', id: '1' };
    assert.equal(p.decide({ id: 'payments', kind: 'service', roles: ['svc:payments'] }, 'transfer:create', r, 0).rule, 'svc');
    const user = p.decide({ id: 'mallory', kind: 'user', roles: ['svc:payments'] }, 'transfer:create', r, 0);
    assert.deepEqual([user.allowed, user.rule], [false, null]);
    assert.equal(p.decide({ id: 'robot', kind: 'service', roles: ['teller'] }, 'account:read', r, 0).allowed, false);
    assert.equal(p.decide({ id: 'tina', kind: 'user', roles: ['teller'] }, 'account:read', r, 0).allowed, true);
    for (const kind of ['user', 'service'] as const) assert.equal(p.decide({ id: 'x', kind, roles: ['reader'] }, 'ledger:read', r, 0).allowed, true);
    assert.throws(() => compilePolicy(policyOf({ id: 'k', kind: 'robot' as 'user', roles: ['x'], permissions: ['a:b'] })), TypeError);
  });

  test('the reference policy: service roles only for services, people roles only for users', () => {
    for (const rule of REFERENCE_POLICY.rules) {
      const service = rule.roles.map((role) => role.startsWith(SERVICE_ROLE_PREFIX));
      assert.ok(service.every((s) => s === service[0]), `${rule.id} mixes service and people roles`);
      assert.equal(rule.kind, service[0] === true ? 'service' : 'user', rule.id);
    }
    // The reviewer's case: a human user holding svc:payments moves nothing, with no limit or otherwise.
    const p = compilePolicy(REFERENCE_POLICY);
    const mallory: Principal = { id: 'mallory', kind: 'user', roles: [SERVICE_ROLES.payments] };
    const d = p.decide(mallory, PERMISSIONS.transferCreate, { type: 'transfer', id: 'x', amount: 10n ** 15n, ledger: 'JPY', owners: [], creditOwners: [], flags: [] }, MONDAY_10);
    assert.equal(d.allowed, false);
    for (const permission of Object.values(PERMISSIONS)) assert.equal(p.decide(mallory, permission, { type: 'x', id: '1' }, MONDAY_10).allowed, false, permission);
  });

  test('the reference policy: customer flags', () => {
    const p = compilePolicy(REFERENCE_POLICY);
    const transfer = (flags: string[], creditOwners: string[]) => ({ type: 'transfer', id: 't', amount: 1n, ledger: 'USD', owners: ['alice'], creditOwners, flags });
    for (const flag of CUSTOMER_TRANSFER_FLAGS) assert.equal(p.decide(alice, PERMISSIONS.transferCreate, transfer([flag], ['bob']), MONDAY_10).allowed, true, flag);
    for (const flag of ['closing_credit', 'balancing_credit', 'post_pending_transfer', 'void_pending_transfer']) {
      assert.equal(p.decide(alice, PERMISSIONS.transferCreate, transfer([flag], ['bob']), MONDAY_10).allowed, false, flag);
      assert.equal(p.decide(alice, PERMISSIONS.transferCreate, transfer([flag], ['alice']), MONDAY_10).rule, 'customer-transfers-between-own', flag);
    }
    // Staff and services are not limited by flags.
    const teller: Principal = { id: 't', kind: 'user', roles: ['teller'] };
    assert.equal(p.decide(teller, PERMISSIONS.transferCreate, transfer(['closing_credit'], ['bob']), MONDAY_10).allowed, true);
    assert.equal(p.decide({ id: 'payments', kind: 'service', roles: [SERVICE_ROLES.payments] }, PERMISSIONS.transferCreate, transfer(['closing_credit'], ['bob']), MONDAY_10).allowed, true);
  });

  test('business hours read the injected clock: edges, weekends, and a fixed UTC offset', () => {
    const hours = { days: [1, 2, 3, 4, 5], startHour: 8, endHour: 18, utcOffsetMinutes: 0 };
    const p = compilePolicy(policyOf({ id: 'bh', roles: ['teller'], permissions: ['transfer:create'], when: { businessHours: hours } }));
    const teller: Principal = { id: 't', kind: 'user', roles: ['teller'] };
    const at = (ms: number) => p.decide(teller, 'transfer:create', { type: 'transfer', id: 'x' }, ms);
    assert.equal(at(MONDAY_10).allowed, true);
    assert.equal(at(Date.UTC(2026, 10, 23, 8, 0)).allowed, true);
    assert.equal(at(MONDAY_0759).reason, 'outside business hours');
    assert.equal(at(MONDAY_18).allowed, false);
    assert.equal(at(SATURDAY_10).allowed, false);
    // UTC+10: Monday 10:00 UTC is 20:00 local (closed); Sunday 23:00 UTC is Monday 09:00 local (open).
    const east = compilePolicy(policyOf({ id: 'bh', roles: ['teller'], permissions: ['transfer:create'], when: { businessHours: { ...hours, utcOffsetMinutes: 600 } } }));
    assert.equal(east.decide(teller, 'transfer:create', { type: 'transfer', id: 'x' }, MONDAY_10).allowed, false);
    assert.equal(east.decide(teller, 'transfer:create', { type: 'transfer', id: 'x' }, Date.UTC(2026, 10, 22, 23, 0)).allowed, true);
    // Before the epoch the weekday arithmetic still holds: 1969-12-29 was a Monday.
    assert.equal(at(Date.UTC(1969, 11, 29, 9, 0)).allowed, true);
  });

  test('the first rule that holds decides; a later failure does not hide an earlier allow', () => {
    const p = compilePolicy(
      policyOf(
        { id: 'small', roles: ['customer'], permissions: ['transfer:create'], when: { amountMax: 10n } },
        { id: 'usd', roles: ['customer'], permissions: ['transfer:create'], when: { ledgerIn: ['USD'] } },
      ),
    );
    assert.equal(p.decide(alice, 'transfer:create', { type: 't', id: '1', amount: 5n, ledger: 'EUR' }, 0).rule, 'small');
    assert.equal(p.decide(alice, 'transfer:create', { type: 't', id: '1', amount: 50n, ledger: 'USD' }, 0).rule, 'usd');
    const denied = p.decide(alice, 'transfer:create', { type: 't', id: '1', amount: 50n, ledger: 'EUR' }, 0);
    assert.deepEqual([denied.allowed, denied.rule, denied.reason], [false, 'usd', 'ledger not allowed']);
  });

  test('needsOwners and permissionsOf', () => {
    const p = compilePolicy(REFERENCE_POLICY);
    assert.equal(p.needsOwners(['customer'], PERMISSIONS.accountRead), true);
    assert.equal(p.needsOwners(['teller'], PERMISSIONS.accountRead), false);
    assert.equal(p.needsOwners(['auditor'], PERMISSIONS.transferCreate), false);
    assert.deepEqual([...p.permissionsOf('auditor')].sort(), ['account:read', 'audit:read', 'ledger:read', 'self:manage', 'transfer:read']);
  });

  test('malformed policies fail at compile time', () => {
    const bad: [string, Policy][] = [
      ['empty version', { version: '', rules: [] }],
      ['duplicate id', policyOf({ id: 'a', roles: ['x'], permissions: ['a:b'] }, { id: 'a', roles: ['x'], permissions: ['a:c'] })],
      ['no role', policyOf({ id: 'a', roles: [], permissions: ['a:b'] })],
      ['bad permission', policyOf({ id: 'a', roles: ['x'], permissions: ['Transfer' as 'a:b'] })],
      ['negative limit', policyOf({ id: 'a', roles: ['x'], permissions: ['a:b'], when: { amountMax: -1n } })],
      ['number limit', policyOf({ id: 'a', roles: ['x'], permissions: ['a:b'], when: { amountMax: 5 as unknown as bigint } })],
      ['hours reversed', policyOf({ id: 'a', roles: ['x'], permissions: ['a:b'], when: { businessHours: { days: [1], startHour: 18, endHour: 8, utcOffsetMinutes: 0 } } })],
      ['bad day', policyOf({ id: 'a', roles: ['x'], permissions: ['a:b'], when: { businessHours: { days: [7], startHour: 8, endHour: 18, utcOffsetMinutes: 0 } } })],
      ['bad offset', policyOf({ id: 'a', roles: ['x'], permissions: ['a:b'], when: { businessHours: { days: [1], startHour: 8, endHour: 18, utcOffsetMinutes: 15 * 60 } } })],
    ];
    for (const [label, policy] of bad) assert.throws(() => compilePolicy(policy), TypeError, label);
  });

  test('property: a principal with no role named in the policy is always denied', () => {
    const p = compilePolicy(REFERENCE_POLICY);
    const known = new Set(ALL_ROLES);
    fc.assert(
      fc.property(
        fc.array(fc.string({ minLength: 1, maxLength: 12 }).filter((r) => !known.has(r)), { maxLength: 4 }),
        fc.constantFrom(...Object.values(PERMISSIONS)),
        fc.bigInt({ min: 0n, max: 2n ** 63n }),
        fc.integer({ min: 0, max: 2 ** 42 }),
        (roles, permission, amount, nowMs) => {
          const d = p.decide({ id: 'x', kind: 'user', roles }, permission, { type: 't', id: '1', amount, owners: ['x'], ledger: 'USD' }, nowMs);
          assert.equal(d.allowed, false);
        },
      ),
      { seed: propertySeed('authz deny by default'), numRuns: 300 },
    );
  });

  test('property: the customer transfer limit is exact for every amount', () => {
    const p = compilePolicy(REFERENCE_POLICY);
    fc.assert(
      fc.property(fc.bigInt({ min: 1n, max: 2n ** 63n - 1n }), (amount) => {
        const d = p.decide(alice, PERMISSIONS.transferCreate, { type: 'transfer', id: '1', amount, ledger: 'USD', owners: ['alice'], flags: [] }, MONDAY_10);
        assert.equal(d.allowed, amount <= CUSTOMER_TRANSFER_MAX_MINOR);
      }),
      { seed: propertySeed('authz customer limit'), numRuns: 300 },
    );
  });
});

describe('Authorizer: every decision is audited', () => {
  test('a decision whose record the full trail refuses is thrown with the error, never returned alone', () => {
    let refusal: Error = new AuditBufferFullError('audit buffer holds its bound');
    const full = { record: (_e: AuditEntry): void => { throw refusal; }, flush: () => Promise.resolve() };
    const authorizer = new Authorizer({ policy: REFERENCE_POLICY, audit: full, clock: () => MONDAY_10 });
    const origin = { service: 'ledger', ip: '127.0.0.1', requestId: 'r1' };
    const thrown = (f: () => unknown): unknown => {
      try {
        f();
      } catch (error) {
        return error;
      }
      return undefined;
    };
    const allow = thrown(() => authorizer.check(alice, PERMISSIONS.transferCreate, { type: 'transfer', id: 't1', amount: 100n, ledger: 'USD', owners: ['alice'], flags: [] }, origin));
    assert.ok(allow instanceof DecisionUnrecordedError);
    assert.deepEqual([allow.decision.allowed, allow.cause === refusal], [true, true]);
    const deny = thrown(() => authorizer.check(null, PERMISSIONS.accountRead, { type: 'account', id: '/v1/accounts/x' }, origin, 'ERR_JWT_EXPIRED'));
    assert.ok(deny instanceof DecisionUnrecordedError);
    assert.equal(deny.decision.allowed, false);
    assert.match(deny.decision.reason, /ERR_JWT_EXPIRED$/);
    // Any other failure of the sink is its own error, not a decision to answer.
    refusal = new TypeError('a bug in the sink');
    assert.equal(thrown(() => authorizer.check(alice, PERMISSIONS.accountRead, { type: 'account', id: 'a', owners: ['alice'] }, origin)), refusal);
  });

  test('allow, deny and unauthenticated each record who, what, the rule and the policy version', () => {
    const audit = new MemoryAuditSink();
    const authorizer = new Authorizer({ policy: REFERENCE_POLICY, audit, clock: () => MONDAY_10 });
    const origin = { service: 'ledger', ip: '127.0.0.1', requestId: 'r1' };
    authorizer.check(alice, PERMISSIONS.transferCreate, { type: 'transfer', id: 't1', amount: 100n, ledger: 'USD', owners: ['alice'], flags: [] }, origin);
    authorizer.check({ id: 'svc', kind: 'service', roles: ['svc:reporting'] }, PERMISSIONS.transferCreate, { type: 'transfer', id: 't2' }, origin);
    authorizer.check(null, PERMISSIONS.accountRead, { type: 'account', id: '/v1/accounts/x' }, origin, 'ERR_JWT_EXPIRED');
    assert.deepEqual(audit.entries, [
      {
        recordClass: 'access',
        actor: { type: 'user', id: 'alice' },
        action: 'authz.decision',
        outcome: 'success',
        reason: 'allowed',
        origin,
        resource: { type: 'transfer', id: 't1' },
        payload: { decision: 'allow', permission: 'transfer:create', rule: 'customer-transfers-from-own', policyVersion: REFERENCE_POLICY.version, roles: ['customer'], amount: '100', ledger: 'USD' },
      },
      {
        recordClass: 'access',
        actor: { type: 'service', id: 'svc' },
        action: 'authz.decision',
        outcome: 'failure',
        reason: 'no rule grants transfer:create to roles [svc:reporting]',
        origin,
        resource: { type: 'transfer', id: 't2' },
        payload: { decision: 'deny', permission: 'transfer:create', rule: null, policyVersion: REFERENCE_POLICY.version, roles: ['svc:reporting'] },
      },
      {
        recordClass: 'access',
        actor: { type: 'anonymous', id: 'anonymous' },
        action: 'authz.decision',
        outcome: 'failure',
        reason: 'unauthenticated: ERR_JWT_EXPIRED',
        origin,
        resource: { type: 'account', id: '/v1/accounts/x' },
        payload: { decision: 'deny', permission: 'account:read', rule: null, policyVersion: REFERENCE_POLICY.version, roles: [] },
      },
    ]);
  });
});

describe('LogAuditSink', () => {
  test('writes each entry as one structured line, with its time, and holds nothing', async () => {
    const lines: [object, string][] = [];
    const sink = new LogAuditSink({ info: (o, m) => lines.push([o, m]) });
    const entry = { recordClass: 'access', actor: { type: 'user' as const, id: 'a' }, action: 'authz.decision', outcome: 'success' as const, origin: { service: 's' }, resource: { type: 't', id: '1' } };
    sink.record({ ...entry, occurredAt: new Date(MONDAY_10) });
    await sink.flush();
    assert.deepEqual(lines, [[{ audit: true, ...entry, occurredAt: new Date(MONDAY_10).toISOString() }, 'authz.decision']]);
  });
});
