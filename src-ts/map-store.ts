// The user-facing map: per-key locks handed out as EntryLock handles, lock-free reads of
// committed data, auto keys. All shared state lives in the Rust core, so any number of
// handles in any number of worker threads see the same locks, cache and commits.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Codec } from './codecs'
import { decodeValue } from './codecs'
import { Database } from './database'
import { EntryLock, type Entry, type LockContext } from './entry-lock'
import { checkRangeOptions, EntryRange, OpenWalks, type RangeContext, type RangeOptions } from './entry-range'
import { checkMetadata, decodeRecord, readEnvelope, type Metadata } from './envelope'
import { AbortError, InvalidArgumentError, native, settled, StoreClosedError } from './errors'
import type { Logger } from './logger'
import { checkWatchOptions, Watch, type WatchOptions } from './watch'
import type { NativeLocked, NativeMapStore, NativeStats } from './native'
import { checkObject, checkTimeout, checkWellFormedKey, type OpenOptions } from './options'

export interface LockOptions {
  /** Give up waiting after this many ms with LockTimeoutError (default: the store's lockTimeoutMs). */
  timeoutMs?: number
  /** Give up waiting when aborted, with AbortError. */
  signal?: AbortSignal
}

export interface CreateOptions<T> extends LockOptions {
  value?: T
  metadata?: Metadata
  /** Return the existing entry (locked, `existed: true`) instead of failing; `value` is then ignored. */
  allowExisting?: boolean
}

export interface StoredEntry<T> {
  key: string
  value: T
  metadata: Metadata
}

/**
 * entries, fileBytes, cacheHits/cacheMisses/cacheEntries/cacheBytes, locksHeld/locksWaiting, and commits
 * with the write transactions (fsyncs when durable) that carried them: batches, failedBatches,
 * largestBatch; unsyncedBatches: non-durable transactions not yet synced (what a crash would lose).
 */
export type Stats = NativeStats & {
  /** Commits per write transaction: how many commits shared each fsync. */
  commitsPerBatch: number
  /** Walks of this handle whose snapshot is still open. */
  openSnapshots: number
}

/** A lock as the binding hands it over: a bare token when there is no committed record. */
type Locked = number | NativeLocked

const MODE_EXISTING = 0
const MODE_NEW = 1
const MODE_ANY = 2

/** @internal */
export interface MapStoreParts<T> {
  database: Database
  native: NativeMapStore
  name: string
  codec: Codec<T>
  logger: Logger
  lockTimeoutMs: number
  slowCommitMs: number
  slowLockWaitMs: number
  ownsDatabase?: boolean
}

function checkKey(key: unknown): asserts key is string {
  if (typeof key !== 'string') throw new TypeError(`a key must be a string, got ${key === null ? 'null' : typeof key}`)
  checkWellFormedKey('the key', key)
}

/** setTimeout's longest delay (2^31 − 1 ms, about 24.8 days); longer ones fire at once. */
const LONGEST_TIMER = 2 ** 31 - 1

/**
 * Calls `fire` after `ms` (finite), however long: delays over setTimeout's limit are a chain of
 * timers. Returns the cancel function.
 */
function longTimeout(fire: () => void, ms: number): () => void {
  let timer: NodeJS.Timeout
  const arm = (delay: number): void => {
    if (delay <= LONGEST_TIMER) timer = setTimeout(fire, delay)
    else timer = setTimeout(() => arm(delay - LONGEST_TIMER), LONGEST_TIMER)
  }
  arm(ms)
  return () => clearTimeout(timer)
}

function isPromise<T>(value: T | Promise<T>): value is Promise<T> {
  return typeof (value as Promise<T>)?.then === 'function'
}

export class MapStore<T = unknown> {
  readonly #parts: MapStoreParts<T>
  readonly #walks = new OpenWalks()
  /** Reused for every getEntry: the native side copies the record here (see getInto). */
  #readBuffer = Buffer.allocUnsafeSlow(16 * 1024)
  readonly #lockContext: LockContext
  readonly #rangeContext: RangeContext<T>
  #closed = false

