// Issue 10, "Watch": map.watch() yields every change committed after the call, in commit order,
// from every thread (file) or every process (etcd); a consumer that falls highWaterMark changes
// behind gets WatchOverflowError; break, return(), the signal and close() end it and free it.
// Each test waits for changes themselves (or for sync()), never for time to pass.
import { once } from 'node:events'
import { Worker } from 'node:worker_threads'
import { forEachBackend } from './backends.mjs'
import { kv, otherProcess, put } from './helpers.mjs'

const { AbortError, Database, MapStore, WatchChange, WatchOverflowError } = kv
const fixture = new URL('./fixtures/watch-worker.mjs', import.meta.url)

/** The next `n` changes of `watch`, then the watch is left open (the loop breaks only at `n`). */
async function take(watch, n) {
  const seen = []
  if (n === 0) return seen
  while (seen.length < n) {
    const { value, done } = await watch.next()
    if (done) throw new Error(`the watch ended after ${seen.length} of ${n} changes`)
    seen.push(value)
  }
  return seen
}

const plain = (changes) => changes.map((c) => [c.type, c.key, c.value, c.type === 'put' ? c.metadata : undefined])

/** Whether `promise` is still pending once everything queued before it on the loop has run. */
async function pending(promise) {
  let settled = false
  promise.then(
    () => (settled = true),
    () => (settled = true),
  )
  await new Promise(setImmediate)
  return !settled
}

function worker(workerData) {
  const w = new Worker(fixture, { workerData })
  const exited = once(w, 'exit')
  return { w, exited }
}

