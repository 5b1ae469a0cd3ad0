// The fresh-install test: pack the main package and the linux-x64-gnu package, install both
// into an empty project with no Rust toolchain on PATH, and use kvstore from it through
// `import`, through `require`, and from TypeScript (checking the generics).
import { execFileSync } from 'node:child_process'
import { copyFileSync, cpSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { delimiter, join } from 'node:path'

const root = new URL('..', import.meta.url).pathname
const work = mkdtempSync(join(tmpdir(), 'kvstore-fresh-'))
const run = (cmd, args, cwd, env = process.env) => execFileSync(cmd, args, { cwd, env, stdio: ['ignore', 'pipe', 'inherit'], encoding: 'utf8' })

try {
  // The platform package, as `napi artifacts` would fill it.
  const platform = join(work, 'linux-x64-gnu')
  cpSync(join(root, 'npm', 'linux-x64-gnu'), platform, { recursive: true })
  copyFileSync(join(root, 'kvstore.linux-x64-gnu.node'), join(platform, 'kvstore.linux-x64-gnu.node'))
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
  run('npm', ['install', '--no-audit', '--no-fund', '--prefer-offline', join(work, mainTgz), join(work, platformTgz)], app, env)

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
  process.stdout.write(run(process.execPath, ['smoke.mjs'], app, env))
  process.stdout.write(run(process.execPath, ['smoke.cjs'], app, env))

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
  console.log('fresh-install: 3 passed, 0 failed')
} finally {
  rmSync(work, { recursive: true, force: true })
}
