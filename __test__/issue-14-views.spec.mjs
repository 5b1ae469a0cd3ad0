// Issue 14.3: a decoded value must not be a view into a buffer the store reuses, so that a later
// read cannot change it. Checked for every codec, through getEntry, getEntries and locks.
import test from 'ava'
import { kv, put, tempStore } from './helpers.mjs'

const { codecs } = kv

// Two values of the same shape and size, so that a view of the first would be overwritten by the second.
const cases = {
  msgpack: (s) => ({ bytes: Buffer.from(s), list: [Buffer.from(s)] }),
  v8: (s) => ({ bytes: Buffer.from(s), u8: new Uint8Array(Buffer.from(s)), f64: new Float64Array([s.charCodeAt(0)]), top: Buffer.from(s) }),
  raw: (s) => Buffer.from(s),
  json: (s) => ({ s }),
  // A custom codec that returns the bytes it was given (the simplest a user could write).
  identity: (s) => Buffer.from(s),
}
const identity = { name: 'identity', encode: (b) => b, decode: (b) => b }
const codecOf = (name) => (name === 'identity' ? identity : codecs[name])

/** The value as plain data, for comparing after later reads. */
const snapshot = (value) => JSON.stringify(value, (_k, v) => (ArrayBuffer.isView(v) ? [v.constructor.name, ...new Uint8Array(v.buffer, v.byteOffset, v.byteLength)] : v))

for (const [name, make] of Object.entries(cases)) {
  test(`14.3 ${name}: values read earlier are not changed by later reads`, async (t) => {
    const store = await tempStore(t, { codec: codecOf(name) })
    await put(store, 'a', make('hello'))
    await put(store, 'b', make('WORLD'))
    const expectedA = snapshot(make('hello'))

    const a = store.getEntry('a').value
    t.is(snapshot(a), expectedA)
    store.getEntry('b')
    t.is(snapshot(a), expectedA, 'getEntry after getEntry')
    const lock = await store.getAndLockEntry('b')
    lock.release()
    t.is(snapshot(a), expectedA, 'getEntry after a lock (the record travels through the read buffer)')

    const locked = await store.getAndLockEntry('a')
    const lockedValue = locked.entry.value
    locked.release()
    store.getEntry('b')
    await (await store.getAndLockEntry('b')).release()
    t.is(snapshot(lockedValue), expectedA, 'a lock entry after later reads')

    const walked = [...store.getEntries()].map((item) => item.value)
    store.getEntry('b')
    ;[...store.getEntries()].map((item) => item.value)
    t.is(snapshot(walked[0]), expectedA, 'a walked value after later reads')
    t.is(snapshot(walked[1]), snapshot(make('WORLD')))

    // Writing into a value read earlier does not change what the store or later reads return.
    const mine = store.getEntry('a').value
    const view = ArrayBuffer.isView(mine) ? mine : ArrayBuffer.isView(mine.bytes) ? mine.bytes : undefined
    if (view) {
      new Uint8Array(view.buffer, view.byteOffset, view.byteLength).fill(0x21)
      t.is(snapshot(store.getEntry('a').value), expectedA, 'the store is not changed through a value')
      t.is(snapshot(store.getEntry('b').value), snapshot(make('WORLD')), 'other entries neither')
    }
  })
}
