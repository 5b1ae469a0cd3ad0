// A job tracker kept in two maps of one file, as the original Go system did:
//   jobs:  job id (auto key, creation order) → { state, path, attempts }, metadata.path
//   paths: file path → job id of its current job, metadata.job
// One job per path at a time; progress is committed with updateOnly while the lock is held.
// The job and the claim of its path are written by one db.commit([job, claim]): both or neither,
// so a crash never leaves a job without its path (or a path pointing at no job). Finishing deletes
// the claim in the same commit that marks the job DONE.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Database, EntryAlreadyExistsError } from '../dist/index.js'

const dir = mkdtempSync(join(tmpdir(), 'kvstore-jobs-'))
const db = await Database.open(join(dir, 'tracker.redb'))
const jobs = db.mapStore('jobs')
const paths = db.mapStore('paths')

/** Starts a job for `path` unless one is already tracking it. */
async function submit(path) {
  let claim
  try {
    claim = await paths.createAndLockEntry(path, { value: null })
  } catch (err) {
    if (err instanceof EntryAlreadyExistsError) return { path, refused: `already tracked by job ${paths.getEntry(path).value}` }
    throw err
  }
  // Hold the path's lock while the job is created, so nobody else claims it meanwhile.
  const job = await jobs.createAndLockEntry(undefined, { value: { state: 'QUEUED', path, attempts: 0 }, metadata: { path } })
  claim.entry.value = job.key
  claim.entry.metadata.job = job.key
  await db.commit([job, claim]) // both written in one transaction, or neither
  return { path, job: job.key }
}

/** Runs a job: RUNNING, progress while holding its lock, then DONE and the path freed together. */
async function run(jobId) {
  const lock = await jobs.getAndLockEntry(jobId, { timeoutMs: 5_000 })
  lock.entry.value = { ...lock.entry.value, state: 'RUNNING', attempts: lock.entry.value.attempts + 1 }
  await lock.commit({ updateOnly: true })
  for (const progress of [25, 50, 100]) {
    lock.entry.value.progress = progress
    await lock.commit({ updateOnly: true }) // readers see the progress; the lock stays ours
  }
  lock.entry.value.state = 'DONE'
  const claim = await paths.getAndLockEntry(lock.entry.value.path)
  await db.commit([lock, { lock: claim, delete: true }])
}

const submitted = await Promise.all(['/data/a', '/data/b', '/data/a', '/data/c'].map(submit))
for (const s of submitted) console.log('submit', s.path, s.job ? `→ job ${s.job}` : `refused: ${s.refused}`)
await Promise.all(submitted.filter((s) => s.job).map((s) => run(s.job)))
for (const { key, value, metadata } of jobs.getEntries()) console.log('job', key, value.state, value.progress, metadata.path)
console.log('paths still tracked:', paths.count())
await db.close()
rmSync(dir, { recursive: true, force: true })
