// The platform packages this repository builds itself, and the toolchain that builds them: one
// table read by build-platforms.mjs, test-platforms.mjs and the CI workflow's build step (which
// runs build-platforms.mjs), so the versions and the glibc floor are written down once.
import { execFileSync } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { homedir } from 'node:os'
import { join } from 'node:path'

export const root = new URL('..', import.meta.url).pathname

// Pinned cross toolchain: zig from PyPI's `ziglang` wheel, cargo-zigbuild from crates.io.
export const ZIG_VERSION = '0.14.1'
export const CARGO_ZIGBUILD_VERSION = '0.24.1'
// The oldest glibc the gnu packages run on (zig links against this version's symbols; napi-rs's
// own gnu toolchains use the same floor). Debian 8+, Ubuntu 14.04+, RHEL/CentOS 7+.
export const GLIBC_FLOOR = '2.17'
// An arm64 Node from the npm registry, run under qemu-aarch64-static for the arm64-gnu test.
export const ARM64_NODE_VERSION = '20.20.2'

export const toolsDir = process.env.KVSTORE_TOOLS_DIR ?? join(process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'kvstore-cross')
export const zigDir = join(toolsDir, `ziglang-${ZIG_VERSION}`, 'ziglang')
// Each cross target gets its own cargo target dir under target/cross/, so a cross build never
// waits on (or blocks) the developer's builds in target/, and two cross builds can run at once.
export const crossDir = join(root, 'target', 'cross')

// musl's dynamic linker resolves these names to itself (ldso/dynlink.c, "reserved" names).
const MUSL_SELF = /^lib(c|pthread|rt|m|dl|util|xnet)\.so(\.\d+)*$/
const GLIBC_LIBS = /^(libc\.so\.6|libm\.so\.6|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1|ld-linux-(x86-64|aarch64)\.so\.[12])$/

const MACOS_LIBS = /^\/usr\/lib\/(libSystem\.B|libiconv\.2|libcharset\.1)\.dylib$/

// The oldest macOS the darwin packages run on (MACOSX_DEPLOYMENT_TARGET): Node 20's own floors.
const MACOS_X64_FLOOR = '10.15'
const MACOS_ARM64_FLOOR = '11.0'

// needed: the shared libraries the addon may depend on — that libc's own, and libgcc_s, which
// every official Node build (glibc) and Alpine's nodejs (musl) already load; on macOS libSystem and
// libiconv/libcharset (Rust's std links iconv on Apple targets; both ship with every macOS).
export const PLATFORMS = [
  { platform: 'linux-x64-gnu', triple: 'x86_64-unknown-linux-gnu', libc: 'glibc', machine: 'Advanced Micro Devices X86-64', needed: (lib) => GLIBC_LIBS.test(lib) || lib === 'libgcc_s.so.1' },
  { platform: 'linux-arm64-gnu', triple: 'aarch64-unknown-linux-gnu', libc: 'glibc', machine: 'AArch64', needed: (lib) => GLIBC_LIBS.test(lib) || lib === 'libgcc_s.so.1' },
  { platform: 'linux-x64-musl', triple: 'x86_64-unknown-linux-musl', libc: 'musl', machine: 'Advanced Micro Devices X86-64', needed: (lib) => MUSL_SELF.test(lib) || lib === 'libgcc_s.so.1' },
  { platform: 'linux-arm64-musl', triple: 'aarch64-unknown-linux-musl', libc: 'musl', machine: 'AArch64', needed: (lib) => MUSL_SELF.test(lib) || lib === 'libgcc_s.so.1' },
  { platform: 'darwin-x64', triple: 'x86_64-apple-darwin', macos: MACOS_X64_FLOOR, cpuType: 0x01000007, needed: (lib) => MACOS_LIBS.test(lib) },
  { platform: 'darwin-arm64', triple: 'aarch64-apple-darwin', macos: MACOS_ARM64_FLOOR, cpuType: 0x0100000c, needed: (lib) => MACOS_LIBS.test(lib) },
]

// napi-rs's package suffix for a target triple (win32-x64-msvc, linux-arm64-musl, …).
export const platformOfTriple = (triple) => {
  const [arch, , os, abi] = triple.split('-')
  const cpu = { x86_64: 'x64', aarch64: 'arm64' }[arch] ?? arch
  if (os === 'darwin') return `darwin-${cpu}`
  if (os === 'windows') return `win32-${cpu}-${abi}`
  return `${os}-${cpu}-${abi}`
}

export const byPlatform = (name) => {
  const found = PLATFORMS.find((p) => p.platform === name)
  if (!found) throw new Error(`unknown platform ${name}; built here: ${PLATFORMS.map((p) => p.platform).join(', ')}`)
  return found
}

// The --target napi build passes to cargo-zigbuild: gnu targets carry the glibc floor.
export const zigTarget = (p) => (p.libc === 'glibc' ? `${p.triple}.${GLIBC_FLOOR}` : p.triple)
export const addonName = (p) => `kvstore.${p.platform}.node`
export const packagedAddon = (p) => join(root, 'npm', p.platform, addonName(p))

export const run = (cmd, args, opts = {}) => execFileSync(cmd, args, { cwd: root, stdio: 'inherit', ...opts })
export const capture = (cmd, args, opts = {}) => execFileSync(cmd, args, { cwd: root, stdio: ['ignore', 'pipe', 'pipe'], encoding: 'utf8', ...opts })
export const tryCapture = (cmd, args, opts = {}) => {
  try {
    return capture(cmd, args, opts)
  } catch {
    return null
  }
}

// PATH with the pinned zig first (napi build -x and cargo-zigbuild look for `zig` on PATH).
export const zigEnv = (p) => ({ ...process.env, PATH: `${zigDir}:${process.env.PATH}`, ...(p?.macos ? { MACOSX_DEPLOYMENT_TARGET: p.macos } : {}) })
export const haveZig = () => existsSync(join(zigDir, 'zig')) && tryCapture(join(zigDir, 'zig'), ['version'])?.trim() === ZIG_VERSION
export function ensureZig() {
  if (haveZig()) return
  const python = tryCapture('python3', ['--version']) ? 'python3' : 'python'
  run(python, ['-m', 'pip', 'install', '--disable-pip-version-check', '--upgrade', '--target', join(toolsDir, `ziglang-${ZIG_VERSION}`), `ziglang==${ZIG_VERSION}`])
  if (!haveZig()) throw new Error(`zig ${ZIG_VERSION} did not install into ${toolsDir}`)
}
// Every symbol musl's libc.so exports, from the stub zig links musl targets against.
export const muslSymbols = () => new Set([...readFileSync(join(zigDir, 'lib', 'libc', 'musl', 'libc.S'), 'utf8').matchAll(/^\.type (\S+), %(function|object);$/gm)].map((m) => m[1]))
