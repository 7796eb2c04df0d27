/**
 * The keys of the audit trail: the Ed25519 key that signs checkpoints, and the per-subject
 * AES-256-GCM keys that make personal data erasable.
 */
import { createCipheriv, createDecipheriv, createPrivateKey, createPublicKey, randomBytes, sign, verify, type KeyObject } from 'node:crypto';
import { sha256 } from './record.ts';

/**
 * A fixed, public development key: with no AUDIT_SIGNING_KEY a local run still signs, and its
 * checkpoints verify across restarts. Anyone can forge with it, so production refuses it
 * (see `loadSigningKey`). The seed is the bytes 0..31.
 */
const DEV_SEED = Buffer.from(Array.from({ length: 32 }, (_, i) => i));
/** PKCS#8 DER prefix for an Ed25519 private key; the 32-byte seed follows (RFC 8410 §7). */
const ED25519_PKCS8_PREFIX = Buffer.from('302e020100300506032b657004220420', 'hex');

export class SigningKeyError extends Error {
  override readonly name = 'SigningKeyError';
}

export interface CheckpointSigner {
  readonly privateKey: KeyObject;
  readonly publicKey: KeyObject;
  /** The first 8 bytes of SHA-256 over the public key's SPKI DER, hex: names the key in each checkpoint. */
  readonly keyId: string;
  /** True for the public development key. */
  readonly development: boolean;
}

export function keyIdOf(publicKey: KeyObject): string {
  return sha256(publicKey.export({ type: 'spki', format: 'der' })).subarray(0, 8).toString('hex');
}

function signerOf(privateKey: KeyObject, development: boolean): CheckpointSigner {
  if (privateKey.asymmetricKeyType !== 'ed25519') {
    throw new SigningKeyError(`must be an Ed25519 private key, got ${privateKey.asymmetricKeyType ?? 'a symmetric key'}`);
  }
  const publicKey = createPublicKey(privateKey);
  return { privateKey, publicKey, keyId: keyIdOf(publicKey), development };
}

/**
 * The checkpoint signer from configuration: a PKCS#8 PEM (literal `\n` accepted, for
 * environment files), or nothing for the development key, which `production` refuses.
 */
export function loadSigningKey(pem: string | undefined, options: { production: boolean }): CheckpointSigner {
  if (pem === undefined || pem.trim() === '') {
    if (options.production) throw new SigningKeyError('is required in production (a PKCS#8 PEM Ed25519 private key)');
    return signerOf(createPrivateKey({ key: Buffer.concat([ED25519_PKCS8_PREFIX, DEV_SEED]), format: 'der', type: 'pkcs8' }), true);
  }
  let key: KeyObject;
  try {
    key = createPrivateKey({ key: pem.replaceAll('\\n', '\n'), format: 'pem' });
  } catch (error) {
    throw new SigningKeyError(`is not a PEM private key: ${error instanceof Error ? error.message : String(error)}`);
  }
  return signerOf(key, false);
}

export function publicKeyPem(publicKey: KeyObject): string {
  return publicKey.export({ type: 'spki', format: 'pem' }).toString();
}

export function parsePublicKey(pem: string): KeyObject {
  const key = createPublicKey({ key: pem, format: 'pem' });
  if (key.asymmetricKeyType !== 'ed25519') throw new SigningKeyError(`the public key must be Ed25519, got ${key.asymmetricKeyType}`);
  return key;
}

/** A signed tree head. */
export interface Checkpoint {
  origin: string;
  treeSize: number;
  rootHash: Buffer;
  issuedAt: Date;
  keyId: string;
  signature: Buffer;
}

/**
 * The signed bytes: a versioned line-based note (after the transparency-dev checkpoint
 * format), so a third party can reproduce them with no library at all.
 */
export function checkpointBody(c: Pick<Checkpoint, 'origin' | 'treeSize' | 'rootHash' | 'issuedAt'>): Buffer {
  return Buffer.from(`ledgerline-audit-checkpoint/v1\n${c.origin}\n${c.treeSize}\n${c.rootHash.toString('base64')}\n${c.issuedAt.getTime()}\n`, 'utf8');
}

export function signCheckpoint(signer: CheckpointSigner, c: Pick<Checkpoint, 'origin' | 'treeSize' | 'rootHash' | 'issuedAt'>): Checkpoint {
  if (c.origin.includes('\n')) throw new RangeError('a log origin must be one line');
  return { ...c, keyId: signer.keyId, signature: sign(null, checkpointBody(c), signer.privateKey) };
}

/**
 * The public keys a verifier trusts: one, or several for a log whose signing key was rotated
 * (each checkpoint is signed by the key of its time). They come from the verifier, never from
 * the log's own database, which a forger could add a key to; a key the database names is
 * trusted only through a transition signed by a key already trusted (`trustThroughTransitions`).
 */
export type TrustedKeys = KeyObject | readonly KeyObject[];

