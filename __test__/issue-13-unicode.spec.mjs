// Issue 13: strings that are not well-formed Unicode (lone surrogates) are refused where they
// would be changed on their way into the store, instead of being merged or altered silently.
import test from 'ava'
import { join } from 'node:path'
import { kv, put, tempDir, tempStore } from './helpers.mjs'

const LONE = ['\ud800', '\udc00', 'a\udfffb', '/x/\ud83d']

test('a key that is not well-formed is IllegalKeyError for every call that takes a key, and nothing is written', async (t) => {
  const store = await tempStore(t)
  for (const key of LONE) {
    await t.throwsAsync(store.createAndLockEntry(key, { value: 'first' }), { instanceOf: kv.IllegalKeyError, code: 'ERR_ILLEGAL_KEY' }, JSON.stringify(key))
    await t.throwsAsync(store.createAndLockEntry(key, { allowExisting: true }), { code: 'ERR_ILLEGAL_KEY' })
    await t.throwsAsync(store.getAndLockEntry(key), { code: 'ERR_ILLEGAL_KEY' })
    await t.throwsAsync(store.updateEntry(key, () => {}), { code: 'ERR_ILLEGAL_KEY' })
    await t.throwsAsync(store.deleteEntry(key), { code: 'ERR_ILLEGAL_KEY' })
    t.throws(() => store.getEntry(key), { code: 'ERR_ILLEGAL_KEY' })
  }
  t.is(store.count(), 0)
  t.is(store.stats().locksHeld, 0)
  t.is(store.stats().locksWaiting, 0)
  // The reported case: two different lone surrogates must not name one entry.
  await put(store, '\ufffd', 'replacement character')
  await t.throwsAsync(store.createAndLockEntry('\ud800', { value: 'x' }), { code: 'ERR_ILLEGAL_KEY' })
  t.deepEqual(store.getEntry('\ufffd').value, 'replacement character')
  t.is(store.count(), 1)
})

test('a well-formed key with astral characters is fine', async (t) => {
  const store = await tempStore(t)
  await put(store, '/x/\ud83d\ude00', 'smile')
  t.is(store.getEntry('/x/\ud83d\ude00').value, 'smile')
})

test('prefix, start and stop that are not well-formed are IllegalKeyError', async (t) => {
  const store = await tempStore(t)
  await put(store, '/x/1', 1)
  for (const name of ['prefix', 'start', 'stop']) {
    t.throws(() => store.getEntries({ [name]: '/x/\ud800' }), { instanceOf: kv.IllegalKeyError }, name)
    t.throws(() => store.count({ [name]: '/x/\ud800' }), { instanceOf: kv.IllegalKeyError }, name)
  }
  t.is(store.stats().openSnapshots, 0)
})

test('a table name that is not well-formed is IllegalKeyError, and no table is made', async (t) => {
  const path = join(tempDir(t), 'tables.redb')
  await t.throwsAsync(kv.MapStore.open(path, { table: 't\ud800' }), { instanceOf: kv.IllegalKeyError })
  const db = await kv.Database.open(path)
  t.throws(() => db.mapStore('t\udc00'), { instanceOf: kv.IllegalKeyError })
  t.deepEqual(db.tables(), [])
  await db.close()
})

test('metadata names and values that are not well-formed are InvalidArgumentError naming the field, nothing written', async (t) => {
  const store = await tempStore(t)
  // At create: refused before the lock is taken.
  const err = await t.throwsAsync(store.createAndLockEntry('k', { value: 1, metadata: { path: 'x\ud800' } }), { instanceOf: kv.InvalidArgumentError })
  t.regex(err.message, /metadata 'path'/)
  const named = await t.throwsAsync(store.createAndLockEntry('k', { value: 1, metadata: { ['p\udc00']: 'x' } }), { instanceOf: kv.InvalidArgumentError })
  t.regex(named.message, /metadata name "p\\udc00"/)
  t.is(store.stats().locksHeld, 0)
  // At commit: the entry is unchanged, the lock released (or kept with holdLockOnFailure).
  await put(store, 'k', 'v', { path: 'good' })
  const lock = await store.getAndLockEntry('k')
  lock.entry.value = 'changed'
  lock.entry.metadata.path = 'x\ud800'
  const atCommit = await t.throwsAsync(lock.commit({ holdLockOnFailure: true }), { instanceOf: kv.InvalidArgumentError })
  t.regex(atCommit.message, /metadata 'path' of 'k'/)
  t.true(lock.held)
  lock.entry.metadata = { ['\udfff']: 'v' }
  await t.throwsAsync(lock.commit(), { code: 'ERR_INVALID_ARGUMENT' })
  t.false(lock.held)
  t.deepEqual(store.getEntry('k'), { key: 'k', value: 'v', metadata: { path: 'good' } })
  t.is(store.count(), 1)
})

