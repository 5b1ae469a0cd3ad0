// Issue 10: a multi-lock commit (db.commit) is written whole or not at all, also when the
// process is killed with SIGKILL mid-write. Each round runs fixtures/crash-multi-writer.mjs
// until it has acknowledged a random number of commits, kills it, reopens the file and checks
// every acknowledged commit is there whole and no commit is there in half.
import test from 'ava'
import { join } from 'node:path'
import { kv, rng, runAndKill, tempDir } from './helpers.mjs'

const writer = new URL('./fixtures/crash-multi-writer.mjs', import.meta.url).pathname
const ROUNDS = 15

test('kill -9 during multi-lock commits: every acknowledged one is whole after reopen, none is half there', async (t) => {
  const path = join(tempDir(t), 'crash-multi.redb')
  const random = rng(0x10c0de)
  const claims = new Map() // job → path of an acknowledged claim not finished
  const finishing = new Map() // job → path whose finish began, unacknowledged
  const finished = new Map() // job → path of an acknowledged finish
  const versions = new Map() // pair key → last acknowledged version
  let checked = 0
  let pairsSeen = 0
  for (let round = 0; round < ROUNDS; round++) {
    const acks = 20 + Math.floor(random() * 200)
    const { lines, signal } = await runAndKill(writer, path, round, acks)
    t.is(signal, 'SIGKILL', `round ${round} was killed`)
    for (const line of lines) {
      if (line.op === 'claim') claims.set(line.job, line.path)
      else if (line.op === 'finishing') finishing.set(line.job, line.path)
      else if (line.op === 'finish') {
        claims.delete(line.job)
        finishing.delete(line.job)
        finished.set(line.job, line.path)
      } else versions.set(line.key, Math.max(versions.get(line.key) ?? 0, line.v))
    }

    const db = await kv.Database.open(path)
    const jobs = db.mapStore('jobs')
    const paths = db.mapStore('paths')
    t.is(jobs.stats().locksHeld + paths.stats().locksHeld, 0)
    // No half commit, acknowledged or not: every job has its claim and every claim its job.
    for (const { key, value, metadata } of jobs.getEntries()) {
      if (key.includes('pair-')) continue
      const claim = paths.getEntry(value.path)
      t.true(claim?.value === key && claim.metadata.job === key && metadata.path === value.path, `round ${round}: job ${key} has its claim ${value.path}`)
      checked++
    }
    for (const { key, value } of paths.getEntries({ prefix: '/data/' })) {
      t.is(jobs.getEntry(value)?.value.path, key, `round ${round}: claim ${key} has its job ${value}`)
      checked++
    }
    // Every acknowledged claim is there (unless its finish began), every finish is whole.
    for (const [job, where] of claims) {
      const there = jobs.getEntry(job) !== undefined
      if (!there && finishing.has(job)) {
        // Its finish landed before the kill, unacknowledged: both are gone for good.
        t.is(paths.getEntry(where), undefined)
        claims.delete(job)
        finishing.delete(job)
        finished.set(job, where)
      } else {
        t.true(there, `round ${round}: acknowledged job ${job} is there`)
        t.is(paths.getEntry(where)?.value, job, `round ${round}: acknowledged claim ${where} is there`)
      }
      checked++
    }
    for (const [job, where] of finished) {
      t.true(jobs.getEntry(job) === undefined && paths.getEntry(where) === undefined, `round ${round}: finished ${job} stays gone`)
      checked++
    }
    // Both entries of every pair carry the same version, at least the acknowledged one.
    for (const { key, value, metadata } of jobs.getEntries({ start: 'pair-', stop: 'pair.' })) {
      const other = paths.getEntry(key)
      t.true(other !== undefined && other.value.v === value.v && other.metadata.v === metadata.v, `round ${round}: pair ${key} is whole (${value.v} / ${other?.value.v})`)
      pairsSeen++
    }
    for (const { key, value, metadata } of jobs.getEntries({ start: 'wpair-', stop: 'wpair.' })) {
      const other = paths.getEntry(key)
      t.true(other !== undefined && other.value.v === value.v && other.metadata.v === metadata.v, `round ${round}: pair ${key} is whole`)
      pairsSeen++
    }
    for (const [key, v] of versions) {
      // A commit can land without its ack having been written before the kill, never the reverse.
      t.true((jobs.getEntry(key)?.value.v ?? 0) >= v, `round ${round}: ${key} ≥ ${v}`)
      checked++
    }
    await db.close()
  }
  t.true(await kv.Database.checkIntegrity(path), "redb's integrity check passes")
  t.true(finished.size > 0 && claims.size > 0 && versions.size > 0, 'every kind of commit was acknowledged')
  t.log(`${ROUNDS} rounds killed, ${checked} checks of acknowledged commits, ${finished.size} finished jobs, ${claims.size} open claims, ${pairsSeen} pairs compared`)
})
