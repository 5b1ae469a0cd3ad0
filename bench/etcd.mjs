// npm run bench -- --backend etcd [--n 2000] [--members 1,3] [--rounds 1] [--workloads a,b]
//                                 [--rss-entries 100000] [--timeout 600]
// The BENCHMARKS.md workloads over etcd ("Over etcd"): for each cluster size, a loopback etcd
// cluster is started (__test__/etcd-cluster.mjs: real members, data in a temporary directory) and
// stopped after. Each (store, workload) runs in its own process on a fresh prefix, which is
// deleted afterwards: kvstore over etcd against the etcd3 npm client in its idioms (see
// bench/stores/etcd3.mjs; read-modify-writes both with lock() and with STM). Prints one JSON line
// per run, then per cluster size a Markdown table of ops/s with kvstore ÷ the faster etcd3 idiom
// (the median over rounds of each round's ratio) against the targets, and the RSS of a
// process whose replica holds --rss-entries entries (on the first cluster size).
import { execFile } from 'node:child_process'
import { readdirSync, statSync } from 'node:fs'
import { cpus } from 'node:os'
import { parseArgs, promisify } from 'node:util'
import { Etcd3 } from 'etcd3'
import { startCluster } from '../__test__/etcd-cluster.mjs'

const run = promisify(execFile)
const here = (file) => new URL(file, import.meta.url).pathname

export const etcdWorkloads = ['create-seq', 'create-conc', 'rmw-seq', 'rmw-conc-hot', 'rmw-conc-hot-2proc', 'get-random', 'scan-all', 'delete-seq']
const RMW = new Set(['rmw-seq', 'rmw-conc-hot', 'rmw-conc-hot-2proc'])
/** kvstore ÷ the faster etcd3 idiom, from issue 9 (the two-process run is held to rmw-conc-hot's). */
const TARGETS = { 'rmw-conc-hot': 3, 'rmw-conc-hot-2proc': 3, 'create-conc': 2, 'get-random': 100 }
const COLUMNS = ['kvstore', 'etcd3', 'etcd3-lock', 'etcd3-stm']
const HEADINGS = { kvstore: 'kvstore', etcd3: 'etcd3', 'etcd3-lock': 'etcd3 lock()', 'etcd3-stm': 'etcd3 STM' }

const storesFor = (workload) => (RMW.has(workload) ? ['kvstore', 'etcd3-lock', 'etcd3-stm'] : ['kvstore', 'etcd3'])

const rate = (r) => (r && r.ops && r.seconds ? r.ops / r.seconds : undefined)
function median(xs) {
  const known = xs.filter((x) => x !== undefined).sort((a, b) => a - b)
  if (known.length === 0) return undefined
  const mid = known.length >> 1
  return known.length % 2 ? known[mid] : (known[mid - 1] + known[mid]) / 2
}
const fmt = (x) => (x === undefined ? '–' : x >= 100_000 ? `${Math.round(x / 1000)}k` : x >= 1000 ? `${(x / 1000).toFixed(1)}k` : x.toFixed(0))
/** When the native module and dist/ were last written: a rebuild during the run mixes builds. */
function buildStamp() {
  const root = new URL('..', import.meta.url).pathname
  const files = [...readdirSync(root).filter((f) => /^kvstore\..*\.node$/.test(f)), ...readdirSync(`${root}dist`).map((f) => `dist/${f}`)]
  const newest = Math.max(...files.map((f) => statSync(`${root}${f}`).mtimeMs))
  return new Date(newest).toISOString()
}
const ratioText = (x) => (x === undefined ? '–' : x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2))

