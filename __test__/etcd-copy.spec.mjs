// Stores beyond one file: `kvstore copy` between files and etcd clusters, `backup()` of a cluster
// store into an ordinary kvstore file, and the CLI's reading commands on an etcd URL. One real
// etcd member on loopback serves the whole file; each test works under a prefix of its own.
import test from 'ava'
import { readdirSync } from 'node:fs'
import { join } from 'node:path'
import { startCluster } from './etcd-cluster.mjs'
import { kv, kvstore, put, tempDir } from './helpers.mjs'

let cluster
let prefixes = 0

test.before(async () => {
  cluster = await startCluster({ members: 1 })
})

test.after.always(async () => {
  await cluster?.stop()
})

/** A cluster URL with a prefix no other test uses. */
function freshUrl(name) {
  prefixes++
  return cluster.url(`/copy${process.pid}-${prefixes}-${name}`)
}

const prefixOf = (url) => url.slice(url.indexOf('/', 'etcd://'.length))

/** A codec of the application's own: only its name is recorded in the store. */
const rot13 = {
  name: 'rot13-text',
  encode: (text) => Buffer.from(text.replace(/[a-z]/gi, (c) => String.fromCharCode(((c.toLowerCase().charCodeAt(0) - 97 + 13) % 26) + (c <= 'Z' ? 65 : 97)))),
  decode: (bytes) => bytes.toString().replace(/[a-z]/gi, (c) => String.fromCharCode(((c.toLowerCase().charCodeAt(0) - 97 + 13) % 26) + (c <= 'Z' ? 65 : 97))),
}

/** Passes the stored value bytes through, under the table's codec name (as the CLI does). */
const bytesCodec = (name) => ({ name, encode: (bytes) => bytes, decode: (bytes) => bytes })

const LONG_KEY = `long/${'k'.repeat(2043)}`

/** Several maps: every built-in codec and a custom one, metadata, keys with '/', unicode, empty values. */
async function seed(location) {
  const db = await kv.Database.open(location)
  const jobs = db.mapStore('jobs')
  await put(jobs, '/jobs/1', { state: 'DONE', n: 1n << 60n, at: new Date(0) }, { owner: 'u1', '名前': 'ü🙂' })
  await put(jobs, '/jobs/2', { state: 'QUEUED', list: [1, 2, 3] })
  await put(jobs, 'a//b/', null, { '': '', note: '' })
  await put(jobs, 'ключ/🙂', 'unicode key', { 2: 'integer-like name', b: 'x' })
  await put(jobs, 'e\u0301', 'decomposed')
  await put(jobs, '\u00e9', 'composed')
  await put(jobs, LONG_KEY, 'a key of 2048 bytes')
  const blobs = db.mapStore('blobs', { codec: kv.codecs.raw })
  await put(blobs, 'empty', Buffer.alloc(0))
  await put(blobs, 'empty-with-meta', Buffer.alloc(0), { why: 'nothing to say' })
  await put(blobs, 'binary', Buffer.from([0, 1, 0xfe, 0xff, 0x80, 0]))
  await put(blobs, 'big', Buffer.alloc(200_000, 7))
  await put(db.mapStore('docs', { codec: kv.codecs.json }), 'd/1', { text: 'ünïcödé', nested: { a: [true, null] } })
  await put(db.mapStore('docs', { codec: kv.codecs.json }), 'd/2', '')
  await put(db.mapStore('v8map', { codec: kv.codecs.v8 }), 'm', new Map([[1, new Set(['x'])]]))
  const custom = db.mapStore('secret/notes', { codec: rot13 })
  await put(custom, 'n1', 'Hello, World', { lang: 'en' })
  await put(custom, 'n2', '')
  db.mapStore('empty%map', { codec: kv.codecs.json })
  const many = db.mapStore('many', { codec: kv.codecs.raw })
  await Promise.all(Array.from({ length: 700 }, (_, i) => put(many, `item/${String(i).padStart(4, '0')}`, Buffer.from(`value ${i}`), { i: String(i) })))
  await db.close()
}

