/**
 * The ledger API's wire format, one TypeBox schema per shape. These schemas validate requests,
 * shape responses and produce the OpenAPI document. Amounts and timestamps are strings of
 * digits (minor units; nanoseconds since the epoch), never JSON numbers.
 */
import { Type, type Static } from 'typebox';
import { STORABLE_TEXT_PATTERN } from '@ledgerline/service-runtime';
import {
  METADATA_KEY_LENGTH_MAX,
  METADATA_KEYS_MAX,
  METADATA_VALUE_LENGTH_MAX,
  TRANSFER_RESULT_CODES,
  ACCOUNT_RESULT_CODES,
} from '@ledgerline/ledger';

/** The most transfers (or accounts) one batch request may carry. */
export const BATCH_ITEMS_MAX = 1000;

export const Id = Type.String({
  pattern: '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$',
  description: 'A 128-bit id as a UUID string (for example a UUIDv7).',
  examples: ['01936f8e-9c3a-7d2e-8b1f-4a5c6d7e8f90'],
});

/** 1..2^63−1: up to 19 digits, no leading zero; the upper bound is checked by the handler. */
export const Amount = Type.String({
  pattern: '^[1-9][0-9]{0,18}$',
  description: 'A positive amount in minor units of the ledger, as a string of digits (at most 2^63-1).',
  examples: ['12500'],
});

export const Digits = Type.String({ pattern: '^[0-9]{1,19}$', description: 'An unsigned 64-bit integer as a string of digits.' });

export const LedgerCode = Type.String({
  pattern: '^[A-Z][A-Z0-9]{2,11}$',
  description: 'The asset or currency of a ledger, for example USD.',
  examples: ['USD'],
});

export const Code = Type.Integer({ minimum: 1, maximum: 65535, description: 'A chart-of-accounts or reason code chosen by the user.' });

// The key rules live in `propertyNames`: TypeBox's Record drops constraints on its key schema
// (it emits `patternProperties: { "^.*$": ... }`), and `^.*$` does not match a key containing a
// line break, which would leave that key's value unchecked. `^[\s\S]*$` matches every key.
export const Metadata = Type.Record(
  Type.String({ pattern: '^[\\s\\S]*$' }),
  Type.String({ maxLength: METADATA_VALUE_LENGTH_MAX, pattern: STORABLE_TEXT_PATTERN }),
  {
    maxProperties: METADATA_KEYS_MAX,
    propertyNames: Type.String({ minLength: 1, maxLength: METADATA_KEY_LENGTH_MAX, pattern: STORABLE_TEXT_PATTERN }),
    description: `Up to ${METADATA_KEYS_MAX} string keys (1..${METADATA_KEY_LENGTH_MAX} characters) and values (at most ${METADATA_VALUE_LENGTH_MAX}), without NUL characters.`,
  },
);

export const AccountFlagsIn = Type.Object(
  {
    debits_must_not_exceed_credits: Type.Optional(Type.Boolean()),
    credits_must_not_exceed_debits: Type.Optional(Type.Boolean()),
  },
  { additionalProperties: false },
);

export const NewAccountBody = Type.Object(
  {
    id: Id,
    ledger: LedgerCode,
    code: Code,
    flags: Type.Optional(AccountFlagsIn),
    metadata: Type.Optional(Metadata),
  },
  { additionalProperties: false },
);
export type NewAccountBody = Static<typeof NewAccountBody>;

export const AccountBatchBody = Type.Object(
  { accounts: Type.Array(NewAccountBody, { minItems: 1, maxItems: BATCH_ITEMS_MAX }) },
  { additionalProperties: false },
);

export const AccountOut = Type.Object({
  id: Type.String(),
  ledger: Type.String(),
  scale: Type.Integer({ description: 'Digits after the decimal point in this ledger, e.g. 2 for USD.' }),
  code: Type.Integer(),
  flags: Type.Object({
    debits_must_not_exceed_credits: Type.Boolean(),
    credits_must_not_exceed_debits: Type.Boolean(),
    closed: Type.Boolean(),
  }),
  metadata: Type.Record(Type.String(), Type.String()),
  debits_pending: Type.String(),
  debits_posted: Type.String(),
  credits_pending: Type.String(),
  credits_posted: Type.String(),
  timestamp: Type.String({ description: 'Ledger timestamp: nanoseconds since the Unix epoch.' }),
});

export const AccountResultOut = Type.Object({
  id: Type.String(),
  result: Type.Enum(ACCOUNT_RESULT_CODES),
  timestamp: Type.Union([Type.String(), Type.Null()]),
});

