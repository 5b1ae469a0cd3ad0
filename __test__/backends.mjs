// The contract specs run against both storages: a redb file and an etcd cluster (one real
// member on loopback, started once per spec file on first use and stopped when it exits).
//
//   forEachBackend(({ test, tempStore, location, twoHandles }) => {
//     test('create twice fails', async (t) => { const store = await tempStore(t) ... })
//   })
//
// registers each test twice, titled `[file] …` and `[etcd] …`. `location(t, name)` is a fresh
// file path or cluster URL (a prefix of its own) for tests that open stores themselves.
import avaTest from 'ava'
import { join } from 'node:path'
import { startCluster } from './etcd-cluster.mjs'
import { tempDir } from './helpers.mjs'
import { MapStore } from '../dist/index.js'

let cluster
let prefixes = 0

/** The spec file's cluster, started on first use and stopped after its last test. */
async function sharedCluster() {
  cluster ??= startCluster({ members: 1 })
  return cluster
}

avaTest.after.always(async () => {
  if (cluster) await (await cluster).stop()
})

const file = {
  name: 'file',
  async location(t, name = 'store.redb') {
    return join(tempDir(t), name)
  },
}

const etcd = {
  name: 'etcd',
  async location(_t, name = 'store') {
    const running = await sharedCluster()
    prefixes++
    return running.url(`/t${process.pid}-${prefixes}-${name.replace(/[^a-z0-9]/gi, '')}`)
  },
}

export const backends = [file, etcd]

/** Registers `body`'s tests once per backend. */
export function forEachBackend(body) {
  for (const backend of backends) {
    const test = (title, fn) => avaTest(`[${backend.name}] ${title}`, fn)
    test.serial = (title, fn) => avaTest.serial(`[${backend.name}] ${title}`, fn)
    test.failing = (title, fn) => avaTest.failing(`[${backend.name}] ${title}`, fn)
    const location = (t, name) => backend.location(t, name)
    /** A fresh store of this backend, closed when the test ends. */
    const tempStore = async (t, options = {}) => {
      const store = await MapStore.open(await location(t), options)
      t.teardown(() => store.close())
      return store
    }
    /** Two handles on one new store, both closed when the test ends. */
    const twoHandles = async (t, name) => {
      const where = await location(t, name)
      const a = await MapStore.open(where)
      const b = await MapStore.open(where)
      t.teardown(async () => {
        await a.close()
        await b.close()
      })
      return [a, b]
    }
    body({ backend: backend.name, test, location, tempStore, twoHandles })
  }
}
