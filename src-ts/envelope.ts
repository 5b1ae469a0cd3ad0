// The record envelope (FORMAT.md): version byte, metadata pairs, then the codec's bytes.
// crates/core/src/envelope.rs reads and writes the same layout.
import { CodecError, InvalidArgumentError } from './errors'

export type Metadata = Record<string, string>

const VERSION = 1

function varintLength(n: number): number {
  let len = 1
  while (n >= 0x80) {
    n = Math.floor(n / 128)
    len++
  }
  return len
}

function writeVarint(buf: Buffer, at: number, n: number): number {
  while (n >= 0x80) {
    buf[at++] = (n & 0x7f) | 0x80
    n = Math.floor(n / 128)
  }
  buf[at++] = n
  return at
}

/**
 * Checks that `metadata` is a plain object of well-formed strings: anything else would be
 * dropped or changed on its way into the record (symbol keys, a Map's entries, lone surrogates).
 */
export function checkMetadata(key: string | undefined, metadata: unknown): asserts metadata is Metadata {
  const of = key === undefined ? '' : ` of '${key}'`
  if (typeof metadata !== 'object' || metadata === null) {
    throw new InvalidArgumentError(`metadata${of} must be an object of strings`)
  }
  const proto: unknown = Object.getPrototypeOf(metadata)
  if (proto !== Object.prototype && proto !== null) {
    throw new InvalidArgumentError(`metadata${of} must be a plain object of strings, got ${Array.isArray(metadata) ? 'an array' : `a ${metadata.constructor?.name ?? 'object'}`}`)
  }
  if (Object.getOwnPropertySymbols(metadata).length > 0) {
    throw new InvalidArgumentError(`metadata${of} must have string names, not symbols`)
  }
  for (const name of Object.keys(metadata)) {
    if (!name.isWellFormed()) {
      throw new InvalidArgumentError(`metadata name ${JSON.stringify(name)}${of} is not well-formed Unicode (it holds a lone surrogate)`)
    }
    const text = (metadata as Record<string, unknown>)[name]
    if (typeof text !== 'string') {
      throw new InvalidArgumentError(`metadata '${name}'${of} must be a string, got ${text === null ? 'null' : typeof text}`)
    }
    if (!text.isWellFormed()) {
      throw new InvalidArgumentError(`metadata '${name}'${of} is not well-formed Unicode (it holds a lone surrogate): ${JSON.stringify(text)}`)
    }
  }
}

/** Sets `name` as an own property, also `__proto__` (which plain assignment would swallow). */
export function setMetadata(metadata: Metadata, name: string, value: string): void {
  if (name === '__proto__') Object.defineProperty(metadata, name, { value, enumerable: true, writable: true, configurable: true })
  else metadata[name] = value
}

export function encodeRecord(key: string, metadata: Metadata, value: Uint8Array): Buffer {
  checkMetadata(key, metadata)
  const names = Object.keys(metadata)
  if (names.length === 0) {
    const out = Buffer.allocUnsafe(2 + value.length)
    out[0] = VERSION
    out[1] = 0
    out.set(value, 2)
    return out
  }
  const parts: Buffer[] = []
  let size = 1 + varintLength(names.length) + value.length
  for (const name of names) {
    const k = Buffer.from(name)
    const v = Buffer.from(metadata[name])
    parts.push(k, v)
    size += varintLength(k.length) + k.length + varintLength(v.length) + v.length
  }
  const out = Buffer.allocUnsafe(size)
  out[0] = VERSION
  let at = writeVarint(out, 1, names.length)
  for (const part of parts) {
    at = writeVarint(out, at, part.length)
    out.set(part, at)
    at += part.length
  }
  out.set(value, at)
  return out
}

export interface Envelope {
  metadata: Metadata
  /** Where the codec's bytes begin; they run to the end of the record. */
  valueStart: number
}

/** Reads the envelope of the record in `bytes[start, end)` without copying the value. */
export function readEnvelope(key: string, bytes: Buffer, start: number, end: number): Envelope {
  if (end - start >= 2 && bytes[start] === VERSION && bytes[start + 1] === 0) {
    return { metadata: {}, valueStart: start + 2 }
  }
  const fail = (why: string): never => {
    throw new CodecError(`the record of '${key}' is damaged: ${why}`)
  }
  if (end <= start || bytes[start] !== VERSION) fail(`unknown envelope version ${bytes[start]}`)
  let at = start + 1
  const varint = (): number => {
    let n = 0
    let scale = 1
    for (let i = 0; i < 8; i++) {
      if (at >= end) fail('truncated')
      const b = bytes[at++]
      n += (b & 0x7f) * scale
      if ((b & 0x80) === 0) return b === 0 && i > 0 ? fail('non-minimal length') : n
      scale *= 128
    }
    return fail('overlong length')
  }
  const text = (): string => {
    const len = varint()
    if (at + len > end) fail('truncated')
    const s = bytes.toString('utf8', at, at + len)
    at += len
    return s
  }
  const count = varint()
  const metadata: Metadata = {}
  for (let i = 0; i < count; i++) {
    const name = text()
    setMetadata(metadata, name, text())
  }
  return { metadata, valueStart: at }
}

export interface DecodedRecord {
  metadata: Metadata
  value: Buffer
}

export function decodeRecord(key: string, record: Buffer): DecodedRecord {
  const { metadata, valueStart } = readEnvelope(key, record, 0, record.length)
  return { metadata, value: record.subarray(valueStart) }
}