/** True when one of the trusted keys signed `c` (the checkpoint's key id only picks which to try first). */
export function checkpointSignatureValid(keys: TrustedKeys, c: Checkpoint): boolean {
  if (c.signature.length !== 64) return false;
  const list = Array.isArray(keys) ? (keys as readonly KeyObject[]) : [keys as KeyObject];
  const named = list.filter((k) => keyIdOf(k) === c.keyId);
  return [...named, ...list.filter((k) => !named.includes(k))].some((k) => verify(null, checkpointBody(c), k, c.signature));
}

// ------------------------------------------------------------------------------------------
// Signing-key transitions

/**
 * A rotation of the signing key, vouched for by the outgoing key: it signs the incoming public
 * key, so a party that trusts only the old key can follow the log across the change. The
 * signed bytes are a note like a checkpoint's:
 * `ledgerline-audit-key-transition/v1\n<origin>\n<outgoing key id>\n<incoming key id>\n<base64 SPKI DER of the incoming key>\n<issued at, ms>\n`.
 */
export interface KeyTransition {
  origin: string;
  fromKeyId: string;
  toPublicKey: KeyObject;
  issuedAt: Date;
  /** Ed25519 by the outgoing key over `keyTransitionBody`. */
  signature: Buffer;
}

export function keyTransitionBody(t: Omit<KeyTransition, 'signature'>): Buffer {
  const der = t.toPublicKey.export({ type: 'spki', format: 'der' });
  return Buffer.from(`ledgerline-audit-key-transition/v1\n${t.origin}\n${t.fromKeyId}\n${keyIdOf(t.toPublicKey)}\n${der.toString('base64')}\n${t.issuedAt.getTime()}\n`, 'utf8');
}

/** The outgoing signer's statement that `to` signs the log `origin` from now on. */
export function signKeyTransition(from: CheckpointSigner, origin: string, to: KeyObject, issuedAt: Date): KeyTransition {
  if (origin.includes('\n')) throw new RangeError('a log origin must be one line');
  if (to.asymmetricKeyType !== 'ed25519') throw new SigningKeyError(`the incoming key must be Ed25519, got ${to.asymmetricKeyType ?? 'a symmetric key'}`);
  if (keyIdOf(to) === from.keyId) throw new SigningKeyError('the incoming key is the outgoing key');
  const t = { origin, fromKeyId: from.keyId, toPublicKey: to, issuedAt };
  return { ...t, signature: sign(null, keyTransitionBody(t), from.privateKey) };
}

/**
 * The trusted keys, widened by the transitions of the log `origin` that a trusted key signed,
 * and by those the keys so added signed, in turn. A transition whose signature does not verify
 * under a key already trusted adds nothing: whoever can write to the log's database cannot
 * make a key trusted without an outgoing private key. Returns the keys and the transitions
 * followed, in the order they were.
 */
export function trustThroughTransitions(keys: TrustedKeys, transitions: readonly KeyTransition[], origin: string): { keys: KeyObject[]; followed: KeyTransition[] } {
  const trusted = Array.isArray(keys) ? [...(keys as readonly KeyObject[])] : [keys as KeyObject];
  const ids = new Set(trusted.map(keyIdOf));
  const followed: KeyTransition[] = [];
  for (let grew = true; grew; ) {
    grew = false;
    for (const t of transitions) {
      if (t.origin !== origin || followed.includes(t) || ids.has(keyIdOf(t.toPublicKey)) || t.toPublicKey.asymmetricKeyType !== 'ed25519') continue;
      const signer = trusted.find((k) => keyIdOf(k) === t.fromKeyId);
      if (signer === undefined || t.signature.length !== 64 || !verify(null, keyTransitionBody(t), signer, t.signature)) continue;
      trusted.push(t.toPublicKey);
      ids.add(keyIdOf(t.toPublicKey));
      followed.push(t);
      grew = true;
    }
  }
  return { keys: trusted, followed };
}

// ------------------------------------------------------------------------------------------
// Per-subject encryption (crypto-shredding)

const IV_BYTES = 12;
const TAG_BYTES = 16;
export const SUBJECT_KEY_BYTES = 32;

export const newSubjectKey = (): Buffer => randomBytes(SUBJECT_KEY_BYTES);

/**
 * AES-256-GCM, iv ‖ tag ‖ ciphertext. The record id is the associated data, so a ciphertext
 * moved to another record does not decrypt.
 */
export function seal(key: Buffer, plaintext: string, recordId: string): Buffer {
  const iv = randomBytes(IV_BYTES);
  const cipher = createCipheriv('aes-256-gcm', key, iv);
  cipher.setAAD(Buffer.from(recordId, 'utf8'));
  const body = Buffer.concat([cipher.update(plaintext, 'utf8'), cipher.final()]);
  return Buffer.concat([iv, cipher.getAuthTag(), body]);
}

