import test from 'ava'
import { rmSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { kv, tmpfs } from './helpers.mjs'

// A real full disk: a 4 MiB tmpfs. Mounting needs root (CI runs as root).
const root = process.getuid?.() === 0
const maybe = root ? test : test.skip

/** Creates `k0`, `k1`… holding `value` until a commit fails (or `most` are written);
 * `afterEach` runs after each commit that succeeded. */
async function fillUntilFull(store, value, most, afterEach = () => {}) {
  const committed = []
  let failure
  for (let i = 0; i < most && failure === undefined; i++) {
    const lock = await store.createAndLockEntry(`k${i}`, { value })
    try {
      await lock.commit()
      committed.push(`k${i}`)
      afterEach()
    } catch (err) {
      failure = err
    }
  }
  return { committed, failure }
}

maybe('a full disk rejects the commit with IoError ENOSPC, loses nothing, and the store recovers when space returns', async (t) => {
  const dir = tmpfs(t, '4m')
  const ballast = join(dir, 'ballast')
  writeFileSync(ballast, Buffer.alloc(1 << 20, 1))
  const path = join(dir, 'full.redb')
  const store = await kv.MapStore.open(path, { codec: kv.codecs.raw })
  const value = Buffer.alloc(32 * 1024, 7)
  const { committed, failure } = await fillUntilFull(store, value, 1000)
  t.truthy(failure, 'the disk filled up')
  t.true(failure instanceof kv.IoError)
  t.is(failure.code, 'ERR_IO')
  t.is(failure.systemCode, 'ENOSPC')
  t.is(failure.errno, 28)
  t.true(committed.length > 10)
  t.is(store.stats().locksHeld, 0, 'the failed commit released its lock')

  // Still full: commits keep failing cleanly, the queue is not wedged.
  const again = await store.createAndLockEntry('again', { value })
  await t.throwsAsync(again.commit(), { code: 'ERR_IO' })

  // Space returns: the next commit goes through.
  rmSync(ballast)
  const after = await store.createAndLockEntry('after', { value: Buffer.from('small') })
  await after.commit()
  t.deepEqual(store.getEntry('after').value, Buffer.from('small'))
  for (const key of committed) t.deepEqual(store.getEntry(key)?.value, value, key)
  await store.close()

  const reopened = await kv.MapStore.open(path, { codec: kv.codecs.raw })
  t.is(reopened.count(), committed.length + 1)
  for (const key of committed) t.deepEqual(reopened.getEntry(key)?.value, value, key)
  t.is(reopened.getEntry(`k${committed.length}`), undefined, 'the failed commit left nothing behind')
  await reopened.close()
  t.true(await kv.Database.checkIntegrity(path))
})

maybe('issue 14.5: under durability none, a full disk loses no acknowledged commit (written again once space returns)', async (t) => {
  // redb holds non-durable pages in memory (here ~18 MB) until it spills: room for them once
  // the ballast goes.
  const dir = tmpfs(t, '64m')
  const ballast = join(dir, 'ballast')
  writeFileSync(ballast, Buffer.alloc(60 << 20, 1))
  const path = join(dir, 'full.redb')
  // No sync falls due during the test: every acknowledged commit is held only by the instance.
  const store = await kv.MapStore.open(path, { codec: kv.codecs.raw, durability: 'none', syncIntervalMs: 3_600_000 })
  const value = Buffer.alloc(32 * 1024, 7)
  // Read while the disk still takes writes: once a write failed, reads that need the file may
  // fail too until it can be reopened (the writer retries at once).
  let unsynced = 0
  const { committed, failure } = await fillUntilFull(store, value, 1000, () => (unsynced = store.stats().unsyncedBatches))
  t.is(failure?.systemCode, 'ENOSPC')
  t.true(committed.length > 10)
  t.true(unsynced > 0, 'the acknowledged commits are not durable yet')

  rmSync(ballast)
  const after = await store.createAndLockEntry('after', { value: Buffer.from('small') })
  await after.commit()
  for (const key of committed) t.deepEqual(store.getEntry(key)?.value, value, key)
  await store.close()

  const reopened = await kv.MapStore.open(path, { codec: kv.codecs.raw })
  t.is(reopened.count(), committed.length + 1)
  for (const key of committed) t.deepEqual(reopened.getEntry(key)?.value, value, key)
  await reopened.close()
})

maybe('issue 14.5: under durability none, a disk still full at close makes close() report the lost commits', async (t) => {
  const dir = tmpfs(t, '4m')
  writeFileSync(join(dir, 'ballast'), Buffer.alloc(1 << 20, 1))
  const path = join(dir, 'full.redb')
  const store = await kv.MapStore.open(path, { codec: kv.codecs.raw, durability: 'none', syncIntervalMs: 3_600_000 })
  const value = Buffer.alloc(32 * 1024, 7)
  const { failure } = await fillUntilFull(store, value, 2000)
  t.is(failure?.systemCode, 'ENOSPC')
  const err = await t.throwsAsync(store.close(), { instanceOf: kv.IoError })
  t.regex(err.message, /acknowledged non-durable transaction\(s\) .* lost/)
  t.is(err.systemCode, 'ENOSPC')
  t.throws(() => store.getEntry('k0'), { instanceOf: kv.StoreClosedError }, 'closed all the same')
})
