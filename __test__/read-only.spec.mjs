// Issue 15.12: a store opened read-only (`readOnly: true`) reads but changes nothing, and the
// command line's reading commands open that way, so a store on a read-only mount can be read.
import test from 'ava'
import { execFileSync, spawn } from 'node:child_process'
import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { exitOf, kv, kvstore, put, tempDir, tmpfs } from './helpers.mjs'

const root = process.getuid?.() === 0
const asRoot = root ? test : test.skip

async function writtenStore(path) {
  const store = await kv.MapStore.open(path, { table: 'jobs' })
  for (let i = 0; i < 5; i++) await put(store, `job-${i}`, { state: 'queued', i }, { owner: 'a' })
  await store.close()
}

test('readOnly: reads work, every change is refused with InvalidArgumentError, the file is untouched', async (t) => {
  const dir = tempDir(t)
  const path = join(dir, 'ro.redb')
  await writtenStore(path)
  const before = readFileSync(path)
  const db = await kv.Database.open(path, { readOnly: true })
  const jobs = db.mapStore('jobs')
  t.deepEqual(jobs.getEntry('job-3')?.value, { state: 'queued', i: 3 })
  t.is(jobs.count(), 5)
  t.deepEqual([...jobs.getEntries({ keysOnly: true })].map((e) => e.key), ['job-0', 'job-1', 'job-2', 'job-3', 'job-4'])
  const refused = { instanceOf: kv.InvalidArgumentError, message: /read-only/ }
  await t.throwsAsync(jobs.getAndLockEntry('job-1'), refused)
  await t.throwsAsync(jobs.createAndLockEntry('new'), refused)
  await t.throwsAsync(jobs.createAndLockEntry(), refused)
  await t.throwsAsync(jobs.updateEntry('job-1', (e) => e), refused)
  await t.throwsAsync(jobs.deleteEntry('job-1'), refused)
  await t.throwsAsync(db.compact(), refused)
  await db.backup(join(dir, 'copy.redb'))
  await db.close()
  t.deepEqual(readFileSync(path), before, 'the file is byte for byte as it was')
  const copy = await kv.MapStore.open(join(dir, 'copy.redb'), { table: 'jobs' })
  t.is(copy.count(), 5)
  await copy.close()
})

test('readOnly: a missing file is an IoError and is not created; a non-boolean is refused', async (t) => {
  const path = join(tempDir(t), 'missing.redb')
  await t.throwsAsync(kv.Database.open(path, { readOnly: true }), { instanceOf: kv.IoError, message: /missing\.redb/ })
  t.false(existsSync(path))
  await t.throwsAsync(kv.Database.open(path, { readOnly: 'yes' }), { instanceOf: kv.InvalidArgumentError, message: /readOnly/ })
  t.false(existsSync(path))
})

asRoot('15.12 the reading commands read a store on a read-only mount; load and compact fail with a clear error', async (t) => {
  const dir = tmpfs(t, '16m')
  const path = join(dir, 'jobs.redb')
  await writtenStore(path)
  execFileSync('mount', ['-o', 'remount,ro', dir])
  const tables = await kvstore(['tables', path])
  t.is(tables.code, 0, tables.stderr)
  t.is(tables.stdout, 'jobs\tmsgpack\n')
  const ls = await kvstore(['ls', path, '--table', 'jobs'])
  t.is(ls.code, 0, ls.stderr)
  t.is(ls.stdout, 'job-0\njob-1\njob-2\njob-3\njob-4\n')
  const get = await kvstore(['get', path, 'job-2', '--table', 'jobs'])
  t.is(get.code, 0, get.stderr)
  t.deepEqual(JSON.parse(get.stdout), { key: 'job-2', value: { state: 'queued', i: 2 }, metadata: { owner: 'a' } })
  const dump = await kvstore(['dump', path, '--table', 'jobs'])
  t.is(dump.code, 0, dump.stderr)
  t.is(dump.stdout.trim().split('\n').length, 6)
  const stats = await kvstore(['stats', path, '--table', 'jobs'])
  t.is(stats.code, 0, stats.stderr)
  t.is(JSON.parse(stats.stdout).entries, 5)
  const backup = await kvstore(['backup', path, join(tempDir(t), 'copy.redb')])
  t.is(backup.code, 0, backup.stderr)

  const load = await kvstore(['load', path, '--table', 'jobs'], '{"key":"x","value":1}\n')
  t.is(load.code, 1)
  t.regex(load.stderr, /EROFS|read-only file system/i)
  const compact = await kvstore(['compact', path])
  t.is(compact.code, 1)
  t.regex(compact.stderr, /EROFS|read-only file system/i)
})

asRoot('15.12 a store left unclean by a crash on a read-only mount is refused with the reason, not repaired', async (t) => {
  const dir = tmpfs(t, '16m')
  const path = join(dir, 'crashed.redb')
  const script = `
    const { MapStore } = await import(${JSON.stringify(new URL('../dist/index.js', import.meta.url).href)})
    const store = await MapStore.open(${JSON.stringify(path)}, { table: 'jobs' })
    const { entry, commit } = await store.createAndLockEntry('a')
    entry.value = 1
    await commit()
    process.stdout.write('committed\\n')
    setInterval(() => {}, 60_000) // stay alive until killed
  `
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] })
  await new Promise((resolve) => child.stdout.once('data', resolve))
  child.kill('SIGKILL')
  t.is((await exitOf(child)).signal, 'SIGKILL')
  execFileSync('mount', ['-o', 'remount,ro', dir])
  const ls = await kvstore(['ls', path, '--table', 'jobs'])
  t.is(ls.code, 1)
  t.regex(ls.stderr, /needs a repair \(it was not closed cleanly, or it is damaged\).*ERR_DATABASE_CORRUPT/)
})

test('readOnly beside a read-write handle of this process creates no map and records no codec', async (t) => {
  const path = join(tempDir(t), 'joined.redb')
  await writtenStore(path)
  const rw = await kv.Database.open(path)
  const ro = await kv.Database.open(path, { readOnly: true })
  t.teardown(async () => {
    await ro.close()
    await rw.close()
  })
  t.throws(() => ro.mapStore('audit', { codec: kv.codecs.json }), { instanceOf: kv.InvalidArgumentError, message: /no map 'audit'.*read-only/ })
  t.throws(() => ro.mapStore('auto', { keys: { width: 4 } }), { instanceOf: kv.InvalidArgumentError })
  // The writer's own map is its to create, with its codec.
  const audit = rw.mapStore('audit')
  await put(audit, 'a', { n: 1 })
  t.deepEqual(ro.mapStore('audit').getEntry('a')?.value, { n: 1 })
  t.deepEqual(rw.tables().map((m) => m.name).sort(), ['audit', 'jobs'])
})

test('a truncated store opened read-only is DatabaseCorruptError, and temporary() refuses readOnly', async (t) => {
  const dir = tempDir(t)
  const path = join(dir, 'cut.redb')
  await writtenStore(path)
  writeFileSync(path, readFileSync(path).subarray(0, 4096))
  await t.throwsAsync(kv.Database.open(path, { readOnly: true }), { instanceOf: kv.DatabaseCorruptError })
  await t.throwsAsync(kv.MapStore.temporary({ readOnly: true }), { instanceOf: kv.InvalidArgumentError, message: /temporary/ })
})