export const AccountBatchOut = Type.Object({ results: Type.Array(AccountResultOut) });

const transferFlagNames = [
  'linked',
  'pending',
  'post_pending_transfer',
  'void_pending_transfer',
  'balancing_debit',
  'balancing_credit',
  'closing_debit',
  'closing_credit',
] as const;

export const TransferFlagsIn = Type.Object(
  Object.fromEntries(transferFlagNames.map((n) => [n, Type.Optional(Type.Boolean())])) as Record<
    (typeof transferFlagNames)[number],
    ReturnType<typeof Type.Optional<ReturnType<typeof Type.Boolean>>>
  >,
  { additionalProperties: false },
);

export const NewTransferBody = Type.Object(
  {
    id: Id,
    debit_account_id: Type.Optional(Id),
    credit_account_id: Type.Optional(Id),
    amount: Type.Optional(Amount),
    pending_id: Type.Optional(Id),
    ledger: Type.Optional(LedgerCode),
    code: Type.Optional(Code),
    flags: Type.Optional(TransferFlagsIn),
    timeout_seconds: Type.Optional(Type.Integer({ minimum: 0, maximum: 2 ** 31 - 1 })),
    metadata: Type.Optional(Metadata),
  },
  {
    additionalProperties: false,
    description:
      'A transfer. debit_account_id, credit_account_id, amount, ledger and code are required, except when posting or voiding a pending transfer (flags.post_pending_transfer or flags.void_pending_transfer with pending_id), where omitted fields come from the pending transfer.',
  },
);
export type NewTransferBody = Static<typeof NewTransferBody>;

export const TransferBatchBody = Type.Object(
  { transfers: Type.Array(NewTransferBody, { minItems: 1, maxItems: BATCH_ITEMS_MAX }) },
  { additionalProperties: false },
);

export const TransferResultOut = Type.Object({
  id: Type.String(),
  result: Type.Enum(TRANSFER_RESULT_CODES),
  timestamp: Type.Union([Type.String(), Type.Null()]),
  amount: Type.Union([Type.String(), Type.Null()], { description: 'The amount moved or reserved; for balancing transfers it may be less than requested.' }),
});

export const TransferBatchOut = Type.Object({ results: Type.Array(TransferResultOut) });

export const TransferOut = Type.Object({
  id: Type.String(),
  debit_account_id: Type.Union([Type.String(), Type.Null()]),
  credit_account_id: Type.Union([Type.String(), Type.Null()]),
  amount: Type.String(),
  pending_id: Type.Union([Type.String(), Type.Null()]),
  ledger: Type.Union([Type.String(), Type.Null()]),
  code: Type.Union([Type.Integer(), Type.Null()]),
  flags: Type.Object(Object.fromEntries(transferFlagNames.map((n) => [n, Type.Boolean()]))),
  timeout_seconds: Type.Integer(),
  metadata: Type.Record(Type.String(), Type.String()),
  timestamp: Type.String(),
  result: Type.String({ description: '`ok` for an applied transfer, otherwise the recorded rejection.' }),
  pending_status: Type.Union([Type.Literal('pending'), Type.Literal('posted'), Type.Literal('voided'), Type.Literal('expired'), Type.Null()]),
  expires_at: Type.Union([Type.String(), Type.Null()]),
  resolved_at: Type.Union([Type.String(), Type.Null()]),
});

export const TransferPageOut = Type.Object({
  transfers: Type.Array(TransferOut),
  next_cursor: Type.Union([Type.String(), Type.Null()], { description: 'Pass as `after` for the next page; null at the end.' }),
});

export const AccountParams = Type.Object({ id: Id }, { additionalProperties: false });

export const TransfersQuery = Type.Object(
  {
    // Optional for the client (the OpenAPI document says so); the default fills them in.
    limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 1000, default: 50 })),
    order: Type.Optional(Type.Enum(['asc', 'desc'], { default: 'desc' })),
    after: Type.Optional(Digits),
  },
  { additionalProperties: false },
);

export const BalanceQuery = Type.Object({ at: Digits }, { additionalProperties: false });

export const BalanceOut = Type.Object({
  account_id: Type.String(),
  timestamp: Type.String(),
  debits_pending: Type.String(),
  debits_posted: Type.String(),
  credits_pending: Type.String(),
  credits_posted: Type.String(),
});

export const LedgersOut = Type.Object({
  ledgers: Type.Array(Type.Object({ code: Type.String(), scale: Type.Integer(), description: Type.String() })),
});
