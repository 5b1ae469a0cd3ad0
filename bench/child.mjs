// Runs one (store, workload) in a fresh process and prints one JSON line.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { scale, workloads } from './workloads.mjs'

const [storeName, workload, durableFlag, nText] = process.argv.slice(2)
const durable = durableFlag === 'durable'
const n = Number(nText)
const storeModule = new URL(`./stores/${storeName}.mjs`, import.meta.url).href
const { open } = await import(storeModule)
const dir = mkdtempSync(join(tmpdir(), `kvbench-${storeName}-`))
let peakRss = 0
const sampler = setInterval(() => {
  peakRss = Math.max(peakRss, process.memoryUsage.rss())
}, 50)
try {
  const store = await open(dir, { durable })
  let result
  if (workload === 'scale') {
    result = await scale(store, n)
  } else {
    const context = { workerSafe: storeName !== 'level', workerData: { storeModule, dir, durable } }
    result = await workloads[workload](store, n, context)
  }
  await store.close()
  peakRss = Math.max(peakRss, process.memoryUsage.rss())
  process.stdout.write(JSON.stringify({ store: storeName, workload, durable, n, ...result, peakRssMB: Math.round(peakRss / 2 ** 20) }) + '\n')
} finally {
  clearInterval(sampler)
  rmSync(dir, { recursive: true, force: true })
}
