// Issue 14, items 4 and 14: a walk (getEntries) ends only at its end, or with a typed error —
// never silently at close(), never with an untyped error or a snapshot left open.
import test from 'ava'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { kv, put, tempDir } from './helpers.mjs'

async function storeWith(t, n, options = {}) {
  const path = join(tempDir(t), 'walks.redb')
  const store = await kv.MapStore.open(path, options)
  t.teardown(() => store.close())
  const writes = []
  for (let i = 0; i < n; i++) writes.push(put(store, `k${String(i).padStart(4, '0')}`, i))
  await Promise.all(writes)
  return { store, path }
}

test('close() during a sync walk throws StoreClosedError instead of ending it early', async (t) => {
  const { store } = await storeWith(t, 501)
  const seen = []
  const error = t.throws(() => {
    for (const item of store.getEntries()) {
      seen.push(item.key)
      if (seen.length === 10) void store.close()
    }
  }, { instanceOf: kv.StoreClosedError })
  t.is(error.code, 'ERR_STORE_CLOSED')
  t.is(seen.length, 10, 'nothing comes out after close()')
})

test('close() during an async walk rejects with StoreClosedError', async (t) => {
  const { store } = await storeWith(t, 501)
  let seen = 0
  await t.throwsAsync(async () => {
    for await (const item of store.getEntries()) {
      t.is(item.value, seen)
      if (++seen === 100) await store.close()
    }
  }, { instanceOf: kv.StoreClosedError })
  t.is(seen, 100)
})

test('an iterator taken before close() and first stepped after it throws StoreClosedError', async (t) => {
  const { store } = await storeWith(t, 10)
  const range = store.getEntries()
  const started = range[Symbol.iterator]()
  t.is(started.next().value.key, 'k0000')
  const fresh = range[Symbol.iterator]()
  await store.close()
  t.throws(() => started.next(), { instanceOf: kv.StoreClosedError })
  t.throws(() => fresh.next(), { instanceOf: kv.StoreClosedError })
  t.throws(() => started.next(), { instanceOf: kv.StoreClosedError }, 'and keeps saying so')
})

test('a walk that finished before close() stays finished', async (t) => {
  const { store } = await storeWith(t, 3)
  const it = store.getEntries()[Symbol.iterator]()
  t.is([...{ [Symbol.iterator]: () => it }].length, 3)
  await store.close()
  t.deepEqual(it.next(), { done: true, value: undefined })
})

test('closing a db.mapStore() view ends its walks with StoreClosedError; other views walk on', async (t) => {
  const path = join(tempDir(t), 'views.redb')
  const db = await kv.Database.open(path)
  t.teardown(() => db.close())
  const a = db.mapStore('a')
  const b = db.mapStore('b')
  await Promise.all([put(a, 'x', 1), put(a, 'y', 2), put(b, 'x', 1), put(b, 'y', 2)])
  const walkA = a.getEntries()[Symbol.iterator]()
  const walkB = b.getEntries()[Symbol.iterator]()
  t.is(walkA.next().value.key, 'x')
  t.is(walkB.next().value.key, 'x')
  await a.close()
  t.throws(() => walkA.next(), { instanceOf: kv.StoreClosedError })
  t.is(walkB.next().value.key, 'y')
  t.true(walkB.next().done)
})

/**
 * A store whose key `damaged-ZQXJ` is stored as bytes that are not UTF-8 (the marker's second
 * byte flipped to 0xff in every copy in the file), between two sound keys.
 */
async function damagedKeyFile(t) {
  const path = join(tempDir(t), 'damaged.redb')
  const store = await kv.MapStore.open(path, { codec: kv.codecs.json })
  await put(store, 'damaged-A', 'a')
  await put(store, 'damaged-ZQXJ', 'z')
  await put(store, 'damaged-ZZ', 'zz')
  await store.close()
  const bytes = readFileSync(path)
  const marker = Buffer.from('ZQXJ')
  let flipped = 0
  for (let at = bytes.indexOf(marker); at >= 0; at = bytes.indexOf(marker, at + 1)) {
    bytes[at + 1] = 0xff
    flipped++
  }
  t.true(flipped > 0, 'the key is in the file')
  writeFileSync(path, bytes)
  return path
}

test('a damaged (non UTF-8) key makes a walk throw DatabaseCorruptError and frees its snapshot', async (t) => {
  const path = await damagedKeyFile(t)
  const store = await kv.MapStore.open(path, { codec: kv.codecs.json })
  t.teardown(() => store.close())
  for (const options of [{}, { prefix: 'damaged-' }, { reverse: true }, { keysOnly: true }]) {
    const seen = []
    const error = t.throws(() => {
      for (const item of store.getEntries(options)) seen.push(item.key)
    }, { instanceOf: kv.KvStoreError }, JSON.stringify(options))
    t.true(error instanceof kv.DatabaseCorruptError, `${error.name}: ${error.message}`)
    t.is(error.code, 'ERR_DATABASE_CORRUPT')
    t.regex(error.message, /damaged\.redb/)
    t.deepEqual(seen, options.reverse ? ['damaged-ZZ'] : ['damaged-A'])
    t.is(store.stats().openSnapshots, 0, 'the failed walk let go of its snapshot')
  }
  await t.throwsAsync(async () => {
    for await (const item of store.getEntries()) t.truthy(item.key)
  }, { instanceOf: kv.DatabaseCorruptError })
  t.is(store.stats().openSnapshots, 0)
  t.throws(() => store.count({ prefix: 'damaged-' }), { instanceOf: kv.DatabaseCorruptError })
  // compact() is not refused for a walk that is gone.
  const compacted = await store.compact().then(() => 'compacted', (err) => err)
  t.false(compacted instanceof kv.InvalidArgumentError, String(compacted))
  t.is(store.getEntry('damaged-A').value, 'a', 'the sound entries still read')
})
