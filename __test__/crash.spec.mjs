import test from 'ava'
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { statSync } from 'node:fs'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { kv, rng, runAndKill, tempDir } from './helpers.mjs'

const writer = new URL('./fixtures/crash-writer.mjs', import.meta.url).pathname
const unsyncedWriter = new URL('./fixtures/unsynced-writer.mjs', import.meta.url).pathname
const ROUNDS = 20

test('kill -9 during concurrent durable commits loses nothing acknowledged', async (t) => {
  const path = join(tempDir(t), 'crash.redb')
  const random = rng(0xc0ffee)
  const created = new Map() // key → { value, metadata } of an acknowledged create
  const deleted = new Set()
  const deleting = new Set() // a delete started: present with its value, or gone
  const counts = new Map() // key → last acknowledged count
  const autoKeys = []
  let checked = 0
  let reopenMs = 0
  for (let round = 0; round < ROUNDS; round++) {
    const acks = 20 + Math.floor(random() * 200)
    const { lines, signal } = await runAndKill(writer, path, round, acks)
    t.is(signal, 'SIGKILL', `round ${round} was killed`)
    const roundKeys = []
    for (const line of lines) {
      if (line.op === 'create') {
        created.set(line.key, line)
        roundKeys.push(line.key)
      } else if (line.op === 'deleting') {
        deleting.add(line.key)
      } else if (line.op === 'delete') {
        created.delete(line.key)
        deleting.delete(line.key)
        deleted.add(line.key)
      } else {
        counts.set(line.key, Math.max(counts.get(line.key) ?? 0, line.count))
      }
    }
    const previousMax = autoKeys.at(-1) ?? ''
    t.true(roundKeys.every((k) => k > previousMax), `round ${round}: auto keys rise past every earlier key`)
    autoKeys.push(...[...roundKeys].sort())

    // The write-ahead log stays within its 1 MiB; not closed cleanly, the file is refused by a
    // read-only open, which can neither repair it nor replay the log.
    t.true(statSync(`${path}-wal`).size <= 1 << 20, `round ${round}: the log stays within 1 MiB`)
    await t.throwsAsync(kv.MapStore.open(path, { table: 'crash', readOnly: true }), { instanceOf: kv.DatabaseCorruptError, message: /read-write/ })

    const started = process.hrtime.bigint()
    const store = await kv.MapStore.open(path, { table: 'crash' })
    reopenMs += Number(process.hrtime.bigint() - started) / 1e6
    t.is(store.stats().locksHeld, 0)
    for (const [key, { value, metadata }] of created) {
      const stored = store.getEntry(key)
      if (stored === undefined && deleting.has(key)) {
        // Its delete landed before the kill, unacknowledged: it stays deleted from now on.
        created.delete(key)
        deleting.delete(key)
        deleted.add(key)
      } else {
        t.deepEqual(stored, { key, value, metadata }, `round ${round}: ${key}`)
      }
      checked++
    }
    for (const key of deleted) {
      t.is(store.getEntry(key), undefined, `round ${round}: ${key} stays deleted`)
      checked++
    }
    for (const [key, count] of counts) {
      const stored = store.getEntry(key)
      // A commit can land without its ack having been written before the kill, never the reverse.
      t.true(stored !== undefined && stored.value.count >= count, `round ${round}: ${key} ≥ ${count}`)
      checked++
    }
    // Every record decodes: nothing is half-written.
    for (const item of store.getEntries()) t.not(item.value, undefined)
    await store.close()
  }
  t.is(new Set(autoKeys).size, autoKeys.length, 'no auto key was handed out twice')
  t.true(await kv.Database.checkIntegrity(path), "redb's integrity check passes")
  t.log(`${ROUNDS} rounds killed, ${checked} acknowledged commits checked, ${autoKeys.length} auto keys, mean reopen ${(reopenMs / ROUNDS).toFixed(1)} ms`)
})

test("durability 'none': once the writer has synced (within syncIntervalMs), a kill -9 loses none of those commits", async (t) => {
  const path = join(tempDir(t), 'unsynced.redb')
  const child = spawn(process.execPath, [unsyncedWriter, path, '20'], { stdio: ['ignore', 'pipe', 'inherit'] })
  const exited = once(child, 'exit')
  let report
  for await (const line of createInterface({ input: child.stdout })) {
    report = JSON.parse(line)
    child.kill('SIGKILL')
  }
  const [, signal] = await exited
  t.is(signal, 'SIGKILL')
  t.true(report.unsyncedBefore > 0, 'the commits were not durable at first')
  const store = await kv.MapStore.open(path)
  for (let i = 0; i < report.synced; i++) t.is(store.getEntry(`synced-${i}`)?.value, i)
  await store.close()
})
