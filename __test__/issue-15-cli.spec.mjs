// Issue 15 (items 8, 9, 10) and issue 13's command line part, as subprocess tests: load reports
// the lines it cannot take; dump → load is byte for byte with the table's codec; a closed pipe
// ends a command quietly with the store closed; arguments that are not UTF-8 are refused.
import test from 'ava'
import { existsSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { cli, kv, kvstore, put, run, tempDir } from './helpers.mjs'

/** Every stored record of a table as [key, metadata, value bytes (hex)], read under its codec's name. */
async function storedBytes(path, table, codecName) {
  const store = await kv.MapStore.open(path, { table, codec: { name: codecName, encode: (b) => b, decode: (b) => Buffer.from(b) } })
  const rows = [...store.getEntries()].map((item) => [item.key, item.metadata, item.value.toString('hex')])
  await store.close()
  return rows
}

/** Opens and closes `path`, returning what the logger heard (a repair warning means it was not closed cleanly). */
async function warningsOnOpen(path, table) {
  const heard = []
  const logger = { debug() {}, info() {}, warn: (m) => heard.push(m), error: (m) => heard.push(m) }
  const store = await kv.MapStore.open(path, { table, logger })
  await store.close()
  return heard
}

// 15.8 ---------------------------------------------------------------------------------------

test('15.8 load reports each line it cannot take by number, writes the others, says how many, exits 1', async (t) => {
  const path = join(tempDir(t), 'load.redb')
  const input = [
    JSON.stringify({ key: 'good-1', value: { n: 1 }, metadata: { owner: 'u1' } }),
    JSON.stringify({ key: '', value: 1 }),
    JSON.stringify({ key: 'meta', value: 1, metadata: { n: 5 } }),
    JSON.stringify({ key: 42, value: 1 }),
    '',
    JSON.stringify({ value: 'no key' }),
    '{"key": "broken',
    '{"key": "\\ud800", "value": 1}',
    JSON.stringify({ key: 'bytes', bytes: 'not base64!' }),
    '[1, 2]',
    JSON.stringify({ key: 'good-2', value: 'two' }),
    JSON.stringify({ key: 'no-value' }),
  ].join('\n')
  const { code, stdout, stderr } = await kvstore(['load', path, '--table', 'jobs'], input)
  t.is(code, 1)
  const reported = stderr.trim().split('\n')
  t.deepEqual(
    reported.map((line) => Number(/^kvstore: line (\d+): /.exec(line)?.[1])).filter(Boolean),
    [2, 3, 4, 6, 7, 8, 9, 10],
  )
  t.regex(reported[0], /line 2: "key" must not be empty/)
  t.regex(reported[1], /line 3: metadata 'n' of 'meta' must be a string/)
  t.regex(reported[2], /line 4: "key" must be a string, got number/)
  t.regex(reported[3], /line 6: no "key"/)
  t.regex(reported[4], /line 7: not JSON/)
  t.regex(reported[5], /line 8: "key" "\\ud800" is not well-formed Unicode/)
  t.regex(reported[6], /line 9: "bytes" must be the stored value in base64/)
  t.regex(reported[7], /line 10: not a JSON object/)
  t.is(reported.at(-1), 'kvstore: 8 lines were not loaded')
  t.regex(stdout, /^loaded 3 entries into table 'jobs' of .*load\.redb\n$/)
  const store = await kv.MapStore.open(path, { table: 'jobs' })
  t.deepEqual(
    [...store.getEntries()].map(({ key, value, metadata }) => ({ key, value, metadata })),
    [
      { key: 'good-1', value: { n: 1 }, metadata: { owner: 'u1' } },
      { key: 'good-2', value: 'two', metadata: {} },
      { key: 'no-value', value: null, metadata: {} },
    ],
    'no auto-keyed entry, nothing from a bad line',
  )
  await store.close()
})

test('15.8 a clean load exits 0 and says how many entries it wrote', async (t) => {
  const path = join(tempDir(t), 'clean.redb')
  const input = ['{"key":"a","value":1}', '{"key":"b","value":2}'].join('\n')
  const { code, stdout, stderr } = await kvstore(['load', path], input)
  t.is(code, 0, stderr)
  t.is(stderr, '')
  t.regex(stdout, /^loaded 2 entries into table 'default'/)
})

test('15.8 a raw or unknown-codec table needs "bytes": a "value" line is reported', async (t) => {
  const path = join(tempDir(t), 'raw.redb')
  const store = await kv.MapStore.open(path, { table: 'r', codec: kv.codecs.raw })
  await store.close()
  const { code, stderr } = await kvstore(['load', path, '--table', 'r'], '{"key":"a","value":"text"}\n')
  t.is(code, 1)
  t.regex(stderr, /^kvstore: line 1: the table's codec is 'raw': give the stored value as base64 in "bytes"\n/)
})

// 15.9 ---------------------------------------------------------------------------------------

const reverse = { name: 'reverse-custom', encode: (s) => Buffer.from([...s].reverse().join('')), decode: (b) => [...b.toString()].reverse().join('') }
const tables = {
  msgpack: { codec: kv.codecs.msgpack, values: [{ when: new Date(1_700_000_000_123), bytes: Buffer.from([0, 1, 255]), big: 2n ** 62n, n: 1.5 }, new Date(5), Buffer.from('buf'), 2n ** 63n - 1n, JSON.parse('{"__proto__":1}')] },
  raw: { codec: kv.codecs.raw, values: [Buffer.from([0, 1, 2, 255]), Buffer.alloc(0), Buffer.from('text')] },
  json: { codec: kv.codecs.json, values: [{ a: [1, 'x'], b: null }, 'text', 1e21, { s: 'x\ud800' }] },
  v8: { codec: kv.codecs.v8, values: [{ when: new Date(3), map: new Map([[1, new Set([2])]]), big: 10n ** 30n, u: undefined }, Buffer.from('v8'), new Float64Array([1.5])] },
  custom: { codec: reverse, values: ['hello', 'olleh', ''] },
}

test('15.9 dump → load into a new file keeps each table codec and its exact bytes', async (t) => {
  const source = join(tempDir(t), 'source.redb')
  const db = await kv.Database.open(source)
  for (const [table, { codec, values }] of Object.entries(tables)) {
    const store = db.mapStore(table, { codec })
    for (const [i, value] of values.entries()) await put(store, `k${i}`, value, i === 0 ? { owner: 'u1', note: 'é\ud83d\ude00' } : {})
  }
  await db.close()
  for (const [table, { codec, values }] of Object.entries(tables)) {
    const dump = await kvstore(['dump', source, '--table', table])
    t.is(dump.code, 0, dump.stderr)
    t.deepEqual(JSON.parse(dump.stdout.split('\n')[0]), { kvstore: 'dump', format: 1, table, codec: codec.name })
    const target = join(tempDir(t), `${table}.redb`)
    // No --table: the header names the table and its codec.
    const load = await kvstore(['load', target], dump.stdout)
    t.is(load.code, 0, load.stderr)
    t.regex(load.stdout, new RegExp(`^loaded ${values.length} entries into table '${table}'`))
    const loaded = await kv.Database.open(target)
    t.deepEqual(loaded.tables(), [{ name: table, codec: codec.name }], table)
    await loaded.close()
    t.deepEqual(await storedBytes(target, table, codec.name), await storedBytes(source, table, codec.name), `${table}: byte for byte`)
    // And the application reads its values back with its codec.
    const app = await kv.MapStore.open(target, { table, codec })
    for (const [i, value] of values.entries()) {
      const read = app.getEntry(`k${i}`).value
      if (ArrayBuffer.isView(value)) t.deepEqual(Buffer.from(read.buffer, read.byteOffset, read.byteLength), Buffer.from(value.buffer, value.byteOffset, value.byteLength))
      else t.deepEqual(read, value, `${table} k${i}`)
    }
    await app.close()
  }
})

test('15.9 loading a dump into a table with another codec is refused before anything is written', async (t) => {
  const source = join(tempDir(t), 'a.redb')
  const store = await kv.MapStore.open(source, { table: 't', codec: kv.codecs.json })
  await put(store, 'k', 1)
  await store.close()
  const dump = await kvstore(['dump', source, '--table', 't'])
  const target = join(tempDir(t), 'b.redb')
  const other = await kv.MapStore.open(target, { table: 't' })
  await other.close()
  const load = await kvstore(['load', target], dump.stdout)
  t.is(load.code, 1)
  t.regex(load.stderr, /ERR_CODEC_MISMATCH/)
  t.deepEqual(await storedBytes(target, 't', 'msgpack'), [])
})

test('15.9 a value that does not decode is dumped with its bytes (and reported), so load keeps it', async (t) => {
  const source = join(tempDir(t), 'bad.redb')
  const bytes = { name: 'msgpack', encode: (b) => b, decode: (b) => b }
  const store = await kv.MapStore.open(source, { table: 't', codec: bytes })
  await put(store, 'bad', Buffer.from([0x92, 0x01]), { m: 'x' }) // an array of 2 with one item
  await put(store, 'good', kv.codecs.msgpack.encode({ a: 1 }))
  await store.close()
  const dump = await kvstore(['dump', source, '--table', 't'])
  t.is(dump.code, 1)
  t.regex(dump.stderr, /^kvstore: entry 'bad' dumped without "value" \(its bytes do not decode as msgpack\): /)
  const lines = dump.stdout.trim().split('\n').map((l) => JSON.parse(l))
  t.deepEqual(lines[1], { key: 'bad', metadata: { m: 'x' }, bytes: Buffer.from([0x92, 0x01]).toString('base64') })
  t.deepEqual(lines[2], { key: 'good', value: { a: 1 }, metadata: {}, bytes: lines[2].bytes })
  const target = join(tempDir(t), 'bad-copy.redb')
  t.is((await kvstore(['load', target], dump.stdout)).code, 0)
  t.deepEqual(await storedBytes(target, 't', 'msgpack'), await storedBytes(source, 't', 'msgpack'))
})

// 15.10 --------------------------------------------------------------------------------------

for (const command of ['dump', 'ls']) {
  test(`15.10 \`kvstore ${command} file | head -1\` ends quietly and closes the store`, async (t) => {
    const path = join(tempDir(t), 'pipe.redb')
    const store = await kv.MapStore.open(path, { table: 'jobs', durability: 'none' })
    // Far more than a pipe holds (64 KiB), so the command is still writing when head exits.
    const filler = 'x'.repeat(200)
    await Promise.all(Array.from({ length: 3000 }, (_, i) => put(store, `/jobs/${String(i).padStart(5, '0')}`, filler)))
    await store.close()
    const { code, stdout, stderr } = await run('bash', ['-o', 'pipefail', '-c', `"${process.execPath}" "${cli}" ${command} "${path}" --table jobs | head -1`])
    t.is(stderr, '', 'no stack trace')
    t.is(code, 0)
    t.is(stdout.split('\n').length, 2, 'one line')
    t.deepEqual(await warningsOnOpen(path, 'jobs'), [], 'closed cleanly: no repair on the next open')
  })
}

// Issue 13, command line -----------------------------------------------------------------------

test('13 an argument that is not valid UTF-8 is refused with the one-line error', async (t) => {
  const path = join(tempDir(t), 'args.redb')
  const store = await kv.MapStore.open(path)
  await put(store, '\ufffd', 'the replacement character')
  await store.close()
  // Bytes ED A0 80 (a UTF-8-encoded surrogate) reach process.argv as U+FFFD: without the check, get
  // would return the entry of another key.
  const { code, stdout, stderr } = await run('bash', ['-c', `"${process.execPath}" "${cli}" get "${path}" "$(printf '\\355\\240\\200')"`])
  t.is(code, 2)
  t.is(stdout, '')
  t.regex(stderr, /^kvstore: argument 3 is not valid UTF-8 .*\n$/)
  const prefix = await run('bash', ['-c', `"${process.execPath}" "${cli}" ls "${path}" --prefix "$(printf 'a\\377')"`])
  t.is(prefix.code, 2)
  t.regex(prefix.stderr, /^kvstore: argument 4 is not valid UTF-8/)
  const fine = await kvstore(['get', path, '\ufffd'])
  t.is(fine.code, 0, 'a real U+FFFD is fine')
})

test('a dump whose output cannot be written (a full device) exits 1, not 0', async (t) => {
  const path = join(tempDir(t), 'full-out.redb')
  const store = await kv.MapStore.open(path, { table: 't' })
  for (let i = 0; i < 50; i++) await put(store, `k${i}`, { i })
  await store.close()
  const r = await run('bash', ['-c', `"${process.execPath}" "${cli}" dump "${path}" --table t > /dev/full`])
  t.is(r.code, 1)
  t.regex(r.stderr, /cannot write the output: ENOSPC/)
})

test('reading commands refuse an empty file and leave it as it was', async (t) => {
  const path = join(tempDir(t), 'empty.redb')
  writeFileSync(path, '')
  for (const command of ['stats', 'tables', 'ls', 'dump', 'get']) {
    const r = await kvstore(command === 'get' ? [command, path, 'k'] : [command, path])
    t.is(r.code, 1, command)
    t.regex(r.stderr, /empty \(0 bytes\): it is not a kvstore file/, command)
    t.is(statSync(path).size, 0, `${command} wrote nothing`)
  }
})

test('load takes a header after a byte order mark, and loads nothing when the first line is not JSON', async (t) => {
  const dir = tempDir(t)
  const withBom = join(dir, 'bom.redb')
  const header = JSON.stringify({ kvstore: 'dump', format: 1, table: 'm', codec: 'json' })
  const ok = await kvstore(['load', withBom], `\uFEFF${header}\n{"key":"a","value":1}\n`)
  t.is(ok.code, 0, ok.stderr)
  const store = await kv.MapStore.open(withBom, { table: 'm', codec: kv.codecs.json })
  t.is(store.getEntry('a')?.value, 1)
  await store.close()

  const garbled = join(dir, 'garbled.redb')
  const refused = await kvstore(['load', garbled], `#${header}\n{"key":"a","value":1}\n`)
  t.is(refused.code, 2)
  t.regex(refused.stderr, /line 1: not JSON; nothing was loaded/)
  t.false(existsSync(garbled), 'no store was created')
})

test('15.11 usage errors exit 2: an unknown option, a --limit that is not a number, a --limit without a value', async (t) => {
  const path = join(tempDir(t), 'usage.redb')
  const store = await kv.MapStore.open(path)
  await put(store, 'k', 1)
  await store.close()
  for (const args of [['ls', path, '--frob'], ['ls', path, '--limit', 'abc'], ['ls', path, '--limit']]) {
    const r = await kvstore(args)
    t.is(r.code, 2, `${args.join(' ')}: ${r.stderr}`)
    t.regex(r.stderr, /^kvstore: /, args.join(' '))
    t.is(r.stderr.trim().split('\n').length, 1, 'one line')
  }
})
