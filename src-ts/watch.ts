// Watching a map's commits: an async iterator over the changes the core's watch hub hands to a
// native watcher. Changes come in batches (one native call each, no polling: a parked next()
// is woken through the mailbox); values decode on first access, like a walk's items.
import type { Codec } from './codecs'
import { EntryItem } from './entry-range'
import type { Metadata } from './envelope'
import { AbortError, InvalidArgumentError, native, settled } from './errors'
import type { NativeWatcher } from './native'
import { checkWellFormedKey, invalid } from './options'

export interface WatchOptions {
  /** Only keys that begin with this. */
  prefix?: string
  /** Give up when aborted: the iteration ends with AbortError. */
  signal?: AbortSignal
  /**
   * Most changes held for a consumer that falls behind (default 10 000); one more ends the watch
   * with WatchOverflowError, its unread changes dropped, rather than grow without bound.
   */
  highWaterMark?: number
}

/** One committed change: `value` and `metadata` decode on first access ('put' only). */
export class WatchChange<T> extends EntryItem<T> {
  readonly type: 'put' | 'delete'

  constructor(key: string, batch: Buffer, start: number, end: number, codec: Codec<T>) {
    super(key, end < 0 ? undefined : batch, start, end, codec)
    this.type = end < 0 ? 'delete' : 'put'
  }

  override toJSON(): { key: string; value: T; metadata: Metadata } & { type: 'put' | 'delete' } {
    return { type: this.type, ...super.toJSON() }
  }
}

export function checkWatchOptions(options: WatchOptions): { prefix?: string; highWaterMark?: number; signal?: AbortSignal } {
  if (typeof options !== 'object' || options === null) throw new InvalidArgumentError('watch options must be an object')
  const { prefix, signal, highWaterMark } = options
  if (prefix !== undefined) {
    if (typeof prefix !== 'string') throw new TypeError('prefix must be a string')
    checkWellFormedKey('prefix', prefix)
  }
  if (signal !== undefined && !(signal instanceof AbortSignal)) throw new InvalidArgumentError('signal must be an AbortSignal')
  if (highWaterMark !== undefined && (typeof highWaterMark !== 'number' || !Number.isSafeInteger(highWaterMark) || highWaterMark < 1)) {
    invalid('highWaterMark', highWaterMark, 'a positive integer')
  }
  return { prefix, signal, highWaterMark }
}

function isPromise<T>(value: T | Promise<T>): value is Promise<T> {
  return typeof (value as Promise<T>)?.then === 'function'
}

/**
 * The iterator `map.watch()` returns. The watch begins when `watch()` is called, not at the
 * first `next()`. `break`, `return()`, the signal, or closing the map or its database end it and
 * free what it held; a watch dropped without ending is freed when it is garbage collected.
 */
export class Watch<T> implements AsyncIterableIterator<WatchChange<T>>, AsyncDisposable {
  #native: NativeWatcher
  #codec: Codec<T>
  #signal: AbortSignal | undefined
  #batch: Buffer | null = null
  #at = 0
  #done = false
  /** Why the watch ended, when the next next() must throw it (the signal's AbortError). */
  #failure: Error | undefined
  /** Calls of next() run one after another. */
  #queue: Promise<unknown> = Promise.resolve()
  readonly #onAbort = (): void => {
    if (this.#done) return
    this.#failure = new AbortError(undefined, { cause: this.#signal?.reason })
    this.#end()
  }

  /** @internal */
  constructor(watcher: NativeWatcher, codec: Codec<T>, signal: AbortSignal | undefined) {
    this.#native = watcher
    this.#codec = codec
    this.#signal = signal
    signal?.addEventListener('abort', this.#onAbort, { once: true })
  }

  [Symbol.asyncIterator](): this {
    return this
  }

  next(): Promise<IteratorResult<WatchChange<T>>> {
    const step = this.#queue.then(() => this.#step())
    this.#queue = step.catch(() => undefined)
    return step
  }

  async #step(): Promise<IteratorResult<WatchChange<T>>> {
    for (;;) {
      if (this.#done) return this.#ended()
      const batch = this.#batch
      if (batch !== null && this.#at < batch.length) return { done: false, value: this.#read(batch) }
      this.#batch = null
      let next: Buffer | null
      try {
        const pending = native(() => this.#native.next())
        next = isPromise(pending) ? await settled(pending) : pending
      } catch (err) {
        this.#end()
        throw err
      }
      if (next === null || this.#done) {
        this.#end()
        return this.#ended()
      }
      this.#batch = next
      this.#at = 0
    }
  }

  #read(batch: Buffer): WatchChange<T> {
    const keyLength = batch.readUInt32LE(this.#at)
    const keyEnd = this.#at + 4 + keyLength
    const key = batch.toString('utf8', this.#at + 4, keyEnd)
    const recordLength = batch.readInt32LE(keyEnd)
    const start = keyEnd + 4
    if (recordLength < 0) {
      this.#at = start
      return new WatchChange(key, batch, start, -1, this.#codec)
    }
    this.#at = start + recordLength
    return new WatchChange(key, batch, start, this.#at, this.#codec)
  }

  /** The end: the failure that ended the watch, once, then done. */
  #ended(): IteratorResult<WatchChange<T>> {
    const failure = this.#failure
    if (failure !== undefined) {
      this.#failure = undefined
      throw failure
    }
    return { done: true, value: undefined }
  }

  /** Ends the watch: frees the native watcher's queue; a pending next() resolves done. */
  #end(): void {
    if (this.#done) return
    this.#done = true
    this.#batch = null
    this.#signal?.removeEventListener('abort', this.#onAbort)
    this.#native.close()
  }

  async return(): Promise<IteratorResult<WatchChange<T>>> {
    this.#end()
    return { done: true, value: undefined }
  }

  async throw(err?: unknown): Promise<IteratorResult<WatchChange<T>>> {
    this.#end()
    throw err
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.#end()
  }
}
