import test from 'ava'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'

const run = promisify(execFile)
const example = (name) => new URL(`../examples/${name}`, import.meta.url).pathname

test('the demo runs the main job end to end', async (t) => {
  const { stdout } = await run(process.execPath, [example('demo.mjs')])
  t.regex(stdout, /again\s+ERR_ENTRY_EXISTS/)
  t.regex(stdout, /after\s+ERR_ENTRY_RELEASED/)
  t.regex(stdout, /counter\s+32/)
})

test('the job tracker keeps one job per path across its two maps', async (t) => {
  const { stdout } = await run(process.execPath, [example('job-tracker.mjs')])
  t.is((stdout.match(/refused: already tracked by job/g) ?? []).length, 1)
  t.is((stdout.match(/ DONE 100 /g) ?? []).length, 3)
  t.regex(stdout, /paths still tracked: 0/)
})

test('the job runner waits for jobs through watch, and sees each go QUEUED → RUNNING → DONE', async (t) => {
  const { stdout } = await run(process.execPath, [example('job-runner.mjs')])
  t.is((stdout.match(/ DONE {4}runner [01] {2}output \d+/g) ?? []).length, 20)
  t.regex(stdout, /all 20 jobs went QUEUED → RUNNING → DONE exactly once, seen through watch; watchers left: 0/)
})

test('the worker pool runs every job exactly once', async (t) => {
  const { stdout } = await run(process.execPath, [example('worker-pool.mjs')])
  t.regex(stdout, /every one of 200 jobs ran exactly once/)
})
