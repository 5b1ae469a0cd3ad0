// The typed errors of kvstore. Codes are defined once in the Rust core (ErrorCode) and mapped
// here once; __test__/errors.spec.mjs checks that both lists agree.
import { constants } from 'node:os'

export class KvStoreError extends Error {
  readonly code: string
  constructor(message: string, code: string, options?: { cause?: unknown }) {
    super(message, options)
    this.code = code
    this.name = new.target.name
  }
}

function kind(code: string) {
  return class extends KvStoreError {
    static readonly code = code
    constructor(message: string, options?: { cause?: unknown }) {
      super(message, code, options)
    }
  }
}

export class EntryAlreadyExistsError extends kind('ERR_ENTRY_EXISTS') {}
export class EntryNotFoundError extends KvStoreError {
  static readonly code: string = 'ERR_ENTRY_NOT_FOUND'
  constructor(message: string, options?: { cause?: unknown }, code = 'ERR_ENTRY_NOT_FOUND') {
    super(message, code, options)
  }
}
/** The entry was deleted by the lock holder this caller was waiting behind. */
export class EntryDeletedError extends EntryNotFoundError {
  static override readonly code = 'ERR_ENTRY_DELETED'
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options, 'ERR_ENTRY_DELETED')
  }
}
export class LockReleasedError extends kind('ERR_LOCK_RELEASED') {}
export class EntryReleasedError extends kind('ERR_ENTRY_RELEASED') {}
export class IllegalKeyError extends kind('ERR_ILLEGAL_KEY') {}
export class LockTimeoutError extends kind('ERR_LOCK_TIMEOUT') {}
/** `name === 'AbortError'`, like the DOMException that fetch and timers/promises throw. */
export class AbortError extends kind('ABORT_ERR') {
  constructor(message = 'The operation was aborted', options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'AbortError'
  }
}
export class CodecError extends kind('ERR_CODEC') {}
export class CodecMismatchError extends kind('ERR_CODEC_MISMATCH') {}
export class DatabaseLockedError extends kind('ERR_DATABASE_LOCKED') {}
export class DatabaseCorruptError extends kind('ERR_DATABASE_CORRUPT') {}
export class StoreClosedError extends kind('ERR_STORE_CLOSED') {}
export class InvalidArgumentError extends kind('ERR_INVALID_ARGUMENT') {}
/** etcd: the commit's lock was lost (its session expired, or its lock key is gone); nothing was written. */
export class LockLostError extends kind('ERR_LOCK_LOST') {}
/** etcd: no quorum answered within requestTimeoutMs; the message says whether the call wrote nothing or its outcome is unknown. */
export class UnavailableError extends kind('ERR_UNAVAILABLE') {}
/** etcd: authentication or authorization refused. */
export class PermissionDeniedError extends kind('ERR_PERMISSION_DENIED') {}
/**
 * A watch fell more than its highWaterMark changes behind (or, with etcd, its replica had to
 * read the prefix again after a compaction and cannot replay what it missed): the watch ended
 * and its unread changes were dropped. Read the map again and start a new watch.
 */
export class WatchOverflowError extends kind('ERR_WATCH_OVERFLOW') {}
/** A failed read, write or sync. `errno` is the OS error number, `systemCode` its name. */
export class IoError extends kind('ERR_IO') {
  errno?: number
  systemCode?: string
  syscall?: string
}

type ErrorClass = new (message: string, options?: { cause?: unknown }) => KvStoreError

export const errorClasses: Record<string, ErrorClass> = {
  ERR_ENTRY_EXISTS: EntryAlreadyExistsError,
  ERR_ENTRY_NOT_FOUND: EntryNotFoundError,
  ERR_ENTRY_DELETED: EntryDeletedError,
  ERR_LOCK_RELEASED: LockReleasedError,
  ERR_ENTRY_RELEASED: EntryReleasedError,
  ERR_ILLEGAL_KEY: IllegalKeyError,
  ERR_LOCK_TIMEOUT: LockTimeoutError,
  ABORT_ERR: AbortError,
  ERR_CODEC: CodecError,
  ERR_CODEC_MISMATCH: CodecMismatchError,
  ERR_DATABASE_LOCKED: DatabaseLockedError,
  ERR_DATABASE_CORRUPT: DatabaseCorruptError,
  ERR_STORE_CLOSED: StoreClosedError,
  ERR_INVALID_ARGUMENT: InvalidArgumentError,
  ERR_LOCK_LOST: LockLostError,
  ERR_UNAVAILABLE: UnavailableError,
  ERR_PERMISSION_DENIED: PermissionDeniedError,
  ERR_WATCH_OVERFLOW: WatchOverflowError,
  ERR_IO: IoError,
}

const errnoNames = new Map<number, string>(Object.entries(constants.errno).map(([name, n]) => [n, name]))

// The binding's message format: `CODE: message` or `ERR_IO(errno): message`.
const NATIVE_MESSAGE = /^([A-Z_]+)(?:\((\d+)\))?: ([\s\S]*)$/

/** Turns an error thrown by the native binding into its typed class; passes others through. */
export function fromNative(err: unknown): unknown {
  if (!(err instanceof Error) || err instanceof KvStoreError) return err
  const match = NATIVE_MESSAGE.exec(err.message)
  const Class = match ? errorClasses[match[1]] : undefined
  if (!match || !Class) return err
  const typed = new Class(match[3])
  if (typed instanceof IoError && match[2] !== undefined) {
    typed.errno = Number(match[2])
    typed.systemCode = errnoNames.get(typed.errno)
  }
  return typed
}

/** Runs a native call, rethrowing its error typed. */
export function native<T>(call: () => T): T {
  try {
    return call()
  } catch (err) {
    throw fromNative(err)
  }
}

/** Awaits a native promise, rejecting with the typed error. */
export async function settled<T>(promise: Promise<T>): Promise<T> {
  try {
    return await promise
  } catch (err) {
    throw fromNative(err)
  }
}
