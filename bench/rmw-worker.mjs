// One of the workers of workers-rmw: opens the same store and runs its share of RMWs.
import { workerData } from 'node:worker_threads'
import { keyOf, rng } from './data.mjs'

const { storeModule, dir, durable, seed, count, hot } = workerData
const { open } = await import(storeModule)
const store = await open(dir, { durable })
const random = rng(seed)
let next = 0
await Promise.all(
  Array.from({ length: 16 }, async () => {
    while (next < count) {
      next++
      await store.rmw(keyOf(Math.floor(random() * hot)))
    }
  }),
)
await store.close()
