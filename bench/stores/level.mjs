// classic-level (LevelDB): sync:true when durable; RMW behind a per-key promise chain, which is
// what a user has to write by hand to make read-modify-write exclusive per key.
import { join } from 'node:path'
import { ClassicLevel } from 'classic-level'
import { Packr } from 'msgpackr'

export const name = 'level'
const packr = new Packr({ useRecords: false })

export async function open(dir, { durable }) {
  const db = new ClassicLevel(join(dir, 'bench.level'), { keyEncoding: 'utf8', valueEncoding: 'buffer' })
  await db.open()
  const chains = new Map()
  const exclusive = (key, fn) => {
    const prev = chains.get(key) ?? Promise.resolve()
    const next = prev.then(fn, fn)
    chains.set(key, next)
    next.finally(() => {
      if (chains.get(key) === next) chains.delete(key)
    })
    return next
  }
  const options = { sync: durable }
  return {
    create: (key, value) =>
      exclusive(key, async () => {
        if ((await db.get(key)) !== undefined) throw new Error(`${key} exists`)
        await db.put(key, packr.pack(value), options)
      }),
    rmw: (key) =>
      exclusive(key, async () => {
        const value = packr.unpack(await db.get(key))
        value.attempts++
        await db.put(key, packr.pack(value), options)
      }),
    get: () => {
      throw new Error('classic-level has no synchronous get')
    },
    getAsync: async (key) => packr.unpack(await db.get(key)),
    async scan() {
      let n = 0
      for await (const [, value] of db.iterator()) if (packr.unpack(value).id >= 0) n++
      return n
    },
    delete: (key) => exclusive(key, () => db.del(key, options)),
    close: () => db.close(),
  }
}
