import test from 'ava'
import { readFileSync } from 'node:fs'
import { decodeRecord, encodeRecord } from '../dist/envelope.js'

// The same vectors are checked by crates/core/tests/store.rs against the Rust envelope.
const vectors = JSON.parse(readFileSync(new URL('../crates/core/tests/vectors/envelope.json', import.meta.url), 'utf8'))

for (const v of vectors) {
  test(`envelope vector: ${v.name}`, (t) => {
    const metadata = Object.fromEntries(v.metadata)
    const value = Buffer.from(v.value, 'hex')
    t.is(encodeRecord('k', metadata, value).toString('hex'), v.record)
    const decoded = decodeRecord('k', Buffer.from(v.record, 'hex'))
    t.deepEqual(Object.entries(decoded.metadata), v.metadata)
    t.is(decoded.value.toString('hex'), v.value)
  })
}

test('a damaged envelope is a CodecError naming the key', (t) => {
  for (const bad of ['', '02', '01', '010105', '018000']) {
    t.throws(() => decodeRecord('the-key', Buffer.from(bad, 'hex')), { code: 'ERR_CODEC', message: /the-key/ })
  }
})

test('any bytes decode to a record or a CodecError, never anything else (seeded)', (t) => {
  let state = 0x2545f491
  const next = () => {
    state ^= state << 13
    state ^= state >>> 17
    state ^= state << 5
    return state >>> 0
  }
  const valid = encodeRecord('k', { path: '/x', é: 'ü' }, Buffer.from('value'))
  for (let round = 0; round < 20_000; round++) {
    const bytes = round % 2 === 0 ? Buffer.from(valid) : Buffer.from(Array.from({ length: next() % 48 }, () => next() & 0xff))
    for (let m = next() % 4; m > 0 && bytes.length > 0; m--) bytes[next() % bytes.length] = next() & 0xff
    try {
      const { metadata, value } = decodeRecord('k', bytes)
      t.is(typeof metadata, 'object')
      t.true(Buffer.isBuffer(value))
    } catch (err) {
      if (err.code !== 'ERR_CODEC') t.fail(`unexpected ${err.name}: ${err.message}`)
    }
  }
})
