// The benchmark's data: BENCHMARKS.md keys and ~150-byte job records from a fixed-seed generator.
export function rng(seed = 0x5eed) {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

export const keyOf = (i) => `/data/projects/p${i % 100}/file-${String(i).padStart(8, '0')}`

const STATES = ['QUEUED', 'RUNNING', 'COPYING', 'DONE', 'FAILED']

export function recordOf(i, random) {
  return {
    id: i,
    path: keyOf(i),
    state: STATES[Math.floor(random() * STATES.length)],
    priority: Math.floor(random() * 10),
    created: 1_700_000_000_000 + i,
    attempts: 0,
    tags: [`team-${Math.floor(random() * 50)}`, `tier-${Math.floor(random() * 3)}`],
    target: { id: `t-${Math.floor(random() * 1e6)}`, type: 'bucket' },
  }
}
