import test from 'ava'
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { kv, put, tempDir, tempStore, waitersQueued } from './helpers.mjs'

function capture() {
  const lines = { debug: [], info: [], warn: [], error: [] }
  const logger = Object.fromEntries(Object.keys(lines).map((level) => [level, (m) => lines[level].push(m)]))
  return { logger, lines }
}

test('a slow commit and a slow lock wait are logged past their thresholds', async (t) => {
  const { logger, lines } = capture()
  const store = await tempStore(t, { logger, slowCommitMs: 0, slowLockWaitMs: 0 })
  await put(store, 'k', 1)
  t.true(lines.warn.some((m) => /the commit of 'k' took/.test(m)))
  const holder = await store.getAndLockEntry('k')
  const waiting = store.getAndLockEntry('k')
  await waitersQueued(store, 1)
  holder.release()
  ;(await waiting).release()
  t.true(lines.warn.some((m) => /waited .* ms for the lock on 'k'/.test(m)))
})

test('opening a file left by a crash logs that redb repaired it', async (t) => {
  const path = join(tempDir(t), 'crashed.redb')
  const writer = new URL('./fixtures/crash-writer.mjs', import.meta.url).pathname
  const child = spawn(process.execPath, [writer, path, '0'], { stdio: ['ignore', 'pipe', 'inherit'] })
  const exited = once(child, 'exit')
  let acks = 0
  for await (const _line of createInterface({ input: child.stdout })) {
    if (++acks === 50) child.kill('SIGKILL')
  }
  await exited
  const { logger, lines } = capture()
  const store = await kv.MapStore.open(path, { table: 'crash', logger })
  t.true(store.count() > 0)
  await store.close()
  t.is(lines.warn.length, 1)
  t.regex(lines.warn[0], /was not closed cleanly; redb repaired it in [\d.]+ ms/)

  const clean = capture()
  const again = await kv.MapStore.open(path, { table: 'crash', logger: clean.logger })
  await again.close()
  t.deepEqual(clean.lines.warn, [], 'a cleanly closed file needs no repair')
})
