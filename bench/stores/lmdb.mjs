// lmdb-js, idiomatically: sync reads, writes batched per event-loop turn, RMW in transaction().
import { join } from 'node:path'
import { open as openLmdb } from 'lmdb'

export const name = 'lmdb'

export async function open(dir, { durable }) {
  const db = openLmdb({ path: join(dir, 'bench.lmdb'), noSync: !durable, compression: false })
  return {
    create: (key, value) =>
      db.transaction(() => {
        if (db.doesExist(key)) throw new Error(`${key} exists`)
        db.put(key, value)
      }),
    rmw: (key) =>
      db.transaction(() => {
        const value = db.get(key)
        value.attempts++
        db.put(key, value)
      }),
    get: (key) => db.get(key),
    scan() {
      let n = 0
      for (const { value } of db.getRange()) if (value.id >= 0) n++
      return n
    },
    delete: (key) => db.remove(key),
    close: () => db.close(),
  }
}
