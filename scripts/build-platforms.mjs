// npm run build:platforms [-- platform…] [--jobs N]: cross-builds the release addon for each
// platform of scripts/platforms.mjs (default: all of them) with napi-rs's `--cross-compile`
// (cargo-zigbuild, zig as linker and C compiler) and puts each .node into npm/<platform>/.
// Installs the pinned toolchain first when it is missing: the rustup targets, zig (PyPI's
// `ziglang` wheel, into ~/.cache/kvstore-cross) and cargo-zigbuild (crates.io).
import { copyFileSync, mkdirSync } from 'node:fs'
import { join } from 'node:path'
import { spawn } from 'node:child_process'
import { parseArgs } from 'node:util'
import {
  CARGO_ZIGBUILD_VERSION, PLATFORMS, ZIG_VERSION, addonName, byPlatform, crossDir, ensureZig, packagedAddon, root, run,
  tryCapture, zigEnv, zigTarget,
} from './platforms.mjs'

const { values, positionals } = parseArgs({ allowPositionals: true, options: { jobs: { type: 'string', default: '2' } } })
const wanted = positionals.length ? positionals.map(byPlatform) : PLATFORMS
const jobs = Math.max(1, Number(values.jobs) || 1)

function ensureToolchain(platforms) {
  const installed = tryCapture('rustup', ['target', 'list', '--installed'])?.split('\n') ?? []
  const missing = platforms.map((p) => p.triple).filter((t) => !installed.includes(t))
  if (missing.length) run('rustup', ['target', 'add', ...missing])
  ensureZig()
  const zigbuild = tryCapture('cargo-zigbuild', ['--version'])?.trim()
  if (zigbuild !== `cargo-zigbuild ${CARGO_ZIGBUILD_VERSION}`) {
    run('cargo', ['install', 'cargo-zigbuild', '--version', CARGO_ZIGBUILD_VERSION, '--locked', '--force'])
  }
  console.log(`toolchain: zig ${ZIG_VERSION}, cargo-zigbuild ${CARGO_ZIGBUILD_VERSION}, targets ${platforms.map((p) => p.triple).join(' ')}`)
}

function build(p) {
  const out = join(crossDir, 'out', p.platform)
  const args = [
    join(root, 'node_modules', '@napi-rs', 'cli', 'dist', 'cli.js'), 'build', '--platform', '--release',
    '--target', zigTarget(p), '--cross-compile', '--target-dir', join(crossDir, p.triple), '--output-dir', out, '--no-js',
  ]
  const started = Date.now()
  console.log(`build ${p.platform}: napi ${args.slice(2).join(' ')}`)
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, args, { cwd: root, env: zigEnv(p), stdio: ['ignore', 'inherit', 'inherit'] })
    child.on('error', reject)
    child.on('exit', (code, signal) => {
      if (code !== 0) return reject(new Error(`build ${p.platform} failed (${signal ?? `exit ${code}`})`))
      mkdirSync(join(root, 'npm', p.platform), { recursive: true })
      copyFileSync(join(out, addonName(p)), packagedAddon(p))
      console.log(`build ${p.platform}: npm/${p.platform}/${addonName(p)} in ${Math.round((Date.now() - started) / 1000)} s`)
      resolve()
    })
  })
}

ensureToolchain(wanted)
// Most of a release build is one LTO link on one core: two targets at once use both.
const queue = [...wanted]
const worker = async () => {
  for (let p = queue.shift(); p; p = queue.shift()) await build(p)
}
await Promise.all(Array.from({ length: Math.min(jobs, wanted.length) }, worker))
