import { forEachBackend } from './backends.mjs'
import { kv, put, waitersQueued } from './helpers.mjs'

forEachBackend(({ test, tempStore, twoHandles, location }) => {
  test('create twice fails with EntryAlreadyExistsError', async (t) => {
    const store = await tempStore(t)
    const { commit } = await store.createAndLockEntry('foo', { value: 1 })
    await commit()
    const err = await t.throwsAsync(store.createAndLockEntry('foo', { value: 2 }), { instanceOf: kv.EntryAlreadyExistsError })
    t.is(err.code, 'ERR_ENTRY_EXISTS')
    t.is(store.getEntry('foo').value, 1)
    t.is(store.stats().locksHeld, 0)
  })

  test('allowExisting returns the existing entry locked, ignoring the new value', async (t) => {
    const store = await tempStore(t)
    await put(store, 'foo', { one: '1' }, { hello: 'world' })
    const lock = await store.createAndLockEntry('foo', { value: { one: 'x' }, allowExisting: true })
    t.true(lock.existed)
    t.deepEqual(lock.entry.value, { one: '1' })
    t.deepEqual(lock.entry.metadata, { hello: 'world' })
    t.is(store.stats().locksHeld, 1)
    lock.release()
    const fresh = await store.createAndLockEntry('bar', { value: 5, allowExisting: true })
    t.false(fresh.existed)
    t.is(fresh.entry.value, 5)
    fresh.release()
    t.is(store.getEntry('bar'), undefined, 'release writes nothing')
  })

  test('a locked entry carries its committed value whatever its size (small, and larger than the read buffer)', async (t) => {
    const store = await tempStore(t)
    const small = { s: 'x'.repeat(10) }
    const large = { s: 'y'.repeat(100_000), list: Array.from({ length: 1000 }, (_, i) => i) }
    await put(store, 'small', small, { m: '1' })
    await put(store, 'large', large, { m: '2' })
    for (const [key, value, m] of [['small', small, '1'], ['large', large, '2'], ['small', small, '1']]) {
      const lock = await store.getAndLockEntry(key)
      t.deepEqual(lock.entry.value, value)
      t.deepEqual(lock.entry.metadata, { m })
      t.true(lock.existed)
      lock.entry.value.touched = true
      await lock.commit()
      t.true(store.getEntry(key).value.touched)
      delete value.touched
      await store.updateEntry(key, (e) => { delete e.value.touched })
    }
    const deleted = await store.deleteEntry('large')
    t.true(deleted)
  })

  test('getAndLockEntry of a missing key is EntryNotFoundError', async (t) => {
    const store = await tempStore(t)
    const err = await t.throwsAsync(store.getAndLockEntry('nope'), { instanceOf: kv.EntryNotFoundError })
    t.is(err.code, 'ERR_ENTRY_NOT_FOUND')
    t.is(store.stats().locksHeld, 0)
  })

  test('commit persists value and metadata; the handle is dead afterwards', async (t) => {
    const store = await tempStore(t)
    const { key, entry, commit, existed } = await store.createAndLockEntry('foo', { value: { state: 'NEW' } })
    t.is(key, 'foo')
    t.false(existed)
    entry.value = { ...entry.value, state: 'RUNNING' }
    entry.metadata.path = '/data/x'
    await commit()
    t.deepEqual(store.getEntry('foo'), { key: 'foo', value: { state: 'RUNNING' }, metadata: { path: '/data/x' } })
    t.throws(() => entry.value, { instanceOf: kv.EntryReleasedError, code: 'ERR_ENTRY_RELEASED' })
    t.throws(() => { entry.value = 1 }, { code: 'ERR_ENTRY_RELEASED' })
    t.throws(() => entry.metadata, { code: 'ERR_ENTRY_RELEASED' })
    await t.throwsAsync(commit(), { instanceOf: kv.LockReleasedError, code: 'ERR_LOCK_RELEASED' })
  })

  test('updateOnly keeps the lock: a second acquirer waits for the final commit, then sees it', async (t) => {
    const store = await tempStore(t)
    await put(store, 'job', { n: 0 })
    const lock = await store.getAndLockEntry('job')
    lock.entry.value = { n: 1 }
    await lock.commit({ updateOnly: true })
    t.deepEqual(store.getEntry('job').value, { n: 1 }, 'an updateOnly commit is visible to readers')
    const order = []
    const second = store.getAndLockEntry('job').then((l) => {
      order.push('second')
      return l
    })
    await waitersQueued(store, 1)
    lock.entry.value = { n: 2 }
    order.push('final')
    await lock.commit()
    const next = await second
    t.deepEqual(order, ['final', 'second'])
    t.deepEqual(next.entry.value, { n: 2 })
    next.release()
  })

  test('commit({ delete: true }) deletes and releases', async (t) => {
    const store = await tempStore(t)
    await put(store, 'gone', 1)
    const lock = await store.getAndLockEntry('gone')
    await lock.commit({ delete: true })
    t.is(store.getEntry('gone'), undefined)
    t.is(store.stats().locksHeld, 0)
    t.false(lock.held)
  })

  test('delete together with updateOnly is InvalidArgumentError and the lock stays held', async (t) => {
    const store = await tempStore(t)
    await put(store, 'k', 1)
    const lock = await store.getAndLockEntry('k')
    await t.throwsAsync(lock.commit({ delete: true, updateOnly: true }), { instanceOf: kv.InvalidArgumentError, code: 'ERR_INVALID_ARGUMENT' })
    t.true(lock.held)
    t.is(store.stats().locksHeld, 1)
    lock.entry.value = 2
    await lock.commit()
    t.is(store.getEntry('k').value, 2)
  })

  test('a waiter whose key is deleted by the holder gets EntryDeletedError; create then succeeds', async (t) => {
    const store = await tempStore(t)
    await put(store, 'k', 'v')
    const holder = await store.getAndLockEntry('k')
    const getter = store.getAndLockEntry('k')
    getter.catch(() => {})
    const creator = store.createAndLockEntry('k', { value: 'new' })
    await waitersQueued(store, 2)
    await holder.commit({ delete: true })
    const err = await t.throwsAsync(getter, { instanceOf: kv.EntryDeletedError })
    t.is(err.code, 'ERR_ENTRY_DELETED')
    t.true(err instanceof kv.EntryNotFoundError, 'EntryDeletedError is an EntryNotFoundError')
    const created = await creator
    t.false(created.existed)
    await created.commit()
    t.is(store.getEntry('k').value, 'new')
  })

  test('a waiter that times out leaves no trace and the next waiter proceeds', async (t) => {
    const store = await tempStore(t)
    await put(store, 'k', 0)
    const holder = await store.getAndLockEntry('k')
    const impatient = store.getAndLockEntry('k', { timeoutMs: 1 })
    const patient = store.getAndLockEntry('k')
    const err = await t.throwsAsync(impatient, { instanceOf: kv.LockTimeoutError })
    t.is(err.code, 'ERR_LOCK_TIMEOUT')
    await waitersQueued(store, 1)
    t.is(store.stats().locksWaiting, 1, 'only the patient waiter is queued')
    holder.release()
    const next = await patient
    t.is(next.entry.value, 0)
    next.release()
    t.deepEqual([store.stats().locksHeld, store.stats().locksWaiting], [0, 0])
  })

  test('lockTimeoutMs is the store default; timeoutMs overrides it', async (t) => {
    const store = await tempStore(t, { lockTimeoutMs: 1 })
    // A free key may take a round trip to lock (etcd): only the wait for a held one is timed here.
    await (await store.createAndLockEntry('k', { value: 0, timeoutMs: Infinity })).commit()
    const holder = await store.getAndLockEntry('k', { timeoutMs: Infinity })
    await t.throwsAsync(store.getAndLockEntry('k'), { code: 'ERR_LOCK_TIMEOUT' })
    const patient = store.getAndLockEntry('k', { timeoutMs: Infinity })
    await waitersQueued(store, 1)
    holder.release()
    ;(await patient).release()
    t.is(store.stats().locksHeld, 0)
  })

  test('an aborted signal rejects with AbortError and removes the waiter', async (t) => {
    const store = await tempStore(t)
    await put(store, 'k', 0)
    const holder = await store.getAndLockEntry('k')
    const controller = new AbortController()
    const waiting = store.getAndLockEntry('k', { signal: controller.signal })
    await waitersQueued(store, 1)
    controller.abort(new Error('user gave up'))
    const err = await t.throwsAsync(waiting)
    t.is(err.name, 'AbortError')
    t.is(err.code, 'ABORT_ERR')
    t.is(store.stats().locksWaiting, 0)
    await t.throwsAsync(store.getAndLockEntry('k', { signal: controller.signal }), { name: 'AbortError' }, 'already aborted')
    holder.release()
    t.is(store.stats().locksHeld, 0)
  })

  test('waiters are served first come, first served', async (t) => {
    const store = await tempStore(t)
    await put(store, 'k', [])
    const holder = await store.getAndLockEntry('k')
    const served = []
    const waiters = Array.from({ length: 50 }, (_, i) =>
      store.getAndLockEntry('k').then(async (lock) => {
        served.push(i)
        lock.entry.value = [...lock.entry.value, i]
        await lock.commit()
      }),
    )
    await waitersQueued(store, 50)
    holder.release()
    await Promise.all(waiters)
    const expected = Array.from({ length: 50 }, (_, i) => i)
    t.deepEqual(served, expected)
    t.deepEqual(store.getEntry('k').value, expected)
  })

  test('holdLockOnFailure keeps the lock after a failed commit so the caller can retry', async (t) => {
    let failNext = true
    const picky = {
      name: 'picky',
      encode: (v) => {
        if (failNext) {
          failNext = false
          throw new Error('not now')
        }
        return Buffer.from(JSON.stringify(v))
      },
      decode: (b) => JSON.parse(b.toString()),
    }
    const store = await tempStore(t, { codec: picky })
    const lock = await store.createAndLockEntry('k', { value: 1 })
    await t.throwsAsync(lock.commit({ holdLockOnFailure: true }), { instanceOf: kv.CodecError })
    t.true(lock.held)
    t.is(lock.entry.value, 1)
    await lock.commit()
    t.is(store.getEntry('k').value, 1)
  })

  test('updateEntry commits what the callback did and releases when it throws', async (t) => {
    const store = await tempStore(t)
    await put(store, 'k', { n: 1 })
    const result = await store.updateEntry('k', (entry) => {
      entry.value.n++
      return 'done'
    })
    t.is(result, 'done')
    t.is(store.getEntry('k').value.n, 2)
    await t.throwsAsync(
      store.updateEntry('k', (entry) => {
        entry.value.n = 100
        throw new Error('boom')
      }),
      { message: 'boom' },
    )
    t.is(store.getEntry('k').value.n, 2)
    t.is(store.stats().locksHeld, 0)
  })

  test('64 concurrent tasks incrementing 5 keys with awaits inside the lock lose no update', async (t) => {
    const store = await tempStore(t)
    const keys = ['a', 'b', 'c', 'd', 'e']
    for (const k of keys) await put(store, k, { n: 0 })
    const perTask = 20
    await Promise.all(
      Array.from({ length: 64 }, async (_, task) => {
        for (let i = 0; i < perTask; i++) {
          const lock = await store.getAndLockEntry(keys[(task + i) % keys.length])
          const n = lock.entry.value.n
          await new Promise((resolve) => setImmediate(resolve))
          lock.entry.value = { n: n + 1 }
          await lock.commit()
        }
      }),
    )
    const total = keys.reduce((sum, k) => sum + store.getEntry(k).value.n, 0)
    t.is(total, 64 * perTask)
    const stats = store.stats()
    t.is(stats.locksHeld + stats.locksWaiting, 0)
    t.true(stats.batches < stats.commits, 'concurrent commits shared transactions')
  })

  test('deleteEntry waits for the lock, deletes, and is idempotent', async (t) => {
    const store = await tempStore(t)
    await put(store, 'k', 1)
    const holder = await store.getAndLockEntry('k')
    const deleting = store.deleteEntry('k')
    await waitersQueued(store, 1)
    holder.entry.value = 2
    await holder.commit()
    t.true(await deleting)
    t.is(store.getEntry('k'), undefined)
    t.false(await store.deleteEntry('k'))
    t.false(await store.deleteEntry('never'))
  })

  test('a lock handle garbage-collected while held is released with a warning', async (t) => {
    const { setFlagsFromString } = await import('node:v8')
    const { runInNewContext } = await import('node:vm')
    setFlagsFromString('--expose-gc')
    const gc = runInNewContext('gc')
    const warnings = []
    const logger = { debug() {}, info() {}, warn: (m) => warnings.push(m), error() {} }
    const store = await tempStore(t, { logger })
    await put(store, 'k', 1)
    await (async () => {
      await store.getAndLockEntry('k')
    })()
    t.is(store.stats().locksHeld, 1)
    while (store.stats().locksHeld > 0) {
      gc()
      await new Promise((resolve) => setImmediate(resolve))
    }
    t.is(warnings.length, 1)
    t.regex(warnings[0], /'k'.*garbage-collected/)
    const again = await store.getAndLockEntry('k')
    again.release()
  })

  test('two handles on one file in one thread share the same locks and commits', async (t) => {
    const [a, b] = await twoHandles(t, 'shared.redb')
    await put(a, 'k', 1)
    t.is(b.getEntry('k').value, 1)
    const held = await a.getAndLockEntry('k')
    const waiting = b.getAndLockEntry('k')
    await waitersQueued(b, 1)
    held.entry.value = 2
    await held.commit()
    const next = await waiting
    t.is(next.entry.value, 2)
    await a.close()
    t.is(b.stats().locksHeld, 1, 'closing one handle leaves the other handle’s lock alone')
    next.release()
    t.is(b.getEntry('k').value, 2)
  })

  test('issue: a lock released after its view closed is freed in the core (other views are not left waiting)', async (t) => {
    const db = await kv.Database.open(await location(t, 'views.redb'))
    t.teardown(() => db.close())
    const a = db.mapStore('m')
    const b = db.mapStore('m')
    await put(b, 'k', 1)
    const held = await a.getAndLockEntry('k')
    await a.close()
    held.release()
    const next = await b.getAndLockEntry('k', { timeoutMs: 60_000 })
    t.is(next.entry.value, 1)
    next.release()
    t.is(b.stats().locksHeld, 0)
  })

  test('issue: release() while a commit is in flight is refused, so the key never passes on before the write', async (t) => {
    const store = await tempStore(t)
    await put(store, 'k', 1)
    const lock = await store.getAndLockEntry('k')
    lock.entry.value = 2
    const committing = lock.commit()
    t.throws(() => lock.release(), { instanceOf: kv.InvalidArgumentError })
    await committing
    t.is(store.getEntry('k').value, 2)
    t.is(store.stats().locksHeld, 0)
  })
})
