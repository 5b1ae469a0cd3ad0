// A pool of worker threads sharing one store file: the main thread queues jobs, each worker
// opens the same file (one shared core: the same locks, cache and commit queue) and claims
// queued jobs under their per-key locks, so every job runs exactly once.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads'
import { MapStore } from '../dist/index.js'

const JOBS = 200
const WORKERS = 4

if (isMainThread) {
  const dir = mkdtempSync(join(tmpdir(), 'kvstore-pool-'))
  const path = join(dir, 'pool.redb')
  const jobs = await MapStore.open(path, { table: 'jobs' })
  for (let i = 0; i < JOBS; i++) {
    const { commit } = await jobs.createAndLockEntry(undefined, { value: { state: 'QUEUED', input: i } })
    await commit()
  }
  const workers = Array.from({ length: WORKERS }, (_, id) => new Worker(new URL(import.meta.url), { workerData: { path, id } }))
  const done = await Promise.all(workers.map((w) => new Promise((resolve, reject) => w.once('message', resolve).once('error', reject))))
  const runs = new Map()
  for (const { value } of jobs.getEntries()) runs.set(value.state, (runs.get(value.state) ?? 0) + 1)
  console.log('claimed per worker:', done.join(' '))
  console.log('states:', Object.fromEntries(runs))
  const total = done.reduce((a, b) => a + b, 0)
  if (total !== JOBS || runs.get('DONE') !== JOBS) throw new Error(`expected ${JOBS} jobs done once each, got ${total}`)
  console.log(`every one of ${JOBS} jobs ran exactly once`)
  await jobs.close()
  rmSync(dir, { recursive: true, force: true })
} else {
  const jobs = await MapStore.open(workerData.path, { table: 'jobs' })
  let claimed = 0
  for (const { key } of jobs.getEntries({ keysOnly: true })) {
    // Every worker walks the same queue; the lock decides who runs a job.
    const lock = await jobs.getAndLockEntry(key)
    if (lock.entry.value.state !== 'QUEUED') {
      lock.release()
      continue
    }
    lock.entry.value = { ...lock.entry.value, state: 'DONE', output: lock.entry.value.input * 2, worker: workerData.id }
    await lock.commit()
    claimed++
  }
  await jobs.close()
  parentPort.postMessage(claimed)
}
