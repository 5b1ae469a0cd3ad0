#!/usr/bin/env node
// kvstore <command> <file> — look inside a store from the shell. Values are shown as JSON; a
// table with a codec this tool does not know is shown (and loaded) as base64 of its bytes.
import { existsSync } from 'node:fs'
import { createInterface } from 'node:readline'
import { parseArgs } from 'node:util'
import { codecs, type Codec } from './codecs'
import { Database } from './database'
import { KvStoreError } from './errors'
import type { MapStore } from './map-store'

const HELP: Record<string, string> = {
  stats: 'kvstore stats <file> [--table name]\n  Entries, file size, cache, locks and commit counts, as JSON.',
  ls: 'kvstore ls <file> [--table name] [--prefix p] [--limit n]\n  One key per line, in key order.',
  get: 'kvstore get <file> <key> [--table name]\n  The entry as JSON: { key, value, metadata }.',
  dump: 'kvstore dump <file> [--table name]\n  Every entry as a JSON line { key, value, metadata } on stdout.',
  load: 'kvstore load <file> [--table name]\n  Reads JSON lines { key, value, metadata } from stdin; creates or replaces each entry.',
  tables: 'kvstore tables <file>\n  The maps in the file and their codecs.',
  compact: 'kvstore compact <file>\n  Reclaims free space in the file.',
  backup: 'kvstore backup <file> <dest>\n  Writes a consistent copy of the file to <dest>.',
}

const USAGE = `usage: kvstore <command> <file> [options]\n\ncommands:\n${Object.values(HELP)
  .map((h) => `  ${h.split('\n')[0]}`)
  .join('\n')}\n\nkvstore <command> --help for more.`

class UsageError extends Error {}

const bigints = (_key: string, value: unknown): unknown => (typeof value === 'bigint' ? value.toString() : value)

function base64Codec(name: string): Codec<string> {
  return { name, encode: (value) => Buffer.from(value, 'base64'), decode: (bytes) => bytes.toString('base64') }
}

function codecFor(name: string): Codec<unknown> {
  const known = (codecs as Record<string, Codec<unknown>>)[name]
  return known ?? (base64Codec(name) as Codec<unknown>)
}

function openTable(db: Database, table: string, createIfMissing = false): MapStore<unknown> {
  const found = db.tables().find((t) => t.name === table)
  if (!found && !createIfMissing) {
    const names = db.tables().map((t) => t.name)
    throw new UsageError(`no table '${table}' in ${db.path} (tables: ${names.length ? names.join(', ') : 'none'})`)
  }
  return db.mapStore(table, { codec: codecFor(found?.codec ?? 'msgpack') })
}

function progress(label: string): { tick(): void; done(): void } {
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
      process.stderr.write(`\r${label} ${n.toLocaleString()} entries\n`)
    },
  }
}

async function main(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      table: { type: 'string', default: 'default' },
      prefix: { type: 'string' },
      limit: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  })
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
  if (!existsSync(file) && command !== 'load') throw new UsageError(`no such file: ${file}`)
  const db = await Database.open(file)
  try {
    const out = (line: string): boolean => process.stdout.write(`${line}\n`)
    switch (command) {
      case 'tables':
        for (const t of db.tables()) out(`${t.name}\t${t.codec}`)
        break
      case 'stats':
        out(JSON.stringify(openTable(db, values.table).stats(), null, 2))
        break
      case 'ls': {
        const limit = values.limit === undefined ? undefined : Number(values.limit)
        for (const { key } of openTable(db, values.table).getEntries({ prefix: values.prefix, limit, keysOnly: true })) out(key)
        break
      }
      case 'get': {
        const key = rest[0]
        if (key === undefined) throw new UsageError(HELP.get)
        const entry = openTable(db, values.table).getEntry(key)
        if (entry === undefined) throw new UsageError(`no entry '${key}' in table '${values.table}'`)
        out(JSON.stringify(entry, bigints))
        break
      }
      case 'dump': {
        const bar = progress('dumped')
        for (const item of openTable(db, values.table).getEntries()) {
          if (!out(JSON.stringify(item, bigints))) await new Promise((resolve) => process.stdout.once('drain', resolve))
          bar.tick()
        }
        bar.done()
        break
      }
      case 'load': {
        const store = openTable(db, values.table, true)
        const bar = progress('loaded')
        const inFlight = new Set<Promise<void>>()
        for await (const line of createInterface({ input: process.stdin })) {
          if (line.trim() === '') continue
          const { key, value, metadata = {} } = JSON.parse(line) as { key: string; value: unknown; metadata?: Record<string, string> }
          const write = (async () => {
            const lock = await store.createAndLockEntry(key, { allowExisting: true })
            lock.entry.value = value
            lock.entry.metadata = metadata
            await lock.commit()
            bar.tick()
          })()
          inFlight.add(write)
          write.finally(() => inFlight.delete(write)).catch(() => {})
          if (inFlight.size >= 256) await Promise.race(inFlight)
        }
        await Promise.all(inFlight)
        bar.done()
        break
      }
      case 'compact':
        out((await db.compact()) ? 'compacted' : 'nothing to compact')
        break
      case 'backup': {
        const dest = rest[0]
        if (dest === undefined) throw new UsageError(HELP.backup)
        await db.backup(dest)
        out(`backed up to ${dest}`)
        break
      }
    }
  } finally {
    await db.close()
  }
}

main(process.argv.slice(2)).catch((err: unknown) => {
  const message = err instanceof KvStoreError ? `${err.message} (${err.code})` : err instanceof Error ? err.message : String(err)
  process.stderr.write(`kvstore: ${message}\n`)
  process.exitCode = err instanceof UsageError ? 2 : 1
})
