// A held lock on one key: the entry to edit, and commit/release. After the final commit or
// release the handle is dead, and so is its entry: touching it throws EntryReleasedError.
import type { Codec } from './codecs'
import type { Database } from './database'
import { encodeValue } from './codecs'
import { encodeRecord, type Metadata } from './envelope'
import { EntryReleasedError, InvalidArgumentError, KvStoreError, LockReleasedError, StoreClosedError, fromNative } from './errors'
import type { Logger } from './logger'
import type { NativeDatabase, NativeMapStore } from './native'

export interface CommitOptions {
  /** Delete the entry, then release the lock. */
  delete?: boolean
  /** Persist and keep the lock; the holder may commit again. */
  updateOnly?: boolean
  /** When the write fails, keep the lock so the caller can retry. */
  holdLockOnFailure?: boolean
}

const DELETE = 1
const UPDATE_ONLY = 2
const HOLD_ON_FAILURE = 4

/** What the lock handle shares with the store: enough to release it after garbage collection. */
export interface LockContext {
  readonly native: NativeMapStore
  readonly codec: Codec<never>
  readonly logger: Logger
  isClosed(): boolean
  /** A native commit was prepared; it is queued at the end of this turn. */
  commitPrepared(): void
  /** Commits slower than this (ms) are logged. */
  readonly slowCommitMs: number
  /** The database whose map took the lock (for `db.commit`). */
  readonly database: Database
}

interface LockState {
  key: string
  token: number
  held: boolean
}

// A handle dropped while still held would block its key forever: release it and say so (not
// when the core let go of it already: its handle closed).
const abandoned = new FinalizationRegistry<{ state: LockState; context: LockContext }>(({ state, context }) => {
  if (!state.held || !coreHolds(context, state)) return
  state.held = false
  freeLock(context, state)
  context.logger.warn(`kvstore: the lock on '${state.key}' was garbage-collected while held; it has been released`)
})

/** Whether the core still counts this lock as held: closing the handle that took it frees it. */
function coreHolds(context: LockContext, state: LockState): boolean {
  return context.native.holds(state.key, state.token)
}

/**
 * Lets the core drop the lock. Also when this view of the store is closed: the core's handle
 * may still be open (a `db.mapStore()` view closes alone), and only the core can free the key.
 */
function freeLock(context: LockContext, state: LockState): void {
  try {
    context.native.release(state.key, state.token)
  } catch {
    // The core released it already (its handle closed); there is nothing left to free.
  }
}

export class Entry<T> {
  #lock: EntryLock<T>
  #value: T
  #metadata: Metadata

  constructor(lock: EntryLock<T>, value: T, metadata: Metadata) {
    this.#lock = lock
    this.#value = value
    this.#metadata = metadata
  }

  get value(): T {
    this.#lock.assertHeld()
    return this.#value
  }

  set value(value: T) {
    this.#lock.assertHeld()
    this.#value = value
  }

  /** String metadata stored with the value. */
  get metadata(): Metadata {
    this.#lock.assertHeld()
    return this.#metadata
  }

  set metadata(metadata: Metadata) {
    this.#lock.assertHeld()
    this.#metadata = metadata
  }
}

/** What db.commit reaches of its locks, which keep their state private. */
// Set by EntryLock's static block (declared first: the block runs as the class is defined).
let group: {
  state(lock: EntryLock<unknown>): LockState
  context(lock: EntryLock<unknown>): LockContext
  committing(lock: EntryLock<unknown>): boolean
  setCommitting(lock: EntryLock<unknown>, committing: boolean): void
  die(lock: EntryLock<unknown>): void
  free(lock: EntryLock<unknown>): void
}

export class EntryLock<T> {
  readonly key: string
  readonly entry: Entry<T>
  /** True when `createAndLockEntry(..., { allowExisting: true })` found the entry already there. */
  readonly existed: boolean
  #state: LockState
  #context: LockContext
  #committing = false