forEachBackend(({ backend, test, tempStore, location }) => {
  test('yields every commit after the call, in commit order, decoded with the codec', async (t) => {
    const store = await tempStore(t)
    await put(store, 'before', 1)
    const watch = store.watch()
    t.is(store.stats().watchers, 1)
    await put(store, 'a', { v: 1 }, { m: 'x' })
    await store.updateEntry('a', (entry) => {
      entry.value = { v: 2 }
    })
    const { entry, commit } = await store.createAndLockEntry('b', { value: [1, 2] })
    entry.metadata.k = 'v'
    await commit()
    t.true(await store.deleteEntry('a'))
    const changes = await take(watch, 4)
    t.deepEqual(plain(changes), [
      ['put', 'a', { v: 1 }, { m: 'x' }],
      ['put', 'a', { v: 2 }, { m: 'x' }],
      ['put', 'b', [1, 2], { k: 'v' }],
      ['delete', 'a', undefined, undefined],
    ])
    t.true(changes[0] instanceof WatchChange)
    t.deepEqual(JSON.parse(JSON.stringify(changes[3])), { type: 'delete', key: 'a', metadata: {} })
    // Nothing else is queued: 'before' was committed before the call.
    await store.sync()
    t.true(
      await pending(
        watch.next().then((r) => {
          if (!r.done) t.fail(`unexpected ${r.value.key}`)
        }),
      ),
    )
    await watch.return()
    t.is(store.stats().watchers, 0)
  })

  test('64 concurrent committers and a worker thread: every change seen once, each key in commit order', async (t) => {
    const where = await location(t, 'concurrent')
    const store = await MapStore.open(where, { table: 'jobs' })
    t.teardown(() => store.close())
    const keys = Array.from({ length: 16 }, (_, i) => `job-${String(i).padStart(2, '0')}`)
    for (const key of keys) await put(store, key, { n: 0 })
    const watch = store.watch()
    const tasks = 64
    const rounds = backend === 'etcd' ? 5 : 20
    const workerTimes = backend === 'etcd' ? 40 : 200
    const { w, exited } = worker({ location: where, table: 'jobs', mode: 'commit', keys, times: workerTimes })
    const workerDone = once(w, 'message')
    await Promise.all(
      Array.from({ length: tasks }, async (_, task) => {
        for (let i = 0; i < rounds; i++) {
          await store.updateEntry(keys[(task + i * 7) % keys.length], (entry) => {
            entry.value = { n: entry.value.n + 1 }
          })
        }
      }),
    )
    t.deepEqual(await workerDone, ['done'])
    await exited
    const total = tasks * rounds + workerTimes
    const changes = await take(watch, total)
    const perKey = new Map(keys.map((k) => [k, []]))
    for (const change of changes) {
      t.is(change.type, 'put')
      perKey.get(change.key).push(change.value.n)
    }
    let sum = 0
    for (const [key, ns] of perKey) {
      // Commit order of one key is the order of its counter: 1, 2, 3, … with nothing missing.
      t.deepEqual(
        ns,
        ns.map((_, i) => i + 1),
        key,
      )
      t.is(store.getEntry(key).value.n, ns.length)
      sum += ns.length
    }
    t.is(sum, total)
    await store.sync()
    t.true(await pending(watch.next()), 'no change seen twice')
    await watch.return()
  })

  test('a watch opened in a worker thread hears the commits of other threads', async (t) => {
    const where = await location(t, 'in-worker')
    const store = await MapStore.open(where, { table: 'jobs' })
    t.teardown(() => store.close())
    const keys = ['a', 'b', 'c']
    for (const key of keys) await put(store, key, { n: 0 })
    const { w, exited } = worker({ location: where, table: 'jobs', mode: 'watch', expect: 30 })
    const [ready] = await once(w, 'message')
    t.is(ready, 'watching')
    const seen = once(w, 'message')
    for (let i = 0; i < 30; i++) {
      await store.updateEntry(keys[i % 3], (entry) => {
        entry.value = { n: entry.value.n + 1 }
      })
    }
    const [changes] = await seen
    t.deepEqual(
      changes,
      Array.from({ length: 30 }, (_, i) => ['put', keys[i % 3], Math.floor(i / 3) + 1]),
    )
    await exited
    t.is(store.stats().watchers, 0, "the worker's watch ended with it")
  })

  if (backend === 'etcd') {
    test('commits of other processes arrive, each key in commit order', async (t) => {
      const url = await location(t, 'processes')
      const store = await MapStore.open(url, { table: 'jobs' })
      t.teardown(() => store.close())
      const watch = store.watch()
      const keys = ['p0', 'p1', 'p2', 'p3']
      const children = await Promise.all([0, 1].map(() => otherProcess(t, url)))
      const work = { cmd: 'increment', keys, tasks: 4, rounds: 10 }
      const replies = await Promise.all(children.map((child) => child.send(work)))
      t.deepEqual(
        replies.map((r) => r.done),
        [40, 40],
      )
      const perKey = new Map(keys.map((k) => [k, []]))
      for (const change of await take(watch, 80)) perKey.get(change.key).push(change.value)
      for (const [key, values] of perKey) {
        t.deepEqual(
          values,
          values.map((_, i) => i + 1),
          key,
        )
      }
      await watch.return()
    })
  }

  test('prefix: only keys that begin with it', async (t) => {
    const store = await tempStore(t)
    const watch = store.watch({ prefix: '/jobs/' })
    const everything = store.watch()
    for (const key of ['/jobs/1', '/job', '/jobs', '/other/1', '/jobs/2/x', 'jobs/3']) await put(store, key, key)
    await store.deleteEntry('/jobs/1')
    await store.deleteEntry('/other/1')
    t.deepEqual(
      (await take(watch, 3)).map((c) => [c.type, c.key]),
      [
        ['put', '/jobs/1'],
        ['put', '/jobs/2/x'],
        ['delete', '/jobs/1'],
      ],
    )
    t.is((await take(everything, 8)).length, 8)
    await store.sync()
    t.true(await pending(watch.next()))
    await watch.return()
    await everything.return()
    t.throws(() => store.watch({ prefix: 1 }), { instanceOf: TypeError })
    t.throws(() => store.watch({ prefix: '\ud800' }), { instanceOf: kv.IllegalKeyError })
    for (const highWaterMark of [0, -1, 1.5, Infinity, NaN, '10']) {
      t.throws(() => store.watch({ highWaterMark }), { instanceOf: kv.InvalidArgumentError }, String(highWaterMark))
    }
    // A string is quoted in the message, as for the other options.
    t.throws(() => store.watch({ highWaterMark: '5' }), { message: "highWaterMark must be a positive integer, got '5'" })
    t.throws(() => store.watch({ signal: {} }), { instanceOf: kv.InvalidArgumentError })
    t.is(store.stats().watchers, 0)
  })

  test('a consumer more than highWaterMark behind gets WatchOverflowError, then the end', async (t) => {
    const store = await tempStore(t)
    const slow = store.watch({ highWaterMark: 5 })
    const fine = store.watch({ highWaterMark: 6 })
    for (let i = 0; i < 6; i++) await put(store, `k${i}`, i)
    await store.sync() // the replica has published them (a no-op on a file)
    t.is((await take(fine, 6)).length, 6, 'exactly at the mark is not an overflow')
    const err = await t.throwsAsync(slow.next(), { instanceOf: WatchOverflowError })
    t.is(err.code, 'ERR_WATCH_OVERFLOW')
    t.regex(err.message, /more than 5 changes behind/)
    t.deepEqual(await slow.next(), { done: true, value: undefined })
    t.is(store.stats().watchers, 1, 'the failed watch is freed')
    // A for-await loop sees the error thrown.
    const loop = store.watch({ highWaterMark: 2 })
    for (let i = 0; i < 3; i++) await put(store, `k${i}`, i)
    await store.sync()
    await t.throwsAsync(
      async () => {
        for await (const change of loop) t.fail(`read ${change.key}`)
      },
      { instanceOf: WatchOverflowError },
    )
    await fine.return()
    t.is(store.stats().watchers, 0)
  })

  test('the signal ends the watch with AbortError, also while next() waits', async (t) => {
    const store = await tempStore(t)
    const controller = new AbortController()
    const watch = store.watch({ signal: controller.signal })
    await put(store, 'a', 1)
    const [first] = await take(watch, 1)
    t.is(first.key, 'a')
    const waiting = watch.next()
    t.true(await pending(waiting))
    controller.abort(new Error('stop'))
    const err = await t.throwsAsync(waiting, { instanceOf: AbortError })
    t.is(err.cause.message, 'stop')
    t.deepEqual(await watch.next(), { done: true, value: undefined })
    t.is(store.stats().watchers, 0)
    t.throws(() => store.watch({ signal: controller.signal }), { instanceOf: AbortError })
    // Aborted between two changes, the for-await loop ends with the error.
    const second = new AbortController()
    const loop = store.watch({ signal: second.signal })
    await put(store, 'b', 1)
    await put(store, 'c', 1)
    await t.throwsAsync(
      async () => {
        for await (const change of loop) {
          t.is(change.key, 'b')
          second.abort()
        }
      },
      { instanceOf: AbortError },
    )
    t.is(store.stats().watchers, 0)
  })

  test('break, return() and dispose end the watch', async (t) => {
    const store = await tempStore(t)
    const watch = store.watch()
    await put(store, 'a', 1)
    await put(store, 'b', 1)
    for await (const change of watch) {
      t.is(change.key, 'a')
      break
    }
    t.is(store.stats().watchers, 0)
    t.deepEqual(await watch.next(), { done: true, value: undefined }, 'ended, the queued change freed')
    const waiting = store.watch()
    const next = waiting.next()
    t.true(await pending(next))
    await waiting.return()
    t.deepEqual(await next, { done: true, value: undefined }, 'a waiting next() ends')
    const disposed = store.watch()
    t.is(store.stats().watchers, 1)
    await disposed[Symbol.asyncDispose]()
    t.is(store.stats().watchers, 0)
  })

  test('closing the map, its view or its database ends a watch, also a waiting next()', async (t) => {
    const store = await MapStore.open(await location(t, 'close-map'))
    const watch = store.watch()
    const next = watch.next()
    t.true(await pending(next))
    await store.close()
    t.deepEqual(await next, { done: true, value: undefined })
    t.deepEqual(await watch.next(), { done: true, value: undefined })
    t.throws(() => store.watch(), { instanceOf: kv.StoreClosedError })

    const db = await Database.open(await location(t, 'close-db'))
    const view = db.mapStore('jobs')
    const other = db.mapStore('jobs')
    const ofView = view.watch()
    const ofOther = other.watch()
    const viewNext = ofView.next()
    const otherNext = ofOther.next()
    await view.close()
    t.deepEqual(await viewNext, { done: true, value: undefined }, 'closing a view ends its watches')
    t.true(await pending(otherNext), 'not those of another view')
    await put(other, 'x', 1)
    t.is((await otherNext).value.key, 'x')
    const last = ofOther.next()
    await db.close()
    t.deepEqual(await last, { done: true, value: undefined }, 'closing the database ends them all')
  })

  test('1 000 watches opened and ended leave no watcher behind', async (t) => {
    const store = await tempStore(t)
    let key = 0
    for (let i = 0; i < 1000; i++) {
      const controller = new AbortController()
      const watch = store.watch({ signal: controller.signal, prefix: i % 2 ? '' : 'k' })
      switch (i % 5) {
        case 0:
          await watch.return()
          break
        case 1: {
          const next = watch.next()
          controller.abort()
          await t.throwsAsync(next, { instanceOf: AbortError })
          break
        }
        case 2:
          await watch[Symbol.asyncDispose]()
          break
        case 3: {
          // One commit every few rounds: a watch that read a change and broke off.
          await put(store, `k${key++}`, i)
          for await (const change of watch) {
            if (change) break
          }
          break
        }
        default: {
          const next = watch.next()
          await watch.return()
          t.true((await next).done)
        }
      }
    }
    t.is(store.stats().watchers, 0)
    // And the store still watches fine.
    const watch = store.watch()
    await put(store, 'after', 1)
    t.is((await take(watch, 1))[0].key, 'after')
    await watch.return()
    t.is(store.stats().watchers, 0)
  })
})
