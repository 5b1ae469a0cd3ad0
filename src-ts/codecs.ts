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
  /** `bytes` is only valid during the call: copy it if the value keeps a view of it. */
  decode(bytes: Buffer): T
}

// Standard MessagePack (no msgpackr record extension), so rmp-serde and other readers agree.
// copyBuffers: decoded binary values must not be views into a reused read buffer.
const packr = new Packr({ useRecords: false, moreTypes: false, encodeUndefinedAsNil: true, copyBuffers: true })

const msgpack: Codec<unknown> = {
  name: 'msgpack',
  encode: (value) => packr.pack(value),
  decode: (bytes) => packr.unpack(bytes),
}

const json: Codec<unknown> = {
  name: 'json',
  encode(value) {
    const text = JSON.stringify(value)
    if (text === undefined) throw new TypeError(`${typeof value} cannot be stored as JSON`)
    return Buffer.from(text)
  },
  decode: (bytes) => JSON.parse(bytes.toString('utf8')),
}

const v8: Codec<unknown> = {
  name: 'v8',
  encode: (value) => serialize(value),
  decode: (bytes) => deserialize(bytes),
}

const raw: Codec<Uint8Array> = {
  name: 'raw',
  encode(value) {
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

export function decodeValue<T>(codec: Codec<T>, key: string, bytes: Buffer): T {
  try {
    return codec.decode(bytes)
  } catch (cause) {
    throw new CodecError(`codec '${codec.name}' could not decode the value of '${key}': ${String(cause)}`, { cause })
  }
}
