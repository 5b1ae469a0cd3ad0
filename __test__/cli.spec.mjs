import test from 'ava'
import { execFile } from 'node:child_process'
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { cli, kv, kvstore, put, tempDir } from './helpers.mjs'

const exec = promisify(execFile)

async function seeded(t) {
  const path = join(tempDir(t), 'cli.redb')
  const db = await kv.Database.open(path)
  const jobs = db.mapStore('jobs')
  for (let i = 0; i < 30; i++) await put(jobs, `/jobs/${String(i).padStart(2, '0')}`, { i, state: 'DONE' }, { owner: `u${i % 3}` })
  await put(db.mapStore('paths', { codec: kv.codecs.json }), '/data/x', 'job-1')
  await db.close()
  return path
}

test('ls, get, stats and tables', async (t) => {
  const path = await seeded(t)
  const ls = await kvstore(['ls', path, '--table', 'jobs', '--prefix', '/jobs/1', '--limit', '3'])
  t.is(ls.code, 0)
  t.deepEqual(ls.stdout.trim().split('\n'), ['/jobs/10', '/jobs/11', '/jobs/12'])
  const get = await kvstore(['get', path, '/jobs/07', '--table', 'jobs'])
  t.deepEqual(JSON.parse(get.stdout), { key: '/jobs/07', value: { i: 7, state: 'DONE' }, metadata: { owner: 'u1' } })
  const stats = JSON.parse((await kvstore(['stats', path, '--table', 'jobs'])).stdout)
  t.is(stats.entries, 30)
  t.is((await kvstore(['tables', path])).stdout, 'jobs\tmsgpack\npaths\tjson\n')
})

test('dump and load round-trip a table through JSON lines', async (t) => {
  const path = await seeded(t)
  const dump = await kvstore(['dump', path, '--table', 'jobs'])
  t.is(dump.code, 0)
  const lines = dump.stdout.trim().split('\n')
  t.is(lines.length, 31, 'a header and 30 entries')
  t.deepEqual(JSON.parse(lines[0]), { kvstore: 'dump', format: 1, table: 'jobs', codec: 'msgpack' })
  const target = join(tempDir(t), 'loaded.redb')
  const load = await kvstore(['load', target, '--table', 'jobs'], dump.stdout)
  t.is(load.code, 0, load.stderr)
  t.regex(load.stdout, /^loaded 30 entries into table 'jobs'/)
  const again = await kvstore(['dump', target, '--table', 'jobs'])
  t.is(again.stdout, dump.stdout)
})

test('backup and compact', async (t) => {
  const path = await seeded(t)
  const dest = join(tempDir(t), 'copy.redb')
  const backup = await kvstore(['backup', path, dest])
  t.is(backup.code, 0)
  t.true(existsSync(dest))
  t.is(JSON.parse((await kvstore(['stats', dest, '--table', 'jobs'])).stdout).entries, 30)
  const compact = await kvstore(['compact', path])
  t.is(compact.code, 0)
  t.regex(compact.stdout, /compact/)
})

test('clear one-line errors: missing file, unknown table, locked file, unknown command', async (t) => {
  const path = await seeded(t)
  const missing = await kvstore(['ls', join(tempDir(t), 'nope.redb')])
  t.is(missing.code, 2)
  t.regex(missing.stderr, /^kvstore: no such file: .*nope\.redb\n$/)
  const table = await kvstore(['ls', path, '--table', 'nope'])
  t.regex(table.stderr, /^kvstore: no table 'nope' in .* \(tables: jobs, paths\)\n$/)
  const store = await kv.MapStore.open(path, { table: 'jobs' })
  const locked = await kvstore(['ls', path, '--table', 'jobs'])
  await store.close()
  t.is(locked.code, 1)
  t.regex(locked.stderr, /^kvstore: database '.*cli\.redb' is open in another process \(ERR_DATABASE_LOCKED\)\n$/)
  const unknown = await kvstore(['frobnicate', path])
  t.is(unknown.code, 2)
  t.regex(unknown.stderr, /unknown command 'frobnicate'/)
})

test('--help for the tool and for each command', async (t) => {
  const { stdout } = await exec(process.execPath, [cli, '--help'])
  for (const command of ['stats', 'ls', 'get', 'dump', 'load', 'compact', 'backup']) {
    t.true(stdout.includes(`kvstore ${command}`), command)
    const help = await exec(process.execPath, [cli, command, '--help'])
    t.true(help.stdout.startsWith(`kvstore ${command}`))
  }
})

test('a table with an unknown codec is dumped and loaded as base64 of its bytes', async (t) => {
  const path = join(tempDir(t), 'custom.redb')
  const reverse = { name: 'reverse', encode: (s) => Buffer.from([...s].reverse().join('')), decode: (b) => [...b.toString()].reverse().join('') }
  const store = await kv.MapStore.open(path, { table: 't', codec: reverse })
  await put(store, 'k', 'hello')
  await store.close()
  const dump = await kvstore(['dump', path, '--table', 't'])
  const [header, line] = dump.stdout.trim().split('\n').map((l) => JSON.parse(l))
  t.deepEqual(header, { kvstore: 'dump', format: 1, table: 't', codec: 'reverse' })
  t.deepEqual(line, { key: 'k', metadata: {}, bytes: Buffer.from('olleh').toString('base64') })
  // The header recreates the table with the codec's name; the app opens it with its codec.
  const target = join(tempDir(t), 'custom-copy.redb')
  t.is((await kvstore(['load', target], dump.stdout)).code, 0)
  const copy = await kv.MapStore.open(target, { table: 't', codec: reverse })
  t.is(copy.getEntry('k').value, 'hello')
  await copy.close()
})

test('dump shows progress on a terminal, and only there', async (t) => {
  const path = await seeded(t)
  // `script` gives the command a pseudo-terminal, as an interactive shell would.
  const { stdout } = await exec('script', ['-qec', `${process.execPath} ${cli} dump ${path} --table jobs > /dev/null`, '/dev/null'])
  t.regex(stdout, /dumped 30 entries/)
  const piped = await kvstore(['dump', path, '--table', 'jobs'])
  t.false(piped.stderr.includes('dumped'))
})
