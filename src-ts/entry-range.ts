// Lock-free reads over one snapshot: a lazy iterable (sync and async) fed by batches from the
// core, one native call per batch. Items decode on first access, so one bad record does not
// end the walk.
import type { Codec } from './codecs'
import { decodeValue } from './codecs'
import { readEnvelope, type Envelope, type Metadata } from './envelope'
import { InvalidArgumentError, native } from './errors'
import type { NativeMapStore, NativeRange } from './native'
import { checkWellFormedKey } from './options'

export interface RangeOptions {
  /** Only keys that begin with this. */
  prefix?: string
  /** First key (inclusive). Must begin with `prefix` when both are given. */
  start?: string
  /** Key to stop before (exclusive). */
  stop?: string
  reverse?: boolean
  limit?: number
  /** Items carry only `key`. */
  keysOnly?: boolean
}

export class EntryItem<T> {
  readonly key: string
  // The record is bytes [start, end) of a batch buffer that only this walk's items share.
  #batch: Buffer | undefined
  #start: number
  #end: number
  #codec: Codec<T>
  #envelope: Envelope | undefined
  #value: { v: T } | undefined

  constructor(key: string, batch: Buffer | undefined, start: number, end: number, codec: Codec<T>) {
    this.key = key
    this.#batch = batch
    this.#start = start
    this.#end = end
    this.#codec = codec
  }

  #read(): Envelope | undefined {
    if (this.#batch === undefined) return undefined
    this.#envelope ??= readEnvelope(this.key, this.#batch, this.#start, this.#end)
    return this.#envelope
  }

  /** The decoded value; throws CodecError (naming the key) if it cannot be decoded. */
  get value(): T {
    if (this.#value === undefined) {
      const envelope = this.#read()
      if (envelope === undefined) return undefined as T
      const bytes = (this.#batch as Buffer).subarray(envelope.valueStart, this.#end)
      this.#value = { v: decodeValue(this.#codec, this.key, bytes) }
    }
    return this.#value.v
  }

  get metadata(): Metadata {
    return this.#read()?.metadata ?? {}
  }

  toJSON(): { key: string; value: T; metadata: Metadata } {
    return { key: this.key, value: this.value, metadata: this.metadata }
  }
}

const FIRST_BATCH = 64
const LARGEST_BATCH = 4096

function stringOption(options: RangeOptions, name: 'prefix' | 'start' | 'stop'): string | undefined {
  const value = options[name]
  if (value !== undefined && typeof value !== 'string') throw new TypeError(`${name} must be a string`)
  // prefix, start and stop name keys: a lone surrogate in them is IllegalKeyError, as in a key.
  if (value !== undefined) checkWellFormedKey(name, value)
  return value
}

export function checkRangeOptions(options: RangeOptions): RangeOptions {
  if (typeof options !== 'object' || options === null) throw new InvalidArgumentError('range options must be an object')
  const { limit } = options
  if (limit !== undefined && (typeof limit !== 'number' || !(limit >= 0) || (!Number.isInteger(limit) && limit !== Infinity))) {
    throw new InvalidArgumentError(`limit must be a non-negative integer, got ${String(limit)}`)
  }
  return {
    prefix: stringOption(options, 'prefix'),
    start: stringOption(options, 'start'),
    stop: stringOption(options, 'stop'),
    reverse: Boolean(options.reverse),
    limit: limit === Infinity ? undefined : limit,
    keysOnly: Boolean(options.keysOnly),
  }
}

export interface RangeContext<T> {
  readonly native: NativeMapStore
  readonly codec: Codec<T>
  checkOpen(): void
  /** Walks still open are closed with the store. */
  readonly walks: OpenWalks
}

/**
 * The walks of a store whose snapshot is open, held weakly: an iterator dropped without `break`
 * is garbage collected, and the native finalizer then frees its snapshot.
 */
export class OpenWalks {
  #live = new Set<WeakRef<NativeRange>>()
  #collected = new FinalizationRegistry<WeakRef<NativeRange>>((ref) => this.#live.delete(ref))

  /** Returns the token to hand back to `finished`. */
  opened(range: NativeRange): WeakRef<NativeRange> {
    const ref = new WeakRef(range)
    this.#live.add(ref)
    this.#collected.register(range, ref, ref)
    return ref
  }

  finished(ref: WeakRef<NativeRange>): void {
    this.#live.delete(ref)
    this.#collected.unregister(ref)
  }

  get size(): number {
    return this.#live.size
  }

