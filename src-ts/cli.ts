#!/usr/bin/env node
// kvstore <command> <store> — look inside a store from the shell: a file, or an etcd cluster and
// prefix (etcd://host:port[,host:port…]/prefix). Values are shown as JSON. A dump carries the
// table's codec (a header line) and each value's stored bytes (base64), so `load` recreates the
// table byte for byte; the JSON `value` beside them is for reading. `copy` moves every map from
// one store to another through the same API, with each map's codec and each entry's bytes.
import { existsSync, readFileSync, realpathSync } from 'node:fs'
import { createInterface } from 'node:readline'
import { parseArgs } from 'node:util'
import { codecs, type Codec } from './codecs'
import { Database } from './database'
import { checkMetadata, type Metadata } from './envelope'
import { KvStoreError } from './errors'
import type { MapStore } from './map-store'
import { isClusterUrl } from './options'

const HELP: Record<string, string> = {
  stats: 'kvstore stats <store> [--table name]\n  Entries, file size, cache, locks and commit counts, as JSON.',
  ls: 'kvstore ls <store> [--table name] [--prefix p] [--limit n]\n  One key per line, in key order.',
  get: 'kvstore get <store> <key> [--table name]\n  The entry as JSON: { key, value, metadata }.',
  dump: [
    'kvstore dump <store> [--table name]',
    '  The table as JSON lines on stdout: a header { kvstore: "dump", format: 1, table, codec }, then',
    '  { key, value, metadata, bytes } per entry; bytes is the stored value (base64), value its JSON',
    '  reading (absent for raw and unknown codecs).',
  ].join('\n'),
  load: [
    'kvstore load <store> [--table name]',
    "  Reads JSON lines from stdin and creates or replaces each entry. The table is --table, else the",
    "  header's, else 'default'; a new table gets the header's codec. An entry is stored from its",
    '  bytes (base64) when given, else its value is encoded with the codec. Bad lines are reported by',
    '  number and skipped; the others are written; the exit code is 1 if any line was not loaded.',
  ].join('\n'),
  tables: 'kvstore tables <store>\n  The maps in the store and their codecs.',
  compact: 'kvstore compact <store>\n  Reclaims free space in the file (of a cluster: compacts its history).',
  backup: [
    'kvstore backup <store> <dest>',
    '  Writes a consistent copy of the store (every map as of one snapshot; of a cluster, one',
    '  revision) to the new file <dest>, which must not exist.',
  ].join('\n'),
  copy: [
    'kvstore copy <from> <to> [--overwrite]',
    '  Copies every map of <from> into <to> (a file, created if missing, or a cluster): each map',
    '  with its codec, each entry with its stored value bytes and metadata. Refused, with nothing',
    '  copied, when a map already has entries in <to> (or another codec there); --overwrite',
    '  creates or replaces each copied key instead (other keys of <to> stay). Each map is read as',
    '  of one snapshot. Auto-key positions are not copied (backup keeps them).',
  ].join('\n'),
}

const USAGE = `usage: kvstore <command> <store> [options]\n\n<store> is a file or etcd://host:port[,host:port…]/prefix (etcds:// for TLS).\n\ncommands:\n${Object.values(
  HELP,
)
  .map((h) => `  ${h.split('\n')[0]}`)
  .join('\n')}\n\nkvstore <command> --help for more.`

class UsageError extends Error {}
/** Some input was not taken; reported line by line already. */
class IncompleteError extends Error {}

/**
 * Opens a store to read: a file read-only (it must exist; nothing in it changes), a cluster as
 * it is (etcd has no read-only handle; its reads come from a replica loaded at open).
 */
async function openToRead(location: string): Promise<Database> {
  if (isClusterUrl(location)) return Database.open(location)
  if (!existsSync(location)) throw new UsageError(`no such file: ${location}`)
  return Database.open(location, { readOnly: true })
}

/** JSON for reading: BigInts as strings (JSON has no integers that large). */
const readable = (_key: string, value: unknown): unknown => (typeof value === 'bigint' ? value.toString() : value)

