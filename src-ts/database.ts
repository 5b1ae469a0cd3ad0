// A store file, opened once per process and shared by every handle and worker thread.
import { checkCodec } from './codecs'
import { commitLocks, type CommitItem, type GroupCommitOptions } from './entry-lock'
import { native, settled, StoreClosedError } from './errors'
import { silentLogger, type Logger } from './logger'
import { MapStore } from './map-store'
import { binding, type NativeDatabase } from './native'
import { checkDatabaseOptions, checkLogger, checkMapOptions, checkPath, checkTableName, checkTimeout, isClusterUrl, type DatabaseOptions, type MapStoreOptions } from './options'

const ignore = (): void => {}

export class Database {
  readonly #native: NativeDatabase
  readonly #options: DatabaseOptions
  readonly #stores = new Set<MapStore<unknown>>()
  readonly #onClose: (() => void) | undefined
  #closed = false
  /** The close in progress or done; set by the first close(). */
  #closing: Promise<void> | undefined
  #flushScheduled = false
  readonly #flush = (): void => {
    this.#flushScheduled = false
    if (!this.#closed) this.#native.flush()
  }

  private constructor(handle: NativeDatabase, options: DatabaseOptions, onClose?: () => void) {
    this.#native = handle
    this.#options = options
    this.#onClose = onClose
  }

  /**
   * Opens (creating if needed) a store file. Opening a file that is already open in this
   * process, from any thread, shares its core; another process holding it → DatabaseLockedError.
   */
  static async open(path: string, options: DatabaseOptions = {}, onClose?: () => void): Promise<Database> {
    if (!isClusterUrl(path)) return Database.openSync(path, options, onClose)
    // Connecting and loading the replica take round trips: off the event loop.
    checkPath('path', path)
    const nativeOptions = checkDatabaseOptions(options, path)
    return Database.#attach(await settled(native(() => binding.openDatabase(path, nativeOptions))), options, onClose)
  }

  /** @internal A file store, opened on this thread (a cluster takes `open`). */
  static openSync(path: string, options: DatabaseOptions = {}, onClose?: () => void): Database {
    checkPath('path', path)
    const nativeOptions = checkDatabaseOptions(options, path)
    return Database.#attach(native(() => binding.NativeDatabase.open(path, nativeOptions)), options, onClose)
  }

