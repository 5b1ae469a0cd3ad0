import test from 'ava'
import { execFile } from 'node:child_process'
import { readdirSync } from 'node:fs'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { Worker } from 'node:worker_threads'
import { kv, put, tempDir, tempStore, waitersQueued } from './helpers.mjs'

const run = promisify(execFile)
const fixture = (name) => new URL(`./fixtures/${name}`, import.meta.url).pathname

test('10 000 waiters on one key are served in arrival order and leave nothing behind', async (t) => {
  const store = await tempStore(t)
  await put(store, 'k', 0)
  const holder = await store.getAndLockEntry('k')
  const order = []
  const waiters = Array.from({ length: 10_000 }, (_, i) =>
    store.getAndLockEntry('k').then((lock) => {
      order.push(i)
      lock.release()
    }),
  )
  await waitersQueued(store, 10_000)
  holder.release()
  await Promise.all(waiters)
  t.true(order.every((n, i) => n === i), 'first come, first served')
  t.deepEqual([store.stats().locksHeld, store.stats().locksWaiting], [0, 0])
})

test('100 000 distinct keys locked and released: the lock table returns to zero', async (t) => {
  const store = await tempStore(t)
  for (let round = 0; round < 10; round++) {
    const locks = await Promise.all(Array.from({ length: 10_000 }, (_, i) => store.createAndLockEntry(`r${round}-${i}`)))
    t.is(store.stats().locksHeld, 10_000)
    for (const lock of locks) lock.release()
    t.is(store.stats().locksHeld, 0)
  }
})

// Serial: other tests of this file open descriptors (a worker thread) while they run.
test.serial('1 000 open/close cycles leak no file descriptors', async (t) => {
  const path = join(tempDir(t), 'cycles.redb')
  const fds = () => readdirSync('/proc/self/fd').length
  const first = await kv.MapStore.open(path)
  await put(first, 'k', 1)
  await first.close()
  const before = fds()
  for (let i = 0; i < 1000; i++) {
    const store = await kv.MapStore.open(path)
    if (i % 100 === 0) t.is(store.getEntry('k').value, 1)
    await store.close()
  }
  t.is(fds(), before)
})

test('a process with commits in flight exits cleanly on process.exit', async (t) => {
  const path = join(tempDir(t), 'exit.redb')
  const { stdout } = await run(process.execPath, [fixture('exit-mid-commit.mjs'), path])
  t.regex(stdout, /exiting with commits in flight/)
  const store = await kv.MapStore.open(path)
  t.true(store.count() >= 1, 'at least the awaited commit is there')
  await store.close()
})

test('a worker terminated mid-commit leaves the store usable and its locks free', async (t) => {
  const path = join(tempDir(t), 'terminate.redb')
  const store = await kv.MapStore.open(path, { table: 'counters' })
  t.teardown(() => store.close())
  await put(store, 'hot', { n: 0 })
  for (let round = 0; round < 5; round++) {
    const worker = new Worker(fixture('increment-worker.mjs'), { workerData: { path, key: 'hot', times: 1_000_000 } })
    // Let it get going, then pull the plug while it commits.
    await store.updateEntry('hot', (entry) => { entry.value = { n: entry.value.n + 1 } })
    await worker.terminate()
    await store.updateEntry('hot', (entry) => { entry.value = { n: entry.value.n + 1 } })
  }
  t.is(store.stats().locksHeld, 0)
  t.true(store.getEntry('hot').value.n >= 10)
})