  constructor(context: LockContext, key: string, token: number, existed: boolean, value: T, metadata: Metadata) {
    this.key = key
    this.existed = existed
    this.#context = context
    this.#state = { key, token, held: true }
    this.entry = new Entry(this, value, metadata)
    abandoned.register(this, { state: this.#state, context }, this.#state)
  }

  /**
   * Whether this handle still holds its lock: false after the final commit or release, and
   * once the store handle it was taken through closed (the core then passed the key on).
   */
  get held(): boolean {
    return this.#state.held && coreHolds(this.#context, this.#state)
  }

  assertHeld(): void {
    if (!this.#state.held) throw new EntryReleasedError(`the entry '${this.key}' was released; take the lock again to use it`)
  }

  #die(): void {
    if (this.#state.held) {
      this.#state.held = false
      abandoned.unregister(this.#state)
    }
  }

  /** Persists the entry (or deletes it), then releases the lock unless `updateOnly`. */
  commit = (options: CommitOptions = {}): Promise<void> => this.#commit(options)

  async #commit(options: CommitOptions): Promise<void> {
    if (!this.#state.held) throw new LockReleasedError(`the lock on '${this.key}' was already released`)
    if (this.#context.isClosed()) {
      this.release()
      throw new StoreClosedError('the store is closed')
    }
    if (typeof options !== 'object' || options === null) throw new InvalidArgumentError('commit options must be an object')
    const { delete: remove = false, updateOnly = false, holdLockOnFailure = false } = options
    if (remove && updateOnly) {
      throw new InvalidArgumentError('commit cannot both delete and keep the lock (delete with updateOnly)')
    }
    if (this.#committing) throw new InvalidArgumentError(`a commit of '${this.key}' is already in flight`)
    const flags = (remove ? DELETE : 0) | (updateOnly ? UPDATE_ONLY : 0) | (holdLockOnFailure ? HOLD_ON_FAILURE : 0)
    this.#committing = true
    try {
      let record: Buffer | null = null
      if (!remove) {
        try {
          const bytes = encodeValue(this.#context.codec as Codec<T>, this.key, this.entry.value)
          record = encodeRecord(this.key, this.entry.metadata, bytes)
        } catch (err) {
          // Nothing reached the core: free the lock here, unless the caller keeps it to retry.
          if (!holdLockOnFailure) this.#free()
          throw err
        }
      }
      const { key, token } = this.#state
      const started = performance.now()
      const written = this.#context.native.commit(key, token, record, flags)
      this.#context.commitPrepared()
      await written
      const took = performance.now() - started
      if (took >= this.#context.slowCommitMs) this.#context.logger.warn(`kvstore: the commit of '${key}' took ${took.toFixed(1)} ms`)
      if (!updateOnly) this.#die()
    } catch (err) {
      const typed = fromNative(err)
      const gone = typed instanceof KvStoreError && (typed.code === 'ERR_LOCK_RELEASED' || typed.code === 'ERR_STORE_CLOSED')
      if (!holdLockOnFailure || gone) this.#die()
      throw typed
    } finally {
      this.#committing = false
    }
  }

  /**
   * Drops the lock without writing; changes to the entry are discarded. Idempotent. Not while a
   * commit is in flight: the key would pass on before that write lands.
   */
  release = (): void => {
    if (!this.#state.held) return
    if (this.#committing) throw new InvalidArgumentError(`a commit of '${this.key}' is in flight; await it before releasing`)
    this.#free()
  }

  #free(): void {
    this.#die()
    freeLock(this.#context, this.#state)
  }

  static {
    group = {
      state: (lock) => lock.#state,
      context: (lock) => lock.#context,
      committing: (lock) => lock.#committing,
      setCommitting: (lock, committing) => {
        lock.#committing = committing
      },
      die: (lock) => lock.#die(),
      free: (lock) => lock.#free(),
    }
  }
}

// ---- several held locks, one atomic commit (db.commit) ----

export interface GroupCommitOptions {
  /** Persist every entry and keep every lock; the holder may commit again. */
  updateOnly?: boolean
  /** When the write fails, keep every lock so the caller can retry. */
  holdLockOnFailure?: boolean
}

/** An item of `db.commit`: a held lock (its entry is written), or `{ lock, delete: true }`. */
export type CommitItem = EntryLock<any> | { lock: EntryLock<any>; delete?: boolean } // eslint-disable-line @typescript-eslint/no-explicit-any

interface GroupPart {
  lock: EntryLock<unknown>
  state: LockState
  context: LockContext
  remove: boolean
}

/** Every lock of one commit, checked: InvalidArgumentError (nothing written, every lock kept) otherwise. */
function groupParts(items: unknown, updateOnly: boolean): GroupPart[] {
  if (!Array.isArray(items)) throw new InvalidArgumentError('commit takes an array of locks: EntryLock or { lock, delete }; nothing was written')
  const parts: GroupPart[] = []
  const seen = new Set<EntryLock<unknown>>()
  for (const [i, item] of items.entries()) {
    let lock: unknown = item
    let remove: unknown = false
    if (!(item instanceof EntryLock) && typeof item === 'object' && item !== null && 'lock' in item) {
      lock = item.lock
      remove = 'delete' in item ? item.delete : false
      if (remove === undefined) remove = false
    }
    if (!(lock instanceof EntryLock)) {
      throw new InvalidArgumentError(`item ${i} of the commit is not a lock (an EntryLock or { lock, delete }); nothing was written`)
    }
    if (typeof remove !== 'boolean') throw new InvalidArgumentError(`item ${i}: delete must be a boolean; nothing was written`)
    if (remove && updateOnly) {
      throw new InvalidArgumentError(`commit cannot both delete '${lock.key}' and keep the lock (delete with updateOnly); nothing was written`)
    }
    if (seen.has(lock)) throw new InvalidArgumentError(`the lock on '${lock.key}' is named twice in one commit; nothing was written`)
    seen.add(lock)
    const state = group.state(lock)
    const context = group.context(lock)
    if (group.committing(lock)) throw new InvalidArgumentError(`a commit of '${lock.key}' is already in flight; nothing was written`)
    // Only the handle's own view here: the core tells a lock released by its handle's close
    // (InvalidArgumentError) from one lost with an etcd session (LockLostError).
    if (!state.held) {
      throw new InvalidArgumentError(`the lock on '${lock.key}' is not held (committed or released); nothing was written`)
    }
    parts.push({ lock, state, context, remove })
  }
  return parts
}

/**
 * @internal `db.commit(items, options)`: the entries of several held locks (of maps of `database`)
 * written in one transaction, all or none; see Database.commit.
 */
export async function commitLocks(database: Database, nativeDb: NativeDatabase, items: unknown, options: unknown): Promise<void> {
  if (typeof options !== 'object' || options === null) throw new InvalidArgumentError('commit options must be an object')
  if ('delete' in options && options.delete !== undefined) {
    throw new InvalidArgumentError('delete is given per lock: db.commit([{ lock, delete: true }]); nothing was written')
  }
  const { updateOnly = false, holdLockOnFailure = false } = options as GroupCommitOptions
  const parts = groupParts(items, updateOnly)
  if (parts.length === 0) return
  const fail = (err: unknown): never => {
    for (const part of parts) {
      // As each lock's own commit would: a closed store's lock goes, the others per holdLockOnFailure.
      if (!holdLockOnFailure || part.context.isClosed()) group.free(part.lock)
    }
    throw err
  }
  if (database.closed || parts.some((p) => p.context.isClosed())) fail(new StoreClosedError('the store is closed'))
  const records: (Buffer | null)[] = []
  let refused: unknown
  for (const { lock, context, remove } of parts) {
    if (remove) {
      records.push(null)
      continue
    }
    try {
      const bytes = encodeValue(context.codec as Codec<unknown>, lock.key, lock.entry.value)
      records.push(encodeRecord(lock.key, lock.entry.metadata, bytes))
    } catch (err) {
      refused = err
      break
    }
  }
  if (refused !== undefined) {
    // A lock of another store refuses the whole commit first, keeping every lock.
    const foreign = parts.find((p) => p.context.database !== database && p.context.database.path !== database.path)
    if (foreign) throw new InvalidArgumentError(`the lock on '${foreign.lock.key}' belongs to a map of another store; nothing was written`)
    fail(refused)
  }
  const flags = (updateOnly ? UPDATE_ONLY : 0) | (holdLockOnFailure ? HOLD_ON_FAILURE : 0)
  for (const part of parts) group.setCommitting(part.lock, true)
  const started = performance.now()
  try {
    const written = nativeDb.commitGroup(
      parts.map((p) => p.context.native),
      parts.map((p) => p.state.key),
      parts.map((p) => p.state.token),
      records,
      flags,
    )
    database.commitPrepared()
    await written
    const took = performance.now() - started
    const slow = Math.min(...parts.map((p) => p.context.slowCommitMs))
    if (took >= slow) parts[0].context.logger.warn(`kvstore: the commit of ${parts.map((p) => `'${p.lock.key}'`).join(', ')} took ${took.toFixed(1)} ms`)
    if (!updateOnly) for (const part of parts) group.die(part.lock)
  } catch (err) {
    const typed = fromNative(err)
    const gone = typed instanceof KvStoreError && (typed.code === 'ERR_LOCK_RELEASED' || typed.code === 'ERR_STORE_CLOSED')
    for (const part of parts) {
      // Kept: by holdLockOnFailure, or because the commit was refused before anything was queued.
      const kept = (holdLockOnFailure && !gone) || coreHolds(part.context, part.state)
      if (!kept) group.die(part.lock)
    }
    throw typed
  } finally {
    for (const part of parts) group.setCommitting(part.lock, false)
  }
}