  /** Frees every snapshot still open (at close). */
  closeAll(): void {
    for (const ref of this.#live) ref.deref()?.close()
    this.#live.clear()
  }
}

/**
 * One walk: the snapshot is taken at the first `next()` and freed at the end, on break, on
 * dispose or at a failed step. Once its store is closed, a walk that has not ended throws
 * StoreClosedError at every `next()`: it never ends early as if it had reached its end.
 */
class EntryWalk<T> implements Iterator<EntryItem<T>> {
  #context: RangeContext<T>
  #options: RangeOptions
  #range: NativeRange | undefined
  #opened: WeakRef<NativeRange> | undefined
  #batch: Buffer | null = null
  #at = 0
  #batchSize = FIRST_BATCH
  #done = false

  constructor(context: RangeContext<T>, options: RangeOptions) {
    this.#context = context
    this.#options = options
  }

  #fill(): boolean {
    if (this.#range === undefined) {
      this.#context.checkOpen()
      this.#range = native(() => this.#context.native.range(this.#options))
      this.#opened = this.#context.walks.opened(this.#range)
    }
    const range = this.#range
    this.#batch = native(() => range.nextBatch(this.#batchSize))
    this.#batchSize = Math.min(this.#batchSize * 4, LARGEST_BATCH)
    this.#at = 0
    return this.#batch !== null
  }

  next(): IteratorResult<EntryItem<T>> {
    if (this.#done) return { done: true, value: undefined }
    if (this.#range !== undefined) {
      try {
        this.#context.checkOpen()
      } catch (err) {
        // close() freed the snapshot already; forget it. Not done: the next call throws too.
        this.#free()
        throw err
      }
    }
    if (this.#batch === null || this.#at >= this.#batch.length) {
      let filled: boolean
      try {
        filled = this.#fill()
      } catch (err) {
        // A failed step (a damaged file, an I/O error) ends the walk and frees its snapshot.
        if (this.#range !== undefined) this.return()
        throw err
      }
      if (!filled) {
        this.return()
        return { done: true, value: undefined }
      }
    }
    const batch = this.#batch as Buffer
    const keyLength = batch.readUInt32LE(this.#at)
    const keyEnd = this.#at + 4 + keyLength
    const key = batch.toString('utf8', this.#at + 4, keyEnd)
    if (this.#options.keysOnly) {
      this.#at = keyEnd
      return { done: false, value: new EntryItem(key, undefined, 0, 0, this.#context.codec) }
    }
    const start = keyEnd + 4
    this.#at = start + batch.readUInt32LE(keyEnd)
    return { done: false, value: new EntryItem(key, batch, start, this.#at, this.#context.codec) }
  }

  return(): IteratorResult<EntryItem<T>> {
    this.#done = true
    this.#free()
    return { done: true, value: undefined }
  }

  #free(): void {
    this.#batch = null
    if (this.#range !== undefined) {
      this.#range.close()
      this.#context.walks.finished(this.#opened as WeakRef<NativeRange>)
      this.#range = undefined
    }
  }
}

/** The result of `getEntries()`: iterate it with `for...of` or `for await...of`. */
export class EntryRange<T> implements Iterable<EntryItem<T>>, AsyncIterable<EntryItem<T>>, Disposable {
  #context: RangeContext<T>
  #options: RangeOptions
  /**
   * Its walks, for `[Symbol.dispose]`; held weakly, so an iterator dropped without `break` is
   * collected (and its snapshot freed) even while this range lives on.
   */
  #walks = new Set<WeakRef<EntryWalk<T>>>()

  constructor(context: RangeContext<T>, options: RangeOptions) {
    this.#context = context
    this.#options = options
  }

  [Symbol.iterator](): Iterator<EntryItem<T>> {
    for (const ref of this.#walks) if (ref.deref() === undefined) this.#walks.delete(ref)
    const walk = new EntryWalk(this.#context, this.#options)
    const ref = new WeakRef(walk)
    this.#walks.add(ref)
    const finish = (): IteratorResult<EntryItem<T>> => {
      this.#walks.delete(ref)
      return walk.return()
    }
    return {
      next: () => {
        const result = walk.next()
        if (result.done) this.#walks.delete(ref)
        return result
      },
      return: finish,
    }
  }

  [Symbol.asyncIterator](): AsyncIterator<EntryItem<T>> {
    const walk = this[Symbol.iterator]()
    return {
      next: async () => walk.next(),
      return: async () => (walk.return as () => IteratorResult<EntryItem<T>>)(),
    }
  }

  /** Frees every snapshot this range still holds. */
  [Symbol.dispose](): void {
    for (const ref of this.#walks) ref.deref()?.return()
    this.#walks.clear()
  }

  /** All items as an array (one snapshot). */
  toArray(): EntryItem<T>[] {
    return [...this]
  }
}
