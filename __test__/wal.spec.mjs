// The write-ahead log of a durable store (`<file>-wal`, FORMAT.md "The write-ahead log"), attacked
// through the public API with real processes and kill -9: what must hold, and the defects a
// hostile pass found (each fixed since).
import test from 'ava'
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { copyFileSync, existsSync, readFileSync, rmSync, statSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { kv, kvstore, put, tempDir, tmpfs } from './helpers.mjs'

// Mounting a tmpfs (a real full disk) needs root; CI runs as root.
const asRoot = process.getuid?.() === 0 ? test : test.skip

const dist = new URL('../dist/index.js', import.meta.url).href

// A child that opens argv[1] with the options in argv[2], commits `k0`…`k<n-1>` (value i, metadata
// { i }) one after the other, each durably in a batch of its own, prints one line per
// acknowledged commit and then waits to be killed.
const sequentialWriter = `
import { MapStore } from ${JSON.stringify(dist)}
const [path, options, n] = process.argv.slice(1)
const store = await MapStore.open(path, JSON.parse(options))
for (let i = 0; i < Number(n); i++) {
  const { entry, commit } = await store.createAndLockEntry('k' + i, { value: i })
  entry.metadata.i = String(i)
  await commit()
  process.stdout.write(JSON.stringify({ key: 'k' + i, i }) + '\\n')
}
setInterval(() => {}, 1 << 30)
`

/** Runs the sequential writer for `n` commits, kills it with SIGKILL after the last ack. */
async function commitThenKill(path, options, n) {
  const child = spawn(process.execPath, ['--input-type=module', '-e', sequentialWriter, path, JSON.stringify(options), String(n)], {
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  const exited = once(child, 'exit')
  const acks = []
  for await (const line of createInterface({ input: child.stdout })) {
    acks.push(JSON.parse(line))
    if (acks.length === n) child.kill('SIGKILL')
  }
  const [, signal] = await exited
  return { acks, signal }
}

/** Where each whole record of the log starts and ends (FORMAT.md: 32-byte header, then the body). */
function logRecords(bytes) {
  const records = []
  let at = 0
  while (at + 32 <= bytes.length && bytes.readUInt32LE(at) === 0x4c57564b) {
    const end = at + 32 + bytes.readUInt32LE(at + 4)
    if (end > bytes.length) break
    records.push({ start: at, end, tag: bytes.readBigUInt64LE(at + 8), seq: bytes.readBigUInt64LE(at + 16) })
    at = end
  }
  // Only the run of the first record's tag, numbered from 0, is the live log.
  return records.filter((r, i) => r.tag === records[0].tag && r.seq === BigInt(i))
}

// ---------------------------------------------------------------- behaviours that hold

test('a torn or damaged last record of the -wal is ignored: every earlier acknowledged commit is replayed', async (t) => {
  const dir = tempDir(t)
  const path = join(dir, 'torn.redb')
  // No checkpoint falls due: k0's batch is the checkpoint that starts the log, k1… are its records.
  const { acks, signal } = await commitThenKill(path, { syncIntervalMs: 86_400_000 }, 40)
  t.is(signal, 'SIGKILL')
  t.is(acks.length, 40)
  const log = readFileSync(`${path}-wal`)
  const records = logRecords(log)
  t.is(records.length, 39, 'one record per commit after the first')
  const last = records.at(-1)

  // Torn: the log ends inside its last record.
  copyFileSync(path, join(dir, 'cut.redb'))
  copyFileSync(`${path}-wal`, join(dir, 'cut.redb-wal'))
  truncateSync(join(dir, 'cut.redb-wal'), last.end - 7)
  // Damaged: one byte of the last record's body flipped.
  const flipped = Buffer.from(log)
  flipped[last.end - 3] ^= 0x5a
  copyFileSync(path, join(dir, 'flip.redb'))
  copyFileSync(`${path}-wal`, join(dir, 'flip.redb-wal'))
  writeFileSync(join(dir, 'flip.redb-wal'), flipped)

  for (const name of ['cut.redb', 'flip.redb', 'torn.redb']) {
    const store = await kv.MapStore.open(join(dir, name))
    const lost = name === 'torn.redb' ? 0 : 1
    for (const { key, i } of acks.slice(0, acks.length - lost)) t.deepEqual(store.getEntry(key), { key, value: i, metadata: { i: String(i) } }, `${name}: ${key}`)
    t.is(store.count(), acks.length - lost, `${name}: nothing else`)
    await store.close()
  }
})

test('after a crash a read-only open (and the CLI) is refused naming the write-ahead log, until a read-write open replays it', async (t) => {
  const path = join(tempDir(t), 'ro.redb')
  const { acks } = await commitThenKill(path, { syncIntervalMs: 86_400_000, table: 'jobs' }, 25)
  // redb's own check repairs the file without the log: only the log's commits are missing now.
  await kv.Database.checkIntegrity(path)
  const refused = { instanceOf: kv.DatabaseCorruptError, message: /write-ahead log/ }
  await t.throwsAsync(kv.MapStore.open(path, { table: 'jobs', readOnly: true }), refused)
  const cli = await kvstore(['get', path, 'k24', '--table', 'jobs'])
  t.is(cli.code, 1)
  t.regex(cli.stderr, /write-ahead log/)

  const store = await kv.MapStore.open(path, { table: 'jobs' })
  t.is(store.count(), acks.length)
  await store.close()
  const reader = await kv.MapStore.open(path, { table: 'jobs', readOnly: true })
  t.deepEqual(reader.getEntry('k24'), { key: 'k24', value: 24, metadata: { i: '24' } })
  await reader.close()
  const again = await kvstore(['get', path, 'k24', '--table', 'jobs'])
  t.is(again.code, 0, again.stderr)
  t.deepEqual(JSON.parse(again.stdout).value, 24)
})

test('a store opened through a symlink keeps its log beside the real file: kill -9, then opening the real path replays every commit', async (t) => {
  const dir = tempDir(t)
  const real = join(dir, 'real.redb')
  const link = join(dir, 'link.redb')
  const first = await kv.MapStore.open(real)
  await put(first, 'seed', 'x')
  await first.close()
  symlinkSync(real, link)
  // The child opens the symlink; the log is beside the real file.
  const { acks, signal } = await commitThenKill(link, { syncIntervalMs: 86_400_000 }, 30)
  t.is(signal, 'SIGKILL')
  t.true(statSync(`${real}-wal`).size > 0, 'the log is beside the real file')
  t.false(existsSync(`${link}-wal`), 'and not beside the symlink')
  const store = await kv.MapStore.open(real)
  for (const { key, i } of acks) t.is(store.getEntry(key)?.value, i, key)
  await store.close()
})

// ------------------------------------------- defects a hostile pass found (fixed since)

test('a store whose -wal cannot be created (a 255-byte file name) still opens after a kill -9 that followed its first commit', async (t) => {
  // NAME_MAX is 255: `<name>-wal` cannot exist. The store works without a log (README: "A store
  // whose -wal cannot be created … works without it"), but the first checkpoint records a log tag
  // before the log is first opened; killed before a second batch retires it, the file names a log
  // that every later open (read-write and read-only) fails to read: IoError ENAMETOOLONG.
  const path = join(tempDir(t), `${'n'.repeat(250)}.redb`)
  const { acks, signal } = await commitThenKill(path, {}, 1)
  t.is(signal, 'SIGKILL')
  t.is(acks.length, 1)
  const store = await kv.MapStore.open(path)
  t.deepEqual(store.getEntry('k0'), { key: 'k0', value: 0, metadata: { i: '0' } })
  await store.close()
  const reader = await kv.MapStore.open(path, { readOnly: true })
  t.is(reader.getEntry('k0')?.value, 0)
  await reader.close()
})

test('a backup put back in place of its store does not take on commits made after the backup (from the -wal left beside it)', async (t) => {
  // The backup copies the live log tag from kvstore:meta; a clean close retires the tag in the
  // store but leaves the log's records on disk. Restoring the backup over the store file then
  // replays every record of that tag: commits made after the backup come back, deletes included.
  const dir = tempDir(t)
  const path = join(dir, 'state.redb')
  const backup = join(dir, 'backup.redb')
  // No checkpoint falls due during the test: the backup and the later commits share one log tag.
  const store = await kv.MapStore.open(path, { syncIntervalMs: 86_400_000 })
  await put(store, 'a', 'before backup')
  await put(store, 'b', 'before backup')
  await store.backup(backup)
  await put(store, 'a', 'after backup')
  await store.deleteEntry('b')
  await put(store, 'c', 'after backup')
  await store.close()

  rmSync(path)
  copyFileSync(backup, path)
  const restored = await kv.MapStore.open(path)
  t.deepEqual(
    [...restored.getEntries()].map(({ key, value }) => [key, value]),
    [
      ['a', 'before backup'],
      ['b', 'before backup'],
    ],
    'the restored store holds what the backup holds',
  )
  await restored.close()
})

/** Fills the file system of `dir` to the last block with ballast files. */
function fillDisk(dir) {
  let n = 0
  for (const size of [64 << 10, 4 << 10]) {
    try {
      for (;;) writeFileSync(join(dir, `ballast-${n++}`), Buffer.alloc(size, 1))
    } catch (err) {
      if (err.code !== 'ENOSPC') throw err
    }
  }
}

/** On a fresh 16 MiB tmpfs: 40 keys of 16 KiB written 5 times, a full disk, then 200 durable same-size updates. */
async function updatesOnFullDisk(t, name) {
  const path = join(tmpfs(t, '16m'), name)
  const store = await kv.MapStore.open(path, { codec: kv.codecs.raw })
  const value = (i) => Buffer.alloc(16 << 10, i % 251)
  // Five rounds of updates leave redb free pages inside its file to reuse.
  for (let round = 0; round < 5; round++) for (let k = 0; k < 40; k++) await put(store, `k${k}`, value(round))
  fillDisk(join(path, '..'))
  const failures = []
  for (let i = 0; i < 200; i++) {
    const lock = await store.createAndLockEntry(`k${i % 40}`, { allowExisting: true })
    lock.entry.value = value(i)
    await lock.commit().catch((err) => failures.push(`${i}: ${err.code} ${err.systemCode}`))
  }
  await store.close().catch(() => {})
  return failures
}

asRoot('on a full disk a durable store keeps making same-size updates, as it does without a log (it is not wedged until space returns)', async (t) => {
  // Control: a store whose -wal cannot be created (a 255-byte name) commits through redb alone;
  // each durable commit reuses the pages the one before it freed, so a full disk takes them all.
  t.deepEqual(await updatesOnFullDisk(t, `${'n'.repeat(250)}.redb`), [], 'without a log every update goes through')
  // With a log, redb commits without a sync and cannot reuse pages freed since the last
  // checkpoint: the file would grow, the commit fail with ENOSPC, and every commit after it
  // (the writer could not reopen the file) until space returned — ~55 passed, ~145 failed.
  // Under 64 MiB free the log stands aside and batches are durable redb commits.
  const failures = await updatesOnFullDisk(t, 'state.redb')
  t.is(failures.length, 0, `${failures.length} of 200 updates failed, the first: ${failures[0]}`)
})

test('the log of a store named `events` does not overwrite another store named `events-wal`', async (t) => {
  // `<file>-wal` is opened (created if missing, never truncated) and written from offset 0
  // whatever the file already holds: a store whose path is `<file>-wal` is zeroed and overwritten
  // by the first checkpoint of `<file>`, and then refuses to open ("Not a redb database").
  const dir = tempDir(t)
  const other = await kv.MapStore.open(join(dir, 'events-wal'))
  await put(other, 'e1', 'kept')
  await other.close()
  const store = await kv.MapStore.open(join(dir, 'events'))
  await put(store, 'a1', 1)
  await put(store, 'a2', 2)
  await store.close()
  const again = await kv.MapStore.open(join(dir, 'events-wal'))
  t.is(again.getEntry('e1')?.value, 'kept')
  await again.close()
})
