/**
 * Proof bundles: self-contained JSON that a third party checks with nothing but the log's
 * public key (`verifyBundle`, or `npm run audit -- verify-proof`). A bundle carries the signed
 * checkpoint(s) and the proof; the verifier checks the signatures first and then every hash
 * of the proof, and accepts nothing it has not checked.
 */
import { createPublicKey } from 'node:crypto';
import { checkpointSignatureValid, trustThroughTransitions, type Checkpoint, type KeyTransition, type TrustedKeys } from './keys.ts';
import { leafHash, ProofError, verifyConsistency, verifyInclusion } from './merkle.ts';

/** The largest time a Date holds, in ms either side of the epoch (ECMA-262 §21.4.1.22): beyond it a Date is invalid. */
const DATE_MS_MAX = 8.64e15;

export interface CheckpointJson {
  origin: string;
  treeSize: number;
  /** Base64. */
  rootHash: string;
  /** Milliseconds since the epoch, as signed. */
  issuedAtMs: number;
  keyId: string;
  /** Base64 Ed25519 signature over the checkpoint body (see keys.ts `checkpointBody`). */
  signature: string;
}

/** A signing-key transition as a bundle carries it (keys.ts `KeyTransition`). */
export interface KeyTransitionJson {
  origin: string;
  fromKeyId: string;
  /** Base64 SPKI DER of the incoming public key. */
  toPublicKey: string;
  issuedAtMs: number;
  /** Base64 Ed25519 signature by the outgoing key over `keyTransitionBody`. */
  signature: string;
}

export interface InclusionBundle {
  kind: 'inclusion';
  checkpoint: CheckpointJson;
  /** The log's signing-key transitions, when it has any: a verifier who trusts an earlier key follows them (only those its keys signed). */
  keyTransitions?: KeyTransitionJson[];
  leafIndex: number;
  /** Base64 of the exact bytes the leaf hashes (canonical JSON of the record's fields). */
  leafData: string;
  proof: string[];
}

export interface ConsistencyBundle {
  kind: 'consistency';
  from: CheckpointJson;
  to: CheckpointJson;
  keyTransitions?: KeyTransitionJson[];
  proof: string[];
}

export type ProofBundle = InclusionBundle | ConsistencyBundle;

export function checkpointJson(c: Checkpoint): CheckpointJson {
  return {
    origin: c.origin,
    treeSize: c.treeSize,
    rootHash: c.rootHash.toString('base64'),
    issuedAtMs: c.issuedAt.getTime(),
    keyId: c.keyId,
    signature: c.signature.toString('base64'),
  };
}

export function keyTransitionJson(t: KeyTransition): KeyTransitionJson {
  return {
    origin: t.origin,
    fromKeyId: t.fromKeyId,
    toPublicKey: t.toPublicKey.export({ type: 'spki', format: 'der' }).toString('base64'),
    issuedAtMs: t.issuedAt.getTime(),
    signature: t.signature.toString('base64'),
  };
}

export function keyTransitionFromJson(t: KeyTransitionJson, name: string): KeyTransition {
  if (t === null || typeof t !== 'object' || typeof t.origin !== 'string' || typeof t.fromKeyId !== 'string' || !Number.isSafeInteger(t.issuedAtMs) || Math.abs(t.issuedAtMs) > DATE_MS_MAX) {
    throw new ProofError(`${name} is not a key transition`);
  }
  let toPublicKey;
  try {
    toPublicKey = createPublicKey({ key: b64(t.toPublicKey, `${name}.toPublicKey`), format: 'der', type: 'spki' });
  } catch (error) {
    if (error instanceof ProofError) throw error;
    throw new ProofError(`${name}.toPublicKey is not a public key`);
  }
  return { origin: t.origin, fromKeyId: t.fromKeyId, toPublicKey, issuedAt: new Date(t.issuedAtMs), signature: b64(t.signature, `${name}.signature`) };
}

/** The verifier's keys, widened by the bundle's transitions that those keys signed. */
function widened(keys: TrustedKeys, bundle: { keyTransitions?: KeyTransitionJson[] }, origin: string): TrustedKeys {
  const carried = bundle.keyTransitions;
  if (carried === undefined) return keys;
  if (!Array.isArray(carried)) throw new ProofError('keyTransitions must be an array');
  return trustThroughTransitions(keys, carried.map((t, i) => keyTransitionFromJson(t, `keyTransitions[${i}]`)), origin).keys;
}

