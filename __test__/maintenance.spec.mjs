import test from 'ava'
import { join } from 'node:path'
import { existsSync, readdirSync } from 'node:fs'
import { kv, put, tempDir, tempStore } from './helpers.mjs'

test('backup while commits keep flowing gives a copy that opens and matches one snapshot', async (t) => {
  const dir = tempDir(t)
  const store = await kv.MapStore.open(join(dir, 'live.redb'), { table: 'jobs' })
  t.teardown(() => store.close())
  for (let i = 0; i < 500; i++) await put(store, `base-${String(i).padStart(4, '0')}`, { i }, { n: String(i) })
  let writing = true
  let written = 0
  const writer = (async () => {
    while (writing) {
      const { commit } = await store.createAndLockEntry(`more-${String(written).padStart(6, '0')}`, { value: written })
      await commit()
      written++
    }
  })()
  const dest = join(dir, 'copy.redb')
  await store.backup(dest)
  writing = false
  await writer
  t.true(written > 0)
  await t.throwsAsync(store.backup(dest), { instanceOf: kv.InvalidArgumentError }, 'never overwrites')

  const copy = await kv.MapStore.open(dest, { table: 'jobs' })
  t.teardown(() => copy.close())
  t.is(copy.count({ prefix: 'base-' }), 500)
  t.deepEqual(copy.getEntry('base-0042'), { key: 'base-0042', value: { i: 42 }, metadata: { n: '42' } })
  // Commits land in order, so one snapshot holds a prefix of the concurrent ones.
  const more = copy.getEntries({ prefix: 'more-' }).toArray().map((e) => e.value)
  t.deepEqual(more, Array.from({ length: more.length }, (_, i) => i))
  t.true(more.length <= written)
})

test('compact reclaims space, refuses while a walk is open, and the store works after', async (t) => {
  const store = await tempStore(t, { codec: kv.codecs.raw })
  const big = Buffer.alloc(64 * 1024, 3)
  for (let i = 0; i < 100; i++) await put(store, `k${i}`, big)
  for (let i = 0; i < 100; i++) await store.deleteEntry(`k${i}`)
  // More entries than a walk's first batch, so the walk below still holds its snapshot.
  for (let i = 0; i < 100; i++) await put(store, `keep-${String(i).padStart(3, '0')}`, Buffer.from('k'))
  const range = store.getEntries()
  t.is(range[Symbol.iterator]().next().value.key, 'keep-000')
  await t.throwsAsync(store.compact(), { instanceOf: kv.InvalidArgumentError })
  range[Symbol.dispose]()
  const before = store.stats().fileBytes
  t.true(await store.compact())
  t.true(store.stats().fileBytes < before)
  await put(store, 'after', Buffer.from('ok'))
  t.deepEqual(store.getEntry('after').value, Buffer.from('ok'))
})

test('tables() lists every map with its codec', async (t) => {
  const db = await kv.Database.open(join(tempDir(t), 'tables.redb'))
  t.teardown(() => db.close())
  db.mapStore('jobs')
  db.mapStore('paths', { codec: kv.codecs.json })
  t.deepEqual(db.tables(), [
    { name: 'jobs', codec: 'msgpack' },
    { name: 'paths', codec: 'json' },
  ])
})

test('issue: a backup in flight when the store closes settles, whole or refused, and the file reopens at once', async (t) => {
  const dir = tempDir(t)
  const store = await kv.MapStore.open(join(dir, 'closing.redb'))
  for (let i = 0; i < 200; i++) await put(store, `k${i}`, { i })
  const backup = store.backup(join(dir, 'copy.redb'))
  await store.close()
  // close() ends a copy still under way: the file is free as soon as close() resolves.
  const again = await kv.MapStore.open(join(dir, 'closing.redb'))
  t.is(again.count(), 200)
  await again.close()
  const outcome = await backup.then(() => 'copied', (err) => err)
  if (outcome === 'copied') {
    const copy = await kv.MapStore.open(join(dir, 'copy.redb'))
    t.is(copy.count(), 200)
    await copy.close()
  } else {
    t.true(outcome instanceof kv.StoreClosedError, String(outcome))
    t.false(existsSync(join(dir, 'copy.redb')))
  }
  t.deepEqual(readdirSync(dir).filter((name) => name.includes('partial')), [])
})
