// Test harness: real etcd clusters (the `etcd` and `etcdctl` binaries, 3.4 or later, on PATH;
// .ci/run installs Debian's) on free loopback ports, with their data in a fresh temporary
// directory. Readiness is an event: each member's stderr is read line by line until etcd logs that
// it serves client requests. Every member is killed when the test process exits.
//
//   const cluster = await startCluster({ members: 3, auth: true, tls: true, etcdArgs: [] })
//   cluster.endpoints            ['127.0.0.1:P0', ...]
//   cluster.url('/app')          'etcds://127.0.0.1:P0,127.0.0.1:P1,127.0.0.1:P2/app'
//   await cluster.kill(i)        SIGKILL member i; resolves once it has exited
//   await cluster.pause(i)       SIGSTOP; resume(i) sends SIGCONT
//   await cluster.restart(i)     a killed member again (same data dir and flags); resolves when ready
//   await cluster.leader()       index of the leader that the running members agree on
//   await cluster.ctl(args, { user })  etcdctl on the running members; resolves with its stdout
//   cluster.ca                   (tls) PEM of the throwaway CA that signed the server certificate
//   cluster.users                (auth) { root, app, other }: { name, password, prefix? }
//   await cluster.stop()         kill all, remove the directory; idempotent
import { spawn, execFile, execFileSync } from 'node:child_process'
import { createServer } from 'node:net'
import { once } from 'node:events'
import { createWriteStream, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { promisify } from 'node:util'

const run = promisify(execFile)

/** What etcd prints on stderr once a member serves clients: 3.4's default logger (capnslog) and
 * 3.5+ say "ready to serve client requests"; 3.4 with --logger zap says only
 * "serving client traffic ...". */
const READY = /ready to serve client requests|serving client traffic/
const READY_TIMEOUT_MS = 30_000
const TAIL_LINES = 40

const live = new Set()
let exitHooked = false

/** Kills every member of every cluster still running, synchronously (for process 'exit'). */
function killAllNow() {
  for (const cluster of live) cluster._killNow()
}

function hookProcessExit() {
  if (exitHooked) return
  exitHooked = true
  process.on('exit', killAllNow)
  // A signal would end the process without 'exit': clean up, then die of the same signal.
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
    process.once(signal, () => {
      killAllNow()
      process.kill(process.pid, signal)
    })
  }
}

/** `count` distinct free TCP ports on 127.0.0.1 (all held open together, then released). */
async function freePorts(count) {
  const servers = []
  try {
    for (let i = 0; i < count; i++) {
      const server = createServer()
      servers.push(server)
      server.listen(0, '127.0.0.1')
      await once(server, 'listening')
    }
    return servers.map((s) => s.address().port)
  } finally {
    await Promise.all(servers.map((s) => new Promise((resolve) => s.close(resolve))))
  }
}

/** A throwaway CA and a server certificate for 127.0.0.1 and localhost signed by it (EC P-256). */
function makeCertificates(dir) {
  const openssl = (...args) => execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] })
  writeFileSync(
    join(dir, 'ca.ext'),
    'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n',
  )
  writeFileSync(
    join(dir, 'server.ext'),
    'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n' +
      'extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n' +
      'subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n',
  )
  const key = (name) => openssl('genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', name)
  key('ca.key')
  openssl('req', '-new', '-key', 'ca.key', '-subj', '/CN=kvstore test CA', '-out', 'ca.csr')
  openssl('x509', '-req', '-in', 'ca.csr', '-signkey', 'ca.key', '-days', '2', '-extfile', 'ca.ext', '-out', 'ca.pem')
  key('server.key')
  openssl('req', '-new', '-key', 'server.key', '-subj', '/CN=127.0.0.1', '-out', 'server.csr')
  openssl(
    'x509', '-req', '-in', 'server.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial',
    '-days', '2', '-extfile', 'server.ext', '-out', 'server.pem',
  )
  return { ca: join(dir, 'ca.pem'), cert: join(dir, 'server.pem'), key: join(dir, 'server.key') }
}

/** Big integers (etcd's member ids are uint64) as strings, so JSON.parse keeps them exact. */
function parseJsonWithIds(text) {
  return JSON.parse(text.replace(/([:[,]\s*)(\d{16,})(?=\s*[,\]}])/g, '$1"$2"'))
}

class Member {
  constructor(index, dir, args) {
    this.index = index
    this.name = `m${index}`
    this.args = args
    this.logPath = join(dir, `${this.name}.log`)
    this.child = null
    this.exited = null
    this.paused = false
    this.tail = []
  }

  get running() {
    return this.child !== null && this.child.exitCode === null && this.child.signalCode === null
  }

