import { forEachBackend } from './backends.mjs'
import { kv } from './helpers.mjs'

forEachBackend(({ test, tempStore, location }) => {
  test('auto keys come back in creation order as 13-character base-36 strings', async (t) => {
    const store = await tempStore(t)
    const keys = []
    for (let i = 0; i <= 10; i++) {
      const { key, commit } = await store.createAndLockEntry(undefined, { value: i })
      keys.push(key)
      await commit()
    }
    t.true(keys.every((k) => /^[0-9a-z]{13}$/.test(k)))
    t.deepEqual([...keys].sort(), keys)
    t.deepEqual(
      store.getEntries().toArray().map((e) => e.value),
      Array.from({ length: 11 }, (_, i) => i),
    )
    t.is(keys[10], '000000000000a')
  })

  test('generateNextKey is strictly increasing across leases, concurrent callers and reopen', async (t) => {
    const path = await location(t, 'keys.redb')
    const seen = []
    for (let round = 0; round < 3; round++) {
      const store = await kv.MapStore.open(path, { keys: { bandwidth: 5 } })
      seen.push(...(await Promise.all(Array.from({ length: 12 }, () => store.generateNextKey()))))
      await store.close()
    }
    t.is(new Set(seen).size, seen.length, 'no key repeats')
    t.deepEqual([...seen].sort(), seen)
  })

  test('auto and user keys mix in one table', async (t) => {
    const store = await tempStore(t)
    const auto = await store.createAndLockEntry(undefined, { value: 'auto' })
    await auto.commit()
    const user = await store.createAndLockEntry('/user/key', { value: 'user' })
    await user.commit()
    t.is(store.count(), 2)
  })

  test('keys.width and keys.base shape auto keys', async (t) => {
    const store = await tempStore(t, { keys: { width: 6, base: 10 } })
    t.is(await store.generateNextKey(), '000000')
    t.is(await store.generateNextKey(), '000001')
  })

  test('a non-string key is a TypeError', async (t) => {
    const store = await tempStore(t)
    for (const bad of [1, null, {}, Symbol('x')]) {
      await t.throwsAsync(store.createAndLockEntry(bad), { instanceOf: TypeError })
      await t.throwsAsync(store.getAndLockEntry(bad), { instanceOf: TypeError })
      t.throws(() => store.getEntry(bad), { instanceOf: TypeError })
    }
  })

  test('an empty or oversize key is IllegalKeyError', async (t) => {
    const store = await tempStore(t)
    await t.throwsAsync(store.createAndLockEntry(''), { instanceOf: kv.IllegalKeyError, code: 'ERR_ILLEGAL_KEY' })
    await t.throwsAsync(store.getAndLockEntry(''), { code: 'ERR_ILLEGAL_KEY' })
    t.throws(() => store.getEntry(''), { code: 'ERR_ILLEGAL_KEY' })
    const long = 'k'.repeat(2049)
    await t.throwsAsync(store.createAndLockEntry(long), { code: 'ERR_ILLEGAL_KEY' })
    const longest = 'é'.repeat(1024)
    const lock = await store.createAndLockEntry(longest, { value: 1 })
    await lock.commit()
    t.is(store.getEntry(longest).value, 1)
    t.is(store.stats().locksHeld, 0)
  })

  test('no key prefix is reserved: keys that look like internal names are ordinary', async (t) => {
    const store = await tempStore(t)
    for (const key of ['seq:default', 'codec:default', 'format', '\u0000', 'kvstore:meta']) {
      const lock = await store.createAndLockEntry(key, { value: key })
      await lock.commit()
      t.is(store.getEntry(key).value, key)
    }
    t.is(store.count(), 5)
    t.is(await store.generateNextKey(), '0000000000000')
  })
})
