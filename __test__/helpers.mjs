// Shared test helpers: fresh stores in temporary directories, and ways to wait on events.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { once } from 'node:events'

export * as kv from '../dist/index.js'
import { MapStore } from '../dist/index.js'

/** A temporary directory removed when the test ends. */
export function tempDir(t) {
  const dir = mkdtempSync(join(tmpdir(), 'kvstore-test-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

/** A fresh store, closed when the test ends. */
export async function tempStore(t, options = {}) {
  const store = await MapStore.temporary(options)
  t.teardown(() => store.close())
  return store
}

/** Resolves once the store reports at least `n` lock waiters (polls on the event loop, no sleeps). */
export async function waitersQueued(store, n) {
  while (store.stats().locksWaiting < n) await new Promise((resolve) => setImmediate(resolve))
}

/** Writes `value` under `key`, whether or not it exists. */
export async function put(store, key, value, metadata = {}) {
  const { entry, commit } = await store.createAndLockEntry(key, { allowExisting: true })
  entry.value = value
  entry.metadata = metadata
  await commit()
}

export async function exitOf(child) {
  const [code, signal] = await once(child, 'exit')
  return { code, signal }
}