  static #attach(handle: NativeDatabase, options: DatabaseOptions, onClose?: () => void): Database {
    const repairMs = handle.repairMs
    if (repairMs !== null && repairMs !== undefined) {
      options.logger?.warn(`kvstore: '${handle.path}' was not closed cleanly; redb repaired it in ${repairMs.toFixed(1)} ms`)
    }
    return new Database(handle, options, onClose)
  }

  /**
   * Runs redb's integrity check over a store file that is not open: true when clean, false when
   * it had to be repaired; DatabaseCorruptError when it cannot be.
   */
  static async checkIntegrity(path: string): Promise<boolean> {
    checkPath('path', path)
    return native(() => binding.checkIntegrity(path))
  }

  get path(): string {
    return this.#native.path
  }

  get closed(): boolean {
    return this.#closed
  }

  /** A named map in this file. `T` is the type of its values. */
  mapStore<T = unknown>(name: string, options: MapStoreOptions<T> = {}): MapStore<T> {
    this.#checkOpen()
    checkTableName(name)
    const checked = checkMapOptions(options)
    const codec = checkCodec(options.codec)
    const handle = native(() => this.#native.mapStore(name, { codec: codec.name, ...checked }))
    const logger: Logger = checkLogger(options.logger) ?? this.#options.logger ?? silentLogger
    const store = MapStore.attach<T>({
      database: this,
      native: handle,
      name,
      codec,
      logger,
      lockTimeoutMs: checkTimeout('lockTimeoutMs', options.lockTimeoutMs) ?? this.#options.lockTimeoutMs ?? Infinity,
      slowCommitMs: checkTimeout('slowCommitMs', options.slowCommitMs) ?? this.#options.slowCommitMs ?? 1000,
      slowLockWaitMs: checkTimeout('slowLockWaitMs', options.slowLockWaitMs) ?? this.#options.slowLockWaitMs ?? 1000,
    })
    this.#stores.add(store as MapStore<unknown>)
    return store
  }

  /** The maps of this file and the codec each was created with. */
  tables(): { name: string; codec: string }[] {
    this.#checkOpen()
    return native(() => this.#native.tables())
  }

  /**
   * Writes a consistent copy of the whole file, as of one snapshot, to `destPath` (which must
   * not exist). Commits go on meanwhile; the copy goes to a working file of its own beside
   * `destPath` and is linked into place only when complete, never over an existing file.
   * close() ends a backup still copying (StoreClosedError).
   */
  async backup(destPath: string): Promise<void> {
    checkPath('destPath', destPath)
    this.#checkOpen()
    return settled(native(() => this.#native.backup(destPath)))
  }

  /**
   * Reclaims free space in the file once the commits queued so far are written; true if it
   * compacted anything. Fails with InvalidArgumentError while a walk (getEntries) or a backup
   * is open.
   */
  async compact(): Promise<boolean> {
    this.#checkOpen()
    return settled(native(() => this.#native.compact()))
  }

  /**
   * Resolves once reads through this handle see everything committed anywhere before the call:
   * read after it to read linearizably. At once for a file; with etcd, once the local replica
   * caught up with the cluster.
   */
  async sync(): Promise<void> {
    this.#checkOpen()
    return settled(native(() => this.#native.sync()))
  }

  /**
   * Commits several held locks at once: every entry is written in one transaction (one etcd
   * transaction with a cluster), all or none, sharing group commit with the other commits. An
   * item is an EntryLock (its entry is written) or `{ lock, delete: true }`. Every lock must be
   * held, of a map of this store (any handle of the same file or cluster), and named once;
   * otherwise InvalidArgumentError, nothing written, every lock still held. On success every
   * lock is released (kept with `updateOnly`) and each handle ends as after its own commit; on
   * failure all are released (kept with `holdLockOnFailure`). A CodecError of any entry refuses
   * the whole commit before anything is queued. With etcd, a lost lock fails it with
   * LockLostError and nothing is written; one commit writes at most 60 entries there.
   */
  async commit(items: readonly CommitItem[], options: GroupCommitOptions = {}): Promise<void> {
    this.#checkOpen()
    return commitLocks(this, this.#native, items, options)
  }

  /**
   * @internal A commit was prepared: queue this turn's commits together once the turn's
   * microtasks have run, so they share one transaction (and one fsync).
   */
  commitPrepared(): void {
    if (this.#flushScheduled) return
    this.#flushScheduled = true
    if (this.#options.durability === 'none') queueMicrotask(this.#flush)
    else setImmediate(this.#flush)
  }

  #checkOpen(): void {
    if (this.#closed) throw new StoreClosedError('the store is closed')
  }

  /**
   * Waits for commits in flight, rejects lock waiters with StoreClosedError, releases this
   * handle's locks; the file closes when its last handle in the process closes. The waiting
   * (round trips to a cluster, a file's final fsync) is off the event loop; calls made once
   * close() began fail with StoreClosedError at once. Idempotent: a second call resolves when
   * the first close finished.
   */
  async close(): Promise<void> {
    if (this.#closing !== undefined) return this.#closing.then(ignore, ignore)
    this.#closed = true
    for (const store of this.#stores) store.closeWalks()
    this.#stores.clear()
    this.#closing = this.#closeNative()
    return this.#closing
  }

  async #closeNative(): Promise<void> {
    // The native close waits for this handle's commits in flight and settles their promises
    // before its own. It rejects (an IoError) when the file's final sync failed and
    // acknowledged non-durable commits were lost; the handle is closed either way.
    try {
      await settled(native(() => this.#native.close()))
    } finally {
      this.#onClose?.()
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close()
  }
}