/** Every map of a store, read through the public API: codec, then each entry's key, value bytes and metadata pairs in order. */
async function contents(location) {
  const db = await kv.Database.open(location)
  try {
    const maps = {}
    for (const { name, codec } of [...db.tables()].sort((a, b) => (a.name < b.name ? -1 : 1))) {
      const store = db.mapStore(name, { codec: bytesCodec(codec) })
      maps[name] = {
        codec,
        entries: store.getEntries().toArray().map((e) => [e.key, Buffer.from(e.value).toString('hex'), Object.entries(e.metadata)]),
      }
    }
    return maps
  } finally {
    await db.close()
  }
}

/** The record envelope of FORMAT.md, written independently of the library. */
function envelope(metadata, value) {
  const varint = (n) => {
    const out = []
    while (n >= 0x80) {
      out.push((n & 0x7f) | 0x80)
      n = Math.floor(n / 128)
    }
    out.push(n)
    return Buffer.from(out)
  }
  const parts = [Buffer.from([1]), varint(metadata.length)]
  for (const [name, text] of metadata) {
    for (const s of [Buffer.from(name), Buffer.from(text)]) parts.push(varint(s.length), s)
  }
  parts.push(value)
  return Buffer.concat(parts)
}

/** The raw records under a cluster prefix, read with etcdctl: `table\0key` → envelope bytes (hex). */
async function rawRecords(url) {
  const prefix = `${prefixOf(url)}/data/`
  const answer = JSON.parse(await cluster.ctl(['get', '--prefix', prefix, '-w', 'json']))
  const records = {}
  for (const { key, value } of answer.kvs ?? []) {
    const rest = Buffer.from(key, 'base64').toString().slice(prefix.length)
    const slash = rest.indexOf('/')
    const table = rest.slice(0, slash).replaceAll('%2F', '/').replaceAll('%25', '%')
    records[`${table}\0${rest.slice(slash + 1)}`] = Buffer.from(value ?? '', 'base64').toString('hex')
  }
  return records
}

test('kvstore copy: file → etcd → etcd → file round-trips every map byte for byte, and file → file', async (t) => {
  const dir = tempDir(t)
  const source = join(dir, 'source.redb')
  await seed(source)
  const original = await contents(source)
  t.deepEqual(Object.keys(original), ['blobs', 'docs', 'empty%map', 'jobs', 'many', 'secret/notes', 'v8map'])
  t.is(original.many.entries.length, 700)

  const first = freshUrl('first')
  const toCluster = await kvstore(['copy', source, first])
  t.is(toCluster.code, 0, toCluster.stderr)
  t.is(toCluster.stdout, `copied 716 entries in 7 maps from ${source} to ${first}\n`)
  t.is(toCluster.stderr, '', 'no progress when stderr is not a terminal')
  t.deepEqual(await contents(first), original)

  // In the cluster, each record is exactly the envelope of the source's metadata and value bytes.
  const raw = await rawRecords(first)
  const expected = {}
  for (const [name, { entries }] of Object.entries(original)) {
    for (const [key, hex, metadata] of entries) expected[`${name}\0${key}`] = envelope(metadata, Buffer.from(hex, 'hex')).toString('hex')
  }
  t.deepEqual(raw, expected)

  const second = freshUrl('second')
  const clusterToCluster = await kvstore(['copy', first, second])
  t.is(clusterToCluster.code, 0, clusterToCluster.stderr)
  t.deepEqual(await rawRecords(second), raw)

  const back = join(dir, 'back.redb')
  const toFile = await kvstore(['copy', second, back])
  t.is(toFile.code, 0, toFile.stderr)
  t.is(toFile.stdout, `copied 716 entries in 7 maps from ${second} to ${back}\n`)
  t.deepEqual(await contents(back), original)

  const fileCopy = join(dir, 'file-copy.redb')
  const fileToFile = await kvstore(['copy', source, fileCopy])
  t.is(fileToFile.code, 0, fileToFile.stderr)
  t.deepEqual(await contents(fileCopy), original)

  // The application reads the copy with its own codecs, the custom one too.
  const notes = await kv.MapStore.open(back, { table: 'secret/notes', codec: rot13 })
  t.is(notes.getEntry('n1').value, 'Hello, World')
  t.deepEqual(notes.getEntry('n1').metadata, { lang: 'en' })
  await notes.close()
  const jobs = await kv.MapStore.open(back, { table: 'jobs' })
  t.deepEqual(jobs.getEntry('/jobs/1').value, { state: 'DONE', n: 1n << 60n, at: new Date(0) })
  t.is(jobs.getEntry(LONG_KEY).value, 'a key of 2048 bytes')
  await jobs.close()
})

