// The `etcd3` npm client (1.1.2) doing the benchmark's jobs in its own idioms, values as JSON,
// everything under client.namespace(`${prefix}/`):
// - create: a create-if-absent transaction (if Create(key) == 0 then put);
// - read-modify-write, idiom 'lock': lock(`locks${key}`) around an awaited get + put. etcd3's
//   lock() is a try-lock (acquire() throws EtcdLockFailedError while another holder has the key),
//   so the caller retries at once; acquire() has already revoked its lease when it throws;
// - read-modify-write, idiom 'stm': stm().transact(get + put), optimistic; a conflict past the
//   STM's own retries (STMConflictError) is retried by the caller;
// - get: an awaited get (linearizable, the client's default); scan: one prefix getAll; delete.
// `conn` is { endpoints: ['127.0.0.1:P', ...], prefix }.
import { Etcd3, EtcdLockFailedError, STMConflictError } from 'etcd3'

export const name = 'etcd3'

export async function open(conn, { idiom = 'plain' } = {}) {
  const client = new Etcd3({ hosts: conn.endpoints.map((e) => `http://${e}`) })
  const ns = client.namespace(`${conn.prefix}/`)
  // Retries of the read-modify-write idioms: failed try-locks, or STM attempts that conflicted.
  let retries = 0

  const rmwLock = async (key) => {
    for (;;) {
      const lock = ns.lock(`locks${key}`)
      try {
        await lock.acquire()
      } catch (error) {
        if (!(error instanceof EtcdLockFailedError)) throw error
        retries++
        continue
      }
      try {
        const value = await ns.get(key).json()
        value.attempts++
        await ns.put(key).value(JSON.stringify(value))
        return
      } finally {
        await lock.release()
      }
    }
  }

  const rmwStm = async (key) => {
    let attempts = 0
    for (;;) {
      try {
        await ns.stm().transact(async (tx) => {
          attempts++
          const value = JSON.parse(await tx.get(key).string())
          value.attempts++
          await tx.put(key).value(JSON.stringify(value))
        })
        retries += attempts - 1
        return
      } catch (error) {
        if (!(error instanceof STMConflictError)) throw error
      }
    }
  }

  const rmw = idiom === 'lock' ? rmwLock : idiom === 'stm' ? rmwStm : null
  return {
    name: idiom === 'plain' ? 'etcd3' : `etcd3-${idiom}`,
    idiom,
    async create(key, value) {
      const { succeeded } = await ns.if(key, 'Create', '==', 0).then(ns.put(key).value(JSON.stringify(value))).commit()
      if (!succeeded) throw new Error(`${key} exists`)
    },
    rmw:
      rmw ??
      (() => {
        throw new Error('etcd3 read-modify-write needs idiom lock or stm')
      }),
    /** Asynchronous: one round trip. */
    getAsync: (key) => ns.get(key).json(),
    async scan() {
      const all = await ns.getAll().prefix('/data/').json()
      let n = 0
      for (const value of Object.values(all)) if (value.id >= 0) n++
      return n
    },
    delete: (key) => ns.delete().key(key),
    async values() {
      return Object.values(await ns.getAll().prefix('/data/').json())
    },
    retries: () => retries,
    close: () => client.close(),
  }
}