function base64Codec(name: string): Codec<string> {
  return { name, encode: (value) => Buffer.from(value, 'base64'), decode: (bytes) => bytes.toString('base64') }
}

const known = codecs as Record<string, Codec<unknown>>

function codecFor(name: string): Codec<unknown> {
  return known[name] ?? (base64Codec(name) as Codec<unknown>)
}

/** The codec whose value is JSON-readable: not raw (bytes) and not one this tool does not know. */
function readableCodec(name: string): Codec<unknown> | undefined {
  return name === 'raw' ? undefined : known[name]
}

/** Stores and returns the value's bytes as they are, under the table's codec name. */
function bytesCodec(name: string): Codec<Uint8Array> {
  return { name, encode: (bytes) => bytes, decode: (bytes) => bytes }
}

function tableCodec(db: Database, table: string): string | undefined {
  return db.tables().find((t) => t.name === table)?.codec
}

function missingTable(db: Database, table: string): UsageError {
  const names = db.tables().map((t) => t.name)
  return new UsageError(`no table '${table}' in ${db.path} (tables: ${names.length ? names.join(', ') : 'none'})`)
}

function openTable(db: Database, table: string): MapStore<unknown> {
  const codec = tableCodec(db, table)
  if (codec === undefined) throw missingTable(db, table)
  return db.mapStore(table, { codec: codecFor(codec) })
}

function progress(label: string, keep = true): { tick(): void; done(): void } {
  if (!process.stderr.isTTY) return { tick() {}, done() {} }
  let n = 0
  let last = 0
  return {
    tick() {
      n++
      const now = Date.now()
      if (now - last > 100) {
        last = now
        process.stderr.write(`\r${label} ${n.toLocaleString()} entries`)
      }
    },
    done() {
      process.stderr.write(keep ? `\r${label} ${n.toLocaleString()} entries\n` : '\r\x1b[K')
    },
  }
}

/**
 * stdout that may be closed by its reader (`kvstore dump f | head`): an EPIPE ends the output
 * quietly instead of crashing the process with the store left open.
 */
class Output {
  #closed = false

  constructor() {
    process.stdout.on('error', (err: NodeJS.ErrnoException) => {
      this.#closed = true
      if (err.code === 'EPIPE') return
      // A full disk or a broken device: the output is incomplete, and the exit code says so.
      process.stderr.write(`kvstore: cannot write the output: ${err.message}\n`)
      process.exitCode = 1
    })
    // A reader of stderr may go away too; nothing more to say then.
    process.stderr.on('error', () => {})
  }

  /** False once the reader has gone: stop producing output. */
  get open(): boolean {
    return !this.#closed && !process.stdout.destroyed
  }

  /** Writes a line, waiting while the reader is behind; false once the reader has gone. */
  async line(text: string): Promise<boolean> {
    if (!this.open) return false
    if (process.stdout.write(`${text}\n`)) return true
    if (!this.open) return false
    await new Promise<void>((resolve) => {
      const done = (): void => {
        process.stdout.off('drain', done)
        process.stdout.off('close', done)
        process.stdout.off('error', done)
        resolve()
      }
      process.stdout.on('drain', done)
      process.stdout.on('close', done)
      process.stdout.on('error', done)
    })
    return this.open
  }
}

/**
 * The command line arguments as the OS gave them (Linux): bytes that are not UTF-8 reach
 * process.argv as U+FFFD, so `get` would read another key. Such an argument is refused.
 */
function checkArgumentBytes(count: number): void {
  let raw: Buffer
  try {
    raw = readFileSync('/proc/self/cmdline')
  } catch {
    return
  }
  const parts: Buffer[] = []
  let at = 0
  for (let end = raw.indexOf(0, at); end !== -1; end = raw.indexOf(0, at)) {
    parts.push(raw.subarray(at, end))
    at = end + 1
  }
  const args = parts.slice(parts.length - count)
  const decoder = new TextDecoder('utf-8', { fatal: true })
  for (const [i, arg] of args.entries()) {
    try {
      decoder.decode(arg)
    } catch {
      throw new UsageError(`argument ${i + 1} is not valid UTF-8 (${JSON.stringify(arg.toString('utf8'))}); keys and names must be well-formed Unicode`)
    }
  }
}