test('kvstore copy refuses a destination map that has entries unless --overwrite, and copies nothing', async (t) => {
  const dir = tempDir(t)
  const source = join(dir, 'source.redb')
  const db = await kv.Database.open(source)
  await put(db.mapStore('jobs'), 'j1', { v: 'new' })
  await put(db.mapStore('jobs'), 'j2', { v: 'new' })
  await put(db.mapStore('fresh', { codec: kv.codecs.json }), 'f', 1)
  await db.close()

  const url = freshUrl('busy')
  const target = await kv.Database.open(url)
  await put(target.mapStore('jobs'), 'j1', { v: 'old' })
  await put(target.mapStore('jobs'), 'other', { v: 'kept' })
  await target.close()

  const refused = await kvstore(['copy', source, url])
  t.is(refused.code, 1)
  t.is(refused.stdout, '')
  t.regex(refused.stderr, /^kvstore: map 'jobs' already has 2 entries in etcd:\/\/.*; nothing was copied \(--overwrite replaces the keys it copies\)\n$/)
  const untouched = await contents(url)
  t.deepEqual(Object.keys(untouched), ['jobs'], "the map 'fresh' was not created either")
  t.deepEqual(
    untouched.jobs.entries.map(([key]) => key),
    ['j1', 'other'],
  )

  // Into a file too, and a map recorded with another codec is refused even with --overwrite.
  const file = join(dir, 'busy.redb')
  const busy = await kv.Database.open(file)
  await put(busy.mapStore('jobs'), 'x', 1)
  busy.mapStore('fresh', { codec: kv.codecs.raw })
  await busy.close()
  const refusedFile = await kvstore(['copy', url, file])
  t.is(refusedFile.code, 1)
  t.regex(refusedFile.stderr, /map 'jobs' already has 1 entry in /)
  const mismatch = await kvstore(['copy', source, file, '--overwrite'])
  t.is(mismatch.code, 1)
  t.regex(mismatch.stderr, /map 'fresh' is json in .* but raw in .*; nothing was copied\n$/)
  t.deepEqual((await contents(file)).jobs.entries.map(([key]) => key), ['x'])

  const overwritten = await kvstore(['copy', source, url, '--overwrite'])
  t.is(overwritten.code, 0, overwritten.stderr)
  t.is(overwritten.stdout, `copied 3 entries in 2 maps from ${source} to ${url}\n`)
  const store = await kv.MapStore.open(url, { table: 'jobs' })
  t.deepEqual(store.getEntry('j1').value, { v: 'new' })
  t.deepEqual(store.getEntry('other').value, { v: 'kept' }, 'keys the source does not have stay')
  await store.close()

  // The same store on both sides is refused before anything is opened for writing.
  const same = await kvstore(['copy', source, `${dir}/./source.redb`])
  t.is(same.code, 2)
  t.regex(same.stderr, /are the same store/)
  const sameCluster = await kvstore(['copy', url, url])
  t.is(sameCluster.code, 2)
  t.regex(sameCluster.stderr, /are the same store/)
})