/** The plaintext, or null when this key did not seal it (the subject's key was destroyed and a new one made). */
export function open(key: Buffer, sealed: Buffer, recordId: string): string | null {
  if (sealed.length < IV_BYTES + TAG_BYTES) return null;
  const decipher = createDecipheriv('aes-256-gcm', key, sealed.subarray(0, IV_BYTES));
  decipher.setAAD(Buffer.from(recordId, 'utf8'));
  decipher.setAuthTag(sealed.subarray(IV_BYTES, IV_BYTES + TAG_BYTES));
  try {
    return Buffer.concat([decipher.update(sealed.subarray(IV_BYTES + TAG_BYTES)), decipher.final()]).toString('utf8');
  } catch {
    return null;
  }
}

/** The key-encryption key is malformed, missing, or not the one the stored subject keys need. */
export class KeyEncryptionKeyError extends Error {
  override readonly name = 'KeyEncryptionKeyError';
}

/** Wraps the subject keys at rest (`AUDIT_KEY_ENCRYPTION_KEY`). */
export interface KeyEncryptionKey {
  /** Names the key beside each key it wraps: the first 16 hex digits of its SHA-256. */
  readonly id: string;
  readonly key: Buffer;
  /**
   * Earlier key-encryption keys, by id, during a rotation: keys wrapped under them still open,
   * and the sequencer wraps them again under this one (a thousand a round).
   */
  readonly previous: ReadonlyMap<string, Buffer>;
}

/** One key: 32 random bytes in base64url (or base64). */
function parseOneKey(text: string, where: string): { id: string; key: Buffer } {
  const trimmed = text.trim();
  if (!/^[A-Za-z0-9_\-+/]+={0,2}$/.test(trimmed)) {
    throw new KeyEncryptionKeyError(`${where}must be ${SUBJECT_KEY_BYTES} random bytes in base64url, for example the output of: openssl rand -base64 32`);
  }
  const key = Buffer.from(trimmed.replaceAll('+', '-').replaceAll('/', '_').replace(/=+$/, ''), 'base64url');
  if (key.length !== SUBJECT_KEY_BYTES) throw new KeyEncryptionKeyError(`${where}must be ${SUBJECT_KEY_BYTES} bytes; got ${key.length}`);
  return { id: sha256(key).toString('hex').slice(0, 16), key };
}

/**
 * Reads the key-encryption key: `current` or, during a rotation, `current,previous,...`
 * (comma-separated). The first wraps; the others only open what they wrapped, until the
 * sequencer has wrapped every key again under the first (`npm run audit -- kek-status`).
 */
export function parseKeyEncryptionKey(text: string): KeyEncryptionKey {
  const parts = text.split(',');
  const keys = parts.map((part, i) => parseOneKey(part, parts.length === 1 ? '' : `(key ${i + 1} of ${parts.length}) `));
  const [current, ...previous] = keys as [{ id: string; key: Buffer }, ...{ id: string; key: Buffer }[]];
  const ids = new Set(keys.map((k) => k.id));
  if (ids.size !== keys.length) throw new KeyEncryptionKeyError('names the same key twice');
  return { id: current.id, key: current.key, previous: new Map(previous.map((k) => [k.id, k.key])) };
}

/** The associated data of a wrapped subject key: a wrapped key moved to another subject does not open. */
const wrapAad = (subject: string): string => `audit.subject_key:${subject}`;

/** A subject key as stored: in clear without a key-encryption key, else wrapped under it. */
export function storedSubjectKey(kek: KeyEncryptionKey | null, subject: string, key: Buffer): { key: Buffer; kekId: string | null } {
  return kek === null ? { key, kekId: null } : { key: seal(kek.key, key.toString('base64'), wrapAad(subject)), kekId: kek.id };
}

/**
 * A stored subject key in clear. Refuses, naming the reason, a wrapped key with no or another
 * key-encryption key, and one that does not open (changed, or moved from another subject).
 */
export function clearSubjectKey(kek: KeyEncryptionKey | null, subject: string, stored: Buffer, kekId: string | null): Buffer {
  if (kekId === null) return stored;
  if (kek === null) throw new KeyEncryptionKeyError(`the key of subject ${subject} is wrapped, and no key-encryption key is configured (AUDIT_KEY_ENCRYPTION_KEY)`);
  const wrapping = kek.id === kekId ? kek.key : kek.previous.get(kekId);
  if (wrapping === undefined) {
    const also = kek.previous.size === 0 ? '' : ` or the previous ${[...kek.previous.keys()].join(', ')}`;
    throw new KeyEncryptionKeyError(`the key of subject ${subject} is wrapped under key-encryption key ${kekId}, not the configured ${kek.id}${also}`);
  }
  const text = open(wrapping, stored, wrapAad(subject));
  const key = text === null ? null : Buffer.from(text, 'base64');
  if (key?.length !== SUBJECT_KEY_BYTES) throw new KeyEncryptionKeyError(`the wrapped key of subject ${subject} does not open: changed, or moved from another subject`);
  return key;
}
