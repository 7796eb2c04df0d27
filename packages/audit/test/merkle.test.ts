/**
 * RFC 6962 hashing and proofs against the public test vectors of transparency-dev/merkle
 * (testonly/constants.go and proof/verify_test.go), then property tests: every proof this
 * code generates verifies, and every corruption of one is rejected.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { propertySeed } from '@ledgerline/testing';
import {
  consistencyRanges,
  EMPTY_ROOT,
  Frontier,
  inclusionRanges,
  leafHash,
  ProofError,
  rootFromInclusionProof,
  rootOf,
  verifyConsistency,
  verifyInclusion,
} from '../src/merkle.ts';

const hex = (s: string): Buffer => Buffer.from(s, 'hex');

const LEAVES = ['', '00', '10', '2021', '3031', '40414243', '5051525354555657', '606162636465666768696a6b6c6d6e6f'].map(hex);
/** RootHashes(): index = tree size. */
const ROOTS = [
  'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855',
  '6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d',
  'fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125',
  'aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77',
  'd37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7',
  '4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4',
  '76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef',
  'ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c',
  '5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328',
].map(hex);
/** inclusionProofs: leaf is 1-based in the vectors. */
const INCLUSION = [
  { leaf: 1, size: 8, proof: ['96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7', '5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e', '6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4'] },
  { leaf: 6, size: 8, proof: ['bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b', 'ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0', 'd37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7'] },
  { leaf: 3, size: 3, proof: ['fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125'] },
  { leaf: 2, size: 5, proof: ['6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d', '5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e', 'bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b'] },
].map((v) => ({ ...v, proof: v.proof.map(hex) }));
const CONSISTENCY = [
  { size1: 1, size2: 8, proof: ['96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7', '5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e', '6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4'] },
  { size1: 6, size2: 8, proof: ['0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a', 'ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0', 'd37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7'] },
  { size1: 2, size2: 5, proof: ['5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e', 'bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b'] },
  { size1: 6, size2: 7, proof: ['0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a', 'b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f', 'd37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7'] },
].map((v) => ({ ...v, proof: v.proof.map(hex) }));

const leafHashes = LEAVES.map(leafHash);
/** A proof from ranges, hashed over an in-memory tree. */
const proofOf = (ranges: { lo: number; hi: number }[], hashes: Buffer[] = leafHashes): Buffer[] => ranges.map((r) => rootOf(hashes, r.lo, r.hi));

test('roots of the RFC 6962 vector trees, by recursion and by the frontier', () => {
  const frontier = new Frontier();
  assert.deepEqual(frontier.root(), EMPTY_ROOT);
  for (let size = 0; size <= 8; size += 1) {
    assert.deepEqual(rootOf(leafHashes.slice(0, size)), ROOTS[size], `size ${size}`);
    if (size > 0) frontier.append(leafHashes[size - 1]!);
    assert.deepEqual(frontier.root(), ROOTS[size], `frontier size ${size}`);
  }
  // A frontier resumed from its subtrees continues identically.
  const resumed = new Frontier(5, [
    { level: 2, index: 0, hash: rootOf(leafHashes, 0, 4) },
    { level: 0, index: 4, hash: leafHashes[4]! },
  ]);
  for (let i = 5; i < 8; i += 1) resumed.append(leafHashes[i]!);
  assert.deepEqual(resumed.root(), ROOTS[8]);
  assert.throws(() => new Frontier(3, []), /invariant/);
});

test('inclusion proofs: generated equal the vectors, and verify', () => {
  for (const v of INCLUSION) {
    const index = v.leaf - 1;
    assert.deepEqual(proofOf(inclusionRanges(index, v.size)), v.proof, `leaf ${index} size ${v.size}`);
    verifyInclusion(BigInt(index), BigInt(v.size), leafHashes[index]!, v.proof, ROOTS[v.size]!);
  }
  // A single-leaf tree: the empty proof, the leaf is the root.
  verifyInclusion(0n, 1n, leafHashes[0]!, [], ROOTS[1]!);
});