export async function main(argv) {
  const { values: flags } = parseArgs({
    args: argv,
    options: {
      backend: { type: 'string', default: 'etcd' },
      n: { type: 'string', default: '2000' },
      members: { type: 'string', default: '1,3' },
      rounds: { type: 'string', default: '1' },
      workloads: { type: 'string', default: [...etcdWorkloads, 'rss'].join(',') },
      'rss-entries': { type: 'string', default: '100000' },
      timeout: { type: 'string', default: '600' },
    },
  })
  const n = Number(flags.n)
  const rounds = Math.max(1, Number(flags.rounds))
  const sizes = flags.members.split(',').map(Number)
  const chosen = flags.workloads.split(',')
  for (const w of chosen) if (w !== 'rss' && !etcdWorkloads.includes(w)) throw new Error(`unknown workload ${w}; known: ${etcdWorkloads.join(', ')}, rss`)
  const timeout = Number(flags.timeout) * 1000
  const started = Date.now()
  const build = buildStamp()
  let runs = 0

  /** One (store, workload) in its own process on a fresh prefix; the prefix is deleted after. */
  async function runOne(cluster, members, store, workload) {
    const prefix = `bench-${process.pid}-${runs++}`
    const conn = { endpoints: cluster.endpoints, prefix }
    let result
    try {
      const { stdout } = await run(process.execPath, [here('./etcd-child.mjs'), store, workload, String(n), JSON.stringify(conn)], { maxBuffer: 1 << 24, timeout, killSignal: 'SIGKILL' })
      result = { members, ...JSON.parse(stdout.trim().split('\n').at(-1)) }
    } catch (err) {
      // The child's uncaught error: its 'SomeError: message' line, else the exit status.
      const thrown = err.stderr?.split('\n').find((l) => /^\w*Error\b.*:/.test(l))
      const why = err.killed ? `killed after ${timeout / 1000} s` : (thrown ?? `exit code ${err.code}: ${err.stderr?.trim().split('\n').at(-1) ?? err.message}`)
      result = { members, store, workload, n, error: why }
    }
    if (result.ops && result.seconds) result.opsPerSec = Math.round(rate(result))
    console.log(JSON.stringify(result))
    await wipe(cluster, prefix)
    return result
  }

  async function wipe(cluster, prefix) {
    const client = new Etcd3({ hosts: cluster.endpoints.map((e) => `http://${e}`) })
    try {
      await client.delete().prefix(`${prefix}/`)
    } catch (err) {
      console.error(`could not delete ${prefix}/ after its run: ${err.message}`)
    } finally {
      client.close()
    }
  }

  const tables = []
  let rss
  for (const [index, members] of sizes.entries()) {
    const cluster = await startCluster({ members })
    try {
      const rows = []
      for (const workload of chosen.filter((w) => w !== 'rss')) {
        const stores = storesFor(workload)
        const byStore = Object.fromEntries(stores.map((s) => [s, []]))
        for (let round = 0; round < rounds; round++) {
          for (const s of stores) byStore[s].push(await runOne(cluster, members, s, workload))
        }
        rows.push({ workload, byStore })
      }
      tables.push({ members, rows })
      if (index === 0 && chosen.includes('rss')) {
        const prefix = `bench-${process.pid}-rss`
        try {
          const { stdout } = await run(process.execPath, [here('./etcd-rss.mjs'), '--entries', flags['rss-entries'], '--endpoints', cluster.endpoints.join(','), '--prefix', prefix], { maxBuffer: 1 << 20, timeout, killSignal: 'SIGKILL' })
          rss = { members, ...JSON.parse(stdout.trim().split('\n').at(-1)) }
        } catch (err) {
          rss = { members, workload: 'rss', error: String(err.message).split('\n')[0] }
        }
        console.log(JSON.stringify(rss))
        await wipe(cluster, prefix)
      }
    } finally {
      await cluster.stop()
    }
  }

  const lines = [`\nN = ${n}; ${rounds} round${rounds > 1 ? 's (medians)' : ''}; ${cpus().length} cores (${cpus()[0]?.model ?? 'unknown'}); Node ${process.version}; etcd on loopback, data in a temporary directory; build of ${build}`]
  const rebuilt = buildStamp()
  if (rebuilt !== build) lines.push(`WARNING: the native module or dist/ was rewritten during the run (${build} → ${rebuilt}): the figures mix builds`)
  for (const { members, rows } of tables) {
    lines.push(`\n${members}-member cluster\n`)
    lines.push(`| workload | ${COLUMNS.map((c) => HEADINGS[c]).join(' | ')} | kvstore ÷ best etcd3 | target | lost updates | checks |`)
    lines.push(`|---|${COLUMNS.map(() => '---:').join('|')}|---:|---|---|---|`)
    for (const { workload, byStore } of rows) {
      const cells = COLUMNS.map((c) => (byStore[c] ? fmt(median(byStore[c].map(rate))) : ''))
      const peers = Object.keys(byStore).filter((s) => s !== 'kvstore')
      const ratios = (byStore.kvstore ?? []).map((k, round) => {
        const best = Math.max(...peers.map((p) => rate(byStore[p][round]) ?? 0))
        return rate(k) && best > 0 ? rate(k) / best : undefined
      })
      const ratio = median(ratios)
      const target = TARGETS[workload]
      const verdict = target === undefined ? '' : ratio === undefined ? `≥ ${target}×: no figure` : `≥ ${target}×: ${ratio >= target ? 'met' : 'missed'}`
      // Lost updates and checks: the worst run of each store.
      const lost = Object.keys(byStore)
        .map((s) => byStore[s].map((r) => r.lostUpdates).filter((x) => x !== undefined))
        .filter((xs) => xs.length)
        .map((xs) => Math.max(...xs))
      const bad = Object.entries(byStore).flatMap(([s, rs]) => rs.filter((r) => r.error || r.check !== 'ok').map((r) => `${s}: ${r.error ?? r.check}`))
      lines.push(`| ${workload} | ${cells.join(' | ')} | ${ratioText(ratio)} | ${verdict} | ${lost.length ? lost.join('/') : ''} | ${bad.length ? bad.join('; ') : 'ok'} |`)
    }
  }
  if (rss) {
    lines.push(
      rss.error
        ? `\nRSS with ${flags['rss-entries']} entries: failed (${rss.error})`
        : `\nRSS of a fresh process whose kvstore replica holds ${rss.entries} entries of ~${rss.valueBytes}-byte values (${rss.members}-member cluster): ` +
            `${rss.rssMB} MB (${rss.rssBeforeOpenMB} MB before opening, +${rss.replicaRssMB} MB; peak ${rss.peakRssMB} MB; opened and synced in ${rss.openSeconds} s; check ${rss.check}). ` +
            `The writer that created them (64 tasks, ${rss.writeSeconds} s): ${rss.writerRssMB} MB.`,
    )
  }
  lines.push(`\nlost updates: per store (kvstore/etcd3 lock()/etcd3 STM), the worst run; run time ${((Date.now() - started) / 1000).toFixed(0)} s`)
  console.log(lines.join('\n'))
  const failed = tables.some(({ rows }) => rows.some(({ byStore }) => Object.values(byStore).some((rs) => rs.some((r) => r.error || r.check !== 'ok'))))
  return failed || rss?.error || (rss && rss.check !== 'ok') ? 1 : 0
}
