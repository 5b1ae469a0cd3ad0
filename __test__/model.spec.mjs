import test from 'ava'
import fc from 'fast-check'
import { join } from 'node:path'
import { kv, tempDir } from './helpers.mjs'

// Model-based test: random programs of creates, locked updates with every commit option,
// releases, deletes, reads, walks and reopens, run by several concurrent actors, compared step
// by step with a Map. Lock requests are issued synchronously when an operation starts and are
// served first come, first served, so the writes of a group of concurrent operations must
// behave exactly as if they ran one after another in the order they started; reads take no
// lock and run at once, so they see the state from before the group.
// KV_MODEL_RUNS / KV_MODEL_SEED replay or lengthen it (npm run test:long).
const RUNS = Number(process.env.KV_MODEL_RUNS ?? 100)
const SEED = Number(process.env.KV_MODEL_SEED ?? 20261126)

const KEYS = ['a', 'b', '/x/1', '/x/2', '/x/10', 'é']
// Not well-formed Unicode (issue 13): each would become U+FFFD in UTF-8 and merge with the others,
// so every call refuses them with IllegalKeyError.
const ILLEGAL = ['\ud800', '\udc00', '/x/\ud83d']
const key = fc.oneof({ weight: 6, arbitrary: fc.constantFrom(...KEYS) }, { weight: 1, arbitrary: fc.constantFrom(...ILLEGAL) })
const value = fc.oneof(fc.integer({ min: -5, max: 5 }), fc.record({ n: fc.nat(9), tag: fc.constantFrom('p', 'q') }))
const metadata = fc.constantFrom({}, { owner: 'u1' }, { path: '/data/x', n: '2' })
const op = fc.oneof(
  fc.record({ kind: fc.constant('create'), key, value, metadata, allowExisting: fc.boolean() }),
  fc.record({ kind: fc.constant('update'), key, value, how: fc.constantFrom('commit', 'updateOnly', 'release', 'delete', 'hold') }),
  fc.record({ kind: fc.constant('deleteEntry'), key }),
  fc.record({ kind: fc.constant('get'), key }),
  fc.record({ kind: fc.constant('walk'), prefix: fc.constantFrom(undefined, '/x/', '/x/\udc00'), reverse: fc.boolean() }),
)
const step = fc.oneof({ weight: 9, arbitrary: fc.array(op, { minLength: 1, maxLength: 4 }) }, { weight: 1, arbitrary: fc.constant('reopen') })

const byteOrder = (a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b))

/**
 * What the model says an operation yields, applying it to `model` (reads use `before`).
 * `deletedBehind` tracks, per key, whether the lock holder this operation queued behind in its
 * group deleted the entry: a getAndLockEntry waiting there gets EntryDeletedError.
 */
function expect(model, before, deletedBehind, o) {
  if (ILLEGAL.includes(o.key) || (o.prefix !== undefined && !o.prefix.isWellFormed())) return { error: 'ERR_ILLEGAL_KEY' }
  const has = model.has(o.key)
  switch (o.kind) {
    case 'create':
      deletedBehind.set(o.key, false)
      if (has && !o.allowExisting) return { error: 'ERR_ENTRY_EXISTS' }
      if (!has) model.set(o.key, { value: o.value, metadata: o.metadata })
      return { existed: has }
    case 'update':
      if (!has) return { error: deletedBehind.get(o.key) ? 'ERR_ENTRY_DELETED' : 'ERR_ENTRY_NOT_FOUND' }
      deletedBehind.set(o.key, o.how === 'delete')
      if (o.how === 'delete') model.delete(o.key)
      else if (o.how !== 'release') model.set(o.key, { value: o.value, metadata: model.get(o.key).metadata })
      return { ok: true }
    case 'deleteEntry':
      deletedBehind.set(o.key, has)
      model.delete(o.key)
      return { deleted: has }
    case 'get':
      return { entry: before.has(o.key) ? { key: o.key, ...before.get(o.key) } : undefined }
    case 'walk': {
      const keys = [...before.keys()].filter((k) => o.prefix === undefined || k.startsWith(o.prefix)).sort(byteOrder)
      if (o.reverse) keys.reverse()
      return { walk: keys.map((k) => ({ key: k, ...before.get(k) })) }
    }
  }
}

/** Runs an operation on the store; resolves to what it yielded. */
async function perform(store, o) {
  try {
    switch (o.kind) {
      case 'create': {
        const lock = await store.createAndLockEntry(o.key, { value: o.value, metadata: o.metadata, allowExisting: o.allowExisting })
        await lock.commit()
        return { existed: lock.existed }
      }
      case 'update': {
        const lock = await store.getAndLockEntry(o.key)
        if (o.how === 'release') {
          lock.entry.value = 'discarded'
          lock.release()
          return { ok: true }
        }
        if (o.how === 'delete') {
          await lock.commit({ delete: true })
          return { ok: true }
        }
        lock.entry.value = o.value
        if (o.how === 'updateOnly') {
          await lock.commit({ updateOnly: true })
          await lock.commit()
        } else {
          await lock.commit({ holdLockOnFailure: o.how === 'hold' })
        }
        return { ok: true }
      }
      case 'deleteEntry':
        return { deleted: await store.deleteEntry(o.key) }
      case 'get':
        return { entry: store.getEntry(o.key) }
      case 'walk':
        return { walk: [...store.getEntries({ prefix: o.prefix, reverse: o.reverse })].map(({ key, value, metadata }) => ({ key, value, metadata })) }
    }
  } catch (err) {
    return { error: err.code ?? String(err) }
  }
}

test('random concurrent programs behave like a Map, across reopens', async (t) => {
  let runs = 0
  let steps = 0
  await fc.assert(
    fc.asyncProperty(fc.array(step, { minLength: 1, maxLength: 25 }), async (program) => {
      runs++
      const path = join(tempDir(t), `model-${runs}.redb`)
      let store = await kv.MapStore.open(path, { durability: 'none' })
      const model = new Map()
      try {
        for (const s of program) {
          steps++
          if (s === 'reopen') {
            await store.close()
            store = await kv.MapStore.open(path, { durability: 'none' })
          } else {
            const before = new Map(model)
            const deletedBehind = new Map()
            const expected = s.map((o) => expect(model, before, deletedBehind, o))
            const actual = await Promise.all(s.map((o) => perform(store, o)))
            if (JSON.stringify(actual) !== JSON.stringify(expected)) {
              throw new Error(`step ${JSON.stringify(s)}\n  expected ${JSON.stringify(expected)}\n  actual   ${JSON.stringify(actual)}`)
            }
          }
          const stats = store.stats()
          if (stats.locksHeld !== 0 || stats.locksWaiting !== 0) throw new Error(`locks left behind: ${JSON.stringify(stats)}`)
          if (stats.entries !== model.size) throw new Error(`${stats.entries} entries, model has ${model.size}`)
        }
      } finally {
        await store.close()
      }
    }),
    { numRuns: RUNS, seed: SEED },
  )
  t.log(`${runs} programs, ${steps} steps, seed ${SEED}`)
  t.true(runs >= RUNS)
})
