// Issue 10: several held locks, one atomic commit — db.commit([job, claim]) — on a file and on
// an etcd cluster. Refused inputs write nothing and keep every lock; updateOnly and
// holdLockOnFailure apply to every lock; waiters on either key are granted the new values in
// order; concurrent transfers never show half a commit. (Kill -9: crash.spec.mjs.)
import test from 'ava'
import { execFile } from 'node:child_process'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { forEachBackend } from './backends.mjs'
import { startCluster } from './etcd-cluster.mjs'
import { kv, put, tempDir, waitersQueued } from './helpers.mjs'

/** A database with two maps, closed when the test ends. */
async function twoMaps(t, where, options = {}) {
  const db = await kv.Database.open(where, options)
  t.teardown(() => db.close())
  return { db, jobs: db.mapStore('jobs'), paths: db.mapStore('paths') }
}

forEachBackend(({ test, location }) => {
  test('db.commit writes every entry and releases every lock; the handles are dead after it', async (t) => {
    const { db, jobs, paths } = await twoMaps(t, await location(t))
    const claim = await paths.createAndLockEntry('/data/a')
    const job = await jobs.createAndLockEntry(undefined, { value: { state: 'QUEUED' }, metadata: { path: '/data/a' } })
    claim.entry.value = job.key
    claim.entry.metadata.job = job.key
    await db.commit([job, claim])
    t.deepEqual(jobs.getEntry(job.key), { key: job.key, value: { state: 'QUEUED' }, metadata: { path: '/data/a' } })
    t.deepEqual(paths.getEntry('/data/a'), { key: '/data/a', value: job.key, metadata: { job: job.key } })
    for (const lock of [job, claim]) {
      t.false(lock.held)
      t.throws(() => lock.entry.value, { instanceOf: kv.EntryReleasedError })
      await t.throwsAsync(lock.commit(), { instanceOf: kv.LockReleasedError })
    }
    t.is(jobs.stats().locksHeld + paths.stats().locksHeld, 0)

    // Deletes and puts together; an empty list is nothing to do.
    const again = await jobs.getAndLockEntry(job.key)
    const gone = await paths.getAndLockEntry('/data/a')
    again.entry.value = { state: 'DONE' }
    await db.commit([again, { lock: gone, delete: true }])
    t.is(jobs.getEntry(job.key).value.state, 'DONE')
    t.is(paths.getEntry('/data/a'), undefined)
    await db.commit([])
    // A creator waiting behind a deleted key gets it.
    const fresh = await paths.createAndLockEntry('/data/a', { value: 'next' })
    await fresh.commit()
  })

  test('refused inputs are InvalidArgumentError: nothing written, every lock still held', async (t) => {
    const where = await location(t)
    const { db, jobs, paths } = await twoMaps(t, where)
    const other = await twoMaps(t, await location(t, 'other'))
    await put(jobs, 'j', 'old')
    await put(paths, 'p', 'old')
    const j = await jobs.getAndLockEntry('j')
    const p = await paths.getAndLockEntry('p')
    const foreign = await other.jobs.createAndLockEntry('f', { value: 'x' })
    const released = await jobs.createAndLockEntry('r', { value: 'x' })
    released.release()
    j.entry.value = 'new'
    p.entry.value = 'new'
    const cases = {
      'a released lock': [[j, p, released]],
      'a lock of another database': [[j, foreign, p]],
      'the same lock twice': [[j, p, j]],
      'the same lock twice, once to delete': [[j, p, { lock: j, delete: true }]],
      'a non-lock item': [[j, { key: 'p' }]],
      'a string item': [[j, 'p']],
      'null': [[j, null]],
      '{ lock } that is not a lock': [[j, { lock: {} }]],
      'delete that is not a boolean': [[j, { lock: p, delete: 'yes' }]],
      'not an array': [j],
      'delete with updateOnly': [[j, { lock: p, delete: true }], { updateOnly: true }],
      'delete as a commit option': [[j, p], { delete: true }],
      'options that are not an object': [[j, p], 'fast'],
    }
    for (const [what, args] of Object.entries(cases)) {
      const err = await t.throwsAsync(db.commit(...args), { instanceOf: kv.InvalidArgumentError }, what)
      t.is(err?.code, 'ERR_INVALID_ARGUMENT', what)
      t.true(j.held && p.held && foreign.held, `${what}: every lock still held`)
      t.is(j.entry.value, 'new', `${what}: the handles are alive`)
    }
    // The other database's commit refuses ours the same way.
    await t.throwsAsync(other.db.commit([foreign, j]), { instanceOf: kv.InvalidArgumentError })
    t.true(j.held && foreign.held)
    await db.sync()
    t.is(jobs.getEntry('j').value, 'old')
    t.is(paths.getEntry('p').value, 'old')
    t.is(jobs.getEntry('r'), undefined)
    t.is(other.jobs.getEntry('f'), undefined)
    // The same locks commit fine afterwards.
    await db.commit([j, p])
    t.is(jobs.getEntry('j').value, 'new')
    t.is(paths.getEntry('p').value, 'new')
    foreign.release()
  })

  test('locks of views and of other handles of the same store join one commit; store.database reaches it', async (t) => {
    const where = await location(t)
    const jobs = await kv.MapStore.open(where, { table: 'jobs' })
    const paths = await kv.MapStore.open(where, { table: 'paths' })
    t.teardown(async () => {
      await jobs.close()
      await paths.close()
    })
    const view = jobs.database.mapStore('paths')
    const a = await jobs.createAndLockEntry('a', { value: 1 })
    const b = await paths.createAndLockEntry('b', { value: 2 })
    const c = await view.createAndLockEntry('c', { value: 3 })
    await jobs.database.commit([a, b, c])
    t.is(jobs.getEntry('a').value, 1)
    t.is(paths.getEntry('b').value, 2)
    t.is(paths.getEntry('c').value, 3)
    t.false(a.held || b.held || c.held)
  })

  test('updateOnly keeps every lock: commit again, then a final commit releases them', async (t) => {
    const { db, jobs, paths } = await twoMaps(t, await location(t))
    const j = await jobs.createAndLockEntry('j', { value: { progress: 0 } })
    const p = await paths.createAndLockEntry('p', { value: 'j' })
    for (const progress of [25, 50, 100]) {
      j.entry.value.progress = progress
      p.entry.metadata.progress = String(progress)
      await db.commit([j, p], { updateOnly: true })
      t.true(j.held && p.held)
      t.is(jobs.getEntry('j').value.progress, progress, 'readers see each commit')
      t.is(paths.getEntry('p').metadata.progress, String(progress))
    }
    // Single commits of the same handles work in between.
    j.entry.value.state = 'DONE'
    await j.commit({ updateOnly: true })
    await db.commit([j, { lock: p, delete: true }])
    t.false(j.held || p.held)
    t.deepEqual(jobs.getEntry('j').value, { progress: 100, state: 'DONE' })
    t.is(paths.getEntry('p'), undefined)
    t.is(jobs.stats().locksHeld + paths.stats().locksHeld, 0)
  })

  test('a CodecError of any entry refuses the whole commit: locks kept with holdLockOnFailure, else released', async (t) => {
    const { db, jobs, paths } = await twoMaps(t, await location(t))
    await put(jobs, 'j', 'old')
    const j = await jobs.getAndLockEntry('j')
    const p = await paths.createAndLockEntry('p', { value: 'fine' })
    j.entry.value = 'new'
    p.entry.value = { bad: () => 1 } // msgpack refuses functions
    const err = await t.throwsAsync(db.commit([j, p], { holdLockOnFailure: true }), { instanceOf: kv.CodecError })
    t.regex(err.message, /'p'/, 'the error names the key')
    t.true(j.held && p.held, 'kept with holdLockOnFailure')
    // A bad metadata value is refused the same way.
    p.entry.value = 'fine'
    p.entry.metadata = { n: 1 }
    await t.throwsAsync(db.commit([j, p], { holdLockOnFailure: true }), { instanceOf: kv.InvalidArgumentError })
    t.true(j.held && p.held)
    p.entry.metadata = {}
    p.entry.value = { bad: () => 1 }
    await t.throwsAsync(db.commit([j, p]), { instanceOf: kv.CodecError })
    t.false(j.held || p.held, 'released without holdLockOnFailure')
    t.throws(() => j.entry.value, { instanceOf: kv.EntryReleasedError })
    t.is(jobs.getEntry('j').value, 'old')
    t.is(paths.getEntry('p'), undefined)
    t.is(jobs.stats().locksHeld + paths.stats().locksHeld, 0)
  })

  test('a lock whose commit is in flight cannot join another, and a group in flight refuses single commits', async (t) => {
    const { db, jobs, paths } = await twoMaps(t, await location(t))
    const j = await jobs.createAndLockEntry('j', { value: 1 })
    const p = await paths.createAndLockEntry('p', { value: 2 })
    const single = j.commit({ updateOnly: true })
    await t.throwsAsync(db.commit([j, p]), { instanceOf: kv.InvalidArgumentError })
    await single
    const both = db.commit([j, p], { updateOnly: true })
    await t.throwsAsync(p.commit(), { instanceOf: kv.InvalidArgumentError })
    t.throws(() => p.release(), { instanceOf: kv.InvalidArgumentError })
    await both
    await db.commit([j, p])
    t.is(paths.getEntry('p').value, 2)
  })

  test('waiters queued on either key are granted the new values, in order', async (t) => {
    const { db, jobs, paths } = await twoMaps(t, await location(t))
    const j = await jobs.createAndLockEntry('j', { value: 0 })
    const p = await paths.createAndLockEntry('p', { value: 0 })
    await db.commit([j, p], { updateOnly: true })
    const order = []
    // Three waiters on each key; each reads its entry and the other key's value when granted,
    // adds one and commits.
    const wait = (store, key, other, i) =>
      store.getAndLockEntry(key).then(async (lock) => {
        order.push(`${key}${i}`)
        const seen = { mine: lock.entry.value, other: other.getEntry(key === 'j' ? 'p' : 'j').value }
        lock.entry.value += 1
        await lock.commit()
        return seen
      })
    const waiters = []
    for (let i = 0; i < 3; i++) {
      waiters.push(wait(jobs, 'j', paths, i))
      await waitersQueued(jobs, i + 1)
      waiters.push(wait(paths, 'p', jobs, i))
      await waitersQueued(paths, i + 1)
    }
    j.entry.value = 10
    p.entry.value = 10
    await db.commit([j, p])
    const seen = await Promise.all(waiters)
    // The first waiter of each key sees both new values (neither key shows the old value once
    // the other's waiter runs); each later waiter sees the one before it.
    t.deepEqual(seen[0], { mine: 10, other: seen[0].other })
    t.true(seen[0].other >= 10, 'the other key of the commit has its new value too')
    t.true(seen[1].other >= 10)
    t.deepEqual(
      seen.map((s) => s.mine),
      [10, 10, 11, 11, 12, 12],
    )
    t.deepEqual(order.filter((w) => w[0] === 'j'), ['j0', 'j1', 'j2'], 'first come, first served')
    t.deepEqual(order.filter((w) => w[0] === 'p'), ['p0', 'p1', 'p2'])
    t.is(jobs.getEntry('j').value, 13)
    t.is(paths.getEntry('p').value, 13)
  })

  test('32 tasks moving units between two maps with db.commit lose none and never leave half a move', async (t) => {
    const { db, jobs, paths } = await twoMaps(t, await location(t))
    const KEYS = 6
    for (let i = 0; i < KEYS; i++) {
      await put(jobs, `k${i}`, 100)
      await put(paths, `k${i}`, 100)
    }
    let seed = 7
    const random = (n) => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31
      return seed % n
    }
    const moves = []
    for (let task = 0; task < 32; task++) {
      moves.push(
        (async () => {
          for (let round = 0; round < 8; round++) {
            const from = `k${random(KEYS)}`
            const to = `k${random(KEYS)}`
            // Every task locks a jobs key before a paths key: no cycle.
            const a = await jobs.getAndLockEntry(from)
            const b = await paths.getAndLockEntry(to)
            const amount = 1 + random(5)
            a.entry.value -= amount
            b.entry.value += amount
            await db.commit([a, b])
          }
        })(),
      )
    }
    await Promise.all(moves)
    await db.sync()
    let total = 0
    for (let i = 0; i < KEYS; i++) total += jobs.getEntry(`k${i}`).value + paths.getEntry(`k${i}`).value
    t.is(total, 2 * KEYS * 100, 'every move is whole')
    t.is(jobs.stats().locksHeld + paths.stats().locksHeld, 0)
  })
})

