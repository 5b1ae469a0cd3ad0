// Shared test helpers: fresh stores in temporary directories, and ways to wait on events.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { once } from 'node:events'
import { execFileSync, spawn } from 'node:child_process'
import { createInterface } from 'node:readline'

export * as kv from '../dist/index.js'
import { MapStore } from '../dist/index.js'

/** A temporary directory removed when the test ends. */
export function tempDir(t) {
  const dir = mkdtempSync(join(tmpdir(), 'kvstore-test-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

/** A fresh tmpfs of `size` (as `mount -o size=`), unmounted when the test ends. Needs root. */
export function tmpfs(t, size) {
  const dir = tempDir(t)
  execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', dir])
  t.teardown(() => execFileSync('umount', ['-l', dir]))
  return dir
}

/** A fresh store, closed when the test ends. */
export async function tempStore(t, options = {}) {
  const store = await MapStore.temporary(options)
  t.teardown(() => store.close())
  return store
}

/** Two handles on one new file `name` in a temporary directory, both closed when the test ends. */
export async function twoHandles(t, name) {
  const path = join(tempDir(t), name)
  const a = await MapStore.open(path)
  const b = await MapStore.open(path)
  t.teardown(async () => {
    await a.close()
    await b.close()
  })
  return [a, b]
}

/** Resolves once the store reports at least `n` lock waiters (polls on the event loop, no sleeps). */
export async function waitersQueued(store, n) {
  while (store.stats().locksWaiting < n) await new Promise((resolve) => setImmediate(resolve))
}

/** Writes `value` under `key`, whether or not it exists. */
export async function put(store, key, value, metadata = {}) {
  const { entry, commit } = await store.createAndLockEntry(key, { allowExisting: true })
  entry.value = value
  entry.metadata = metadata
  await commit()
}

export async function exitOf(child) {
  const [code, signal] = await once(child, 'exit')
  return { code, signal }
}

/** Path of the built command line tool. */
export const cli = new URL('../dist/cli.js', import.meta.url).pathname

/** Runs a command with `input` on stdin; resolves with its exit code and everything it wrote. */
export async function run(command, args, input) {
  const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  child.stdout.on('data', (d) => (stdout += d))
  child.stderr.on('data', (d) => (stderr += d))
  child.stdin.end(input ?? '')
  // 'close', not 'exit': the output may still be in the pipes when the process exits.
  const [code] = await once(child, 'close')
  return { code, stdout, stderr }
}

/** Runs `kvstore <args>` (the built CLI) as a user would. */
export const kvstore = (args, input) => run(process.execPath, [cli, ...args], input)

/** A fixed-seed generator of numbers in [0, 1), so a failing round can be replayed. */
export function rng(seed) {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = Math.imul(a ^ (a >>> 15), a | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

/**
 * Runs `node writer path round`, which prints one JSON line per acknowledged commit, until it
 * has printed `acks` lines, then kills it with SIGKILL. Returns the lines and how it exited.
 */
export async function runAndKill(writer, path, round, acks) {
  const child = spawn(process.execPath, [writer, path, String(round)], { stdio: ['ignore', 'pipe', 'inherit'] })
  const exited = once(child, 'exit')
  const lines = []
  for await (const line of createInterface({ input: child.stdout })) {
    lines.push(JSON.parse(line))
    if (lines.length === acks) child.kill('SIGKILL')
  }
  const [code, signal] = await exited
  return { lines, code, signal }
}

const etcdProcess = new URL('./fixtures/etcd-process.mjs', import.meta.url).pathname

/** Another process on the store at `url` (fixtures/etcd-process.mjs), answering one JSON line per command. */
export async function otherProcess(t, url, options = {}) {
  const child = spawn(process.execPath, [etcdProcess], { stdio: ['pipe', 'pipe', 'inherit'] })
  const exited = exitOf(child)
  t.teardown(() => {
    child.kill('SIGKILL')
    return exited
  })
  const replies = createInterface({ input: child.stdout })[Symbol.asyncIterator]()
  const send = async (command) => {
    child.stdin.write(`${JSON.stringify(command)}\n`)
    const { value, done } = await replies.next()
    if (done) throw new Error(`the process ended before answering ${command.cmd}`)
    return JSON.parse(value)
  }
  const opened = await send({ cmd: 'open', url, options })
  t.true(opened.ok, opened.message)
  return { child, send, exited }
}
