// Issue 9: one store shared by several processes through a real etcd cluster — lost updates,
// a holder killed or paused past its session, a killed leader, the whole cluster down, and
// authentication and TLS. Every wait is on an event (a reply, an exit, a member ready).
import test from 'ava'
import { readFileSync } from 'node:fs'
import { startCluster } from './etcd-cluster.mjs'
import { kv, otherProcess, put, waitersQueued } from './helpers.mjs'

let prefixes = 0

/** A cluster for one test, stopped when it ends. */
async function cluster(t, options) {
  const running = await startCluster(options)
  t.teardown(() => running.stop())
  return running
}

const freshUrl = (running) => running.url(`/p${process.pid}-${++prefixes}`)

/** Whether `promise` is still pending once everything queued before it on the loop has run. */
async function pending(promise) {
  let settled = false
  promise.then(() => (settled = true), () => (settled = true))
  await new Promise(setImmediate)
  return !settled
}

test('two processes × 16 tasks doing read-modify-write on 10 hot keys lose no update', async (t) => {
  const running = await cluster(t, { members: 1 })
  const url = freshUrl(running)
  const keys = Array.from({ length: 10 }, (_, i) => `hot-${i}`)
  const [a, b] = await Promise.all([otherProcess(t, url), otherProcess(t, url)])
  const work = { cmd: 'increment', keys, tasks: 16, rounds: 25 }
  const [ra, rb] = await Promise.all([a.send(work), b.send(work)])
  t.true(ra.ok && rb.ok, `${ra.message ?? ''} ${rb.message ?? ''}`)
  const store = await kv.MapStore.open(url, { table: 'jobs' })
  t.teardown(() => store.close())
  await store.sync()
  const total = keys.reduce((sum, key) => sum + (store.getEntry(key)?.value ?? 0), 0)
  t.is(total, 2 * 16 * 25, 'every increment of both processes is there')
})

test('a holder killed with SIGKILL loses its lock after its session TTL: a waiter in another process gets it', async (t) => {
  const running = await cluster(t, { members: 1 })
  const url = freshUrl(running)
  const holder = await otherProcess(t, url, { sessionTtlMs: 1000 })
  t.true((await holder.send({ cmd: 'lock', key: 'k' })).ok)
  const store = await kv.MapStore.open(url, { table: 'jobs' })
  t.teardown(() => store.close())
  const waiting = store.createAndLockEntry('k', { allowExisting: true })
  await waitersQueued(store, 1)
  await store.sync()
  t.true(await pending(waiting), 'the lock is held by the other process')
  holder.child.kill('SIGKILL')
  t.is((await holder.exited).signal, 'SIGKILL')
  const granted = await waiting
  t.false(granted.existed, 'the killed holder wrote nothing')
  granted.entry.value = 'after the kill'
  await granted.commit()
  t.is(store.getEntry('k').value, 'after the kill')
})

test('fencing: a holder paused past its TTL finds its commit refused with ERR_LOCK_LOST, and the next holder’s write stands', async (t) => {
  const running = await cluster(t, { members: 1 })
  const url = freshUrl(running)
  const paused = await otherProcess(t, url, { sessionTtlMs: 1000 })
  t.true((await paused.send({ cmd: 'lock', key: 'k' })).ok)
  paused.child.kill('SIGSTOP')
  const store = await kv.MapStore.open(url, { table: 'jobs' })
  t.teardown(() => store.close())
  // The paused process cannot keep its session alive: the lock passes once the lease expires.
  const lock = await store.createAndLockEntry('k', { allowExisting: true })
  lock.entry.value = 'second holder'
  await lock.commit()
  paused.child.kill('SIGCONT')
  const late = await paused.send({ cmd: 'commit', value: 'paused holder' })
  t.false(late.ok)
  t.is(late.code, 'ERR_LOCK_LOST', late.message)
  await store.sync()
  t.is(store.getEntry('k').value, 'second holder')
  const seen = await paused.send({ cmd: 'get', key: 'k' })
  t.is(seen.value, 'second holder', 'the resumed process reads the winner too')
})

