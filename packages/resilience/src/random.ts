/**
 * Randomness as a dependency: jitter draws from a `Random` so tests can seed it and check the
 * distribution exactly, and a failing run can be replayed from its printed seed.
 */

/** Returns floats uniformly in [0, 1). */
export type Random = () => number;

/** mulberry32: small, fast and good enough for jitter; not for anything secret. */
export function seededRandom(seed: number): Random {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