interface DumpHeader {
  kvstore: 'dump'
  format: 1
  table: string
  codec: string
}

function isHeader(line: unknown): line is DumpHeader {
  return typeof line === 'object' && line !== null && (line as { kvstore?: unknown }).kvstore === 'dump'
}

async function dump(db: Database, table: string, out: Output): Promise<void> {
  const codec = tableCodec(db, table)
  if (codec === undefined) throw missingTable(db, table)
  const store = db.mapStore(table, { codec: bytesCodec(codec) })
  const header: DumpHeader = { kvstore: 'dump', format: 1, table, codec }
  if (!(await out.line(JSON.stringify(header)))) return
  const reader = readableCodec(codec)
  const bar = progress('dumped')
  let damaged = 0
  const report = (key: string, what: string, err: unknown): void => {
    damaged++
    process.stderr.write(`kvstore: entry '${key}' ${what}: ${err instanceof Error ? err.message : String(err)}\n`)
  }
  for (const item of store.getEntries()) {
    let bytes: Buffer
    let metadata: Metadata
    try {
      bytes = item.value as Buffer
      metadata = item.metadata
    } catch (err) {
      // A damaged envelope: neither its metadata nor its value can be told apart.
      report(item.key, 'not dumped', err)
      continue
    }
    // The JSON reading comes first on the line, for people; load uses the bytes.
    const record: Record<string, unknown> = { key: item.key }
    if (reader) {
      try {
        record.value = reader.decode(bytes)
      } catch (err) {
        // Its bytes are dumped as they are, so load keeps them; only the reading is missing.
        report(item.key, `dumped without "value" (its bytes do not decode as ${codec})`, err)
      }
    }
    record.metadata = metadata
    record.bytes = bytes.toString('base64')
    if (!(await out.line(JSON.stringify(record, readable)))) break
    bar.tick()
  }
  bar.done()
  if (damaged > 0) throw new IncompleteError(`${damaged} ${damaged === 1 ? 'entry' : 'entries'} could not be read in full`)
}

const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/

