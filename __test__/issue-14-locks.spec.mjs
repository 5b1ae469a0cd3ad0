// Issue 14, item 16: a lock handle and a lock waiter say what the core says after a close.
import test from 'ava'
import { join } from 'node:path'
import { kv, put, tempDir, twoHandles, waitersQueued } from './helpers.mjs'

test('lock.held is false once close() handed the key to another handle', async (t) => {
  const [a, b] = await twoHandles(t, 'held.redb')
  await put(a, 'k', 1)
  const lock = await a.getAndLockEntry('k')
  t.true(lock.held)
  const waiting = b.getAndLockEntry('k')
  await waitersQueued(b, 1)
  await a.close()
  const next = await waiting
  t.true(next.held)
  t.false(lock.held, 'the closed handle no longer holds the key')
  await t.throwsAsync(lock.commit(), { instanceOf: kv.StoreClosedError })
  t.false(lock.held)
  next.entry.value = 2
  await next.commit()
  t.is(b.getEntry('k').value, 2)
})

test('lock.held is false after the only handle closed', async (t) => {
  const store = await kv.MapStore.open(join(tempDir(t), 'only.redb'))
  const lock = await store.createAndLockEntry('k', { value: 1 })
  await store.close()
  t.false(lock.held)
})

test('closing a db.mapStore() view leaves the locks it holds held', async (t) => {
  const db = await kv.Database.open(join(tempDir(t), 'view-held.redb'))
  t.teardown(() => db.close())
  const view = db.mapStore('m')
  const lock = await view.createAndLockEntry('k', { value: 1 })
  await view.close()
  t.true(lock.held, 'the file handle is open: the lock is still the holder’s')
  lock.release()
  t.false(lock.held)
  const again = await db.mapStore('m').createAndLockEntry('k', { value: 2 })
  again.release()
})

/**
 * Two views of one file: `other` holds key `k`, and `waiting` waits for it through `closing`
 * (queued by the time this resolves).
 */
async function waiterBehindHolder(t, name) {
  const db = await kv.Database.open(join(tempDir(t), name))
  t.teardown(() => db.close())
  const closing = db.mapStore('m')
  const other = db.mapStore('m')
  await put(other, 'k', 1)
  const holder = await other.getAndLockEntry('k')
  const waiting = closing.getAndLockEntry('k')
  await waitersQueued(other, 1)
  return { closing, other, holder, waiting }
}

test('a waiter queued through a closed db.mapStore() view is rejected and never granted', async (t) => {
  const { closing, other, holder, waiting } = await waiterBehindHolder(t, 'view-waiter.redb')
  const created = closing.createAndLockEntry('free-key', { value: 1 })
  await closing.close()
  await t.throwsAsync(waiting, { instanceOf: kv.StoreClosedError })
  t.is(other.stats().locksWaiting, 0, 'the waiter left the queue')
  // A create that got its lock at once is the caller's; release it.
  ;(await created).release()
  holder.release()
  t.is(other.stats().locksHeld, 0, 'nobody was handed the key')
  const again = await other.getAndLockEntry('k', { timeoutMs: 0 })
  again.release()
})

test('a closed view refuses new lock requests with StoreClosedError', async (t) => {
  const db = await kv.Database.open(join(tempDir(t), 'view-refuses.redb'))
  t.teardown(() => db.close())
  const view = db.mapStore('m')
  await view.close()
  await t.throwsAsync(view.getAndLockEntry('k'), { instanceOf: kv.StoreClosedError })
  await t.throwsAsync(view.createAndLockEntry('k'), { instanceOf: kv.StoreClosedError })
  t.is(db.mapStore('m').stats().locksHeld, 0)
})

test('a grant on its way when its db.mapStore() view closes is released, not handed out', async (t) => {
  const { closing, other, holder, waiting } = await waiterBehindHolder(t, 'view-race.redb')
  // In one synchronous stretch: the key is handed to the waiter (its grant is queued for this
  // thread), then the view closes before the grant is delivered.
  holder.release()
  void closing.close()
  await t.throwsAsync(waiting, { instanceOf: kv.StoreClosedError })
  t.is(other.stats().locksHeld, 0, 'the grant was released')
  const again = await other.getAndLockEntry('k', { timeoutMs: 0 })
  again.release()
})
