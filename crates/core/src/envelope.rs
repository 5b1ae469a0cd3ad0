//! The record envelope: how one entry's metadata and codec bytes are laid out in redb.
//! The layout is specified in FORMAT.md; the TypeScript layer writes the same bytes.

use crate::error::{Error, Result};

/// Version byte that starts every record written by this release.
pub const ENVELOPE_VERSION: u8 = 1;

/// One decoded record: string metadata in stored order, then the codec's bytes untouched.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub metadata: Vec<(String, String)>,
    pub value: Vec<u8>,
}

pub fn encode(metadata: &[(String, String)], value: &[u8]) -> Vec<u8> {
    let meta_len: usize = metadata.iter().map(|(k, v)| k.len() + v.len() + 10).sum();
    let mut out = Vec::with_capacity(1 + 5 + meta_len + value.len());
    out.push(ENVELOPE_VERSION);
    put_varint(&mut out, metadata.len() as u64);
    for (k, v) in metadata {
        put_varint(&mut out, k.len() as u64);
        out.extend_from_slice(k.as_bytes());
        put_varint(&mut out, v.len() as u64);
        out.extend_from_slice(v.as_bytes());
    }
    out.extend_from_slice(value);
    out
}

pub fn decode(bytes: &[u8]) -> Result<Record> {
    let mut reader = Reader { bytes, pos: 0 };
    let version = reader.byte()?;
    if version != ENVELOPE_VERSION {
        return Err(Error::codec(format!(
            "unknown record envelope version {version}"
        )));
    }
    let count = reader.varint()?;
    let mut metadata = Vec::with_capacity(count.min(64) as usize);
    for _ in 0..count {
        let k = reader.string()?;
        let v = reader.string()?;
        metadata.push((k, v));
    }
    Ok(Record {
        metadata,
        value: bytes[reader.pos..].to_vec(),
    })
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8> {
        let b = *self
            .bytes
            .get(self.pos)
            .ok_or_else(|| Error::codec("record envelope is truncated"))?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64> {
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                // One spelling per number: a trailing zero group would let two byte strings
                // mean the same record.
                if b == 0 && shift > 0 {
                    return Err(Error::codec("record envelope has a non-minimal length"));
                }
                return Ok(n);
            }
        }
        Err(Error::codec("record envelope has an overlong length"))
    }

    fn string(&mut self) -> Result<String> {
        let len = self.varint()?;
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| self.pos.checked_add(len))
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| Error::codec("record envelope is truncated"))?;
        let s = std::str::from_utf8(&self.bytes[self.pos..end])
            .map_err(|_| Error::codec("record metadata is not valid UTF-8"))?;
        self.pos = end;
        Ok(s.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_metadata_and_value() {
        let meta = vec![
            ("path".to_string(), "/data/x".to_string()),
            ("ü".to_string(), "x".repeat(300)),
        ];
        let bytes = encode(&meta, b"\x01\x02");
        let rec = decode(&bytes).unwrap();
        assert_eq!(rec.metadata, meta);
        assert_eq!(rec.value, b"\x01\x02");
    }

    #[test]
    fn empty_record_is_two_bytes() {
        assert_eq!(encode(&[], b""), vec![1, 0]);
        assert_eq!(decode(&[1, 0]).unwrap(), Record::default());
    }

    /// A bounded, seeded fuzz run (the cargo-fuzz target in crates/core/fuzz runs it longer):
    /// any bytes decode to a record or a codec error, never a panic, and what decodes
    /// re-encodes to the same bytes.
    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let valid = encode(
            &[("path".into(), "/x".into()), ("é".into(), "ü".into())],
            b"value",
        );
        for round in 0..100_000u32 {
            let mut bytes = if round % 2 == 0 {
                valid.clone()
            } else {
                (0..next() % 64).map(|_| next() as u8).collect()
            };
            for _ in 0..(next() % 4) {
                if !bytes.is_empty() {
                    let at = (next() as usize) % bytes.len();
                    bytes[at] = next() as u8;
                }
            }
            bytes.truncate(bytes.len().saturating_sub((next() % 3) as usize));
            match decode(&bytes) {
                Ok(record) => assert_eq!(encode(&record.metadata, &record.value), bytes),
                Err(err) => assert_eq!(err.code(), crate::ErrorCode::Codec),
            }
        }
    }

    #[test]
    fn damaged_records_are_codec_errors() {
        for bad in [
            &[][..],
            &[2, 0],
            &[1],
            &[1, 1, 5, b'a'],
            &[1, 1, 1, 0xff, 0],
        ] {
            assert_eq!(
                decode(bad).unwrap_err().code(),
                crate::ErrorCode::Codec,
                "{bad:?}"
            );
        }
        let overlong = [
            1u8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ];
        assert!(decode(&overlong).is_err());
    }
}