test("the CLI's ls, get, dump, tables and stats read an etcd URL as they read a file", async (t) => {
  const dir = tempDir(t)
  const file = join(dir, 'store.redb')
  await seed(file)
  const url = freshUrl('cli')
  t.is((await kvstore(['copy', file, url])).code, 0)

  for (const args of [
    ['tables'],
    ['ls', '--table', 'jobs'],
    ['ls', '--table', 'many', '--prefix', 'item/01', '--limit', '3'],
    ['get', '/jobs/1', '--table', 'jobs'],
    ['get', 'ключ/🙂', '--table', 'jobs'],
    ['dump', '--table', 'jobs'],
    ['dump', '--table', 'blobs'],
    ['dump', '--table', 'secret/notes'],
  ]) {
    const [command, ...rest] = args
    const fromFile = await kvstore([command, file, ...rest])
    const fromCluster = await kvstore([command, url, ...rest])
    t.is(fromFile.code, 0, `${args.join(' ')}: ${fromFile.stderr}`)
    t.is(fromCluster.code, 0, `${args.join(' ')}: ${fromCluster.stderr}`)
    t.is(fromCluster.stdout, fromFile.stdout, args.join(' '))
  }
  t.is((await kvstore(['tables', url])).stdout, 'blobs\traw\ndocs\tjson\nempty%map\tjson\njobs\tmsgpack\nmany\traw\nsecret/notes\trot13-text\nv8map\tv8\n')
  t.is((await kvstore(['ls', url, '--table', 'many', '--prefix', 'item/01', '--limit', '3'])).stdout, 'item/0100\nitem/0101\nitem/0102\n')

  const stats = await kvstore(['stats', url, '--table', 'many'])
  t.is(stats.code, 0, stats.stderr)
  t.is(JSON.parse(stats.stdout).entries, 700)

  const missing = await kvstore(['get', url, 'nope', '--table', 'jobs'])
  t.is(missing.code, 2)
  t.regex(missing.stderr, /no entry 'nope' in table 'jobs'/)
  const noTable = await kvstore(['ls', url, '--table', 'nope'])
  t.is(noTable.code, 2)
  t.regex(noTable.stderr, /no table 'nope' in etcd:\/\/.*\(tables: blobs, docs, empty%map, jobs, many, secret\/notes, v8map\)/)
  t.deepEqual(Object.keys(await contents(url)), ['blobs', 'docs', 'empty%map', 'jobs', 'many', 'secret/notes', 'v8map'], 'reading created no map')

  // backup and compact take the URL too.
  const dest = join(dir, 'backup.redb')
  const backup = await kvstore(['backup', url, dest])
  t.is(backup.code, 0, backup.stderr)
  t.is(backup.stdout, `backed up to ${dest}\n`)
  t.deepEqual(await contents(dest), await contents(file))
  const compact = await kvstore(['compact', url])
  t.is(compact.code, 0, compact.stderr)
  t.is(compact.stdout, 'compacted\n')

  // A cluster URL is checked: a malformed one is an invalid argument, not a missing file.
  const malformed = await kvstore(['tables', 'etcd://127.0.0.1:1'])
  t.is(malformed.code, 1)
  t.regex(malformed.stderr, /malformed etcd URL.*\(ERR_INVALID_ARGUMENT\)/)
})

