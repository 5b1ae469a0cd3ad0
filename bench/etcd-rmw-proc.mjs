// One of the two processes of rmw-conc-hot-2proc: opens its own store on the same prefix, says
// 'ready', waits for 'go', runs `count` RMWs over `tasks` tasks on `hot` keys, reports 'done'.
import { keyOf, rng } from './data.mjs'
import { concurrently } from './etcd-workloads.mjs'

const { store: storeName, conn, seed, count, hot, tasks } = JSON.parse(process.argv[2])
const [module, idiom] = storeName === 'kvstore' ? ['kvstore-etcd', undefined] : ['etcd3', storeName.split('-')[1] ?? 'plain']
const { open } = await import(new URL(`./stores/${module}.mjs`, import.meta.url).href)
const store = await open(conn, { idiom })
const random = rng(seed)
const picks = Array.from({ length: count }, () => keyOf(Math.floor(random() * hot)))
const go = new Promise((resolve) => process.once('message', resolve))
process.send({ type: 'ready' })
await go
const start = process.hrtime.bigint()
await concurrently(count, tasks, (i) => store.rmw(picks[i]))
const seconds = Number(process.hrtime.bigint() - start) / 1e9
process.send({ type: 'done', ops: count, seconds, ...(store.retries ? { retries: store.retries() } : {}) })
await store.close()
process.disconnect()
