// Codecs turn values into bytes and back. The codec's name is recorded per table, so a table
// is never read with the wrong one.
import { deserialize, serialize } from 'node:v8'
// The pure-JS build: the default Node entry decodes strings through a native addon, and for
// records of a few hundred bytes that call costs more than it saves (unpack ~25 % slower here).
import { Packr } from 'msgpackr/index-no-eval'
import { CodecError, InvalidArgumentError } from './errors'

export interface Codec<T = unknown> {
  readonly name: string
  encode(value: T): Uint8Array
  /**
   * `bytes` belongs to this call: a custom codec gets its own copy, so the value may keep views
   * of it (the store's read buffers are never handed out).
   */
  decode(bytes: Buffer): T
}

/** U+FFFD in UTF-8: what a lone surrogate becomes when a string is written as UTF-8. */
const REPLACEMENT = Buffer.from('\ufffd')
/** The bytes of the name "__proto__", which msgpackr renames to "__proto_" when it decodes a map. */
const PROTO = Buffer.from('__proto__')

/** Whether a string anywhere in `value` (a key or a value) holds a lone surrogate. */
function hasLoneSurrogate(value: unknown, seen = new Set<object>()): boolean {
  if (typeof value === 'string') return !value.isWellFormed()
  if (typeof value !== 'object' || value === null || seen.has(value) || ArrayBuffer.isView(value)) return false
  seen.add(value)
  if (value instanceof Map) {
    for (const [k, v] of value) if (hasLoneSurrogate(k, seen) || hasLoneSurrogate(v, seen)) return true
    return false
  }
  if (value instanceof Set || Array.isArray(value)) {
    for (const v of value) if (hasLoneSurrogate(v, seen)) return true
    return false
  }
  for (const k of Object.keys(value)) if (!k.isWellFormed() || hasLoneSurrogate((value as Record<string, unknown>)[k], seen)) return true
  return false
}

const packrOptions = {
  // Standard MessagePack (no msgpackr record extension), so rmp-serde and other readers agree.
  useRecords: false,
  moreTypes: false,
  encodeUndefinedAsNil: true,
  // Decoded binary values must not be views into a reused read buffer.
  copyBuffers: true,
  // msgpackr would write a function as nil; a function cannot be stored.
  writeFunction(): never {
    throw new TypeError('a function cannot be stored with the msgpack codec')
  },
}
const packr = new Packr(packrOptions)
// For records with a "__proto__" name: maps decode as Map, turned into objects below.
const mapPackr = new Packr({ ...packrOptions, mapsAsObjects: false })

/** msgpackr's conversion of a map key to a property name (asSafeString). */
function propertyName(key: unknown): string {
  if (typeof key === 'string') return key
  if (typeof key === 'number' || typeof key === 'boolean' || typeof key === 'bigint' || key === null || key === undefined) return String(key)
  throw new TypeError(`a MessagePack map key of type ${typeof key} cannot be an object property`)
}

/** Turns the Maps of a `mapPackr` result into plain objects, keeping a "__proto__" name as an own property. */
function mapsToObjects(value: unknown): unknown {
  if (value instanceof Map) {
    const object: Record<string, unknown> = {}
    for (const [k, v] of value) {
      const name = propertyName(k)
      const item = mapsToObjects(v)
      if (name === '__proto__') Object.defineProperty(object, name, { value: item, enumerable: true, writable: true, configurable: true })
      else object[name] = item
    }
    return object
  }
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) value[i] = mapsToObjects(value[i])
  }
  return value
}

const msgpack: Codec<unknown> = {
  name: 'msgpack',
  encode(value) {
    const bytes = packr.pack(value)
    // MessagePack strings are UTF-8: a lone surrogate would be stored as U+FFFD. Only a record
    // that holds U+FFFD needs the walk that tells a real U+FFFD from a replaced surrogate.
    if (bytes.indexOf(REPLACEMENT) !== -1 && hasLoneSurrogate(value)) {
      throw new TypeError('a string that is not well-formed Unicode (a lone surrogate) cannot be stored as MessagePack')
    }
    return bytes
  },
  decode: (bytes) => (bytes.indexOf(PROTO) === -1 ? packr.unpack(bytes) : mapsToObjects(mapPackr.unpack(bytes))),
}

const json: Codec<unknown> = {
  name: 'json',
  encode(value) {
    // No value (an entry created without one) is stored as null, as MessagePack stores it.
    const text = value === undefined ? 'null' : JSON.stringify(value)
    if (text === undefined) throw new TypeError(`${typeof value} cannot be stored as JSON`)
    return Buffer.from(text)
  },
  decode: (bytes) => JSON.parse(bytes.toString('utf8')),
}

const v8: Codec<unknown> = {
  name: 'v8',
  encode: (value) => serialize(value),
  // v8.deserialize returns Buffers and typed arrays as views of its input: give it a copy.
  decode: (bytes) => deserialize(Buffer.from(bytes)),
}

const raw: Codec<Uint8Array> = {
  name: 'raw',
  encode(value) {
    // No value (an entry created without one) is zero bytes.
    if (value === undefined) return new Uint8Array(0)
    if (!(value instanceof Uint8Array)) throw new TypeError('the raw codec stores only Buffer or Uint8Array values')
    return value
  },
  // A copy: the bytes handed to decode may be a view into a buffer that is reused.
  decode: (bytes) => Buffer.from(bytes),
}

export const codecs = { msgpack, json, v8, raw } as const

export function checkCodec<T>(codec: Codec<T> | undefined): Codec<T> {
  if (codec === undefined) return msgpack as Codec<T>
  if (
    typeof codec !== 'object' ||
    codec === null ||
    typeof codec.name !== 'string' ||
    codec.name.length === 0 ||
    typeof codec.encode !== 'function' ||
    typeof codec.decode !== 'function'
  ) {
    throw new InvalidArgumentError('codec must be { name: string, encode(value), decode(bytes) }')
  }
  if (!codec.name.isWellFormed()) throw new InvalidArgumentError(`the codec name ${JSON.stringify(codec.name)} is not well-formed Unicode`)
  return codec
}

export function encodeValue<T>(codec: Codec<T>, key: string, value: T): Uint8Array {
  let bytes: unknown
  try {
    bytes = codec.encode(value)
  } catch (cause) {
    throw new CodecError(`codec '${codec.name}' could not encode the value of '${key}': ${String(cause)}`, { cause })
  }
  if (!(bytes instanceof Uint8Array)) {
    throw new CodecError(`codec '${codec.name}' returned ${typeof bytes} instead of bytes for '${key}'`)
  }
  return bytes
}

/** The built-in codecs never return views of the bytes they decode; custom codecs get a copy. */
const copying = new Set<object>([msgpack, json, v8, raw])

export function decodeValue<T>(codec: Codec<T>, key: string, bytes: Buffer): T {
  try {
    return codec.decode(copying.has(codec) ? bytes : Buffer.from(bytes))
  } catch (cause) {
    throw new CodecError(`codec '${codec.name}' could not decode the value of '${key}': ${String(cause)}`, { cause })
  }
}
