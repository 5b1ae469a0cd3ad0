import { forEachBackend } from './backends.mjs'
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import { kv, put } from './helpers.mjs'

setFlagsFromString('--expose-gc')
const gc = runInNewContext('gc')

forEachBackend(({ backend, test, tempStore }) => {
  async function seed(t) {
    const store = await tempStore(t)
    const keys = []
    for (let i = 0; i < 100; i++) keys.push(String(i).padStart(3, '0'))
    for (let i = 0; i < 100; i++) keys.push(`/foo/${i}`)
    keys.push('/baz/0', '/baz/2')
    await Promise.all(keys.map((k) => put(store, k, k)))
    return { store, keys: [...keys].sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b))) }
  }

  const keysOf = (range) => [...range].map((e) => e.key)

  test('getEntries walks in byte order', async (t) => {
    const { store, keys } = await seed(t)
    t.deepEqual(keysOf(store.getEntries()), keys)
    for (const { key, value, metadata } of store.getEntries({ limit: 3 })) {
      t.is(value, key)
      t.deepEqual(metadata, {})
    }
  })

  test('prefix, start (inclusive, next key if absent) and stop (exclusive)', async (t) => {
    const { store, keys } = await seed(t)
    t.deepEqual(keysOf(store.getEntries({ prefix: '/foo/' })), keys.filter((k) => k.startsWith('/foo/')))
    const window = keysOf(store.getEntries({ prefix: '/foo', start: '/foo/10', stop: '/foo/20' }))
    t.is(window[0], '/foo/10')
    t.false(window.includes('/foo/20'))
    t.deepEqual(window, keys.filter((k) => k >= '/foo/10' && k < '/foo/20'))
    t.deepEqual(keysOf(store.getEntries({ start: '/baz/1', stop: '/baz/3' })), ['/baz/2'])
    t.deepEqual(keysOf(store.getEntries({ start: '099' })), ['099'])
    t.deepEqual(keysOf(store.getEntries({ prefix: '/baz' })), ['/baz/0', '/baz/2'])
    t.deepEqual(keysOf(store.getEntries({ prefix: '/nothing' })), [])
  })

  test('a start outside the prefix is InvalidArgumentError', async (t) => {
    const { store } = await seed(t)
    t.throws(() => [...store.getEntries({ prefix: '/foo', start: '/bar' })], { instanceOf: kv.InvalidArgumentError })
  })

  test('reverse, limit and keysOnly', async (t) => {
    const { store, keys } = await seed(t)
    t.deepEqual(keysOf(store.getEntries({ reverse: true, limit: 3 })), keys.slice(-3).reverse())
    t.deepEqual(keysOf(store.getEntries({ prefix: '/baz', reverse: true })), ['/baz/2', '/baz/0'])
    const onlyKeys = [...store.getEntries({ keysOnly: true, limit: 2 })]
    t.deepEqual(onlyKeys.map((e) => e.key), keys.slice(0, 2))
    t.is(onlyKeys[0].value, undefined)
    t.deepEqual(keysOf(store.getEntries({ limit: 0 })), [])
  })

  test('for await walks the same snapshot', async (t) => {
    const { store, keys } = await seed(t)
    const seen = []
    for await (const item of store.getEntries({ reverse: true, limit: 100 })) seen.push(item.key)
    t.deepEqual(seen, keys.slice(-100).reverse())
  })

  test('an empty store iterates to a clean end', async (t) => {
    const store = await tempStore(t)
    t.deepEqual([...store.getEntries()], [])
    t.is(store.count(), 0)
    t.is(store.getEntry('x'), undefined)
  })

  test('a walk does not see commits made during it', async (t) => {
    const { store, keys } = await seed(t)
    const seen = []
    for (const item of store.getEntries()) {
      if (seen.length === 0) {
        await put(store, 'zzz', 'new')
        await store.deleteEntry(keys[keys.length - 1])
      }
      seen.push(item.key)
    }
    t.deepEqual(seen, keys)
    t.is(store.getEntry('zzz').value, 'new')
  })

  test('breaking out of the loop or disposing frees the snapshot', async (t) => {
    const { store } = await seed(t)
    for (const _item of store.getEntries()) {
      t.is(store.stats().openSnapshots, 1)
      break
    }
    t.is(store.stats().openSnapshots, 0)
    const range = store.getEntries()
    const it = range[Symbol.iterator]()
    it.next()
    t.is(store.stats().openSnapshots, 1)
    range[Symbol.dispose]()
    t.is(store.stats().openSnapshots, 0)
    t.deepEqual(it.next(), { done: true, value: undefined })
  })

  // Compaction waits for walks only in a file (a cluster's compact() trims etcd's history).
  const fileTest = backend === 'file' ? test : () => {}
  fileTest('an iterator dropped without break has its snapshot freed by garbage collection', async (t) => {
    const { store } = await seed(t)
    const abandon = () => {
      const it = store.getEntries()[Symbol.iterator]()
      t.is(it.next().value.key, '/baz/0')
    }
    abandon()
    t.is(store.stats().openSnapshots, 1)
    await t.throwsAsync(store.compact(), { instanceOf: kv.InvalidArgumentError }, 'the snapshot is held')
    // Collect until the walk's snapshot is gone in the core: compact runs only then.
    for (;;) {
      gc()
      await new Promise(setImmediate)
      try {
        await store.compact()
        break
      } catch (err) {
        if (!(err instanceof kv.InvalidArgumentError)) throw err
      }
    }
    t.is(store.stats().openSnapshots, 0)
    t.is(store.count(), 202)
  })

  test('reads see committed data only, never a held entry’s edits', async (t) => {
    const store = await tempStore(t)
    await put(store, 'k', { state: 'committed' })
    const lock = await store.getAndLockEntry('k')
    lock.entry.value = { state: 'editing' }
    t.deepEqual(store.getEntry('k').value, { state: 'committed' })
    t.deepEqual([...store.getEntries()].map((e) => e.value), [{ state: 'committed' }])
    await lock.commit()
    t.deepEqual(store.getEntry('k').value, { state: 'editing' })
  })

  test('an entry that cannot be decoded throws CodecError naming its key; the walk goes on', async (t) => {
    const touchy = {
      name: 'touchy',
      encode: (v) => Buffer.from(String(v)),
      decode: (b) => {
        if (b.toString() === 'bad') throw new Error('cannot read this')
        return b.toString()
      },
    }
    const store = await tempStore(t, { codec: touchy })
    for (const v of ['a', 'bad', 'c']) await put(store, v, v)
    const items = [...store.getEntries()]
    t.deepEqual(items.map((i) => i.key), ['a', 'bad', 'c'])
    t.is(items[0].value, 'a')
    const err = t.throws(() => items[1].value, { instanceOf: kv.CodecError })
    t.regex(err.message, /'bad'/)
    t.is(items[2].value, 'c')
    t.throws(() => store.getEntry('bad'), { code: 'ERR_CODEC' })
  })

  test('count honours the same options', async (t) => {
    const { store } = await seed(t)
    t.is(store.count(), 202)
    t.is(store.count({ prefix: '/foo/' }), 100)
    t.is(store.count({ prefix: '/foo', start: '/foo/10', stop: '/foo/20' }), 11)
    t.is(store.count({ limit: 5 }), 5)
  })
})