test('consistency proofs: generated equal the vectors, and verify', () => {
  for (const v of CONSISTENCY) {
    assert.deepEqual(proofOf(consistencyRanges(v.size1, v.size2)), v.proof, `${v.size1} → ${v.size2}`);
    verifyConsistency(BigInt(v.size1), BigInt(v.size2), v.proof, ROOTS[v.size1]!, ROOTS[v.size2]!);
  }
  verifyConsistency(0n, 5n, [], EMPTY_ROOT, ROOTS[5]!);
  verifyConsistency(4n, 4n, [], ROOTS[4]!, ROOTS[4]!);
  assert.deepEqual(consistencyRanges(3, 3), []);
});

const SOME = hex('abacaba000000000000000000000000000000000000000000060061e00123456');

/** transparency-dev's corruptInclusionProof probes: each must be rejected. */
function inclusionProbes(index: bigint, size: bigint, proof: Buffer[], root: Buffer, leaf: Buffer) {
  const flipped = proof.map((_, i) => proof.map((h, j) => (j === i ? Buffer.from([h[0]! ^ 8, ...h.subarray(1)]) : h)));
  return [
    { index: index - 1n, size, leaf, proof, root },
    { index: index + 1n, size, leaf, proof, root },
    { index: index ^ 2n, size, leaf, proof, root },
    { index, size: size * 2n, leaf, proof, root },
    { index, size: size / 2n, leaf, proof, root },
    { index, size, leaf: Buffer.from('WrongLeaf'), proof, root },
    { index, size, leaf, proof, root: EMPTY_ROOT },
    { index, size, leaf, proof, root: SOME },
    { index, size, leaf, proof: [...proof, Buffer.alloc(0)], root },
    { index, size, leaf, proof: [...proof, root], root },
    { index, size, leaf, proof: [Buffer.alloc(0), ...proof], root },
    { index, size, leaf, proof: [root, ...proof], root },
    ...flipped.map((p) => ({ index, size, leaf, proof: p, root })),
    ...(proof.length > 0 ? [{ index, size, leaf, proof: proof.slice(0, -1), root }] : []),
    ...(proof.length > 1 ? [{ index, size, leaf, proof: [proof[0]!, SOME, ...proof.slice(1)], root }] : []),
  ];
}

function consistencyProbes(size1: bigint, size2: bigint, root1: Buffer, root2: Buffer, proof: Buffer[]) {
  const flipped = proof.map((_, i) => proof.map((h, j) => (j === i ? Buffer.from([h[0]! ^ 16, ...h.subarray(1)]) : h)));
  return [
    { size1: size1 - 1n, size2, root1, root2, proof },
    { size1: size1 + 1n, size2, root1, root2, proof },
    { size1: size1 ^ 2n, size2, root1, root2, proof },
    { size1, size2: size2 * 2n, root1, root2, proof },
    { size1, size2: size2 / 2n, root1, root2, proof },
    { size1, size2, root1: Buffer.from('WrongRoot'), root2, proof },
    { size1, size2, root1, root2: Buffer.from('WrongRoot'), proof },
    { size1, size2, root1: root2, root2: root1, proof },
    { size1, size2, root1, root2, proof: [] },
    { size1, size2, root1, root2, proof: [...proof, Buffer.alloc(0)] },
    { size1, size2, root1, root2, proof: [...proof, root1] },
    { size1, size2, root1, root2, proof: [...proof, root2] },
    { size1, size2, root1, root2, proof: [Buffer.alloc(0), ...proof] },
    { size1, size2, root1, root2, proof: [root1, ...proof] },
    { size1, size2, root1, root2, proof: [root2, ...proof] },
    { size1, size2, root1, root2, proof: [proof[0]!, ...proof] },
    { size1, size2, root1, root2, proof: proof.slice(0, -1) },
    ...flipped.map((p) => ({ size1, size2, root1, root2, proof: p })),
  ];
}

