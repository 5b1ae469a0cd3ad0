import test from 'ava'
import { execFile } from 'node:child_process'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { kv, put, tempDir } from './helpers.mjs'

const run = promisify(execFile)
const opener = new URL('./fixtures/open-store.mjs', import.meta.url).pathname

test('a second process opening the open file fails at once with DatabaseLockedError naming the path', async (t) => {
  const path = join(tempDir(t), 'locked.redb')
  const store = await kv.MapStore.open(path)
  await put(store, 'k', 'v')
  const started = process.hrtime.bigint()
  const { stdout } = await run(process.execPath, [opener, path])
  const result = JSON.parse(stdout)
  t.log(`refused after ${Number(process.hrtime.bigint() - started) / 1e6} ms (including process start)`)
  t.false(result.opened)
  t.is(result.code, 'ERR_DATABASE_LOCKED')
  t.is(result.name, 'DatabaseLockedError')
  t.true(result.message.includes(path))
  t.is(store.getEntry('k').value, 'v', 'nothing was damaged')
  await store.close()
  const after = JSON.parse((await run(process.execPath, [opener, path])).stdout)
  t.true(after.opened, 'once closed here, another process may open it')
})
