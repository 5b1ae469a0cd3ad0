// The fresh-install test: pack the main package and one platform package, install both into an
// empty project with no Rust toolchain on PATH, and use kvstore from it through `import`, through
// `require`, from a worker thread, through the CLI, and from TypeScript (checking the generics).
// With no options (npm test): the linux-x64-gnu package with the addon `npm run build` left in the
// repository root, run by this Node. test-platforms.mjs passes another platform, its addon and the
// Node to run the consumer's scripts with (an arm64 Node under qemu-aarch64-static); npm and tsc
// always run on this Node (installing is platform-independent: npm is told the target os/cpu/libc).
import { execFileSync } from 'node:child_process'
import { copyFileSync, cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { delimiter, join, resolve } from 'node:path'
import { parseArgs } from 'node:util'

const root = new URL('..', import.meta.url).pathname
const { values: opts } = parseArgs({
  options: {
    platform: { type: 'string', default: 'linux-x64-gnu' },
    addon: { type: 'string' }, // default: kvstore.<platform>.node in the repository root
    node: { type: 'string', default: process.execPath }, // runs the consumer's scripts
    emulator: { type: 'string' }, // e.g. qemu-aarch64-static: runs `<emulator> <node> …`
  },
})
const addon = resolve(opts.addon ?? join(root, `kvstore.${opts.platform}.node`))
const work = mkdtempSync(join(tmpdir(), 'kvstore-fresh-'))
const run = (cmd, args, cwd, env = process.env) => execFileSync(cmd, args, { cwd, env, stdio: ['ignore', 'pipe', 'inherit'], encoding: 'utf8' })
const runNode = (args, cwd, env) => (opts.emulator ? run(opts.emulator, [opts.node, ...args], cwd, env) : run(opts.node, args, cwd, env))

try {
  // The platform package, as `napi artifacts` would fill it.
  const platform = join(work, opts.platform)
  cpSync(join(root, 'npm', opts.platform), platform, { recursive: true })
  copyFileSync(addon, join(platform, `kvstore.${opts.platform}.node`))
  const { os, cpu, libc } = JSON.parse(readFileSync(join(platform, 'package.json'), 'utf8'))
  const platformTgz = run('npm', ['pack', '--silent', '--pack-destination', work], platform).trim()
  const mainTgz = run('npm', ['pack', '--silent', '--pack-destination', work], root).trim()

  // A consumer project whose PATH has no cargo or rustc.
  const app = join(work, 'app')
  mkdirSync(app)
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'consumer', version: '1.0.0', private: true }))
  const path = process.env.PATH.split(delimiter).filter((dir) => !/cargo|rustup/.test(dir)).join(delimiter)
  const env = { ...process.env, PATH: path }
  for (const tool of ['cargo', 'rustc']) {
    try {
      run('which', [tool], app, env)
      throw new Error(`${tool} is still on PATH`)
    } catch (err) {
      if (String(err.message).includes('still on PATH')) throw err
    }
  }
  // --os/--cpu/--libc: the platform the package is for, so npm picks the optional dependencies
  // (msgpackr-extract's) of that platform; --force lets the named package of a foreign cpu install.
  const target = [`--os=${os[0]}`, `--cpu=${cpu[0]}`, ...(libc ? [`--libc=${libc[0]}`] : [])]
  if (cpu[0] !== process.arch || os[0] !== process.platform) target.push('--force')
  run('npm', ['install', '--no-audit', '--no-fund', '--prefer-offline', ...target, join(work, mainTgz), join(work, platformTgz)], app, env)

  const smoke = (open) => `
    const dir = mkdtempSync(join(tmpdir(), 'kvstore-smoke-'))
    const jobs = await MapStore.open(join(dir, 'smoke.redb'), { table: 'jobs' })
    const { entry, commit } = await jobs.createAndLockEntry('job-1', { value: { state: 'NEW' } })
    entry.metadata.path = '/data/x'
    await commit()
    await jobs.updateEntry('job-1', (e) => { e.value.state = 'DONE' })
    const got = jobs.getEntry('job-1')
    if (got.value.state !== 'DONE' || got.metadata.path !== '/data/x') throw new Error('wrong entry ' + JSON.stringify(got))
    if ([...jobs.getEntries()].length !== 1) throw new Error('wrong walk')
    await jobs.close()
    rmSync(dir, { recursive: true, force: true })
    console.log('${open} ok')`
  writeFileSync(join(app, 'smoke.mjs'), `import { MapStore } from 'kvstore'\nimport { mkdtempSync, rmSync } from 'node:fs'\nimport { tmpdir } from 'node:os'\nimport { join } from 'node:path'\n${smoke('import')}\n`)
  writeFileSync(join(app, 'smoke.cjs'), `const { MapStore } = require('kvstore')\nconst { mkdtempSync, rmSync } = require('node:fs')\nconst { tmpdir } = require('node:os')\nconst { join } = require('node:path')\n;(async () => {${smoke('require')}\n})().catch((e) => { console.error(e); process.exit(1) })\n`)
  // A worker thread opens the same file (one shared core) and updates the entry the main thread made.
  writeFileSync(
    join(app, 'worker.mjs'),
    `import { MapStore } from 'kvstore'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads'
if (isMainThread) {
  const dir = mkdtempSync(join(tmpdir(), 'kvstore-smoke-'))
  const path = join(dir, 'worker.redb')
  const jobs = await MapStore.open(path, { table: 'jobs' })
  await (await jobs.createAndLockEntry('job-1', { value: { state: 'NEW' } })).commit()
  const worker = new Worker(new URL(import.meta.url), { workerData: { path } })
  const reply = await new Promise((resolve, reject) => worker.once('message', resolve).once('error', reject))
  const got = jobs.getEntry('job-1')
  if (reply !== 'committed' || got.value.state !== 'WORKED' || got.value.arch !== process.arch) throw new Error('wrong entry ' + JSON.stringify(got))
  await jobs.close()
  rmSync(dir, { recursive: true, force: true })
  console.log('worker thread ok (' + process.arch + ')')
} else {
  const jobs = await MapStore.open(workerData.path, { table: 'jobs' })
  await jobs.updateEntry('job-1', (e) => { e.value = { state: 'WORKED', arch: process.arch } })
  await jobs.close()
  parentPort.postMessage('committed')
}
`,
  )
  for (const script of ['smoke.mjs', 'smoke.cjs', 'worker.mjs']) process.stdout.write(runNode([script], app, env))
  // The CLI, through the bin the install linked (its import loads the addon).
  const help = runNode([join(app, 'node_modules', '.bin', 'kvstore'), '--help'], app, env)
  if (!/kvstore <command>/.test(help)) throw new Error(`kvstore --help printed:\n${help}`)
  console.log('cli ok: kvstore --help')

  // TypeScript: MapStore<Job> makes entry.value a Job.
  writeFileSync(
    join(app, 'consumer.ts'),
    `import { MapStore, EntryNotFoundError, codecs } from 'kvstore'
interface Job { state: 'NEW' | 'DONE'; attempts: number }
export async function bump(path: string): Promise<number> {
  const jobs = await MapStore.open<Job>(path, { table: 'jobs', codec: codecs.msgpack as never })
  const lock = await jobs.getAndLockEntry('job-1', { timeoutMs: 1000 })
  const attempts: number = lock.entry.value.attempts
  // @ts-expect-error entry.value is a Job, not a string
  const wrong: string = lock.entry.value
  lock.entry.value = { state: 'DONE', attempts: attempts + 1 }
  // @ts-expect-error 'LATER' is not a Job state
  lock.entry.value = { state: 'LATER', attempts: 0 }
  await lock.commit({ updateOnly: true })
  lock.release()
  const found = jobs.getEntry('job-1')
  const state: 'NEW' | 'DONE' | undefined = found?.value.state
  void wrong
  void state
  void EntryNotFoundError
  return attempts
}
`,
  )
  writeFileSync(
    join(app, 'tsconfig.json'),
    JSON.stringify({
      compilerOptions: { strict: true, noEmit: true, module: 'node16', moduleResolution: 'node16', target: 'ES2022', lib: ['ES2023', 'ESNext.Disposable'], types: ['node'], typeRoots: [join(root, 'node_modules', '@types')], skipLibCheck: false },
      files: ['consumer.ts'],
    }),
  )
  run(process.execPath, [join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', 'tsconfig.json'], app, env)
  console.log('tsc ok: MapStore<Job> types entry.value as Job')
  console.log(`fresh-install ${opts.platform} (${runNode(['-p', 'process.arch'], app, env).trim()}): 5 passed, 0 failed`)
} finally {
  rmSync(work, { recursive: true, force: true })
}
