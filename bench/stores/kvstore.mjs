// kvstore through its public API: createAndLockEntry / getAndLockEntry + commit.
import { join } from 'node:path'
import { MapStore } from '../../dist/index.js'

export const name = 'kvstore'

export async function open(dir, { durable }) {
  // The default cache: a budget of 8 MiB (about 30 000 of these records).
  const store = await MapStore.open(join(dir, 'bench.redb'), { table: 'jobs', durability: durable ? 'immediate' : 'none' })
  return {
    async create(key, value) {
      const { commit } = await store.createAndLockEntry(key, { value })
      await commit()
    },
    async rmw(key) {
      const lock = await store.getAndLockEntry(key)
      lock.entry.value.attempts++
      await lock.commit()
    },
    get: (key) => store.getEntry(key)?.value,
    scan() {
      let n = 0
      for (const item of store.getEntries()) if (item.value.id >= 0) n++
      return n
    },
    delete: (key) => store.deleteEntry(key),
    stats: () => store.stats(),
    close: () => store.close(),
  }
}

export const workerModule = new URL('./kvstore.mjs', import.meta.url).href