test('three members, the leader killed under a stream of commits: every acknowledged commit is there and the store goes on', async (t) => {
  const running = await cluster(t, { members: 3 })
  const url = freshUrl(running)
  const store = await kv.MapStore.open(url, { table: 'jobs', requestTimeoutMs: 3000 })
  t.teardown(() => store.close())
  const acked = []
  const failures = []
  let next = 0
  let killed
  const writer = async () => {
    while (acked.length < 300) {
      const key = `job-${next++}`
      try {
        await put(store, key, { n: next })
        acked.push(key)
        if (acked.length === 60 && killed === undefined) killed = running.leader().then((i) => running.kill(i))
      } catch (err) {
        failures.push(err)
      }
    }
  }
  await Promise.all(Array.from({ length: 8 }, writer))
  await killed
  for (const err of failures) t.true(['ERR_UNAVAILABLE', 'ERR_LOCK_LOST'].includes(err.code), `${err.code}: ${err.message}`)
  await store.sync()
  const missing = acked.filter((key) => store.getEntry(key) === undefined)
  t.deepEqual(missing, [], 'no acknowledged commit is lost')
  await put(store, 'after', 'still writable')
  t.is(store.getEntry('after').value, 'still writable')
})

test('the whole cluster down: writes fail with ERR_UNAVAILABLE, reads serve the replica, writes work again once it returns', async (t) => {
  const running = await cluster(t, { members: 1 })
  const url = freshUrl(running)
  const store = await kv.MapStore.open(url, { table: 'jobs', requestTimeoutMs: 1000 })
  t.teardown(() => store.close())
  await put(store, 'k', 'before')
  await running.kill(0)
  t.is(store.getEntry('k').value, 'before', 'the replica still answers')
  t.is(store.count(), 1)
  const err = await t.throwsAsync(put(store, 'x', 'while down'), { instanceOf: kv.UnavailableError })
  t.regex(err.message, /within 1s/)
  await running.restart(0)
  // The client reconnects by itself: each try until then fails only as unavailable.
  for (;;) {
    try {
      await put(store, 'x', 'after')
      break
    } catch (retry) {
      t.is(retry.code, 'ERR_UNAVAILABLE', retry.message)
    }
  }
  await store.sync()
  t.is(store.getEntry('x').value, 'after')
  t.is(store.getEntry('k').value, 'before')
})

test('authentication: the right user works; a wrong password or a user without permission on the prefix is ERR_PERMISSION_DENIED and writes nothing', async (t) => {
  const running = await cluster(t, { members: 1, auth: true })
  const { app, other } = running.users
  const url = running.url(app.prefix)
  const store = await kv.MapStore.open(url, { table: 'jobs', auth: { username: app.name, password: app.password } })
  t.teardown(() => store.close())
  await put(store, 'k', 'by app')
  t.is(store.getEntry('k').value, 'by app')
  await t.throwsAsync(kv.MapStore.open(url, { table: 'jobs', auth: { username: app.name, password: 'wrong' } }), { instanceOf: kv.PermissionDeniedError })
  await t.throwsAsync(kv.MapStore.open(url, { table: 'jobs', auth: { username: other.name, password: other.password } }), { instanceOf: kv.PermissionDeniedError })
  const stored = await running.ctl(['get', '--prefix', app.prefix, '--keys-only'], { user: 'root' })
  t.false(stored.includes('wrong'), 'nothing written by the refused users')
  await store.sync()
  t.is(store.count(), 1)
})