// ---- file only ----

test("durability 'none': multi-lock commits are written on the calling thread and survive a reopen", async (t) => {
  const where = join(tempDir(t), 'none.redb')
  const db = await kv.Database.open(where, { durability: 'none' })
  const jobs = db.mapStore('jobs')
  const paths = db.mapStore('paths')
  const commits = []
  for (let i = 0; i < 40; i++) {
    const j = await jobs.createAndLockEntry(`j${i}`, { value: i })
    const p = await paths.createAndLockEntry(`p${i}`, { value: i })
    commits.push(db.commit([j, p]))
  }
  await Promise.all(commits)
  t.is(jobs.count() + paths.count(), 80)
  await db.close()
  const again = await kv.Database.open(where)
  t.is(again.mapStore('jobs').getEntry('j39').value, 39)
  t.is(again.mapStore('paths').getEntry('p39').value, 39)
  await again.close()
})

test('a lock taken through a closed view fails the commit with StoreClosedError; the others per holdLockOnFailure', async (t) => {
  const { db, jobs } = await twoMaps(t, join(tempDir(t), 'views.redb'))
  const view = db.mapStore('paths')
  const j = await jobs.createAndLockEntry('j', { value: 1 })
  const p = await view.createAndLockEntry('p', { value: 2 })
  await view.close()
  await t.throwsAsync(db.commit([j, p], { holdLockOnFailure: true }), { instanceOf: kv.StoreClosedError })
  t.true(j.held, 'kept with holdLockOnFailure')
  t.false(p.held, "the closed view's lock is released, as its own commit would")
  const other = db.mapStore('paths')
  const q = await other.createAndLockEntry('q', { value: 3 })
  await other.close()
  await t.throwsAsync(db.commit([j, q]), { instanceOf: kv.StoreClosedError })
  t.false(j.held || q.held, 'released without holdLockOnFailure')
  const p2 = await db.mapStore('paths').createAndLockEntry('p', { value: 3 })
  await db.commit([p2])
  t.is(db.mapStore('paths').getEntry('p').value, 3)
  t.is(jobs.getEntry('j'), undefined)
})

