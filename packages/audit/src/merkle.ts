/**
 * RFC 6962 Merkle tree hashing, proofs and their verification. Pure functions over byte
 * arrays: no storage, no clock, so a third party can run the verifier with nothing but the
 * checkpoint's public key (see `verify-proof.ts`).
 *
 * Leaf hash: SHA-256(0x00 ‖ data). Node hash: SHA-256(0x01 ‖ left ‖ right). The tree over n
 * leaves splits at k, the largest power of two below n (RFC 6962 §2.1).
 *
 * Indices and sizes are bigints in the verifier: proofs arrive from outside, and a size above
 * 2^53 must be rejected or handled exactly, never rounded.
 */
import { hash } from 'node:crypto';

export const HASH_BYTES = 32;

const LEAF_PREFIX = Buffer.from([0x00]);
const NODE_PREFIX = Buffer.from([0x01]);

// One-shot crypto.hash over one buffer: several times cheaper than a createHash object for
// inputs this small, and the sequencer hashes about two per record.
export function leafHash(data: Uint8Array): Buffer {
  return hash('sha256', Buffer.concat([LEAF_PREFIX, data]), 'buffer');
}

/** 0x01 ‖ left ‖ right, filled in place: crypto.hash is synchronous, so one buffer serves every call. */
const NODE_INPUT = Buffer.alloc(1 + 2 * HASH_BYTES, 0x01);

export function nodeHash(left: Uint8Array, right: Uint8Array): Buffer {
  if (left.length !== HASH_BYTES || right.length !== HASH_BYTES) return hash('sha256', Buffer.concat([NODE_PREFIX, left, right]), 'buffer');
  NODE_INPUT.set(left, 1);
  NODE_INPUT.set(right, 1 + HASH_BYTES);
  return hash('sha256', NODE_INPUT, 'buffer');
}

/** The root of the empty tree: SHA-256 of nothing (RFC 6962 §2.1). */
export const EMPTY_ROOT: Buffer = hash('sha256', Buffer.alloc(0), 'buffer');

/** A completed perfect subtree: 2^level leaves starting at leaf `index << level`. */
export interface Subtree {
  level: number;
  index: number;
  hash: Buffer;
}

/**
 * The right edge of a tree: the perfect subtrees that tile leaves [0, size), largest (leftmost)
 * first. Appending a leaf merges equal-level neighbours, so the frontier holds at most
 * log2(size) + 1 hashes, and the root follows from it without touching any earlier leaf.
 */
export class Frontier {
  #size: number;
  readonly #nodes: Subtree[];

  constructor(size = 0, nodes: Subtree[] = []) {
    const expected = perfectSubtrees(0, size);
    if (nodes.length !== expected.length || nodes.some((n, i) => n.level !== expected[i]?.level || n.index !== expected[i]?.index)) {
      throw new Error(`invariant: a frontier of size ${size} needs subtrees ${JSON.stringify(expected)}`);
    }
    this.#size = size;
    this.#nodes = nodes.map((n) => ({ ...n }));
  }

  get size(): number {
    return this.#size;
  }