test('metadata that would be dropped on the way in (symbol names, a Map, an array) is InvalidArgumentError', async (t) => {
  const store = await tempStore(t)
  for (const metadata of [{ [Symbol('s')]: 'x' }, new Map([['a', 'b']]), ['a']]) {
    await t.throwsAsync(store.createAndLockEntry('k', { value: 1, metadata }), { instanceOf: kv.InvalidArgumentError })
  }
  // A null-prototype object is a plain object.
  const bare = Object.create(null)
  bare.a = 'b'
  await put(store, 'k', 1, bare)
  t.deepEqual(store.getEntry('k').metadata, { a: 'b' })
})

test('a msgpack value holding a lone surrogate is CodecError instead of being stored as U+FFFD', async (t) => {
  const store = await tempStore(t)
  for (const value of ['x\ud800', { a: ['\udc00'] }, { ['k\ud800']: 1 }, new Map([['a', '\ud800']])]) {
    const lock = await store.createAndLockEntry('k', { value })
    await t.throwsAsync(lock.commit(), { instanceOf: kv.CodecError })
  }
  t.is(store.count(), 0)
  // A real U+FFFD is kept.
  await put(store, 'k', { a: '\ufffd' })
  t.deepEqual(store.getEntry('k').value, { a: '\ufffd' })
})

test('json and v8 values keep lone surrogates exactly', async (t) => {
  for (const codec of [kv.codecs.json, kv.codecs.v8]) {
    const store = await tempStore(t, { codec })
    await put(store, 'k', { s: 'x\ud800' })
    t.is(store.getEntry('k').value.s, 'x\ud800', codec.name)
  }
})

test('functions are CodecError with msgpack, json (top level) and v8, not stored as null', async (t) => {
  for (const codec of [kv.codecs.msgpack, kv.codecs.v8]) {
    const store = await tempStore(t, { codec })
    for (const value of [() => 1, { f() {} }, [() => 1]]) {
      const lock = await store.createAndLockEntry('k', { value })
      await t.throwsAsync(lock.commit(), { instanceOf: kv.CodecError }, codec.name)
    }
    t.is(store.count(), 0)
  }
  const json = await tempStore(t, { codec: kv.codecs.json })
  const lock = await json.createAndLockEntry('k', { value: () => 1 })
  await t.throwsAsync(lock.commit(), { instanceOf: kv.CodecError })
})

test('a path that is empty or not well-formed is InvalidArgumentError', async (t) => {
  const dir = tempDir(t)
  for (const path of ['', join(dir, 'x\ud800.redb')]) {
    await t.throwsAsync(kv.MapStore.open(path), { instanceOf: kv.InvalidArgumentError }, JSON.stringify(path))
    await t.throwsAsync(kv.Database.open(path), { instanceOf: kv.InvalidArgumentError })
    await t.throwsAsync(kv.Database.checkIntegrity(path), { instanceOf: kv.InvalidArgumentError })
  }
  const store = await tempStore(t)
  await t.throwsAsync(store.backup(''), { instanceOf: kv.InvalidArgumentError })
  await t.throwsAsync(store.backup(join(dir, 'b\udc00.redb')), { instanceOf: kv.InvalidArgumentError })
})

test('a codec name that is not well-formed is InvalidArgumentError', async (t) => {
  await t.throwsAsync(kv.MapStore.temporary({ codec: { name: 'c\ud800', encode: (v) => v, decode: (b) => b } }), { instanceOf: kv.InvalidArgumentError })
})
