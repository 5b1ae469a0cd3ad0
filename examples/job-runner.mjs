// A job runner driven by watch(): runner threads wait for jobs to be queued, and the submitter
// waits for them to finish, without polling. Every thread opens the same file (one shared core),
// so a watch in any thread hears the commits of all of them, in commit order.
//
//   submitter (main thread)  jobs.watch({ prefix: 'job/' })  → sees QUEUED → RUNNING → DONE
//   runners (worker threads) jobs.watch()                     → claim each QUEUED job under its
//                                                               lock; stop on 'control/stop'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads'
import { MapStore } from '../dist/index.js'

const JOBS = 20
const RUNNERS = 2

if (isMainThread) {
  const dir = mkdtempSync(join(tmpdir(), 'kvstore-runner-'))
  const path = join(dir, 'runner.redb')
  const jobs = await MapStore.open(path, { table: 'jobs' })

  // Watch first, then submit: a watch sees every commit made after watch() was called.
  const progress = jobs.watch({ prefix: 'job/' })
  const runners = Array.from({ length: RUNNERS }, (_, id) => new Worker(new URL(import.meta.url), { workerData: { path, id } }))
  const exited = runners.map((w) => new Promise((resolve, reject) => w.once('exit', resolve).once('error', reject)))
  // Each runner says when its own watch is open.
  await Promise.all(runners.map((w) => new Promise((resolve) => w.once('message', resolve))))

  for (let i = 0; i < JOBS; i++) {
    const { commit } = await jobs.createAndLockEntry(`job/${String(i).padStart(3, '0')}`, { value: { state: 'QUEUED', input: i } })
    await commit()
  }

  // The states each job went through, as the watch reported them.
  const history = new Map()
  let finished = 0
  for await (const change of progress) {
    const { state, runner, output } = change.value
    history.set(change.key, [...(history.get(change.key) ?? []), state])
    if (state !== 'QUEUED') console.log(`${change.key}  ${state.padEnd(7)} runner ${runner}${state === 'DONE' ? `  output ${output}` : ''}`)
    if (state === 'DONE' && ++finished === JOBS) break // ends the watch and frees it
  }

  // Tell the runners to stop: they watch for this entry too.
  const { commit } = await jobs.createAndLockEntry('control/stop', { value: true })
  await commit()
  await Promise.all(exited)

  const expected = 'QUEUED,RUNNING,DONE'
  const odd = [...history].filter(([, states]) => states.join() !== expected)
  if (history.size !== JOBS || odd.length > 0) throw new Error(`unexpected histories: ${JSON.stringify(odd)}`)
  console.log(`all ${JOBS} jobs went QUEUED → RUNNING → DONE exactly once, seen through watch; watchers left: ${jobs.stats().watchers}`)
  await jobs.close()
  rmSync(dir, { recursive: true, force: true })
} else {
  const jobs = await MapStore.open(workerData.path, { table: 'jobs' })
  const changes = jobs.watch()
  parentPort.postMessage('watching')

  /** Runs `key` if it is still queued: the lock decides which runner gets it. */
  async function run(key) {
    const lock = await jobs.getAndLockEntry(key)
    if (lock.entry.value.state !== 'QUEUED') {
      lock.release() // another runner was first
      return
    }
    lock.entry.value = { ...lock.entry.value, state: 'RUNNING', runner: workerData.id }
    await lock.commit({ updateOnly: true }) // visible to every watch; the lock is kept
    const output = lock.entry.value.input ** 2 // the work
    lock.entry.value = { ...lock.entry.value, state: 'DONE', output }
    await lock.commit()
  }

  // Jobs queued before this watch began would be missed by it: walk them once. (A walk after
  // watch() may also see a job the watch reports later; run() checks the state under the lock.)
  for (const { key, value } of jobs.getEntries({ prefix: 'job/' })) if (value.state === 'QUEUED') await run(key)
  for await (const change of changes) {
    if (change.key === 'control/stop') break
    if (change.type === 'put' && change.key.startsWith('job/') && change.value.state === 'QUEUED') await run(change.key)
  }
  await jobs.close()
}
