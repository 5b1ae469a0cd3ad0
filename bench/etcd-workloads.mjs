// The BENCHMARKS.md workloads over etcd (bench/etcd.mjs runs them). Each gets a freshly opened
// adapter (bench/stores/kvstore-etcd.mjs or etcd3.mjs) on a fresh prefix, untimed setup, and
// returns { ops, seconds, check, ...figures }; `check` is 'ok' or what was wrong with the result.
import { fork } from 'node:child_process'
import { once } from 'node:events'
import { keyOf, recordOf, rng } from './data.mjs'

export const HOT_KEYS = 1000
export const TASKS = 64

const now = () => Number(process.hrtime.bigint()) / 1e9

async function timed(ops, body) {
  const start = now()
  const extra = (await body()) ?? {}
  return { ops, seconds: now() - start, ...extra }
}

/** Runs `count` jobs over `tasks` concurrent async tasks. */
export async function concurrently(count, tasks, job) {
  let next = 0
  await Promise.all(
    Array.from({ length: tasks }, async () => {
      while (next < count) await job(next++)
    }),
  )
}

/** The records populate() writes: record i from one generator, in order (as in workloads.mjs). */
function records(n, seed) {
  const random = rng(seed)
  return Array.from({ length: n }, (_, i) => recordOf(i, random))
}

async function populate(store, n) {
  const all = records(n, 1)
  await concurrently(n, TASKS, (i) => store.create(keyOf(i), all[i]))
  return all
}

/** What the store holds afterwards, against what it should hold. */
async function checkValues(store, { count, attempts }) {
  const values = await store.values()
  const problems = []
  if (values.length !== count) problems.push(`${values.length} entries, expected ${count}`)
  let sum = 0
  for (const value of values) sum += value.attempts
  if (attempts !== undefined && sum !== attempts) problems.push(`attempts sum to ${sum}, expected ${attempts} (${attempts - sum} lost updates)`)
  return { check: problems.length ? problems.join('; ') : 'ok', attemptsSum: sum }
}

const extras = (store) => ({
  ...(store.stats ? { commitsPerBatch: store.stats().commitsPerBatch } : {}),
  ...(store.retries ? { retries: store.retries() } : {}),
})

export const workloads = {
  'create-seq': async (store, n) => {
    const all = records(n, 2)
    const result = await timed(n, async () => {
      for (let i = 0; i < n; i++) await store.create(keyOf(i), all[i])
    })
    return { ...result, ...(await checkValues(store, { count: n, attempts: 0 })), ...extras(store) }
  },
  'create-conc': async (store, n) => {
    const all = records(n, 2)
    const result = await timed(n, () => concurrently(n, TASKS, (i) => store.create(keyOf(i), all[i])))
    return { ...result, ...(await checkValues(store, { count: n, attempts: 0 })), ...extras(store) }
  },
  'rmw-seq': async (store, n) => {
    await populate(store, n)
    const random = rng(3)
    const picks = Array.from({ length: n }, () => keyOf(Math.floor(random() * n)))
    const result = await timed(n, async () => {
      for (const key of picks) await store.rmw(key)
    })
    const checked = await checkValues(store, { count: n, attempts: n })
    return { ...result, ...checked, lostUpdates: n - checked.attemptsSum, ...extras(store) }
  },
  'rmw-conc-hot': async (store, n) => {
    await populate(store, HOT_KEYS)
    const random = rng(4)
    const picks = Array.from({ length: n }, () => keyOf(Math.floor(random() * HOT_KEYS)))
    const result = await timed(n, () => concurrently(n, TASKS, (i) => store.rmw(picks[i])))
    const checked = await checkValues(store, { count: HOT_KEYS, attempts: n })
    return { ...result, ...checked, lostUpdates: n - checked.attemptsSum, ...extras(store) }
  },
  /** Two processes, each doing rmw-conc-hot (TASKS tasks) for n/2 of the n RMWs on the same hot
   * keys; timed from a common start signal until both are done. This process only populates and
   * checks. */
  'rmw-conc-hot-2proc': async (store, n, context) => {
    await populate(store, HOT_KEYS)
    const counts = [Math.ceil(n / 2), Math.floor(n / 2)]
    const children = counts.map((count, p) =>
      fork(new URL('./etcd-rmw-proc.mjs', import.meta.url).pathname, [JSON.stringify({ ...context, seed: 20 + p, count, hot: HOT_KEYS, tasks: TASKS })], {
        stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
      }),
    )
    const exits = children.map((child) => once(child, 'exit'))
    const message = (child, type) =>
      new Promise((resolve, reject) => {
        const onMessage = (m) => {
          if (m.type === type) {
            child.off('message', onMessage)
            child.off('exit', onExit)
            resolve(m)
          }
        }
        const onExit = (code, signal) => reject(new Error(`an RMW process exited (code ${code}, signal ${signal}) before '${type}'`))
        child.on('message', onMessage)
        child.on('exit', onExit)
      })
    let result
    try {
      await Promise.all(children.map((c) => message(c, 'ready')))
      const done = children.map((c) => message(c, 'done'))
      result = await timed(n, async () => {
        for (const c of children) c.send({ type: 'go' })
        const reports = await Promise.all(done)
        return { perProcess: reports.map((r) => ({ ops: r.ops, seconds: r.seconds, ...(r.retries !== undefined ? { retries: r.retries } : {}) })) }
      })
    } catch (error) {
      for (const c of children) c.kill('SIGKILL')
      throw error
    }
    await Promise.all(exits)
    const checked = await checkValues(store, { count: HOT_KEYS, attempts: n })
    const retries = result.perProcess.some((p) => p.retries !== undefined) ? result.perProcess.reduce((s, p) => s + (p.retries ?? 0), 0) : undefined
    return { ...result, ...checked, lostUpdates: n - checked.attemptsSum, ...(retries !== undefined ? { retries } : {}) }
  },
  'get-random': async (store, n) => {
    const all = await populate(store, n)
    const random = rng(5)
    const reads = 10 * n
    const picks = Array.from({ length: reads }, () => Math.floor(random() * n))
    const keys = picks.map(keyOf)
    let expected = 0
    for (const i of picks) expected += all[i].priority
    const result = store.get
      ? await timed(reads, () => {
          let sum = 0
          for (const key of keys) sum += store.get(key).priority
          return { checksum: sum }
        })
      : await timed(reads, async () => {
          let sum = 0
          for (const key of keys) sum += (await store.getAsync(key)).priority
          return { checksum: sum }
        })
    return { ...result, reads: store.get ? 'synchronous getEntry (local replica)' : 'awaited get', check: result.checksum === expected ? 'ok' : `checksum ${result.checksum}, expected ${expected}` }
  },
  'scan-all': async (store, n) => {
    await populate(store, n)
    let seen
    const result = await timed(n, async () => {
      seen = await store.scan()
    })
    return { ...result, check: seen === n ? 'ok' : `scan saw ${seen} of ${n}` }
  },
  'delete-seq': async (store, n) => {
    await populate(store, n)
    const result = await timed(n, async () => {
      for (let i = 0; i < n; i++) await store.delete(keyOf(i))
    })
    const { check } = await checkValues(store, { count: 0 })
    return { ...result, check }
  },
}
