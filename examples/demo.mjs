// The main job, end to end: open a store, create, lock, update, read, iterate.
// Run with `npm run demo` (builds the native module first).
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { MapStore, EntryAlreadyExistsError } from '../dist/index.js'

const dir = mkdtempSync(join(tmpdir(), 'kvstore-demo-'))
const jobs = await MapStore.open(join(dir, 'state.redb'), { table: 'jobs' })

// Create an entry: it comes back locked; commit() persists it and releases the lock.
const { entry, commit } = await jobs.createAndLockEntry('foo', { value: { one: '1' } })
entry.value.two = '2'
entry.metadata.hello = 'world' // string metadata stored with the value
await commit()
console.log('created  ', jobs.getEntry('foo'))

// Creating it again fails; allowExisting hands back the existing entry, locked.
try {
  await jobs.createAndLockEntry('foo', { value: {} })
} catch (err) {
  if (!(err instanceof EntryAlreadyExistsError)) throw err
  console.log('again    ', err.code)
}

// Get for update: exclusive per key, across async tasks and worker threads.
const lock = await jobs.getAndLockEntry('foo', { timeoutMs: 5_000 })
lock.entry.value = { ...lock.entry.value, state: 'RUNNING' }
await lock.commit({ updateOnly: true }) // persisted, lock still held
lock.entry.value.state = 'DONE'
await lock.commit() // persisted, lock released
try {
  console.log(lock.entry.value)
} catch (err) {
  console.log('after    ', err.code) // the handle is dead after the final commit
}

// 32 concurrent tasks increment one counter: no update is lost.
await jobs.createAndLockEntry('counter', { value: 0 }).then((l) => l.commit())
await Promise.all(Array.from({ length: 32 }, () => jobs.updateEntry('counter', (e) => { e.value += 1 })))
console.log('counter  ', jobs.getEntry('counter').value)

// Auto keys: unique, increasing, zero-padded so byte order is creation order.
for (const state of ['QUEUED', 'QUEUED']) {
  const { key, commit: done } = await jobs.createAndLockEntry(undefined, { value: { state } })
  await done()
  console.log('auto key ', key)
}

// Read committed data without locks, over one snapshot, in key order.
for (const { key, value, metadata } of jobs.getEntries()) console.log('entry    ', key, value, metadata)
console.log('stats    ', jobs.stats())

await jobs.close()
rmSync(dir, { recursive: true, force: true })
