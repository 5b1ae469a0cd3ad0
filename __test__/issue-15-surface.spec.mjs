// Issue 15 (items 1, 2, 3, 4, 6, 7): values, keys and options the library changed without a word.
import test from 'ava'
import { join } from 'node:path'
import { kv, put, tempDir, tempStore, waitersQueued } from './helpers.mjs'

const { codecs } = kv
const DAY = 86_400_000

// 15.1 ---------------------------------------------------------------------------------------

test('15.1 a timeout above 2^31-1 ms waits (chained timers), without TimeoutOverflowWarning', async (t) => {
  const warnings = []
  const onWarning = (warning) => warnings.push(warning)
  process.on('warning', onWarning)
  t.teardown(() => process.off('warning', onWarning))
  const store = await tempStore(t, { lockTimeoutMs: 30 * DAY })
  const holder = await store.createAndLockEntry('k', { value: 0 })
  const byOption = store.getAndLockEntry('k')
  const byCall = store.getAndLockEntry('k', { timeoutMs: 2 ** 31 })
  const huge = store.getAndLockEntry('k', { timeoutMs: 1e300 })
  await waitersQueued(store, 3)
  // A clamped timeout fires after 1 ms: a timer set after the waiters, for longer, fires after
  // theirs would have (timers fire in the order of their due time).
  await new Promise((resolve) => setTimeout(resolve, 25))
  t.is(store.stats().locksWaiting, 3, 'no waiter gave up')
  await holder.commit()
  for (const waiter of [byOption, byCall, huge]) {
    const lock = await waiter
    t.true(lock.held)
    lock.release()
  }
  t.deepEqual(
    warnings.filter((w) => w.name === 'TimeoutOverflowWarning').map((w) => w.message),
    [],
  )
})

test('15.1 a short timeout still times out', async (t) => {
  const store = await tempStore(t)
  const holder = await store.createAndLockEntry('k', { value: 0 })
  await t.throwsAsync(store.getAndLockEntry('k', { timeoutMs: 5 }), { instanceOf: kv.LockTimeoutError })
  holder.release()
  t.is(store.stats().locksWaiting, 0)
})

// 15.2 ---------------------------------------------------------------------------------------

const withProto = () => JSON.parse('{"__proto__":"p","a":"b"}')

test('15.2 a metadata name "__proto__" is returned by getEntry, getEntries and locks', async (t) => {
  const store = await tempStore(t)
  await put(store, 'k', 1, withProto())
  const read = store.getEntry('k').metadata
  t.true(Object.hasOwn(read, '__proto__'))
  t.is(JSON.stringify(read), '{"__proto__":"p","a":"b"}')
  t.is(Object.getPrototypeOf(read), Object.prototype)
  t.is(JSON.stringify([...store.getEntries()][0].metadata), '{"__proto__":"p","a":"b"}')
  const lock = await store.getAndLockEntry('k')
  t.is(JSON.stringify(lock.entry.metadata), '{"__proto__":"p","a":"b"}')
  await lock.commit()
  t.is(JSON.stringify(store.getEntry('k').metadata), '{"__proto__":"p","a":"b"}', 'kept through a lock and commit')
  // Given at create, and as an own property made with defineProperty or on a null-prototype object.
  await (await store.createAndLockEntry('c', { value: 1, metadata: withProto() })).commit()
  t.is(JSON.stringify(store.getEntry('c').metadata), '{"__proto__":"p","a":"b"}')
  const defined = {}
  Object.defineProperty(defined, '__proto__', { value: 'd', enumerable: true, writable: true, configurable: true })
  await put(store, 'd', 1, defined)
  t.is(JSON.stringify(store.getEntry('d').metadata), '{"__proto__":"d"}')
  const bare = Object.create(null)
  bare.__proto__ = 'n'
  await put(store, 'n', 1, bare)
  t.is(JSON.stringify(store.getEntry('n').metadata), '{"__proto__":"n"}')
})

