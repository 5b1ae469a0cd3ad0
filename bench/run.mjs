// npm run bench -- [--n 20000] [--only kvstore,lmdb] [--workloads create-conc,get-random]
//                  [--durable both|durable|none] [--scale 10000,100000,1000000]
// Runs each (store, workload, mode) in its own process, prints one JSON line each, then a
// Markdown table of ops/s with the kvstore ÷ lmdb ratio measured in the same run.
import { execFileSync } from 'node:child_process'
import { cpus } from 'node:os'
import { parseArgs } from 'node:util'
import { scaleSizes, workloads } from './workloads.mjs'

const { values: flags } = parseArgs({
  options: {
    n: { type: 'string', default: '20000' },
    only: { type: 'string', default: 'kvstore,lmdb,sqlite,level' },
    workloads: { type: 'string', default: [...Object.keys(workloads), 'scale'].join(',') },
    durable: { type: 'string', default: 'both' },
    scale: { type: 'string', default: scaleSizes.join(',') },
  },
})

const n = Number(flags.n)
const stores = flags.only.split(',')
const chosen = flags.workloads.split(',')
const modes = flags.durable === 'both' ? ['durable', 'none'] : [flags.durable]
const child = new URL('./child.mjs', import.meta.url).pathname

function run(store, workload, mode, size) {
  try {
    const out = execFileSync(process.execPath, [child, store, workload, mode, String(size)], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], maxBuffer: 1 << 24 })
    const line = out.trim().split('\n').at(-1)
    console.log(line)
    return JSON.parse(line)
  } catch (err) {
    const failed = { store, workload, durable: mode === 'durable', n: size, error: String(err.message).split('\n')[0] }
    console.log(JSON.stringify(failed))
    return failed
  }
}

const rate = (r) => (r && r.ops && r.seconds ? r.ops / r.seconds : undefined)
const fmt = (x) => (x === undefined ? '–' : x >= 100_000 ? `${Math.round(x / 1000)}k` : x >= 1000 ? `${(x / 1000).toFixed(1)}k` : x.toFixed(0))

const rows = []
for (const workload of chosen.filter((w) => w !== 'scale')) {
  for (const mode of modes) {
    const results = Object.fromEntries(stores.map((s) => [s, run(s, workload, mode, n)]))
    rows.push({ workload, mode, results })
  }
}

const scaleRows = []
if (chosen.includes('scale')) {
  for (const size of flags.scale.split(',').map(Number)) {
    for (const store of stores.filter((s) => s === 'kvstore' || s === 'lmdb')) {
      scaleRows.push({ size, store, result: run(store, 'scale', 'none', size) })
    }
  }
}

const lines = []
lines.push(`\nN = ${n}; ${cpus().length} cores (${cpus()[0]?.model ?? 'unknown'}); Node ${process.version}\n`)
if (rows.length) {
  lines.push(`| workload | mode | ${stores.join(' | ')} | kvstore ÷ lmdb | lost updates | commits/batch |`)
  lines.push(`|---|---|${stores.map(() => '---:').join('|')}|---:|---:|---:|`)
  for (const { workload, mode, results } of rows) {
    const ratio = rate(results.kvstore) && rate(results.lmdb) ? (rate(results.kvstore) / rate(results.lmdb)).toFixed(2) : '–'
    const lost = stores.map((s) => results[s]?.lostUpdates).filter((x) => x !== undefined)
    const cpb = results.kvstore?.commitsPerBatch
    lines.push(`| ${workload} | ${mode} | ${stores.map((s) => fmt(rate(results[s]))).join(' | ')} | ${ratio} | ${lost.length ? lost.join('/') : ''} | ${cpb ? cpb.toFixed(1) : ''} |`)
  }
}
if (scaleRows.length) {
  lines.push('\n| scale | store | get-random ops/s | scan-all entries/s | peak RSS MB |')
  lines.push('|---:|---|---:|---:|---:|')
  for (const { size, store, result } of scaleRows) {
    lines.push(`| ${size} | ${store} | ${fmt(rate(result.get))} | ${fmt(rate(result.scan))} | ${result.peakRssMB ?? '–'} |`)
  }
}
console.log(lines.join('\n'))