test('db.backup(dest) of a cluster store writes a file with every map, its codec and its auto-key position', async (t) => {
  const dir = tempDir(t)
  const url = freshUrl('backup')
  await seed(url)
  const db = await kv.Database.open(url)
  t.teardown(() => db.close())
  const keys = { width: 8, base: 10, bandwidth: 5 }
  const auto = db.mapStore('auto', { codec: kv.codecs.json, keys })
  const made = []
  for (let i = 0; i < 7; i++) {
    const lock = await auto.createAndLockEntry(undefined, { value: i })
    made.push(lock.key)
    await lock.commit()
  }
  t.deepEqual(made, ['00000000', '00000001', '00000002', '00000003', '00000004', '00000005', '00000006'])

  const dest = join(dir, 'cluster.redb')
  await db.backup(dest)
  t.deepEqual(readdirSync(dir), ['cluster.redb'], 'no working file is left')
  const expected = await contents(url)
  t.deepEqual(await contents(dest), expected)
  t.is(expected.many.entries.length, 700)

  // It opens as any file does, each map with its codec.
  const notes = await kv.MapStore.open(dest, { table: 'secret/notes', codec: rot13 })
  t.is(notes.getEntry('n1').value, 'Hello, World')
  await t.throwsAsync(kv.MapStore.open(dest, { table: 'secret/notes', codec: kv.codecs.json }), { code: 'ERR_CODEC_MISMATCH' })
  await notes.close()
  // Auto keys go on past every key leased in the cluster (its lease ran to 10), in its format.
  const copy = await kv.MapStore.open(dest, { table: 'auto', codec: kv.codecs.json, keys })
  t.deepEqual(copy.getEntries().toArray().map((e) => e.value), [0, 1, 2, 3, 4, 5, 6])
  t.is(await copy.generateNextKey(), '00000010')
  await copy.close()
  const otherFormat = await kv.MapStore.open(dest, { table: 'auto', codec: kv.codecs.json })
  await t.throwsAsync(otherFormat.generateNextKey(), { code: 'ERR_INVALID_ARGUMENT', message: /width 8 in base 10/ })
  await otherFormat.close()

  // Never over an existing file.
  await t.throwsAsync(db.backup(dest), { code: 'ERR_INVALID_ARGUMENT', message: /already exists/ })
  t.deepEqual(await contents(dest), expected)
})

test('db.backup(dest) of a cluster store holds every map as of one revision while commits go on', async (t) => {
  const dir = tempDir(t)
  const url = freshUrl('revision')
  const db = await kv.Database.open(url)
  t.teardown(() => db.close())
  // Map 'a' spans more than one page of the scan (2 000 keys a page), so 'b' is read later.
  const a = db.mapStore('a', { codec: kv.codecs.raw })
  const b = db.mapStore('b', { codec: kv.codecs.raw })
  const pad = Buffer.alloc(16)
  for (let i = 0; i < 5000; i += 500) {
    await Promise.all(Array.from({ length: 500 }, (_, j) => put(a, `pad/${String(i + j).padStart(5, '0')}`, pad)))
  }
  // The writer commits a/k-n, then b/k-n: at every revision, b's keys are a's, or a's but the last.
  let stop = false
  let written = 0
  const writer = (async () => {
    for (let n = 0; !stop; n++) {
      const key = `k-${String(n).padStart(6, '0')}`
      await put(a, key, Buffer.from([n & 0xff]))
      await put(b, key, Buffer.from([n & 0xff]))
      written = n + 1
    }
  })()
  const backups = []
  let overlapped = 0
  for (let i = 0; i < 4; i++) {
    const before = written
    while (written < before + 3) await new Promise((resolve) => setImmediate(resolve))
    const dest = join(dir, `b${i}.redb`)
    const during = written
    await db.backup(dest)
    if (written > during) overlapped++
    backups.push(dest)
  }
  stop = true
  await writer
  t.true(written >= 12)
  t.true(overlapped > 0, 'commits went on while a backup ran')
  for (const dest of backups) {
    const file = await kv.Database.open(dest, { readOnly: true })
    const keysOf = (name) => file.mapStore(name, { codec: kv.codecs.raw }).getEntries({ prefix: 'k-', keysOnly: true }).toArray().map((e) => e.key)
    const inA = keysOf('a')
    const inB = keysOf('b')
    t.is(file.mapStore('a', { codec: kv.codecs.raw }).count({ prefix: 'pad/' }), 5000)
    await file.close()
    t.true(inA.length >= 3, `${dest}: writes before the backup are in it`)
    t.deepEqual(inB, inA.slice(0, inB.length), `${dest}: b holds only keys a has`)
    t.true(inA.length - inB.length <= 1, `${dest}: a is at most one commit ahead of b (${inA.length} vs ${inB.length})`)
  }
})