test('TLS: etcds:// with tls.ca connects; without the CA the open fails naming the certificate problem', async (t) => {
  const running = await cluster(t, { members: 1, tls: true })
  const url = freshUrl(running)
  t.true(url.startsWith('etcds://'))
  await t.throwsAsync(kv.MapStore.open(url, { table: 'jobs', tls: { ca: running.ca } }), { instanceOf: kv.InvalidArgumentError, message: /PEM/ }, 'a file name is not PEM')
  const store = await kv.MapStore.open(url, { table: 'jobs', tls: { ca: readFileSync(running.ca) } })
  t.teardown(() => store.close())
  await put(store, 'k', 'over tls')
  t.is(store.getEntry('k').value, 'over tls')
  const err = await t.throwsAsync(kv.MapStore.open(url, { table: 'jobs', requestTimeoutMs: 2000 }))
  t.regex(err.message, /certificate|UnknownIssuer|tls/i)
})

test('a process that exits holding locks frees them at once (its session is revoked at close)', async (t) => {
  const running = await cluster(t, { members: 1 })
  const url = freshUrl(running)
  // A TTL far beyond the test's timeout: only the revoke at close can free the lock in time.
  const holder = await otherProcess(t, url, { sessionTtlMs: 600_000 })
  t.true((await holder.send({ cmd: 'lock', key: 'k' })).ok)
  const store = await kv.MapStore.open(url, { table: 'jobs' })
  t.teardown(() => store.close())
  const waiting = store.createAndLockEntry('k', { allowExisting: true })
  await waitersQueued(store, 1)
  holder.child.stdin.end() // the fixture closes its store and exits
  t.is((await holder.exited).code, 0)
  const granted = await waiting
  t.false(granted.existed)
  granted.release()
})

test('refused before anything is written: a malformed URL, durability none, readOnly, a record over the request limit', async (t) => {
  const running = await cluster(t, { members: 1 })
  for (const url of ['etcd://127.0.0.1/app', 'etcd://127.0.0.1:2379', 'etcd://127.0.0.1:2379/app/', 'etcd://:2379/app', 'etcd:/127.0.0.1:2379/app', 'ETCD:127.0.0.1:2379/app']) {
    await t.throwsAsync(kv.MapStore.open(url), { instanceOf: kv.InvalidArgumentError }, url)
  }
  const url = freshUrl(running)
  // The scheme is case-insensitive.
  const shouting = await kv.MapStore.open(url.replace(/^etcd:/, 'ETCD:'), { codec: kv.codecs.raw })
  await shouting.close()
  await t.throwsAsync(kv.MapStore.open(url, { durability: 'none' }), { instanceOf: kv.InvalidArgumentError, message: /durability/ })
  await t.throwsAsync(kv.MapStore.open(url, { readOnly: true }), { instanceOf: kv.InvalidArgumentError, message: /readOnly/ })
  const store = await kv.MapStore.open(url, { codec: kv.codecs.raw })
  t.teardown(() => store.close())
  const lock = await store.createAndLockEntry('big', { value: Buffer.alloc(2 << 20) })
  const err = await t.throwsAsync(lock.commit(), { instanceOf: kv.InvalidArgumentError })
  t.regex(err.message, /limit/)
  t.is(store.getEntry('big'), undefined)
  await store.sync()
  t.is(store.count(), 0)
  const stats = store.stats()
  t.true(stats.replicaRevision > 0, 'stats() carries the replica revision')
  t.true(stats.replicaLag >= 0)
})

// Serial: other tests' calls must not block the loop meanwhile (closing a store whose cluster is down
// still waits on this thread, see README).
test.serial('opening a cluster that does not answer does not stall the event loop', async (t) => {
  let ticks = 0
  let opening = true
  const tick = () => {
    ticks++
    if (opening) setImmediate(tick)
  }
  setImmediate(tick)
  const err = await t.throwsAsync(kv.Database.open('etcd://127.0.0.1:1/nobody', { requestTimeoutMs: 1000 }), { instanceOf: kv.UnavailableError })
  opening = false
  t.regex(err.message, /within 1s/)
  t.true(ticks > 1, `the loop kept turning while the open waited (${ticks} turns)`)
})
