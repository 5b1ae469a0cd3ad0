import test from 'ava'
import { forEachBackend } from './backends.mjs'
import { kv, put } from './helpers.mjs'

const { codecs } = kv

const samples = {
  msgpack: [{ id: 1, path: '/a', tags: ['x', 'y'], nested: { ok: true, n: null } }, 'text', 42, -1.5, [1, [2]], Buffer.from([1, 2, 3])],
  json: [{ id: 1, tags: ['x'] }, 'text', 42, null, [1, 2]],
  v8: [{ when: new Date(0), set: new Set([1]), map: new Map([['a', 1]]) }, 10n, 'text'],
  raw: [Buffer.from('bytes'), new Uint8Array([0, 255])],
}

test('msgpack writes standard MessagePack, without the msgpackr record extension', (t) => {
  const bytes = Buffer.from(codecs.msgpack.encode({ a: 1, b: [true, 'x'] }))
  // map16 of 2: "a" → 1, "b" → [true, "x"]; no ext type (0xd4…0xd8, 0xc7…0xc9) anywhere.
  t.is(bytes.toString('hex'), 'de0002a16101a16292c3a178')
  t.deepEqual(codecs.msgpack.decode(bytes), { a: 1, b: [true, 'x'] })
})

forEachBackend(({ test, tempStore, location }) => {
  for (const [name, values] of Object.entries(samples)) {
    test(`the ${name} codec round-trips`, async (t) => {
      const store = await tempStore(t, { codec: codecs[name] })
      for (const [i, value] of values.entries()) await put(store, `k${i}`, value)
      for (const [i, value] of values.entries()) {
        const stored = store.getEntry(`k${i}`).value
        if (value instanceof Uint8Array) t.deepEqual(Buffer.from(stored), Buffer.from(value))
        else t.deepEqual(stored, value)
      }
    })
  }

  test('a custom codec { name, encode, decode } is used', async (t) => {
    const upper = { name: 'upper', encode: (s) => Buffer.from(s.toUpperCase()), decode: (b) => b.toString() }
    const store = await tempStore(t, { codec: upper })
    await put(store, 'k', 'hello')
    t.is(store.getEntry('k').value, 'HELLO')
  })

  test('opening a table with another codec fails with CodecMismatchError', async (t) => {
    const path = await location(t, 'c.redb')
    const a = await kv.MapStore.open(path, { table: 'jobs', codec: codecs.json })
    await put(a, 'k', { x: 1 })
    const err = await t.throwsAsync(kv.MapStore.open(path, { table: 'jobs', codec: codecs.msgpack }), { instanceOf: kv.CodecMismatchError })
    t.is(err.code, 'ERR_CODEC_MISMATCH')
    t.regex(err.message, /json/)
    await a.close()
    await t.throwsAsync(kv.MapStore.open(path, { table: 'jobs' }), { code: 'ERR_CODEC_MISMATCH' }, 'recorded in the file')
    const other = await kv.MapStore.open(path, { table: 'other' })
    t.is(other.count(), 0, 'another table may use another codec')
    await other.close()
    const again = await kv.MapStore.open(path, { table: 'jobs', codec: codecs.json })
    t.deepEqual(again.getEntry('k').value, { x: 1 })
    await again.close()
  })

  const failing = { name: 'failing', encode: () => { throw new Error('cannot encode') }, decode: (b) => b.toString() }

  test('a codec that throws on encode: commit rejects with CodecError, the stored entry is unchanged, the lock released', async (t) => {
    const store = await tempStore(t, { codec: { ...failing, encode: (v) => (v === 'bad' ? failing.encode() : Buffer.from(v)) } })
    await put(store, 'k', 'good')
    const lock = await store.getAndLockEntry('k')
    lock.entry.value = 'bad'
    const err = await t.throwsAsync(lock.commit(), { instanceOf: kv.CodecError })
    t.is(err.code, 'ERR_CODEC')
    t.regex(err.message, /'k'/)
    t.is(store.getEntry('k').value, 'good')
    t.false(lock.held)
    t.is(store.stats().locksHeld, 0)
    const held = await store.getAndLockEntry('k')
    held.entry.value = 'bad'
    await t.throwsAsync(held.commit({ holdLockOnFailure: true }), { code: 'ERR_CODEC' })
    t.true(held.held)
    t.is(store.stats().locksHeld, 1)
    held.release()
  })

  test('a codec that returns something other than bytes is a CodecError', async (t) => {
    const store = await tempStore(t, { codec: { name: 'wrong', encode: () => 'not bytes', decode: (b) => b } })
    const lock = await store.createAndLockEntry('k', { value: 1 })
    await t.throwsAsync(lock.commit(), { code: 'ERR_CODEC' })
    t.is(store.getEntry('k'), undefined)
  })

  test('the raw codec refuses values other than bytes (no value at all is zero bytes: issue-15-surface)', async (t) => {
    const raw = await tempStore(t, { codec: codecs.raw })
    for (const value of ['a string', null, 1, [1]]) {
      const lock = await raw.createAndLockEntry('k', { value })
      await t.throwsAsync(lock.commit(), { code: 'ERR_CODEC' })
    }
    t.is(raw.count(), 0)
  })

  test('metadata must be strings', async (t) => {
    const store = await tempStore(t)
    const lock = await store.createAndLockEntry('k', { value: 1 })
    lock.entry.metadata.n = 5
    await t.throwsAsync(lock.commit(), { instanceOf: kv.InvalidArgumentError })
    t.is(store.getEntry('k'), undefined)
  })
})
