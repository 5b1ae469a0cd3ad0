// Option shapes and their checks: bad values are InvalidArgumentError before anything opens.
import type { Codec } from './codecs'
import { IllegalKeyError, InvalidArgumentError } from './errors'
import type { Logger } from './logger'

declare global {
  interface String {
    /** ES2024; in Node since 20. */
    isWellFormed(): boolean
  }
}

// Keys, table names, metadata and paths cross into the core as UTF-8, where a lone surrogate
// would become U+FFFD: two different JS strings would name one entry. Such strings are refused.

/** A key-like string (key, prefix, start, stop, table name) that is not well-formed Unicode → IllegalKeyError. */
export function checkWellFormedKey(what: string, text: string): void {
  if (!text.isWellFormed()) throw new IllegalKeyError(`${what} ${JSON.stringify(text)} is not well-formed Unicode (it holds a lone surrogate)`)
}

/** A file path: a non-empty, well-formed string, else InvalidArgumentError. */
export function checkPath(name: string, path: unknown): string {
  if (typeof path !== 'string') throw new TypeError(`${name} must be a string, got ${path === null ? 'null' : typeof path}`)
  if (path.length === 0) throw new InvalidArgumentError(`${name} must not be empty`)
  if (!path.isWellFormed()) throw new InvalidArgumentError(`${name} ${JSON.stringify(path)} is not well-formed Unicode (it holds a lone surrogate)`)
  return path
}

export type Durability = 'immediate' | 'none'

export interface DatabaseOptions {
  /**
   * 'immediate' (default): fsync before commit() resolves. 'none': commit() resolves before the
   * fsync; the file is made durable within `syncIntervalMs` of the first such commit, and at close.
   */
  durability?: Durability
  /** With durability 'none': the most time (ms) a commit stays unsynced, i.e. what a crash can lose (default 1000). */
  syncIntervalMs?: number
  /** redb's page cache for this file, in bytes (default 64 MiB). */
  pageCacheBytes?: number
  /**
   * Open without write access and change nothing: a missing file is not created, a file that was
   * not closed cleanly is refused (it needs a repair), and locks, commits, auto keys and compact()
   * fail with InvalidArgumentError. Reads, walks and backup() work. A file open read-only in this
   * process cannot be opened read-write beside it (DatabaseLockedError). Default false.
   */
  readOnly?: boolean
  /** etcd: this process's session lease, in ms (whole seconds, rounded up): its locks die with it (default 10 000). */
  sessionTtlMs?: number
  /** etcd: every request is bounded by this (ms); no quorum within it → UnavailableError (default 5 000). */
  requestTimeoutMs?: number
  /** etcd: credentials of an etcd user. */
  auth?: { username: string; password: string }
  /** etcd over TLS (`etcds://`): PEM of the CA to trust, and a client certificate and key if the cluster checks clients. */
  tls?: { ca?: string | Uint8Array; cert?: string | Uint8Array; key?: string | Uint8Array }
  /** Default wait for a held lock, in ms (default Infinity). */
  lockTimeoutMs?: number
  /** Receives warnings such as a lock handle collected while held. Silent by default. */
  logger?: Logger
  /** A commit that takes this long (ms) is logged as slow (default 1000). */
  slowCommitMs?: number
  /** A lock wait that takes this long (ms) is logged (default 1000). */
  slowLockWaitMs?: number
}

export interface KeyOptions {
  /** Digits of an auto key (default 13). */
  width?: number
  /** 10 or 36 (default 36). */
  base?: 10 | 36
  /** Numbers leased from the file per write (default 1000). */
  bandwidth?: number
}

export interface MapStoreOptions<T> {
  /** Default codecs.msgpack. Its name is recorded with the table. */
  codec?: Codec<T>
  /**
   * The core's cache of committed records, in bytes: keys, records and ~128 bytes per entry
   * (default 8 MiB, some 30 000 records of 150 bytes; 0 disables). A record over an eighth of it
   * is not cached.
   */
  cacheBytes?: number
  /** The most entries the core's cache holds, within `cacheBytes` (default: no cap; 0 disables). */
  cacheCapacity?: number
  keys?: KeyOptions
  lockTimeoutMs?: number
  logger?: Logger
  slowCommitMs?: number
  slowLockWaitMs?: number
}

export interface OpenOptions<T> extends DatabaseOptions, MapStoreOptions<T> {
  /** The named map inside the file (default 'default'). */
  table?: string
}

export function invalid(name: string, value: unknown, expected: string): never {
  throw new InvalidArgumentError(`${name} must be ${expected}, got ${typeof value === 'string' ? `'${value}'` : String(value)}`)
}

function integer(name: string, value: unknown, min: number, max = Number.MAX_SAFE_INTEGER): number | undefined {
  if (value === undefined) return undefined
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    invalid(name, value, `an integer from ${min} to ${max}`)
  }
  return value
}

export function checkObject(name: string, value: unknown): void {
  if (value !== undefined && (typeof value !== 'object' || value === null)) invalid(name, value, 'an object')
}

export function checkTimeout(name: string, value: unknown): number | undefined {
  if (value === undefined) return undefined
  if (typeof value !== 'number' || Number.isNaN(value) || value < 0) invalid(name, value, 'a number of ms ≥ 0 or Infinity')
  return value
}