async function load(file: string, tableOption: string | undefined, out: Output): Promise<void> {
  const lines = createInterface({ input: process.stdin, crlfDelay: Infinity })[Symbol.asyncIterator]()
  let number = 0
  let first: { number: number; parsed: unknown; text: string } | undefined
  // The first line may be a dump's header: it names the table and its codec.
  for (let next = await lines.next(); !next.done; next = await lines.next()) {
    number++
    // A byte order mark some editors put first is not part of the JSON.
    const text = number === 1 ? next.value.replace(/^\uFEFF/, '') : next.value
    if (text.trim() === '') continue
    let parsed: unknown
    try {
      parsed = JSON.parse(text)
    } catch {
      // What the first line is decides the table: if it cannot be read, nothing is loaded.
      throw new UsageError(`line ${number}: not JSON; nothing was loaded`)
    }
    first = { number, parsed, text }
    break
  }
  let header: DumpHeader | undefined
  if (first !== undefined && isHeader(first.parsed)) {
    header = first.parsed
    if (header.format !== 1) throw new UsageError(`line ${first.number}: a dump of format ${JSON.stringify(header.format)}; this tool reads format 1`)
    if (typeof header.codec !== 'string' || header.codec === '' || typeof header.table !== 'string') {
      throw new UsageError(`line ${first.number}: the dump header needs "table" and "codec" strings`)
    }
    first = undefined
  }
  const table = tableOption ?? header?.table ?? 'default'
  const db = await Database.open(file)
  try {
    const codec = tableCodec(db, table) ?? header?.codec ?? 'msgpack'
    // A table with another codec fails here (CodecMismatchError), before anything is written.
    const store = db.mapStore(table, { codec: bytesCodec(header?.codec ?? codec) })
    const encoder = readableCodec(codec)
    const bar = progress('loaded', false)
    const inFlight = new Set<Promise<void>>()
    let written = 0
    let refused = 0
    const refuse = (at: number, why: string): void => {
      refused++
      process.stderr.write(`kvstore: line ${at}: ${why}\n`)
    }
    const take = async (at: number, text: string, parsed: unknown): Promise<void> => {
      const entry = parseRecord(text, parsed, codec, encoder)
      if (typeof entry === 'string') return refuse(at, entry)
      const write = (async () => {
        try {
          const lock = await store.createAndLockEntry(entry.key, { allowExisting: true })
          lock.entry.value = entry.bytes
          lock.entry.metadata = entry.metadata
          await lock.commit()
          written++
          bar.tick()
        } catch (err) {
          refuse(at, err instanceof KvStoreError ? `${err.message} (${err.code})` : String(err))
        }
      })()
      inFlight.add(write)
      void write.finally(() => inFlight.delete(write))
      if (inFlight.size >= 256) await Promise.race(inFlight)
    }
    if (first !== undefined) await take(first.number, first.text, first.parsed)
    for (let next = await lines.next(); !next.done; next = await lines.next()) {
      number++
      if (next.value.trim() === '') continue
      let parsed: unknown
      try {
        parsed = JSON.parse(next.value)
      } catch {
        refuse(number, 'not JSON')
        continue
      }
      if (isHeader(parsed)) {
        refuse(number, 'a dump header is only taken on the first line')
        continue
      }
      await take(number, next.value, parsed)
    }
    await Promise.all(inFlight)
    bar.done()
    await out.line(`loaded ${written} ${written === 1 ? 'entry' : 'entries'} into table '${table}' of ${db.path}`)
    if (refused > 0) throw new IncompleteError(`${refused} ${refused === 1 ? 'line was' : 'lines were'} not loaded`)
  } finally {
    await db.close()
  }
}

/** A file that must exist, opened read-write; or a cluster. */
async function openExisting(location: string): Promise<Database> {
  if (!isClusterUrl(location) && !existsSync(location)) throw new UsageError(`no such file: ${location}`)
  return Database.open(location)
}

/** Whether two locations name one file (a cluster is compared once open). */
function sameFile(a: string, b: string): boolean {
  if (isClusterUrl(a) || isClusterUrl(b) || !existsSync(a) || !existsSync(b)) return false
  return realpathSync(a) === realpathSync(b)
}

const plural = (n: number, one: string, many: string): string => `${n.toLocaleString('en-US')} ${n === 1 ? one : many}`

/**
 * Copies every map of `from` into `to` through the public API: each map opened on both sides
 * with a codec that passes bytes through under the source codec's name, so the destination
 * records that codec and each entry's value bytes and metadata are written as stored.
 */
async function copy(from: string, to: string, overwrite: boolean, out: Output): Promise<void> {
  if (sameFile(from, to)) throw new UsageError(`'${from}' and '${to}' are the same store`)
  const source = await openToRead(from)
  try {
    const dest = await Database.open(to)
    try {
      if (dest.path === source.path) throw new UsageError(`'${from}' and '${to}' are the same store`)
      const maps = source.tables()
      // Everything is checked before anything is written.
      const there = new Map(dest.tables().map((t) => [t.name, t.codec]))
      const refusals: string[] = []
      let nonEmpty = false
      for (const { name, codec } of maps) {
        const codecThere = there.get(name)
        if (codecThere === undefined) continue
        if (codecThere !== codec) {
          refusals.push(`map '${name}' is ${codec} in ${source.path} but ${codecThere} in ${dest.path}`)
        } else if (!overwrite) {
          const count = dest.mapStore(name, { codec: bytesCodec(codec) }).count()
          if (count > 0) nonEmpty = true
          if (count > 0) refusals.push(`map '${name}' already has ${plural(count, 'entry', 'entries')} in ${dest.path}`)
        }
      }
      if (refusals.length > 0) {
        const hint = nonEmpty ? ' (--overwrite replaces the keys it copies)' : ''
        throw new Error(`${refusals.join('; ')}; nothing was copied${hint}`)
      }
      let copied = 0
      let failed = 0
      for (const { name, codec } of maps) {
        const counts = await copyMap(source, dest, name, codec, overwrite)
        copied += counts.copied
        failed += counts.failed
      }
      await out.line(`copied ${plural(copied, 'entry', 'entries')} in ${plural(maps.length, 'map', 'maps')} from ${source.path} to ${dest.path}`)
      if (failed > 0) throw new IncompleteError(`${plural(failed, 'entry was', 'entries were')} not copied`)
    } finally {
      await dest.close()
    }
  } finally {
    await source.close()
  }
}

