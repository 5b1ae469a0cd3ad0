import test from 'ava'
import { execFileSync } from 'node:child_process'
import { join } from 'node:path'
import { kv, put, tempDir } from './helpers.mjs'

// The Rust half lives in crates/core/examples/interop.rs.
const root = new URL('..', import.meta.url).pathname
const rust = (mode, path) =>
  execFileSync('cargo', ['run', '--quiet', '--release', '-p', 'kvstore-core', '--example', 'interop', '--', mode, path], { cwd: root, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] })

test('a file written from Node is read from Rust, and the other way round', async (t) => {
  const path = join(tempDir(t), 'interop.redb')
  const fromNode = [
    { key: 'node-0', value: { id: 0, path: '/data/n0', tags: ['node', 'é'], nested: { ok: true, n: null } }, metadata: { writer: 'node' } },
    { key: 'node-1', value: [1, -2, 3.5, 'text', false], metadata: {} },
    { key: 'node-2', value: 'just a string', metadata: { a: '1', b: '2' } },
  ]
  const store = await kv.MapStore.open(path, { table: 'interop' })
  for (const { key, value, metadata } of fromNode) await put(store, key, value, metadata)
  await store.close()

  const readByRust = rust('read', path).trim().split('\n').map((line) => JSON.parse(line))
  t.deepEqual(readByRust, fromNode)

  rust('write', path)
  const again = await kv.MapStore.open(path, { table: 'interop' })
  t.deepEqual(again.getEntry('rust-1'), {
    key: 'rust-1',
    value: { id: 1, path: '/data/r1', tags: ['rust', 'n1'], done: false, ratio: 0.25 },
    metadata: { writer: 'rust' },
  })
  t.is(again.count({ prefix: 'rust-' }), 3)
  t.deepEqual(again.getEntry('node-0'), fromNode[0])
  await again.close()
})