  clone(): Frontier {
    return new Frontier(this.#size, this.#nodes);
  }

  /** Appends one leaf hash; returns every perfect subtree it completed (its own leaf first). */
  append(hash: Buffer): Subtree[] {
    const completed: Subtree[] = [{ level: 0, index: this.#size, hash }];
    this.#add(hash, 1, completed);
    return completed;
  }

  /**
   * Appends `count` leaf hashes, 32 bytes each, from `hashes`; returns the perfect subtrees
   * of level `minLevel` or above (and above 0: never the leaves) that they completed. The same
   * as `append` for each, without its arrays.
   */
  appendAll(hashes: Buffer, count: number, minLevel: number): Subtree[] {
    const kept: Subtree[] = [];
    for (let i = 0; i < count; i += 1) this.#add(hashes.subarray(i * HASH_BYTES, (i + 1) * HASH_BYTES), Math.max(1, minLevel), kept);
    return kept;
  }

  /** Adds one leaf, folding the subtrees it completes; pushes to `kept` those of level `minLevel` (≥ 1) or above. */
  #add(leaf: Buffer, minLevel: number, kept: Subtree[]): void {
    let level = 0;
    let index = this.#size;
    let hash = leaf;
    for (let last = this.#nodes.at(-1); last !== undefined && last.level === level; last = this.#nodes.at(-1)) {
      this.#nodes.pop();
      hash = nodeHash(last.hash, hash);
      level += 1;
      index = last.index / 2;
      if (level >= minLevel) kept.push({ level, index, hash });
    }
    this.#nodes.push({ level, index, hash });
    this.#size += 1;
  }

  root(): Buffer {
    return foldSubtrees(this.#nodes.map((n) => n.hash));
  }
}

/** MTH of a left-aligned range from the hashes of its perfect subtrees, largest first. */
export function foldSubtrees(hashes: readonly Buffer[]): Buffer {
  let acc = hashes.at(-1);
  if (acc === undefined) return EMPTY_ROOT;
  for (let i = hashes.length - 2; i >= 0; i -= 1) acc = nodeHash(hashes[i] as Buffer, acc);
  return acc;
}

/**
 * The perfect aligned subtrees that tile [lo, hi), largest first. For the ranges a proof uses
 * (lo aligned to a power of two at least hi - lo) folding their hashes gives MTH(D[lo:hi]).
 */
export function perfectSubtrees(lo: number, hi: number): { level: number; index: number }[] {
  const out: { level: number; index: number }[] = [];
  let at = lo;
  while (at < hi) {
    let level = 0;
    // Grow while the subtree stays aligned at `at` and inside the range.
    while (at % 2 ** (level + 1) === 0 && at + 2 ** (level + 1) <= hi) level += 1;
    out.push({ level, index: at / 2 ** level });
    at += 2 ** level;
  }
  return out;
}

/** Largest power of two strictly below n (n >= 2). */
function splitPoint(n: number): number {
  let k = 1;
  while (k * 2 < n) k *= 2;
  return k;
}

/** A range [lo, hi) of leaves whose MTH is one element of a proof. */
export interface Range {
  lo: number;
  hi: number;
}

/** The ranges of an inclusion proof for leaf `index` in a tree of `size` (RFC 6962 §2.1.1 PATH), leaf to root. */
export function inclusionRanges(index: number, size: number): Range[] {
  if (!(Number.isSafeInteger(index) && Number.isSafeInteger(size) && index >= 0 && index < size)) {
    throw new RangeError(`leaf index ${index} is not in a tree of size ${size}`);
  }
  const path: Range[] = [];
  let lo = 0;
  let hi = size;
  while (hi - lo > 1) {
    const k = splitPoint(hi - lo);
    if (index - lo < k) {
      path.push({ lo: lo + k, hi });
      hi = lo + k;
    } else {
      path.push({ lo, hi: lo + k });
      lo += k;
    }
  }
  return path.reverse();
}

/** The ranges of a consistency proof from size m to size n (RFC 6962 §2.1.2 SUBPROOF), leaf to root. */
export function consistencyRanges(m: number, n: number): Range[] {
  if (!(Number.isSafeInteger(m) && Number.isSafeInteger(n) && m >= 0 && m <= n)) {
    throw new RangeError(`no consistency proof from size ${m} to size ${n}`);
  }
  if (m === 0 || m === n) return [];
  const proof: Range[] = [];
  let lo = 0;
  let hi = n;
  let mm = m;
  let complete = true;
  while (mm !== hi - lo) {
    const k = splitPoint(hi - lo);
    if (mm <= k) {
      proof.push({ lo: lo + k, hi });
      hi = lo + k;
    } else {
      proof.push({ lo, hi: lo + k });
      lo += k;
      mm -= k;
      complete = false;
    }
  }
  if (!complete) proof.push({ lo, hi });
  return proof.reverse();
}

// ------------------------------------------------------------------------------------------
// Verification, after transparency-dev/merkle's proof/verify.go: every length is checked, so
// a proof with a missing, extra or reordered element never verifies.

export class ProofError extends Error {
  override readonly name = 'ProofError';
}

const bitLength = (x: bigint): number => (x === 0n ? 0 : x.toString(2).length);
const onesCount = (x: bigint): number => x.toString(2).replaceAll('0', '').length;
const trailingZeros = (x: bigint): number => {
  let n = 0;
  for (let v = x; v > 0n && (v & 1n) === 0n; v >>= 1n) n += 1;
  return n;
};

function checkHash(name: string, h: Uint8Array): void {
  if (h.length !== HASH_BYTES) throw new ProofError(`${name} must be ${HASH_BYTES} bytes, got ${h.length}`);
}

/** Splits a proof for `index` in `size` into the hashes below the border and those on it. */
function decompose(index: bigint, size: bigint): { inner: number; border: number } {
  const inner = bitLength(index ^ (size - 1n));
  return { inner, border: onesCount(index >> BigInt(inner)) };
}

function chainInner(seed: Uint8Array, proof: readonly Uint8Array[], index: bigint): Uint8Array {
  return proof.reduce((acc, h, i) => (((index >> BigInt(i)) & 1n) === 0n ? nodeHash(acc, h) : nodeHash(h, acc)), seed);
}

function chainInnerRight(seed: Uint8Array, proof: readonly Uint8Array[], index: bigint): Uint8Array {
  return proof.reduce((acc, h, i) => (((index >> BigInt(i)) & 1n) === 1n ? nodeHash(h, acc) : acc), seed);
}

function chainBorderRight(seed: Uint8Array, proof: readonly Uint8Array[]): Uint8Array {
  return proof.reduce((acc, h) => nodeHash(h, acc), seed);
}

/** The root an inclusion proof implies; throws ProofError when the proof cannot be one. */
export function rootFromInclusionProof(index: bigint, size: bigint, leaf: Uint8Array, proof: readonly Uint8Array[]): Uint8Array {
  if (index < 0n || index >= size) throw new ProofError(`leaf index ${index} is not in a tree of size ${size}`);
  checkHash('leaf hash', leaf);
  proof.forEach((h, i) => checkHash(`proof[${i}]`, h));
  const { inner, border } = decompose(index, size);
  if (proof.length !== inner + border) throw new ProofError(`proof has ${proof.length} hashes, a tree of size ${size} needs ${inner + border}`);
  return chainBorderRight(chainInner(leaf, proof.slice(0, inner), index), proof.slice(inner));
}

export function verifyInclusion(index: bigint, size: bigint, leaf: Uint8Array, proof: readonly Uint8Array[], root: Uint8Array): void {
  checkHash('root', root);
  const computed = rootFromInclusionProof(index, size, leaf, proof);
  if (!Buffer.from(computed).equals(root)) throw new ProofError('the inclusion proof does not lead to the root');
}

export function verifyConsistency(size1: bigint, size2: bigint, proof: readonly Uint8Array[], root1: Uint8Array, root2: Uint8Array): void {
  checkHash('root1', root1);
  checkHash('root2', root2);
  proof.forEach((h, i) => checkHash(`proof[${i}]`, h));
  if (size1 < 0n || size2 < size1) throw new ProofError(`size ${size2} is smaller than size ${size1}`);
  if (size1 === size2) {
    if (proof.length > 0) throw new ProofError('equal sizes need an empty proof');
    if (!Buffer.from(root1).equals(root2)) throw new ProofError('equal sizes with different roots');
    return;
  }
  if (size1 === 0n) {
    if (proof.length > 0) throw new ProofError('a proof from the empty tree must be empty');
    return;
  }
  if (proof.length === 0) throw new ProofError('the proof is empty');
  const decomposed = decompose(size1 - 1n, size2);
  const shift = trailingZeros(size1);
  const inner = decomposed.inner - shift;
  // The proof starts with the root of the subtree of size 2^shift, unless size1 is that subtree.
  const seedIsRoot1 = size1 === 1n << BigInt(shift);
  const seed = seedIsRoot1 ? root1 : (proof[0] as Uint8Array);
  const rest = proof.slice(seedIsRoot1 ? 0 : 1);
  if (rest.length !== inner + decomposed.border) {
    throw new ProofError(`proof has ${proof.length} hashes, sizes ${size1} → ${size2} need ${(seedIsRoot1 ? 0 : 1) + inner + decomposed.border}`);
  }
  const mask = (size1 - 1n) >> BigInt(shift);
  const hash1 = chainBorderRight(chainInnerRight(seed, rest.slice(0, inner), mask), rest.slice(inner));
  if (!Buffer.from(hash1).equals(root1)) throw new ProofError('the consistency proof does not lead to the first root');
  const hash2 = chainBorderRight(chainInner(seed, rest.slice(0, inner), mask), rest.slice(inner));
  if (!Buffer.from(hash2).equals(root2)) throw new ProofError('the consistency proof does not lead to the second root');
}

/** MTH over leaf hashes held in memory: the reference for tests and small trees. */
export function rootOf(leafHashes: readonly Buffer[], lo = 0, hi = leafHashes.length): Buffer {
  if (hi - lo === 0) return EMPTY_ROOT;
  if (hi - lo === 1) return leafHashes[lo] as Buffer;
  const k = splitPoint(hi - lo);
  return nodeHash(rootOf(leafHashes, lo, lo + k), rootOf(leafHashes, lo + k, hi));
}
