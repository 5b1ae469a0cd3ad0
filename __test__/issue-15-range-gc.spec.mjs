// Issue 15, item 5: an iterator dropped without break frees its snapshot when it is garbage
// collected, even while the range object (the result of getEntries()) lives on.
import test from 'ava'
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import { kv, put, tempStore } from './helpers.mjs'

setFlagsFromString('--expose-gc')
const gc = runInNewContext('gc')

/**
 * Collects garbage until compact() is no longer refused for an open walk; false if 200 rounds
 * (each a full collection and a turn of the event loop for finalizers) did not do it.
 */
async function collectUntilCompacts(store) {
  for (let round = 0; round < 200; round++) {
    gc()
    await new Promise(setImmediate)
    try {
      await store.compact()
      return true
    } catch (err) {
      if (!(err instanceof kv.InvalidArgumentError)) throw err
    }
  }
  return false
}

test('a dropped iterator of a range kept alive has its snapshot freed by garbage collection', async (t) => {
  const store = await tempStore(t)
  await Promise.all(Array.from({ length: 300 }, (_, i) => put(store, `k${String(i).padStart(3, '0')}`, i)))
  const range = store.getEntries()
  const abandon = () => {
    const it = range[Symbol.iterator]()
    t.is(it.next().value.key, 'k000')
  }
  abandon()
  abandon()
  t.is(store.stats().openSnapshots, 2)
  await t.throwsAsync(store.compact(), { instanceOf: kv.InvalidArgumentError }, 'the snapshots are held')
  t.true(await collectUntilCompacts(store), 'the snapshots were freed by garbage collection')
  t.is(store.stats().openSnapshots, 0)
  // The range is still usable, and still frees what it holds on dispose.
  const it = range[Symbol.iterator]()
  t.is(it.next().value.key, 'k000')
  t.is(store.stats().openSnapshots, 1)
  range[Symbol.dispose]()
  t.is(store.stats().openSnapshots, 0)
  t.true(it.next().done)
  t.is([...range].length, 300)
})

test('a dropped async iterator of a range kept alive is collected too', async (t) => {
  const store = await tempStore(t)
  await Promise.all(Array.from({ length: 100 }, (_, i) => put(store, `k${String(i).padStart(3, '0')}`, i)))
  const range = store.getEntries()
  await (async () => {
    const it = range[Symbol.asyncIterator]()
    t.is((await it.next()).value.key, 'k000')
  })()
  t.is(store.stats().openSnapshots, 1)
  t.true(await collectUntilCompacts(store), 'the snapshots were freed by garbage collection')
  t.is(store.stats().openSnapshots, 0)
  t.is(range.toArray().length, 100)
})