test('every corruption of a vector proof is rejected (the probes of transparency-dev)', () => {
  for (const v of INCLUSION) {
    const i = BigInt(v.leaf - 1);
    for (const p of inclusionProbes(i, BigInt(v.size), v.proof, ROOTS[v.size]!, leafHashes[v.leaf - 1]!)) {
      assert.throws(() => verifyInclusion(p.index, p.size, p.leaf, p.proof, p.root), ProofError, JSON.stringify({ index: String(p.index), size: String(p.size) }));
    }
  }
  for (const v of CONSISTENCY) {
    for (const p of consistencyProbes(BigInt(v.size1), BigInt(v.size2), ROOTS[v.size1]!, ROOTS[v.size2]!, v.proof)) {
      assert.throws(() => verifyConsistency(p.size1, p.size2, p.proof, p.root1, p.root2), ProofError);
    }
  }
  // The edge cases of TestVerifyInclusion and TestVerifyConsistency.
  for (const [index, size] of [[0n, 0n], [0n, 1n], [1n, 0n], [2n, 1n]] as const) {
    assert.throws(() => verifyInclusion(index, size, SOME, [], Buffer.alloc(0)), ProofError);
    assert.throws(() => verifyInclusion(index, size, Buffer.alloc(0), [], EMPTY_ROOT), ProofError);
    assert.throws(() => verifyInclusion(index, size, SOME, [], EMPTY_ROOT), ProofError);
  }
  assert.throws(() => verifyConsistency(1n, 1n, [], ROOTS[1]!, ROOTS[2]!), ProofError);
  assert.throws(() => verifyConsistency(1n, 0n, [], ROOTS[1]!, ROOTS[2]!), ProofError);
  assert.throws(() => verifyConsistency(1n, 2n, [], ROOTS[1]!, ROOTS[2]!), ProofError);
  assert.throws(() => verifyConsistency(0n, 0n, [EMPTY_ROOT], EMPTY_ROOT, EMPTY_ROOT), ProofError);
  assert.throws(() => verifyConsistency(0n, 1n, [EMPTY_ROOT], EMPTY_ROOT, EMPTY_ROOT), ProofError);
  assert.throws(() => inclusionRanges(3, 3), RangeError);
  assert.throws(() => consistencyRanges(4, 3), RangeError);
  assert.throws(() => rootFromInclusionProof(0n, 2n, SOME, [Buffer.alloc(31)]), ProofError);
});

test('property: generated proofs verify for any tree, and the frontier agrees with the recursion', () => {
  const seed = propertySeed('audit merkle proofs');
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 300 }), fc.nat(), fc.nat(), (size, a, b) => {
      const hashes = Array.from({ length: size }, (_, i) => leafHash(Buffer.from(`leaf ${i}`)));
      const frontier = new Frontier();
      for (const h of hashes) frontier.append(h);
      const root = rootOf(hashes);
      assert.deepEqual(frontier.root(), root);
      const index = a % size;
      verifyInclusion(BigInt(index), BigInt(size), hashes[index]!, proofOf(inclusionRanges(index, size), hashes), root);
      const size1 = b % (size + 1);
      const proof = proofOf(consistencyRanges(size1, size), hashes);
      verifyConsistency(BigInt(size1), BigInt(size), proof, rootOf(hashes, 0, size1), root);
      if (proof.length > 0) {
        const bad = proof.map((h, i) => (i === proof.length - 1 ? Buffer.from([h[0]! ^ 1, ...h.subarray(1)]) : h));
        assert.throws(() => verifyConsistency(BigInt(size1), BigInt(size), bad, rootOf(hashes, 0, size1), root), ProofError);
      }
    }),
    { seed, numRuns: 200 },
  );
});

test('property: appending a run of leaf hashes at once equals appending them one by one', () => {
  const seed = propertySeed('audit frontier appendAll');
  fc.assert(
    fc.property(fc.integer({ min: 0, max: 200 }), fc.integer({ min: 1, max: 300 }), fc.integer({ min: 0, max: 7 }), (start, count, minLevel) => {
      const leaf = (i: number): Buffer => leafHash(Buffer.from(`leaf ${i}`));
      const one = new Frontier();
      const all = new Frontier();
      for (let i = 0; i < start; i += 1) {
        one.append(leaf(i));
        all.append(leaf(i));
      }
      const expected = Array.from({ length: count }, (_, i) => one.append(leaf(start + i)))
        .flat()
        .filter((n) => n.level >= minLevel && n.level > 0);
      const run = Buffer.concat(Array.from({ length: count }, (_, i) => leaf(start + i)));
      const kept = all.appendAll(run, count, minLevel);
      assert.deepEqual(kept.map((n) => [n.level, n.index, n.hash.toString('hex')]), expected.map((n) => [n.level, n.index, n.hash.toString('hex')]));
      assert.deepEqual([all.size, all.root()], [one.size, one.root()]);
    }),
    { seed, numRuns: 200 },
  );
});