test('15.2 values with a "__proto__" name come back exactly with every codec', async (t) => {
  const text = '{"__proto__":{"x":1,"__proto__":[{"__proto__":2}]},"a":[{"__proto__":null}],"n":{"1":2}}'
  for (const codec of [codecs.msgpack, codecs.json, codecs.v8]) {
    const store = await tempStore(t, { codec })
    await put(store, 'k', JSON.parse(text))
    const value = store.getEntry('k').value
    t.is(JSON.stringify(value), text, codec.name)
    t.true(Object.hasOwn(value, '__proto__'), codec.name)
    t.is(Object.getPrototypeOf(value), Object.prototype, codec.name)
    t.is(JSON.stringify([...store.getEntries()][0].value), text, codec.name)
    const lock = await store.getAndLockEntry('k')
    t.is(JSON.stringify(lock.entry.value), text, codec.name)
    lock.release()
  }
  // Dates, Buffers and BigInts beside a "__proto__" name keep their types.
  const store = await tempStore(t)
  const value = JSON.parse('{"__proto__":1}')
  Object.assign(value, { when: new Date(5), bytes: Buffer.from([1, 2]), big: 2n ** 60n, list: [new Date(6)] })
  await put(store, 'k', value)
  const read = store.getEntry('k').value
  t.true(Object.hasOwn(read, '__proto__'))
  t.deepEqual(read.when, new Date(5))
  t.deepEqual(Buffer.from(read.bytes), Buffer.from([1, 2]))
  t.is(read.big, 2n ** 60n)
  t.deepEqual(read.list, [new Date(6)])
})

// 15.3 ---------------------------------------------------------------------------------------

test('15.3 an entry created without a value can be committed with every codec', async (t) => {
  const expected = { msgpack: null, json: null, v8: undefined }
  for (const name of ['msgpack', 'json', 'v8', 'raw']) {
    const store = await tempStore(t, { codec: codecs[name] })
    const lock = await store.createAndLockEntry('job', { metadata: { owner: 'u1' } })
    t.is(lock.entry.value, undefined)
    await lock.commit()
    const entry = store.getEntry('job')
    t.deepEqual(entry.metadata, { owner: 'u1' }, name)
    if (name === 'raw') t.deepEqual(entry.value, Buffer.alloc(0), 'raw: zero bytes')
    else t.is(entry.value, expected[name], name)
  }
})

// 15.4 (the core's refusal is the lead's; this pins it once it lands) ----------------------------

// 15.6 ---------------------------------------------------------------------------------------

test('15.6 an empty path is InvalidArgumentError, not IoError', async (t) => {
  await t.throwsAsync(kv.MapStore.open(''), { instanceOf: kv.InvalidArgumentError, message: /path must not be empty/ })
  await t.throwsAsync(kv.Database.open(''), { instanceOf: kv.InvalidArgumentError })
  await t.throwsAsync(kv.MapStore.open(undefined), { instanceOf: TypeError })
})

// 15.7 ---------------------------------------------------------------------------------------

test('15.7 reverse walks keep start as the lower bound (inclusive) and stop as the upper (exclusive)', async (t) => {
  const store = await tempStore(t)
  for (const key of ['a', 'b', 'c', 'd', 'e']) await put(store, key, key)
  const keys = (options) => [...store.getEntries({ keysOnly: true, ...options })].map((item) => item.key)
  t.deepEqual(keys({ start: 'b', stop: 'd' }), ['b', 'c'])
  t.deepEqual(keys({ start: 'b', stop: 'd', reverse: true }), ['c', 'b'])
  t.deepEqual(keys({ start: 'b', reverse: true }), ['e', 'd', 'c', 'b'])
  t.deepEqual(keys({ stop: 'c', reverse: true, limit: 1 }), ['b'])
  t.is(store.count({ start: 'b', stop: 'd', reverse: true }), 2)
})

test('15.x a path with a store in it still opens (the checks refuse only what they should)', async (t) => {
  const path = join(tempDir(t), 'ok.redb')
  const store = await kv.MapStore.open(path)
  await put(store, 'k', 1)
  t.is(store.getEntry('k').value, 1)
  await store.close()
})