/** One map's entries, as of one snapshot of the source, 256 writes in flight. */
async function copyMap(source: Database, dest: Database, name: string, codec: string, overwrite: boolean): Promise<{ copied: number; failed: number }> {
  const from = source.mapStore(name, { codec: bytesCodec(codec) })
  // Opening the map records its codec in the destination, also for a map without entries.
  const to = dest.mapStore(name, { codec: bytesCodec(codec) })
  const bar = progress(`copied map '${name}':`)
  const inFlight = new Set<Promise<void>>()
  let copied = 0
  let failed = 0
  const report = (key: string, err: unknown): void => {
    failed++
    const why = err instanceof KvStoreError ? `${err.message} (${err.code})` : err instanceof Error ? err.message : String(err)
    process.stderr.write(`kvstore: map '${name}', entry '${key}' not copied: ${why}\n`)
  }
  for (const item of from.getEntries()) {
    let bytes: Uint8Array
    let metadata: Metadata
    try {
      bytes = item.value
      metadata = item.metadata
    } catch (err) {
      // A damaged envelope: neither its metadata nor its value can be told apart.
      report(item.key, err)
      continue
    }
    const key = item.key
    const write = (async () => {
      try {
        // Without --overwrite the map was empty: a key that exists now was written meanwhile,
        // and is not replaced.
        const lock = await to.createAndLockEntry(key, { allowExisting: overwrite })
        lock.entry.value = bytes
        lock.entry.metadata = metadata
        await lock.commit()
        copied++
        bar.tick()
      } catch (err) {
        report(key, err)
      }
    })()
    inFlight.add(write)
    void write.finally(() => inFlight.delete(write))
    if (inFlight.size >= 256) await Promise.race(inFlight)
  }
  await Promise.all(inFlight)
  bar.done()
  return { copied, failed }
}

/** A record line checked and encoded, or why it cannot be taken. */
function parseRecord(text: string, parsed: unknown, codec: string, encoder: Codec<unknown> | undefined): { key: string; bytes: Uint8Array; metadata: Metadata } | string {
  if (parsed === undefined) return `not JSON: ${text.length > 60 ? `${text.slice(0, 60)}…` : text}`
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) return 'not a JSON object { key, value, metadata }'
  const line = parsed as { key?: unknown; value?: unknown; metadata?: unknown; bytes?: unknown }
  if (!('key' in line)) return 'no "key" (load writes the keys it is given; it makes no new keys)'
  if (typeof line.key !== 'string') return `"key" must be a string, got ${line.key === null ? 'null' : typeof line.key}`
  if (line.key === '') return '"key" must not be empty'
  if (!line.key.isWellFormed()) return `"key" ${JSON.stringify(line.key)} is not well-formed Unicode`
  const metadata = line.metadata ?? {}
  try {
    checkMetadata(line.key, metadata)
  } catch (err) {
    return (err as Error).message
  }
  if (line.bytes !== undefined) {
    if (typeof line.bytes !== 'string' || !BASE64.test(line.bytes)) return '"bytes" must be the stored value in base64'
    return { key: line.key, bytes: Buffer.from(line.bytes, 'base64'), metadata }
  }
  if (encoder === undefined) return `the table's codec is '${codec}': give the stored value as base64 in "bytes"`
  try {
    return { key: line.key, bytes: encoder.encode(line.value), metadata }
  } catch (err) {
    return `the ${codec} codec cannot encode "value": ${(err as Error).message}`
  }
}

