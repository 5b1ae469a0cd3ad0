// kvstore over etcd, through the same public API as on a file: createAndLockEntry /
// getAndLockEntry + commit, getEntry / getEntries from the local replica, deleteEntry.
// `conn` is { endpoints: ['127.0.0.1:P', ...], prefix }: the store lives under etcd://…/prefix.
import { MapStore } from '../../dist/index.js'

export const name = 'kvstore'

export const urlOf = ({ endpoints, prefix }) => `etcd://${endpoints.join(',')}/${prefix}`

export async function open(conn) {
  const store = await MapStore.open(urlOf(conn), { table: 'jobs' })
  const entries = () => {
    const values = []
    for (const item of store.getEntries()) values.push(item.value)
    return values
  }
  return {
    name,
    idiom: 'locks + fenced group commit, reads from the replica',
    async create(key, value) {
      const { commit } = await store.createAndLockEntry(key, { value })
      await commit()
    },
    async rmw(key) {
      const lock = await store.getAndLockEntry(key)
      lock.entry.value.attempts++
      await lock.commit()
    },
    /** Synchronous: the local replica. */
    get: (key) => store.getEntry(key)?.value,
    scan() {
      let n = 0
      for (const item of store.getEntries()) if (item.value.id >= 0) n++
      return n
    },
    delete: (key) => store.deleteEntry(key),
    /** Every value under the map, for the checks (after sync(): other processes' commits too). */
    async values() {
      await store.sync()
      return entries()
    },
    stats: () => store.stats(),
    close: () => store.close(),
  }
}
