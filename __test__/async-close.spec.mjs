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

test.serial('[etcd] close() with the only member stopped (SIGSTOP) leaves the event loop running, and settles once the member is resumed', async (t) => {
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
  let msAtSettle
  const closing = db.close()
  let ticksAtSettle
  const settledClose = closing.then(
    () => {
      ticksAtSettle = counter.ticks
      msAtSettle = Date.now() - t0
    },
    (err) => {
      ticksAtSettle = counter.ticks
      msAtSettle = Date.now() - t0
      throw err
    },
  )
  // Calls made once close() began fail at once, while the close is still pending.
  t.true(db.closed)
  t.throws(() => store.getEntry('k'), { instanceOf: StoreClosedError })
  await t.throwsAsync(store.createAndLockEntry('x'), { instanceOf: StoreClosedError })
  await t.throwsAsync(db.sync(), { instanceOf: StoreClosedError })
  // A second close() waits for the first.
  const again = db.close()

  await delay(300)
  const pendingAfter300ms = ticksAtSettle === undefined
  await cluster.resume(0)
  resumed = true
  await settledClose
  await again
  counter.stop()
  t.log(`close() settled after ${msAtSettle} ms; the interval ticked ${ticksAtSettle} times meanwhile`)
  t.true(pendingAfter300ms, `close() waited for the stopped member (it settled after ${msAtSettle} ms)`)
  t.true(ticksAtSettle >= 3, `the 10 ms interval ticked ${ticksAtSettle} times in the ${msAtSettle} ms close() was pending`)

  // The close finished its work: the data is there for the next handle.
  const reopened = await MapStore.open(url, { table: 'm' })
  t.teardown(() => reopened.close())
  t.is(reopened.getEntry('k')?.value, 'v')
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
