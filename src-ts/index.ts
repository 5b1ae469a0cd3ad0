export { MapStore } from './map-store'
export type { CreateOptions, LockOptions, Stats, StoredEntry } from './map-store'
export { Database } from './database'
export { Entry, EntryLock } from './entry-lock'
export type { CommitItem, CommitOptions, GroupCommitOptions } from './entry-lock'
export { EntryItem, EntryRange } from './entry-range'
export type { RangeOptions } from './entry-range'
export { Watch, WatchChange } from './watch'
export type { WatchOptions } from './watch'
export { codecs } from './codecs'
export type { Codec } from './codecs'
export type { Metadata } from './envelope'
export type { DatabaseOptions, Durability, KeyOptions, MapStoreOptions, OpenOptions } from './options'
export type { Logger } from './logger'
export {
  AbortError,
  CodecError,
  CodecMismatchError,
  DatabaseCorruptError,
  DatabaseLockedError,
  EntryAlreadyExistsError,
  EntryDeletedError,
  EntryNotFoundError,
  EntryReleasedError,
  IllegalKeyError,
  InvalidArgumentError,
  LockLostError,
  UnavailableError,
  PermissionDeniedError,
  IoError,
  KvStoreError,
  LockReleasedError,
  LockTimeoutError,
  StoreClosedError,
  WatchOverflowError,
  errorClasses,
} from './errors'
