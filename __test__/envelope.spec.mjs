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
  for (const bad of ['', '02', '01', '010105']) {
    t.throws(() => decodeRecord('the-key', Buffer.from(bad, 'hex')), { code: 'ERR_CODEC', message: /the-key/ })
  }
})