/** The options and positionals; an unknown option or a missing value is a usage error (exit 2). */
function parseArguments(argv: string[]) {
  try {
    return parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        table: { type: 'string' },
        prefix: { type: 'string' },
        limit: { type: 'string' },
        overwrite: { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
    })
  } catch (err) {
    throw new UsageError(err instanceof Error ? err.message : String(err))
  }
}

async function main(argv: string[], out: Output): Promise<void> {
  checkArgumentBytes(argv.length)
  const { values, positionals } = parseArguments(argv)
  const [command, file, ...rest] = positionals
  if (command === undefined || !(command in HELP)) {
    if (values.help || command === undefined) {
      process.stdout.write(`${USAGE}\n`)
      return
    }
    throw new UsageError(`unknown command '${command}'\n${USAGE}`)
  }
  if (values.help) {
    process.stdout.write(`${HELP[command]}\n`)
    return
  }
  if (file === undefined) throw new UsageError(HELP[command])
  if (command === 'load') return load(file, values.table, out)
  if (command === 'copy') {
    const to = rest[0]
    if (to === undefined || rest.length > 1) throw new UsageError(HELP.copy)
    for (const option of ['table', 'prefix', 'limit'] as const) {
      if (values[option] !== undefined) throw new UsageError(`copy copies every map: --${option} is not taken\n${HELP.copy}`)
    }
    return copy(file, to, values.overwrite === true, out)
  }
  if (values.overwrite !== undefined) throw new UsageError(`--overwrite is only for copy\n${HELP[command]}`)
  // Every command but compact only reads: a file opens read-only and nothing in it changes (an
  // empty file is refused as corrupt; a read-only file or mount works).
  const table = values.table ?? 'default'
  const db = command === 'compact' ? await openExisting(file) : await openToRead(file)
  try {
    switch (command) {
      case 'tables':
        for (const t of db.tables()) if (!(await out.line(`${t.name}\t${t.codec}`))) break
        break
      case 'stats':
        await out.line(JSON.stringify(openTable(db, table).stats(), null, 2))
        break
      case 'ls': {
        const limit = values.limit === undefined ? undefined : Number(values.limit)
        if (limit !== undefined && !(Number.isSafeInteger(limit) && limit >= 0)) {
          throw new UsageError(`--limit must be a whole number ≥ 0, got '${values.limit}'`)
        }
        for (const { key } of openTable(db, table).getEntries({ prefix: values.prefix, limit, keysOnly: true })) {
          if (!(await out.line(key))) break
        }
        break
      }
      case 'get': {
        const key = rest[0]
        if (key === undefined) throw new UsageError(HELP.get)
        const entry = openTable(db, table).getEntry(key)
        if (entry === undefined) throw new UsageError(`no entry '${key}' in table '${table}'`)
        await out.line(JSON.stringify(entry, readable))
        break
      }
      case 'dump':
        await dump(db, table, out)
        break
      case 'compact':
        await out.line((await db.compact()) ? 'compacted' : 'nothing to compact')
        break
      case 'backup': {
        const dest = rest[0]
        if (dest === undefined) throw new UsageError(HELP.backup)
        await db.backup(dest)
        await out.line(`backed up to ${dest}`)
        break
      }
    }
  } finally {
    await db.close()
  }
}

main(process.argv.slice(2), new Output()).catch((err: unknown) => {
  const message = err instanceof KvStoreError ? `${err.message} (${err.code})` : err instanceof Error ? err.message : String(err)
  process.stderr.write(`kvstore: ${message}\n`)
  process.exitCode = err instanceof UsageError ? 2 : 1
})
