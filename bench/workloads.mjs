// The BENCHMARKS.md workloads. Each gets a freshly opened adapter, untimed setup, and returns
// { ops, seconds, ...checks }.
import { once } from 'node:events'
import { Worker } from 'node:worker_threads'
import { keyOf, recordOf, rng } from './data.mjs'

const HOT_KEYS = 1000
const TASKS = 64

const now = () => Number(process.hrtime.bigint()) / 1e9

async function timed(ops, body) {
  const start = now()
  const extra = (await body()) ?? {}
  return { ops, seconds: now() - start, ...extra }
}

/** Runs `count` jobs over `tasks` concurrent async tasks. */
async function concurrently(count, tasks, job) {
  let next = 0
  await Promise.all(
    Array.from({ length: tasks }, async () => {
      while (next < count) await job(next++)
    }),
  )
}

async function populate(store, n) {
  const random = rng(1)
  await concurrently(n, TASKS, (i) => store.create(keyOf(i), recordOf(i, random)))
}

async function sumAttempts(store, n) {
  let sum = 0
  for (let i = 0; i < n; i++) sum += (store.get ? await getValue(store, keyOf(i)) : 0).attempts
  return sum
}

async function getValue(store, key) {
  return store.getAsync ? store.getAsync(key) : store.get(key)
}

export const workloads = {
  'create-seq': async (store, n) => {
    const random = rng(2)
    const records = Array.from({ length: n }, (_, i) => recordOf(i, random))
    return timed(n, async () => {
      for (let i = 0; i < n; i++) await store.create(keyOf(i), records[i])
    })
  },
  'create-conc': async (store, n) => {
    const random = rng(2)
    const records = Array.from({ length: n }, (_, i) => recordOf(i, random))
    const result = await timed(n, () => concurrently(n, TASKS, (i) => store.create(keyOf(i), records[i])))
    return { ...result, commitsPerBatch: store.stats?.().commitsPerBatch }
  },
  'rmw-seq': async (store, n) => {
    await populate(store, n)
    const random = rng(3)
    const picks = Array.from({ length: n }, () => keyOf(Math.floor(random() * n)))
    return timed(n, async () => {
      for (const key of picks) await store.rmw(key)
    })
  },
  'rmw-conc-hot': async (store, n) => {
    await populate(store, HOT_KEYS)
    const random = rng(4)
    const picks = Array.from({ length: n }, () => keyOf(Math.floor(random() * HOT_KEYS)))
    const result = await timed(n, () => concurrently(n, TASKS, (i) => store.rmw(picks[i])))
    const lostUpdates = n - (await sumAttempts(store, HOT_KEYS))
    return { ...result, lostUpdates, commitsPerBatch: store.stats?.().commitsPerBatch }
  },
  'get-random': async (store, n) => {
    if (!store.get || store.getAsync) return { skipped: 'no synchronous get' }
    await populate(store, n)
    const random = rng(5)
    const reads = 10 * n
    const picks = Array.from({ length: reads }, () => keyOf(Math.floor(random() * n)))
    return timed(reads, () => {
      let sum = 0
      for (const key of picks) sum += store.get(key).priority
      return { checksum: sum }
    })
  },
  'scan-all': async (store, n) => {
    await populate(store, n)
    return timed(n, async () => {
      const seen = await store.scan()
      if (seen !== n) throw new Error(`scan saw ${seen} of ${n}`)
    })
  },
  'delete-seq': async (store, n) => {
    await populate(store, n)
    return timed(n, async () => {
      for (let i = 0; i < n; i++) await store.delete(keyOf(i))
    })
  },
  'workers-rmw': async (store, n, context) => {
    if (!context.workerSafe) return { skipped: 'one process-wide open only' }
    await populate(store, HOT_KEYS)
    const result = await timed(n, async () => {
      const workers = Array.from(
        { length: 4 },
        (_, w) => new Worker(new URL('./rmw-worker.mjs', import.meta.url), { workerData: { ...context.workerData, seed: 10 + w, count: n / 4, hot: HOT_KEYS } }),
      )
      await Promise.all(workers.map((w) => once(w, 'exit')))
    })
    const lostUpdates = n - (await sumAttempts(store, HOT_KEYS))
    return { ...result, lostUpdates }
  },
}

export const scaleSizes = [10_000, 100_000, 1_000_000]

/** scan-all and get-random (1M reads) at a given size, with peak RSS. */
export async function scale(store, size) {
  await populate(store, size)
  const random = rng(6)
  const reads = 1_000_000
  // Keys are made on the fly (the same cost for every store), so peak RSS is the store's own.
  const get = await timed(reads, () => {
    let sum = 0
    for (let i = 0; i < reads; i++) sum += store.get(keyOf(Math.floor(random() * size))).priority
    return { checksum: sum }
  })
  const scan = await timed(size, async () => {
    const seen = await store.scan()
    if (seen !== size) throw new Error(`scan saw ${seen} of ${size}`)
  })
  return { get, scan }
}