  private constructor(parts: MapStoreParts<T>) {
    this.#parts = parts
    this.#lockContext = {
      native: parts.native,
      codec: parts.codec as Codec<never>,
      logger: parts.logger,
      isClosed: () => this.closed,
      commitPrepared: () => parts.database.commitPrepared(),
      database: parts.database,
      slowCommitMs: parts.slowCommitMs,
    }
    this.#rangeContext = {
      native: parts.native,
      codec: parts.codec,
      checkOpen: () => this.#checkOpen(),
      walks: this.#walks,
    }
  }

  /** @internal */
  static attach<T>(parts: MapStoreParts<T>): MapStore<T> {
    return new MapStore(parts)
  }

  /** Opens one named map (`options.table`, default 'default') of a store file. */
  static async open<T = unknown>(path: string, options: OpenOptions<T> = {}): Promise<MapStore<T>> {
    checkObject('options', options)
    const { table = 'default', ...rest } = options
    return MapStore.#onlyMap(await Database.open(path, rest), table, rest)
  }

  static #openSync<T>(path: string, options: OpenOptions<T>, onClose?: () => void): MapStore<T> {
    checkObject('options', options)
    const { table = 'default', ...rest } = options
    return MapStore.#onlyMap(Database.openSync(path, rest, onClose), table, rest)
  }

  /** The map `table` of a database opened for it alone: closing the map closes the database. */
  static #onlyMap<T>(database: Database, table: string, rest: Omit<OpenOptions<T>, 'table'>): MapStore<T> {
    try {
      const store = database.mapStore<T>(table, rest)
      store.#parts.ownsDatabase = true
      return store
    } catch (err) {
      // The open's own error is what the caller hears.
      database.close().catch(() => {})
      throw err
    }
  }

  /** A store in a fresh temporary directory, removed when the store closes. */
  static async temporary<T = unknown>(options: OpenOptions<T> = {}): Promise<MapStore<T>> {
    if (options?.readOnly === true) throw new InvalidArgumentError('a temporary store is new and empty: it cannot be opened readOnly')
    const dir = mkdtempSync(join(tmpdir(), 'kvstore-'))
    try {
      return MapStore.#openSync(join(dir, 'store.redb'), options, () => rmSync(dir, { recursive: true, force: true }))
    } catch (err) {
      rmSync(dir, { recursive: true, force: true })
      throw err
    }
  }

  get name(): string {
    return this.#parts.name
  }

  get path(): string {
    return this.#parts.database.path
  }

  get database(): Database {
    return this.#parts.database
  }
  /** See Database.sync(): resolves once reads see everything committed anywhere before the call. */
  async sync(): Promise<void> {
    return this.database.sync()
  }


  get closed(): boolean {
    return this.#closed || this.#parts.database.closed
  }

  #checkOpen(): void {
    if (this.closed) throw new StoreClosedError('the store is closed')
  }

  // ---- locks ----

  #lock(key: string, mode: number, options: LockOptions): Locked | Promise<Locked> {
    this.#checkOpen()
    checkObject('options', options)
    const timeoutMs = checkTimeout('timeoutMs', options.timeoutMs) ?? this.#parts.lockTimeoutMs
    const { signal } = options
    if (signal !== undefined && !(signal instanceof AbortSignal)) throw new InvalidArgumentError('signal must be an AbortSignal')
    if (signal?.aborted) throw new AbortError(undefined, { cause: signal.reason })
    const store = this.#parts.native
    const buffer = this.#readBuffer
    const locked = native(() => store.lock(key, mode, buffer))
    // Queued: the wait's ticket (unique in the process, for cancelWait) is in the read buffer.
    if (isPromise(locked)) return this.#wait(key, buffer.readDoubleLE(0), locked, timeoutMs, signal)
    if (typeof locked !== 'number') return locked
    // Granted at once: the record, if any, was copied into the read buffer after its length.
    const length = buffer.readInt32LE(0)
    if (length < 0) return locked
    return { token: locked, existed: true, record: Buffer.from(buffer.subarray(4, 4 + length)) }
  }

  async #wait(key: string, ticket: number, locked: Promise<NativeLocked>, timeoutMs: number, signal: AbortSignal | undefined): Promise<Locked> {
    const store = this.#parts.native
    // Waiting: the core owns the queue; a timeout or abort asks it to drop this waiter, which
    // then rejects the promise below (unless the lock was granted first).
    const cancelTimer = Number.isFinite(timeoutMs) ? longTimeout(() => store.cancelWait(key, ticket, 'timeout'), timeoutMs) : undefined
    const onAbort = (): void => {
      store.cancelWait(key, ticket, 'abort')
    }
    signal?.addEventListener('abort', onAbort, { once: true })
    const started = performance.now()
    try {
      const granted = await settled(locked)
      const waited = performance.now() - started
      if (waited >= this.#parts.slowLockWaitMs) this.#parts.logger.warn(`kvstore: waited ${waited.toFixed(1)} ms for the lock on '${key}'`)
      return granted
    } catch (err) {
      if (err instanceof AbortError && signal?.aborted) throw new AbortError(undefined, { cause: signal.reason })
      throw err
    } finally {
      cancelTimer?.()
      signal?.removeEventListener('abort', onAbort)
    }
  }

  #handle(key: string, locked: Locked, fresh?: { value?: T; metadata?: Metadata }): EntryLock<T> {
    if (typeof locked === 'number') {
      return new EntryLock(this.#lockContext, key, locked, false, fresh?.value as T, { ...fresh?.metadata })
    }
    let value: T
    let metadata: Metadata
    if (locked.record) {
      try {
        const envelope = decodeRecord(key, locked.record)
        value = decodeValue(this.#parts.codec, key, envelope.value)
        metadata = envelope.metadata
      } catch (err) {
        native(() => this.#parts.native.release(key, locked.token))
        throw err
      }
    } else {
      value = fresh?.value as T
      metadata = { ...fresh?.metadata }
    }
    return new EntryLock(this.#lockContext, key, locked.token, locked.existed, value, metadata)
  }

  /**
   * Creates `key` (or a fresh auto key when `key` is undefined) and returns it locked. Fails with
   * EntryAlreadyExistsError if it exists, unless `allowExisting`. Waits if the key is locked.
   */
  async createAndLockEntry(key: string | undefined, options: CreateOptions<T> = {}): Promise<EntryLock<T>> {
    checkObject('options', options)
    if (key !== undefined) checkKey(key)
    if (options.metadata !== undefined) checkMetadata(key, options.metadata)
    if (key === undefined) key = await this.generateNextKey()
    const locked = this.#lock(key, options.allowExisting ? MODE_ANY : MODE_NEW, options)
    return this.#handle(key, isPromise(locked) ? await locked : locked, options)
  }

  /** Waits for `key`'s lock and returns the entry locked. EntryNotFoundError if absent. */
  async getAndLockEntry(key: string, options: LockOptions = {}): Promise<EntryLock<T>> {
    checkKey(key)
    const locked = this.#lock(key, MODE_EXISTING, options)
    return this.#handle(key, isPromise(locked) ? await locked : locked)
  }

  /** Locks `key`, runs `update` on its entry, commits. If `update` throws, releases and rethrows. */
  async updateEntry<R>(key: string, update: (entry: Entry<T>) => R | Promise<R>, options: LockOptions = {}): Promise<R> {
    if (typeof update !== 'function') throw new InvalidArgumentError('update must be a function')
    const lock = await this.getAndLockEntry(key, options)
    let result: R
    try {
      result = await update(lock.entry)
    } catch (err) {
      lock.release()
      throw err
    }
    await lock.commit()
    return result
  }

  /** The next auto key: strictly increasing, never repeated, zero-padded so byte order is creation order. */
  async generateNextKey(): Promise<string> {
    this.#checkOpen()
    const next = native(() => this.#parts.native.nextKey())
    return isPromise(next) ? settled(next) : next
  }

  /** Waits for `key`'s lock and deletes the entry. Idempotent; true if there was one. */
  async deleteEntry(key: string, options: LockOptions = {}): Promise<boolean> {
    checkKey(key)
    const locked = await this.#lock(key, MODE_ANY, options)
    const existed = typeof locked !== 'number' && locked.existed
    const token = typeof locked === 'number' ? locked : locked.token
    const lock = new EntryLock(this.#lockContext, key, token, existed, undefined as T, {})
    if (!existed) {
      lock.release()
      return false
    }
    await lock.commit({ delete: true })
    return true
  }

  // ---- reads ----

  /** The last committed entry, or undefined. Never waits for a lock. */
  getEntry(key: string): StoredEntry<T> | undefined {
    checkKey(key)
    this.#checkOpen()
    let length = this.#readInto(key)
    // The record may grow between two reads (another thread commits): read until it fits.
    while (length > this.#readBuffer.length) {
      this.#readBuffer = Buffer.allocUnsafeSlow(Math.max(length, 2 * this.#readBuffer.length))
      length = this.#readInto(key)
    }
    if (length < 0) return undefined
    const buffer = this.#readBuffer
    // The codec must not keep views into the shared buffer (msgpack copies bin values; raw copies).
    const { metadata, valueStart } = readEnvelope(key, buffer, 0, length)
    return { key, value: decodeValue(this.#parts.codec, key, buffer.subarray(valueStart, length)), metadata }
  }

  /** Copies `key`'s committed record into the read buffer; its length, or -1 if absent. */
  #readInto(key: string): number {
    const buffer = this.#readBuffer
    return native(() => this.#parts.native.getInto(key, buffer))
  }

  /** A walk over one snapshot of committed entries, in byte-wise key order. */
  getEntries(options: RangeOptions = {}): EntryRange<T> {
    this.#checkOpen()
    return new EntryRange(this.#rangeContext, checkRangeOptions(options))
  }

  /** How many committed entries match. */
  count(options: RangeOptions = {}): number {
    this.#checkOpen()
    const checked = checkRangeOptions(options)
    return native(() => this.#parts.native.count(checked))
  }

  // ---- watching ----

  /**
   * Every change committed to this map from now on — from any handle and worker thread of the
   * process, and with etcd from any process — in commit order, a multi-entry commit's changes
   * together: `for await (const { type, key, value, metadata } of map.watch({ prefix, signal }))`.
   * A consumer more than `highWaterMark` changes behind (default 10 000) gets WatchOverflowError.
   * `break`, `return()`, the signal (AbortError) or closing the map or its database end it.
   */
  watch(options: WatchOptions = {}): Watch<T> {
    this.#checkOpen()
    const { prefix, signal, highWaterMark } = checkWatchOptions(options)
    if (signal?.aborted) throw new AbortError(undefined, { cause: signal.reason })
    const watcher = native(() => this.#parts.native.watch({ prefix, highWaterMark }))
    return new Watch(watcher, this.#parts.codec, signal)
  }

  stats(): Stats {
    this.#checkOpen()
    const s: NativeStats = native(() => this.#parts.native.stats())
    return { ...s, commitsPerBatch: s.batches === 0 ? 0 : s.commits / s.batches, openSnapshots: this.#walks.size }
  }

  // ---- maintenance (whole file) ----

  /** See Database.backup: a consistent copy of the whole file while commits go on. */
  backup(destPath: string): Promise<void> {
    return this.#parts.database.backup(destPath)
  }

  /** See Database.compact. */
  compact(): Promise<boolean> {
    return this.#parts.database.compact()
  }

  // ---- closing ----

  /** @internal Frees every snapshot still open. */
  closeWalks(): void {
    this.#walks.closeAll()
  }

  /**
   * Closes this map. A store from MapStore.open/temporary closes its file handle (see
   * Database.close); a map from db.mapStore() only stops this view.
   */
  async close(): Promise<void> {
    if (this.#closed) {
      // A second call waits for the first one's close of the database (never rethrowing its
      // error: the database's close() is idempotent that way).
      if (this.#parts.ownsDatabase) await this.#parts.database.close()
      return
    }
    this.#closed = true
    this.closeWalks()
    // Rejects the lock waits queued through this map; a grant on its way is released.
    this.#parts.native.close()
    if (this.#parts.ownsDatabase) await this.#parts.database.close()
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close()
  }
}
