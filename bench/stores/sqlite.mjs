// better-sqlite3 (WAL; synchronous=FULL when durable, OFF when not); RMW in BEGIN IMMEDIATE.
import { join } from 'node:path'
import Database from 'better-sqlite3'
import { Packr } from 'msgpackr'

export const name = 'sqlite'
const packr = new Packr({ useRecords: false })

export async function open(dir, { durable }) {
  const db = new Database(join(dir, 'bench.sqlite'))
  db.pragma('journal_mode = WAL')
  db.pragma(`synchronous = ${durable ? 'FULL' : 'OFF'}`)
  db.pragma('busy_timeout = 60000')
  db.exec('CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB) WITHOUT ROWID')
  const insert = db.prepare('INSERT INTO kv (key, value) VALUES (?, ?)')
  const select = db.prepare('SELECT value FROM kv WHERE key = ?')
  const update = db.prepare('UPDATE kv SET value = ? WHERE key = ?')
  const remove = db.prepare('DELETE FROM kv WHERE key = ?')
  const all = db.prepare('SELECT key, value FROM kv ORDER BY key')
  const create = db.transaction((key, value) => insert.run(key, packr.pack(value)))
  const rmw = db.transaction((key) => {
    const value = packr.unpack(select.get(key).value)
    value.attempts++
    update.run(packr.pack(value), key)
  })
  return {
    create: async (key, value) => create.immediate(key, value),
    rmw: async (key) => rmw.immediate(key),
    get: (key) => {
      const row = select.get(key)
      return row && packr.unpack(row.value)
    },
    scan() {
      let n = 0
      for (const row of all.iterate()) if (packr.unpack(row.value).id >= 0) n++
      return n
    },
    delete: async (key) => remove.run(key),
    close: async () => db.close(),
  }
}