  /** Starts etcd; resolves when it serves client requests, rejects (with its log tail) if it exits
   * or is not ready within READY_TIMEOUT_MS. */
  start(extraArgs) {
    const child = spawn('etcd', [...this.args, ...extraArgs], { stdio: ['ignore', 'ignore', 'pipe'] })
    this.child = child
    this.paused = false
    this.tail = []
    this.exited = once(child, 'exit').catch(() => {})
    const log = createWriteStream(this.logPath, { flags: 'a' })
    const lines = createInterface({ input: child.stderr, crlfDelay: Infinity })
    return new Promise((resolve, reject) => {
      let ready = false
      const fail = (why) => {
        if (ready) return
        ready = true
        clearTimeout(timer)
        reject(new Error(`etcd member ${this.name} ${why}; the last lines of its log:\n${this.tail.join('\n')}`))
      }
      const timer = setTimeout(() => {
        fail(`was not ready after ${READY_TIMEOUT_MS} ms`)
        child.kill('SIGKILL')
      }, READY_TIMEOUT_MS)
      lines.on('line', (line) => {
        log.write(line + '\n')
        this.tail.push(line)
        if (this.tail.length > TAIL_LINES) this.tail.shift()
        if (!ready && READY.test(line)) {
          ready = true
          clearTimeout(timer)
          resolve()
        }
      })
      child.on('error', (error) => fail(`could not be started (${error.message})`))
      // 'close' comes after the last stderr line has been read, so the tail is complete.
      child.on('close', (code, signal) => {
        log.end()
        fail(`exited before it was ready (code ${code}, signal ${signal})`)
      })
    })
  }

  killNow() {
    if (this.running) this.child.kill('SIGKILL')
  }
}

class Cluster {
  constructor({ dir, members, scheme, clientPorts, tlsFiles, users }) {
    this.dir = dir
    this.members = members
    this.scheme = scheme
    this.endpoints = clientPorts.map((p) => `127.0.0.1:${p}`)
    this.tlsFiles = tlsFiles
    if (tlsFiles) this.ca = tlsFiles.ca
    if (users) this.users = users
    this.stopped = null
  }

  /** 'etcd://127.0.0.1:P0,127.0.0.1:P1/prefix' ('etcds://' with tls). */
  url(prefix = '') {
    return `${this.scheme}://${this.endpoints.join(',')}/${String(prefix).replace(/^\/+/, '')}`
  }

  member(i) {
    const m = this.members[i]
    if (!m) throw new RangeError(`no member ${i} in a cluster of ${this.members.length}`)
    return m
  }

  /** SIGKILL member i; resolves once it has exited. */
  async kill(i) {
    const m = this.member(i)
    m.killNow()
    await m.exited
  }

  /** SIGSTOP member i: its process stays, answers nothing. */
  async pause(i) {
    const m = this.member(i)
    if (!m.running) throw new Error(`member ${i} is not running`)
    m.child.kill('SIGSTOP')
    m.paused = true
  }

  async resume(i) {
    const m = this.member(i)
    if (!m.running) throw new Error(`member ${i} is not running`)
    m.child.kill('SIGCONT')
    m.paused = false
  }

  /** Starts killed member i again with its data dir and flags; resolves when it serves clients
   * (for that, a quorum of the cluster must be up). */
  async restart(i) {
    const m = this.member(i)
    if (m.running) throw new Error(`member ${i} is still running: kill(${i}) first`)
    if (this.stopped) throw new Error('the cluster was stopped')
    await m.start(['--initial-cluster-state', 'existing'])
  }

  /** Endpoints of the members that are running and not paused. */
  liveEndpoints() {
    return this.members.filter((m) => m.running && !m.paused).map((m) => this.endpoints[m.index])
  }

  /** etcdctl (API v3) on the live members, with the CA for tls and `user` (default: root when auth
   * is on; null for none) as 'name:password'. Resolves with stdout; rejects with stderr in the
   * message. */
  async ctl(args, { user, endpoints = this.liveEndpoints(), timeout = '10s' } = {}) {
    const flags = [`--endpoints=${endpoints.join(',')}`, `--command-timeout=${timeout}`]
    if (this.tlsFiles) flags.push(`--cacert=${this.tlsFiles.ca}`)
    const who = user === undefined ? this.users?.root : user === null ? null : (this.users?.[user] ?? user)
    if (who) flags.push(`--user=${typeof who === 'string' ? who : `${who.name}:${who.password}`}`)
    try {
      const { stdout } = await run('etcdctl', [...flags, ...args], { env: { ...process.env, ETCDCTL_API: '3' } })
      return stdout
    } catch (error) {
      error.message = `etcdctl ${args.join(' ')} failed: ${error.stderr?.trim() || error.message}`
      throw error
    }
  }