// ---- etcd: a lost lock fails the whole commit ----

test('etcd: a lost lock in the group fails it with LockLostError and neither entry is written', async (t) => {
  const cluster = await startCluster({ members: 1 })
  t.teardown(() => cluster.stop())
  const prefix = `/mc${process.pid}`
  const { db, jobs, paths } = await twoMaps(t, cluster.url(prefix))
  await put(jobs, 'j', 'old')
  await put(paths, 'p', 'old')
  const j = await jobs.getAndLockEntry('j')
  const p = await paths.getAndLockEntry('p')
  j.entry.value = 'new'
  p.entry.value = 'new'
  // Break one of the two fences behind the store's back: delete the lock key of 'p'.
  await cluster.ctl(['del', '--prefix', `${prefix}/lock/paths/`], { user: null })
  const err = await t.throwsAsync(db.commit([j, p]), { instanceOf: kv.LockLostError })
  t.is(err.code, 'ERR_LOCK_LOST')
  t.false(j.held || p.held, 'both released')
  await db.sync()
  t.is(jobs.getEntry('j').value, 'old', 'the lock that was still held wrote nothing either')
  t.is(paths.getEntry('p').value, 'old')
  const raw = await cluster.ctl(['get', '--prefix', `${prefix}/`, '--print-value-only'], { user: null })
  t.false(raw.includes('new'), 'nothing of the commit reached the cluster')
  // Both keys can be locked and committed together again.
  const j2 = await jobs.getAndLockEntry('j')
  const p2 = await paths.getAndLockEntry('p')
  j2.entry.value = 'again'
  p2.entry.value = 'again'
  await db.commit([j2, p2])
  t.is(jobs.getEntry('j').value, 'again')
  t.is(paths.getEntry('p').value, 'again')
})

// ---- the README's example runs as written ----

test("the README's 'Several locks, one atomic commit' example runs", async (t) => {
  const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8')
  const section = readme.slice(readme.indexOf('### Several locks, one atomic commit'))
  const code = /```js\n([\s\S]*?)```/.exec(section)[1]
  const dist = new URL('../dist/index.js', import.meta.url).href
  const file = join(tempDir(t), 'readme-multi-commit.mjs')
  writeFileSync(file, code.replace("from 'kvstore'", `from '${dist}'`))
  const { stdout } = await promisify(execFile)(process.execPath, [file])
  t.is(stdout.trim(), 'DONE undefined')
})
