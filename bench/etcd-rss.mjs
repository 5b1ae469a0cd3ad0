// RSS of a process whose kvstore replica holds `--entries` (default 100 000) entries of ~100-byte
// values. A writer process fills a map over etcd; then a fresh process (--reader) opens it,
// waits for its replica (sync + count), walks every entry once, collects garbage and reports RSS
// before opening and after. Prints one JSON line (the reader's, with the writer's figures).
//   node bench/etcd-rss.mjs [--entries 100000] [--endpoints 127.0.0.1:P,... --prefix p]
// Without --endpoints it starts (and stops) its own 1-member loopback cluster.
import { execFile } from 'node:child_process'
import { parseArgs, promisify } from 'node:util'
import { Packr } from 'msgpackr'
import { keyOf } from './data.mjs'
import { concurrently } from './etcd-workloads.mjs'

const { values: flags } = parseArgs({
  options: {
    entries: { type: 'string', default: '100000' },
    endpoints: { type: 'string' },
    prefix: { type: 'string', default: 'rss' },
    reader: { type: 'boolean', default: false },
  },
})
const entries = Number(flags.entries)
const STATES = ['QUEUED', 'RUNNING', 'COPYING', 'DONE', 'FAILED']
// ~100 bytes as MessagePack (kvstore's default codec).
const valueOf = (i) => ({ id: i, state: STATES[i % 5], priority: i % 10, attempts: 0, owner: `team-${i % 50}`, path: keyOf(i) })
const MB = (bytes) => Math.round((bytes / 2 ** 20) * 10) / 10

async function reader(conn) {
  const { MapStore } = await import('../dist/index.js')
  const { urlOf } = await import('./stores/kvstore-etcd.mjs')
  globalThis.gc?.()
  const before = process.memoryUsage()
  const start = process.hrtime.bigint()
  const store = await MapStore.open(urlOf(conn), { table: 'jobs' })
  await store.sync()
  const count = store.count()
  const openSeconds = Number(process.hrtime.bigint() - start) / 1e9
  let ids = 0
  for (const { value } of store.getEntries()) ids += value.id
  const expectedIds = (entries * (entries - 1)) / 2
  let peak = process.memoryUsage.rss()
  for (let i = 0; i < 3; i++) globalThis.gc?.()
  await new Promise((resolve) => setTimeout(resolve, 200))
  globalThis.gc?.()
  const after = process.memoryUsage()
  peak = Math.max(peak, after.rss)
  const check = count !== entries ? `count ${count}, expected ${entries}` : ids !== expectedIds ? `ids sum to ${ids}, expected ${expectedIds}` : 'ok'
  await store.close()
  return {
    entries: count,
    check,
    openSeconds: Math.round(openSeconds * 1000) / 1000,
    rssBeforeOpenMB: MB(before.rss),
    rssMB: MB(after.rss),
    replicaRssMB: MB(after.rss - before.rss),
    peakRssMB: MB(peak),
    heapUsedMB: MB(after.heapUsed),
    externalMB: MB(after.external),
    gcExposed: typeof globalThis.gc === 'function',
  }
}

async function writer(conn) {
  const { open } = await import('./stores/kvstore-etcd.mjs')
  const store = await open(conn)
  const start = process.hrtime.bigint()
  await concurrently(entries, 64, (i) => store.create(keyOf(i), valueOf(i)))
  const seconds = Number(process.hrtime.bigint() - start) / 1e9
  const rss = process.memoryUsage.rss()
  await store.close()
  return { writeSeconds: Math.round(seconds * 100) / 100, writerRssMB: MB(rss) }
}

async function main() {
  let cluster
  let conn
  if (flags.endpoints) {
    conn = { endpoints: flags.endpoints.split(','), prefix: flags.prefix }
  } else {
    const { startCluster } = await import('../__test__/etcd-cluster.mjs')
    cluster = await startCluster({ members: 1 })
    conn = { endpoints: cluster.endpoints, prefix: flags.prefix }
  }
  try {
    const written = await writer(conn)
    const self = new URL(import.meta.url).pathname
    const args = ['--expose-gc', self, '--reader', '--entries', String(entries), '--endpoints', conn.endpoints.join(','), '--prefix', conn.prefix]
    const { stdout } = await promisify(execFile)(process.execPath, args, { maxBuffer: 1 << 20 })
    const read = JSON.parse(stdout.trim().split('\n').at(-1))
    const valueBytes = new Packr({ useRecords: false }).pack(valueOf(entries - 1)).length
    return { workload: 'rss', store: 'kvstore', valueBytes, ...written, ...read }
  } finally {
    await cluster?.stop()
  }
}

const result = flags.reader ? await reader({ endpoints: flags.endpoints.split(','), prefix: flags.prefix }) : await main()
process.stdout.write(JSON.stringify(result) + '\n')