  /** Index of the current leader, as the live members report it. While an election is on (no
   * leader, or the reported one is not live yet), asks again every 100 ms, for up to `timeoutMs`. */
  async leader({ timeoutMs = 10_000 } = {}) {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      let last = 'no member answered'
      try {
        const status = parseJsonWithIds(await this.ctl(['endpoint', 'status', '-w', 'json'], { user: null }))
        const ids = new Map(status.map((s) => [s.Status.header.member_id, this.endpoints.indexOf(s.Endpoint)]))
        const leaders = new Set(status.map((s) => s.Status.leader))
        const [id] = leaders
        if (leaders.size === 1 && ids.has(id)) return ids.get(id)
        last = `leaders reported: ${[...leaders].join(', ')}`
      } catch (error) {
        last = error.message
      }
      if (Date.now() > deadline) throw new Error(`no leader among the live members after ${timeoutMs} ms (${last})`)
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
  }

  _killNow() {
    for (const m of this.members) m.killNow()
    live.delete(this)
    try {
      // A killed member may not be gone yet: retry a removal that meets its last writes.
      rmSync(this.dir, { recursive: true, force: true, maxRetries: 5 })
    } catch {
      // At process exit, a leftover temporary directory is not worth an error.
    }
  }

  /** Kills every member and removes the directory. Idempotent. */
  stop() {
    this.stopped ??= (async () => {
      for (const m of this.members) m.killNow()
      await Promise.all(this.members.map((m) => m.exited))
      rmSync(this.dir, { recursive: true, force: true })
      live.delete(this)
    })()
    return this.stopped
  }
}

async function tryStart({ members: count, auth, tls, etcdArgs }) {
  const dir = mkdtempSync(join(tmpdir(), 'kvstore-etcd-'))
  const ports = await freePorts(2 * count)
  const clientPorts = ports.slice(0, count)
  const peerPorts = ports.slice(count)
  const tlsFiles = tls ? makeCertificates(dir) : null
  const clientScheme = tls ? 'https' : 'http'
  const initialCluster = peerPorts.map((p, i) => `m${i}=http://127.0.0.1:${p}`).join(',')
  const token = `kvstore-test-${process.pid}-${peerPorts[0]}`
  const members = clientPorts.map((clientPort, i) => {
    const client = `${clientScheme}://127.0.0.1:${clientPort}`
    const peer = `http://127.0.0.1:${peerPorts[i]}`
    const args = [
      `--name=m${i}`,
      `--data-dir=${join(dir, `m${i}`)}`,
      `--listen-client-urls=${client}`,
      `--advertise-client-urls=${client}`,
      `--listen-peer-urls=${peer}`,
      `--initial-advertise-peer-urls=${peer}`,
      `--initial-cluster=${initialCluster}`,
      `--initial-cluster-token=${token}`,
      '--heartbeat-interval=50',
      '--election-timeout=500',
      // Tests authenticate often; bcrypt's default cost 10 takes ~50 ms a password check.
      '--bcrypt-cost=4',
    ]
    if (tlsFiles) args.push(`--cert-file=${tlsFiles.cert}`, `--key-file=${tlsFiles.key}`)
    args.push(...etcdArgs)
    return new Member(i, dir, args)
  })
  const users = auth
    ? {
        root: { name: 'root', password: 'root-secret' },
        app: { name: 'app', password: 'app-secret', prefix: '/app' },
        other: { name: 'other', password: 'other-secret', prefix: '/other' },
      }
    : null
  const cluster = new Cluster({ dir, members, scheme: tls ? 'etcds' : 'etcd', clientPorts, tlsFiles, users })
  live.add(cluster)
  hookProcessExit()
  try {
    await Promise.all(members.map((m) => m.start(['--initial-cluster-state=new'])))
    if (auth) await enableAuth(cluster)
  } catch (error) {
    await cluster.stop()
    throw error
  }
  return cluster
}

async function enableAuth(cluster) {
  const { root, app, other } = cluster.users
  const ctl = (...args) => cluster.ctl(args, { user: null })
  await ctl('user', 'add', root.name, `--new-user-password=${root.password}`)
  await ctl('role', 'add', 'root')
  await ctl('user', 'grant-role', root.name, 'root')
  for (const user of [app, other]) {
    const role = `${user.name}-rw`
    await ctl('role', 'add', role)
    await ctl('role', 'grant-permission', role, '--prefix=true', 'readwrite', user.prefix)
    await ctl('user', 'add', user.name, `--new-user-password=${user.password}`)
    await ctl('user', 'grant-role', user.name, role)
  }
  await ctl('auth', 'enable')
}

/** Starts an etcd cluster of `members` members; see the top of this file for what it returns.
 * `etcdArgs` go to every member after the harness's own flags (e.g. ['--max-txn-ops=16']). A start
 * that fails because a port was taken meanwhile is tried again on new ports (3 tries). */
export async function startCluster({ members = 1, auth = false, tls = false, etcdArgs = [] } = {}) {
  if (!Number.isInteger(members) || members < 1) throw new RangeError('members must be a whole number ≥ 1')
  for (let attempt = 1; ; attempt++) {
    try {
      return await tryStart({ members, auth, tls, etcdArgs })
    } catch (error) {
      if (attempt >= 3 || !/address already in use/.test(error.message)) throw error
    }
  }
}
