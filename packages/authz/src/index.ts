export type { BusinessHours, Conditions, Permission, Policy, Principal, ResourceAttributes, Rule } from './policy.ts';
export { compilePolicy } from './engine.ts';
export type { CompiledPolicy, Decision } from './engine.ts';
export { Authorizer, DECISION_ACTION, decisionEntry, DecisionUnrecordedError, THROTTLED_ACTION } from './authorizer.ts';
export type { AuthorizerOptions } from './authorizer.ts';
export {
  ADMIN_GRANTABLE_ROLES,
  ALL_ROLES,
  CUSTOMER_TRANSFER_FLAGS,
  CUSTOMER_TRANSFER_MAX_MINOR,
  PERMISSIONS,
  PERSONAL_LEDGERS,
  REFERENCE_POLICY,
  ROLES,
  SERVICE_ROLE_PREFIX,
  SERVICE_ROLES,
  TELLER_TRANSFER_MAX_MINOR,
} from './reference.ts';
export { AUTH_PROBLEM_TYPES, FAILURE_SUMMARY_INTERVAL_MS_DEFAULT, installHttpAuth, UNVERIFIABLE_RECORDS_PER_SECOND, VERIFIER_UNAVAILABLE_CODE } from './http.ts';
export { ADDRESSES_MAX, AUTH_FAILURE_LIMIT_DEFAULT, AUTH_FAILURE_TOTAL_LIMIT_DEFAULT, authFailureConfigSchema, authFailureOptionsFromConfig, AuthFailureThrottle, OTHER_ADDRESSES, SUMMARY_ADDRESSES_MAX, type AuthFailureLimit, type ThrottleSummary } from './failure-throttle.ts';
export type { HttpAuth, HttpAuthOptions } from './http.ts';
export { LogAuditSink } from './log-sink.ts';
export type { AuditLogger } from './log-sink.ts';
