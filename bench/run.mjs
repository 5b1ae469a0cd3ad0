// npm run bench -- [--backend file|etcd] [--n 20000] [--only kvstore,lmdb] [--workloads create-conc,get-random]
//                  [--durable both|durable|none] [--scale 10000,100000,1000000] [--rounds 3]
// Runs each (store, workload, mode) in its own process, prints one JSON line each, then a
// Markdown table of ops/s with the kvstore ÷ lmdb ratio measured in the same run.
// Each (workload, mode) runs `rounds` times, the stores taking turns within a round; the table
// shows each store's median, and the ratio is the median of the rounds' kvstore ÷ lmdb, so a
// machine whose speed drifts moves both sides of each ratio alike.
import { execFileSync } from 'node:child_process'
import { cpus } from 'node:os'
import { parseArgs } from 'node:util'
import { measureFloor } from './floor.mjs'
import { scaleSizes, workloads } from './workloads.mjs'

// --backend etcd: the workloads over etcd clusters, with flags of their own (bench/etcd.mjs).
const { backend } = parseArgs({ options: { backend: { type: 'string', default: 'file' } }, strict: false }).values
if (backend === 'etcd') {
  const { main } = await import('./etcd.mjs')
  process.exit(await main(process.argv.slice(2)))
} else if (backend !== 'file') {
  throw new Error(`--backend ${backend}: file or etcd`)
}

const { values: flags } = parseArgs({
  options: {
    backend: { type: 'string', default: 'file' },
    n: { type: 'string', default: '20000' },
    only: { type: 'string', default: 'kvstore,lmdb,sqlite,level' },
    workloads: { type: 'string', default: [...Object.keys(workloads), 'scale'].join(',') },
    durable: { type: 'string', default: 'both' },
    scale: { type: 'string', default: scaleSizes.join(',') },
    rounds: { type: 'string', default: '3' },
  },
})

const n = Number(flags.n)
const rounds = Math.max(1, Number(flags.rounds))
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
function median(xs) {
  const known = xs.filter((x) => x !== undefined).sort((a, b) => a - b)
  if (known.length === 0) return undefined
  const mid = known.length >> 1
  return known.length % 2 ? known[mid] : (known[mid - 1] + known[mid]) / 2
}
const fmt = (x) => (x === undefined ? '–' : x >= 100_000 ? `${Math.round(x / 1000)}k` : x >= 1000 ? `${(x / 1000).toFixed(1)}k` : x.toFixed(0))

const rows = []
for (const workload of chosen.filter((w) => w !== 'scale')) {
  for (const mode of modes) {
    const runs = Object.fromEntries(stores.map((s) => [s, []]))
    for (let round = 0; round < rounds; round++) {
      for (const s of stores) runs[s].push(run(s, workload, mode, n))
    }
    rows.push({ workload, mode, runs })
  }
}

const scaleRows = []
if (chosen.includes('scale')) {
  for (const size of flags.scale.split(',').map(Number).filter((size) => size > 0)) {
    for (const store of stores.filter((s) => s === 'kvstore' || s === 'lmdb')) {
      scaleRows.push({ size, store, result: run(store, 'scale', 'none', size) })
    }
  }
}

const lines = []
lines.push(`\nN = ${n}; ${rounds} rounds (medians); ${cpus().length} cores (${cpus()[0]?.model ?? 'unknown'}); Node ${process.version}\n`)
if (rows.length) {
  lines.push(`| workload | mode | ${stores.join(' | ')} | kvstore ÷ lmdb | lost updates | commits/batch |`)
  lines.push(`|---|---|${stores.map(() => '---:').join('|')}|---:|---:|---:|`)
  for (const { workload, mode, runs } of rows) {
    const paired = (runs.kvstore ?? []).map((k, i) => (rate(k) && rate(runs.lmdb?.[i]) ? rate(k) / rate(runs.lmdb[i]) : undefined))
    const ratio = median(paired)
    // Lost updates: the worst run of each store.
    const lost = stores
      .map((s) => runs[s].map((r) => r?.lostUpdates).filter((x) => x !== undefined))
      .filter((xs) => xs.length)
      .map((xs) => Math.max(...xs))
    const cpb = median((runs.kvstore ?? []).map((r) => r?.commitsPerBatch))
    const cells = stores.map((s) => fmt(median(runs[s].map(rate))))
    lines.push(`| ${workload} | ${mode} | ${cells.join(' | ')} | ${ratio ? ratio.toFixed(2) : '–'} | ${lost.length ? lost.join('/') : ''} | ${cpb ? cpb.toFixed(1) : ''} |`)
  }
}
if (modes.includes('durable')) {
  const { appendMs, overwriteMs } = measureFloor()
  lines.push(
    `\nFloor (this disk, median of 200): 4 KB appended + fdatasync ${appendMs.toFixed(2)} ms; 4 KB overwritten in place + fdatasync ${overwriteMs.toFixed(2)} ms (one durable batch through the write-ahead log: ~${(1000 / overwriteMs).toFixed(0)} batches/s at most).`,
  )
}
if (scaleRows.length) {
  lines.push('\n| scale | store | get-random ops/s | scan-all entries/s | peak RSS MB |')
  lines.push('|---:|---|---:|---:|---:|')
  for (const { size, store, result } of scaleRows) {
    lines.push(`| ${size} | ${store} | ${fmt(rate(result.get))} | ${fmt(rate(result.scan))} | ${result.peakRssMB ?? '–'} |`)
  }
}
console.log(lines.join('\n'))