export function checkLogger(value: unknown): Logger | undefined {
  if (value === undefined) return undefined
  const logger = value as Logger
  if (typeof value !== 'object' || value === null || typeof logger.warn !== 'function') {
    invalid('logger', value, 'an object with debug, info, warn and error methods')
  }
  return logger
}

/** Whether `location` names an etcd cluster rather than a file. */
/**
 * Whether `location` names a cluster: it starts with `etcd:` or `etcds:`, in any case, so a
 * mistyped URL is refused as malformed rather than taken for a file path (a file whose name
 * starts so is written `./etcd:...`).
 */
export function isClusterUrl(location: string): boolean {
  return /^etcds?:/i.test(location)
}

export interface NativeOpenOptions {
  durable: boolean
  pageCacheBytes?: number
  syncIntervalMs?: number
  readOnly: boolean
  sessionTtlMs?: number
  requestTimeoutMs?: number
  username?: string
  password?: string
  tlsCa?: Buffer
  tlsCert?: Buffer
  tlsKey?: Buffer
}

/** PEM text or bytes, as Node's tls options take them (not a file name: read the file first). */
function pem(name: string, value: unknown): Buffer | undefined {
  if (value === undefined) return undefined
  const bytes = typeof value === 'string' ? Buffer.from(value) : value instanceof Uint8Array ? Buffer.from(value) : undefined
  if (bytes === undefined || !bytes.includes('-----BEGIN ')) {
    return invalid(name, typeof value === 'string' ? value.slice(0, 80) : value, 'PEM text or bytes (-----BEGIN …); to use a file, pass readFileSync(path)')
  }
  return bytes
}

/** The options only a cluster takes, checked; file options a cluster cannot honour are refused. */
function checkClusterOptions(options: DatabaseOptions, durability: Durability): Partial<NativeOpenOptions> {
  if (durability === 'none') invalid('durability', durability, "'immediate' with etcd (a commit is durable once a quorum has it)")
  if (options.readOnly === true) invalid('readOnly', true, 'false with etcd')
  const { auth, tls } = options
  checkObject('auth', auth)
  checkObject('tls', tls)
  if (auth !== undefined && (typeof auth.username !== 'string' || typeof auth.password !== 'string')) {
    invalid('auth', auth, '{ username, password } strings')
  }
  return {
    sessionTtlMs: integer('sessionTtlMs', options.sessionTtlMs, 1, 86_400_000),
    requestTimeoutMs: integer('requestTimeoutMs', options.requestTimeoutMs, 1, 86_400_000),
    username: auth?.username,
    password: auth?.password,
    tlsCa: pem('tls.ca', tls?.ca),
    tlsCert: pem('tls.cert', tls?.cert),
    tlsKey: pem('tls.key', tls?.key),
  }
}

export function checkDatabaseOptions(options: DatabaseOptions, location = ''): NativeOpenOptions {
  checkObject('options', options)
  const { durability = 'immediate' } = options
  if (durability !== 'immediate' && durability !== 'none') invalid('durability', durability, "'immediate' or 'none'")
  const syncIntervalMs = integer('syncIntervalMs', options.syncIntervalMs, 0, 86_400_000)
  checkTimeout('lockTimeoutMs', options.lockTimeoutMs)
  checkTimeout('slowCommitMs', options.slowCommitMs)
  checkTimeout('slowLockWaitMs', options.slowLockWaitMs)
  checkLogger(options.logger)
  const { readOnly = false } = options
  if (typeof readOnly !== 'boolean') invalid('readOnly', readOnly, 'a boolean')
  const cluster = isClusterUrl(location) ? checkClusterOptions(options, durability) : {}
  return { durable: durability === 'immediate', pageCacheBytes: integer('pageCacheBytes', options.pageCacheBytes, 1 << 20), syncIntervalMs, readOnly, ...cluster }
}

export function checkTableName(name: unknown): string {
  if (typeof name !== 'string') throw new TypeError(`a table name must be a string, got ${typeof name}`)
  checkWellFormedKey('the table name', name)
  if (name.length === 0 || Buffer.byteLength(name) > 255) invalid('table', name, 'a name of 1 to 255 bytes')
  return name
}

export function checkMapOptions<T>(options: MapStoreOptions<T>): { cacheCapacity?: number; cacheBytes?: number; keyWidth?: number; keyBase?: number; bandwidth?: number } {
  checkObject('options', options)
  checkObject('keys', options.keys)
  checkTimeout('lockTimeoutMs', options.lockTimeoutMs)
  checkTimeout('slowCommitMs', options.slowCommitMs)
  checkTimeout('slowLockWaitMs', options.slowLockWaitMs)
  checkLogger(options.logger)
  const keys = options.keys ?? {}
  if (keys.base !== undefined && keys.base !== 10 && keys.base !== 36) invalid('keys.base', keys.base, '10 or 36')
  return {
    cacheCapacity: integer('cacheCapacity', options.cacheCapacity, 0),
    cacheBytes: integer('cacheBytes', options.cacheBytes, 0),
    keyWidth: integer('keys.width', keys.width, 1, 64),
    keyBase: keys.base,
    bandwidth: integer('keys.bandwidth', keys.bandwidth, 1),
  }
}
