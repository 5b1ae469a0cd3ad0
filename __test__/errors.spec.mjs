import test from 'ava'
import { createRequire } from 'node:module'
import { join } from 'node:path'
import { kv, put, tempDir, waitersQueued } from './helpers.mjs'

const binding = createRequire(import.meta.url)('../index.js')

test('every error code of the core has exactly one error class, and each class has a stable code', (t) => {
  t.deepEqual(Object.keys(kv.errorClasses).sort(), binding.errorCodes().sort())
  for (const [code, Class] of Object.entries(kv.errorClasses)) {
    const err = new Class('x')
    t.true(err instanceof kv.KvStoreError)
    t.is(err.code, code)
  }
})

test('bad option values are InvalidArgumentError before anything opens', async (t) => {
  const path = join(tempDir(t), 'opts.redb')
  const bad = [
    { durability: 'sometimes' },
    { cacheCapacity: -1 },
    { cacheCapacity: 1.5 },
    { cacheBytes: -1 },
    { cacheBytes: 2.5 },
    { cacheBytes: '1MB' },
    { keys: { base: 16 } },
    { keys: { width: 0 } },
    { keys: { bandwidth: 0 } },
    { lockTimeoutMs: -5 },
    { syncIntervalMs: -1 },
    { syncIntervalMs: Infinity },
    { codec: { name: 'x' } },
    { table: '' },
    { logger: 'console' },
  ]
  for (const options of bad) {
    await t.throwsAsync(kv.MapStore.open(path, options), { instanceOf: kv.InvalidArgumentError, code: 'ERR_INVALID_ARGUMENT' }, JSON.stringify(options))
  }
  const store = await kv.MapStore.open(path)
  t.teardown(() => store.close())
  await put(store, 'k', 1)
  await t.throwsAsync(store.getAndLockEntry('k', { timeoutMs: 'soon' }), { code: 'ERR_INVALID_ARGUMENT' })
  t.throws(() => store.getEntries({ limit: -1 }), { code: 'ERR_INVALID_ARGUMENT' })
  t.is(store.stats().locksHeld, 0)
})

test('after close every call rejects with StoreClosedError', async (t) => {
  const store = await kv.MapStore.temporary()
  await put(store, 'k', 1)
  await store.close()
  await store.close()
  const closed = { instanceOf: kv.StoreClosedError, code: 'ERR_STORE_CLOSED' }
  t.throws(() => store.getEntry('k'), closed)
  t.throws(() => store.getEntries(), closed)
  t.throws(() => store.count(), closed)
  t.throws(() => store.stats(), closed)
  await t.throwsAsync(store.createAndLockEntry('x'), closed)
  await t.throwsAsync(store.getAndLockEntry('k'), closed)
  await t.throwsAsync(store.generateNextKey(), closed)
  await t.throwsAsync(store.deleteEntry('k'), closed)
  await t.throwsAsync(store.updateEntry('k', () => {}), closed)
})

test('close rejects waiters, makes held handles reject their commit, and waits for commits in flight', async (t) => {
  const store = await kv.MapStore.temporary()
  await put(store, 'held', 1)
  await put(store, 'flying', 1)
  const held = await store.getAndLockEntry('held')
  const waiter = store.getAndLockEntry('held')
  await waitersQueued(store, 1)
  const flying = await store.getAndLockEntry('flying')
  flying.entry.value = 2
  let landed = false
  const inFlight = flying.commit().then(() => {
    landed = true
  })
  await store.close()
  t.true(landed, 'close resolved after the commit in flight')
  await inFlight
  await t.throwsAsync(waiter, { instanceOf: kv.StoreClosedError })
  await t.throwsAsync(held.commit(), { instanceOf: kv.StoreClosedError })
  t.throws(() => held.entry.value, { code: 'ERR_ENTRY_RELEASED' })
})

test('the committed value survives close and reopen; closing releases the file for the next open', async (t) => {
  const path = join(tempDir(t), 'reopen.redb')
  const a = await kv.MapStore.open(path, { table: 'jobs' })
  for (let i = 0; i < 20; i++) await put(a, `job-${i}`, { i }, { path: `/p/${i}` })
  await a.close()
  const b = await kv.MapStore.open(path, { table: 'jobs' })
  t.is(b.count(), 20)
  t.deepEqual(b.getEntry('job-7'), { key: 'job-7', value: { i: 7 }, metadata: { path: '/p/7' } })
  await b.close()
})

test('a garbage file is DatabaseCorruptError, not a crash', async (t) => {
  const { writeFileSync } = await import('node:fs')
  const path = join(tempDir(t), 'garbage.redb')
  writeFileSync(path, Buffer.alloc(16384, 0x5a))
  await t.throwsAsync(kv.MapStore.open(path), { instanceOf: kv.DatabaseCorruptError, code: 'ERR_DATABASE_CORRUPT' })
})

test('a torn store file (cut short) is DatabaseCorruptError on open, and the next open of a whole copy works', async (t) => {
  const { readFileSync, writeFileSync } = await import('node:fs')
  const path = join(tempDir(t), 'torn.redb')
  const store = await kv.MapStore.open(path)
  for (let i = 0; i < 500; i++) await put(store, `k${i}`, { i, pad: 'x'.repeat(100) })
  await store.close()
  const whole = readFileSync(path)
  for (const cut of [100, 4096, whole.length >> 1, whole.length - 1]) {
    writeFileSync(path, whole.subarray(0, cut))
    const err = await t.throwsAsync(kv.MapStore.open(path), { instanceOf: kv.DatabaseCorruptError }, `cut to ${cut} bytes`)
    t.true(err.message.includes(path))
  }
  writeFileSync(path, whole)
  const again = await kv.MapStore.open(path)
  t.is(again.count(), 500)
  t.deepEqual(again.getEntry('k499').value, { i: 499, pad: 'x'.repeat(100) })
  await again.close()
})

test('a missing directory is an IoError with the OS errno', async (t) => {
  const err = await t.throwsAsync(kv.MapStore.open(join(tempDir(t), 'no', 'such', 'dir.redb')), { instanceOf: kv.IoError })
  t.is(err.code, 'ERR_IO')
  t.is(err.systemCode, 'ENOENT')
  t.is(typeof err.errno, 'number')
})

test('Database holds several maps in one file with one durability', async (t) => {
  const path = join(tempDir(t), 'multi.redb')
  const db = await kv.Database.open(path, { durability: 'none' })
  const jobs = db.mapStore('jobs')
  const paths = db.mapStore('paths', { codec: kv.codecs.json })
  await put(jobs, 'j1', { state: 'NEW' })
  await put(paths, '/data/x', 'j1', { job: 'j1' })
  t.is(jobs.count(), 1)
  t.is(paths.getEntry('/data/x').value, 'j1')
  t.is(jobs.getEntry('/data/x'), undefined, 'tables are separate')
  await db.close()
  t.throws(() => jobs.getEntry('j1'), { code: 'ERR_STORE_CLOSED' })
  const again = await kv.Database.open(path)
  t.deepEqual(again.mapStore('jobs').getEntry('j1').value, { state: 'NEW' }, "durability 'none' is flushed at close")
  await again.close()
})

test('Symbol.asyncDispose closes the store (await using)', async (t) => {
  const store = await kv.MapStore.temporary()
  await put(store, 'k', 1)
  await store[Symbol.asyncDispose]()
  t.true(store.closed)
})
