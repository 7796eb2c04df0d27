export type { BusinessHours, Conditions, Permission, Policy, Principal, ResourceAttributes, Rule } from './policy.ts';
export { compilePolicy } from './engine.ts';
export type { CompiledPolicy, Decision } from './engine.ts';
export { Authorizer, DECISION_ACTION, decisionEntry } from './authorizer.ts';
export type { AuthorizerOptions } from './authorizer.ts';
export {
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
export { AUTH_PROBLEM_TYPES, installHttpAuth } from './http.ts';
export type { HttpAuth, HttpAuthOptions } from './http.ts';
export { LogAuditSink } from './log-sink.ts';
export type { AuditLogger } from './log-sink.ts';
