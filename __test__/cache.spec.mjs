// The core's entry cache is a budget in bytes (cacheBytes), with an optional cap on entries
// (cacheCapacity): large records cannot make it hold gigabytes, and it never serves a stale value.
import test from 'ava'
import { kv, put, tempStore } from './helpers.mjs'

const KiB = 1024

test('the cache stays within cacheBytes however large the records', async (t) => {
  const store = await tempStore(t, { codec: kv.codecs.raw, cacheBytes: 64 * KiB })
  for (let i = 0; i < 40; i++) await put(store, `k${i}`, Buffer.alloc(4 * KiB, i))
  for (let i = 0; i < 40; i++) t.is(store.getEntry(`k${i}`).value[0], i)
  const stats = store.stats()
  t.true(stats.cacheBytes <= 64 * KiB, `counted at ${stats.cacheBytes} bytes`)
  t.true(stats.cacheBytes > 32 * KiB, `filled to ${stats.cacheBytes} bytes`)
  // 4 KiB records: at most 16 fit, not all 40.
  t.true(stats.cacheEntries >= 8 && stats.cacheEntries <= 16, `${stats.cacheEntries} entries`)
})

test('a record over an eighth of cacheBytes is not cached, nor is the value it replaced', async (t) => {
  const store = await tempStore(t, { codec: kv.codecs.raw, cacheBytes: 64 * KiB })
  await put(store, 'small', Buffer.from('s'))
  await put(store, 'k', Buffer.from('old'))
  t.deepEqual(store.getEntry('k').value, Buffer.from('old'))
  const before = store.stats()
  await put(store, 'k', Buffer.alloc(16 * KiB, 7))
  const after = store.stats()
  t.is(after.cacheEntries, before.cacheEntries - 1, 'the old value of k left the cache')
  const big = store.getEntry('k').value
  t.is(big.length, 16 * KiB)
  t.is(big[0], 7)
  t.is(store.stats().cacheEntries, after.cacheEntries, 'a read does not cache it either')
  t.deepEqual(store.getEntry('small').value, Buffer.from('s'))
})

test('the default budget holds tens of thousands of small records; cacheCapacity caps entries; 0 disables', async (t) => {
  const store = await tempStore(t)
  const records = Array.from({ length: 30_000 }, (_, i) => ({ id: i, state: 'RUNNING', path: `/data/p${i % 100}/file-${i}` }))
  await Promise.all(records.map((value, i) => put(store, `job-${i}`, value)))
  t.is(store.stats().cacheEntries, 30_000)
  t.true(store.stats().cacheBytes <= 8 * 2 ** 20)

  const capped = await tempStore(t, { cacheCapacity: 100 })
  await Promise.all(records.slice(0, 1000).map((value, i) => put(capped, `job-${i}`, value)))
  t.is(capped.stats().cacheEntries, 100)

  for (const off of [{ cacheBytes: 0 }, { cacheCapacity: 0 }]) {
    const uncached = await tempStore(t, off)
    await put(uncached, 'k', 1)
    t.is(uncached.getEntry('k').value, 1)
    t.is(uncached.stats().cacheEntries, 0, JSON.stringify(off))
    t.is(uncached.stats().cacheBytes, 0, JSON.stringify(off))
  }
})

test('a huge cacheCapacity reserves nothing up front', async (t) => {
  // lru's bounded cache reserved its capacity at open: 1e9 asked for terabytes and aborted.
  for (const cacheCapacity of [1e9, 2 ** 53 - 1]) {
    const store = await tempStore(t, { cacheCapacity })
    await put(store, 'k', 1)
    t.is(store.getEntry('k').value, 1)
    t.is(store.stats().cacheEntries, 1)
  }
})
