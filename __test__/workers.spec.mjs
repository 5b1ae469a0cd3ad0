import test from 'ava'
import { once } from 'node:events'
import { join } from 'node:path'
import { Worker } from 'node:worker_threads'
import { kv, put, tempDir } from './helpers.mjs'

const fixture = (name) => new URL(`./fixtures/${name}`, import.meta.url)

test('4 worker_threads × 250 increments on one key end at exactly 1000', async (t) => {
  const path = join(tempDir(t), 'workers.redb')
  const store = await kv.MapStore.open(path, { table: 'counters' })
  t.teardown(() => store.close())
  await put(store, 'hot', { n: 0 })
  const workers = Array.from({ length: 4 }, () => new Worker(fixture('increment-worker.mjs'), { workerData: { path, key: 'hot', times: 250 } }))
  // The main thread competes for the same key at the same time.
  for (let i = 0; i < 50; i++) await store.updateEntry('hot', (entry) => { entry.value = { n: entry.value.n + 1 } })
  const messages = await Promise.all(workers.map((w) => once(w, 'message')))
  t.deepEqual(messages.map(([m]) => m), ['done', 'done', 'done', 'done'])
  t.is(store.getEntry('hot').value.n, 1050)
  t.is(store.stats().locksHeld, 0)
})

test('a worker terminated while holding a lock frees it for the others', async (t) => {
  const path = join(tempDir(t), 'terminated.redb')
  const store = await kv.MapStore.open(path, { table: 'counters' })
  t.teardown(() => store.close())
  await put(store, 'k', { n: 1 })
  const worker = new Worker(fixture('hold-lock-worker.mjs'), { workerData: { path, key: 'k' } })
  const [message] = await once(worker, 'message')
  t.is(message, 'locked')
  t.is(store.stats().locksHeld, 1)
  const waiting = store.getAndLockEntry('k')
  await worker.terminate()
  const lock = await waiting
  t.deepEqual(lock.entry.value, { n: 1 })
  lock.release()
})
