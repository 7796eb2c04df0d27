/**
 * Signing keys at rest. Whoever can read a private signing key can mint any token, so with a
 * key-encryption key configured the private JWKs are stored only as JWEs (`alg: dir`,
 * `enc: A256GCM`, RFC 7516): a database dump, a replica or a backup then holds no usable
 * signing key without the key-encryption key, which lives outside the database.
 *
 * Each JWE's protected header (authenticated by the cipher) names the key-encryption key (its
 * id, a hash of the key) and the signing key's `kid`, so that a wrong key-encryption key is
 * reported as such, and a JWE moved to another row does not decrypt as that row's key.
 */
import { createHash, hkdfSync } from 'node:crypto';
import { compactDecrypt, CompactEncrypt, decodeProtectedHeader, type JWK } from 'jose';

/** The protected-header parameter that binds a JWE to its signing key's `kid`. */
const SIGNING_KID_PARAM = 'ledgerline.signing_kid';
const KEK_BYTES = 32;

export interface KeyEncryptionKey {
  /** Names the key in each JWE it encrypts: the first 16 hex digits of its SHA-256. */
  id: string;
  key: Uint8Array;
  /**
   * Earlier key-encryption keys, by id, during a rotation: signing keys encrypted under them
   * still open, and `Identity#ensureSigningKey` encrypts them again under this one.
   */
  previous: ReadonlyMap<string, Uint8Array>;
}

/** The key-encryption key is missing, malformed, or not the one the stored keys need. */
export class KeyEncryptionKeyError extends Error {
  override readonly name = 'KeyEncryptionKeyError';
}

function parseOneKey(text: string, where: string): { id: string; key: Uint8Array } {
  const trimmed = text.trim();
  if (!/^[A-Za-z0-9_\-+/]+={0,2}$/.test(trimmed)) {
    throw new KeyEncryptionKeyError(`${where}must be ${KEK_BYTES} random bytes in base64url, for example the output of: openssl rand -base64 32`);
  }
  const key = Buffer.from(trimmed.replaceAll('+', '-').replaceAll('/', '_').replace(/=+$/, ''), 'base64url');
  if (key.length !== KEK_BYTES) throw new KeyEncryptionKeyError(`${where}must be ${KEK_BYTES} bytes; got ${key.length}`);
  return { id: createHash('sha256').update(key).digest('hex').slice(0, 16), key: new Uint8Array(key) };
}

/**
 * Reads the key-encryption key: 32 random bytes in base64url (or base64), or during a
 * rotation `current,previous,...`: the first encrypts, the others only open what they
 * encrypted until `ensureSigningKey` has encrypted it again under the first.
 */
export function parseKeyEncryptionKey(text: string): KeyEncryptionKey {
  const parts = text.split(',');
  const keys = parts.map((part, i) => parseOneKey(part, parts.length === 1 ? '' : `(key ${i + 1} of ${parts.length}) `));
  const [current, ...previous] = keys as [{ id: string; key: Uint8Array }, ...{ id: string; key: Uint8Array }[]];
  if (new Set(keys.map((k) => k.id)).size !== keys.length) throw new KeyEncryptionKeyError('names the same key twice');
  return { id: current.id, key: current.key, previous: new Map(previous.map((k) => [k.id, k.key])) };
}

/** Encrypts a signing key's private JWK under the key-encryption key. */
export function sealPrivateJwk(jwk: JWK, signingKid: string, kek: KeyEncryptionKey): Promise<string> {
  return new CompactEncrypt(new TextEncoder().encode(JSON.stringify(jwk)))
    .setProtectedHeader({ alg: 'dir', enc: 'A256GCM', kid: kek.id, [SIGNING_KID_PARAM]: signingKid })
    .encrypt(kek.key);
}

/** The id of the key-encryption key a stored JWE was encrypted under. */
export function sealedUnder(jwe: string): string | undefined {
  const kid = decodeProtectedHeader(jwe).kid;
  return typeof kid === 'string' ? kid : undefined;
}

/**
 * The configured key-encryption key, if it is the one a stored JWE was encrypted under; else
 * KeyEncryptionKeyError naming the reason (none configured, or another one).
 */
export function keyFor(jwe: string, signingKid: string, kek: KeyEncryptionKey | null): KeyEncryptionKey {
  if (kek === null) throw new KeyEncryptionKeyError(`signing key ${signingKid} is stored encrypted, and no key-encryption key is configured`);
  const under = sealedUnder(jwe);
  if (under === kek.id) return kek;
  const earlier = under === undefined ? undefined : kek.previous.get(under);
  if (earlier !== undefined && under !== undefined) return { id: under, key: earlier, previous: new Map() };
  const also = kek.previous.size === 0 ? '' : ` or the previous ${[...kek.previous.keys()].join(', ')}`;
  throw new KeyEncryptionKeyError(`signing key ${signingKid} is encrypted under key-encryption key ${String(under)}, not the configured ${kek.id}${also}`);
}

/**
 * Decrypts a stored private JWK. Refuses, naming the reason, a JWE with no or another
 * key-encryption key (`keyFor`), one that fails authentication, and one bound to another
 * signing key.
 */
export async function openPrivateJwk(jwe: string, signingKid: string, configured: KeyEncryptionKey | null): Promise<JWK> {
  const kek = keyFor(jwe, signingKid, configured);
  let opened: Awaited<ReturnType<typeof compactDecrypt>>;
  try {
    opened = await compactDecrypt(jwe, kek.key, { keyManagementAlgorithms: ['dir'], contentEncryptionAlgorithms: ['A256GCM'] });
  } catch (error) {
    throw new KeyEncryptionKeyError(`signing key ${signingKid} does not decrypt: ${error instanceof Error ? error.message : String(error)}`);
  }
  if (opened.protectedHeader[SIGNING_KID_PARAM] !== signingKid) {
    throw new KeyEncryptionKeyError(`the encrypted key stored as ${signingKid} belongs to ${String(opened.protectedHeader[SIGNING_KID_PARAM])}`);
  }
  return JSON.parse(new TextDecoder().decode(opened.plaintext)) as JWK;
}

/**
 * The key of the digest that stands in the audit trail for a username or client id no account
 * has (the identity service's `pseudonymKey`), derived from the current key-encryption key
 * (HKDF-SHA256, its own label): a secret outside the database that every instance shares, so
 * that they name the same text alike, and that a reader of the trail cannot use to test guesses.
 * A new key-encryption key names the same text anew.
 */
export function auditPseudonymKey(kek: KeyEncryptionKey): Uint8Array {
  return new Uint8Array(hkdfSync('sha256', kek.key, new Uint8Array(0), 'ledgerline identity: audit pseudonyms of unknown names', 32));
}