/**
 * A checkpoint from its JSON (a bundle's, or one held outside the log: `audit verify
 * --checkpoint`), strictly: a one-line origin, a positive safe-integer size, an issue time a
 * Date holds, canonical base64. Throws ProofError naming `name` and what is wrong; the
 * signature is not checked here.
 */
export function checkpointFromJson(c: unknown, name: string): Checkpoint {
  if (c === null || typeof c !== 'object' || Array.isArray(c)) throw new ProofError(`${name} is not a checkpoint (a JSON object)`);
  const { origin, treeSize, rootHash, issuedAtMs, keyId, signature } = c as Partial<Record<keyof CheckpointJson, unknown>>;
  if (typeof origin !== 'string' || origin.includes('\n')) throw new ProofError(`${name}.origin must be a one-line string`);
  if (typeof treeSize !== 'number' || !Number.isSafeInteger(treeSize) || treeSize < 1) throw new ProofError(`${name}.treeSize must be a positive integer`);
  if (typeof issuedAtMs !== 'number' || !Number.isSafeInteger(issuedAtMs) || Math.abs(issuedAtMs) > DATE_MS_MAX) throw new ProofError(`${name}.issuedAtMs must be an integer time in milliseconds since the epoch`);
  return { origin, treeSize, rootHash: b64(rootHash, `${name}.rootHash`), issuedAt: new Date(issuedAtMs), keyId: typeof keyId === 'string' ? keyId : '', signature: b64(signature, `${name}.signature`) };
}

/** Strict base64: a value that does not round-trip is rejected, not silently truncated. */
function b64(text: unknown, name: string): Buffer {
  if (typeof text !== 'string') throw new ProofError(`${name} must be base64`);
  const bytes = Buffer.from(text, 'base64');
  if (bytes.toString('base64') !== text) throw new ProofError(`${name} is not canonical base64`);
  return bytes;
}

function proofHashes(proof: unknown): Buffer[] {
  if (!Array.isArray(proof)) throw new ProofError('proof must be an array of base64 hashes');
  return proof.map((h, i) => b64(h, `proof[${i}]`));
}

function checkSigned(keys: TrustedKeys, c: Checkpoint, name: string): void {
  if (!checkpointSignatureValid(keys, c)) throw new ProofError(`${name}: the signature does not verify under the trusted public key${Array.isArray(keys) ? 's' : ''}`);
}

/**
 * Throws ProofError saying what failed; returns what was proven. `publicKey`: the trusted key,
 * or several when the signing key was rotated (a consistency proof may span the change); the
 * bundle's key transitions add the keys that a trusted key vouched for, and no others.
 */
export function verifyBundle(bundle: ProofBundle, publicKey: TrustedKeys): string {
  if (bundle?.kind === 'inclusion') {
    const cp = checkpointFromJson(bundle.checkpoint, 'checkpoint');
    checkSigned(widened(publicKey, bundle, cp.origin), cp, 'checkpoint');
    if (!Number.isSafeInteger(bundle.leafIndex)) throw new ProofError('leafIndex must be an integer');
    const data = b64(bundle.leafData, 'leafData');
    // The leaf names its own position; a proof for another index must not pass as this record's.
    let seq: unknown;
    try {
      seq = (JSON.parse(data.toString('utf8')) as { seq?: unknown }).seq;
    } catch {
      throw new ProofError('leafData is not a record');
    }
    if (seq !== bundle.leafIndex) throw new ProofError(`leafData is record ${String(seq)}, not leaf ${bundle.leafIndex}`);
    verifyInclusion(BigInt(bundle.leafIndex), BigInt(cp.treeSize), leafHash(data), proofHashes(bundle.proof), cp.rootHash);
    return `record ${bundle.leafIndex} is included in ${cp.origin} at tree size ${cp.treeSize}`;
  }
  if (bundle?.kind === 'consistency') {
    const from = checkpointFromJson(bundle.from, 'from');
    const to = checkpointFromJson(bundle.to, 'to');
    const keys = widened(publicKey, bundle, to.origin);
    checkSigned(keys, from, 'from');
    checkSigned(keys, to, 'to');
    if (from.origin !== to.origin) throw new ProofError(`the checkpoints are of different logs (${from.origin}, ${to.origin})`);
    verifyConsistency(BigInt(from.treeSize), BigInt(to.treeSize), proofHashes(bundle.proof), from.rootHash, to.rootHash);
    return `${to.origin} at tree size ${to.treeSize} extends tree size ${from.treeSize}`;
  }
  throw new ProofError('a bundle must be of kind inclusion or consistency');
}
