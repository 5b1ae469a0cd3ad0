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

export function encodeRecord(key: string, metadata: Metadata, value: Uint8Array): Buffer {
  if (typeof metadata !== 'object' || metadata === null) {
    throw new InvalidArgumentError(`metadata of '${key}' must be an object of strings`)
  }
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
    const text = metadata[name]
    if (typeof text !== 'string') {
      throw new InvalidArgumentError(`metadata '${name}' of '${key}' must be a string, got ${typeof text}`)
    }
    const k = Buffer.from(name)
    const v = Buffer.from(text)
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
    metadata[name] = text()
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
