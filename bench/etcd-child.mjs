// Runs one (store, workload) over etcd in a fresh process and prints one JSON line.
//   node bench/etcd-child.mjs <kvstore|etcd3|etcd3-lock|etcd3-stm> <workload> <n> '<conn JSON>'
// conn: { endpoints: ['127.0.0.1:P', ...], prefix } — a prefix no other run uses.
import { workloads } from './etcd-workloads.mjs'

const [storeName, workload, nText, connText] = process.argv.slice(2)
const n = Number(nText)
const conn = JSON.parse(connText)
const [module, idiom] = storeName === 'kvstore' ? ['kvstore-etcd', undefined] : ['etcd3', storeName.split('-')[1] ?? 'plain']
const { open } = await import(new URL(`./stores/${module}.mjs`, import.meta.url).href)

let peakRss = 0
const sampler = setInterval(() => {
  peakRss = Math.max(peakRss, process.memoryUsage.rss())
}, 50)
try {
  const store = await open(conn, { idiom })
  const result = await workloads[workload](store, n, { store: storeName, conn })
  await store.close()
  peakRss = Math.max(peakRss, process.memoryUsage.rss())
  process.stdout.write(JSON.stringify({ store: storeName, workload, n, ...result, peakRssMB: Math.round(peakRss / 2 ** 20) }) + '\n')
} finally {
  clearInterval(sampler)
}
