//! Where everything lives under the prefix `P` (the URL's path):
//!
//! | key | value |
//! | --- | --- |
//! | `P/meta/format` | `"1"`, the layout version |
//! | `P/meta/codec/<t>` | the codec name map `<t>` was created with |
//! | `P/meta/seq/<t>` | decimal ASCII: auto-key numbers below it are leased |
//! | `P/meta/keys/<t>` | `"<width>,<base>"`: the format auto keys are generated in |
//! | `P/data/<t>/<key>` | the record (envelope bytes) |
//! | `P/lock/<t>/<hex(key)>/<lease as 16 hex>` | one process's place in the key's lock queue |
//!
//! `<t>` is the table name with `%` → `%25` and `/` → `%2F`, so that no table name is a prefix
//! of another table's keys.
//!
//! Stores do not nest: the keys of a store whose prefix lies inside another's (`/n` and
//! `/n/data/t`, `/a` and `/a/b`) would mix, so an open is refused (InvalidArgument) when
//!
//! - an ancestor `Q` of `P` (`P` cut at a `/`) has `Q/meta/format`: checked in the transaction
//!   that records `P/meta/format` (one compare per ancestor, atomic with the record), or
//! - a key `P/<X>/meta/format` other than `P/meta/format` holds a layout version (decimal
//!   ASCII; records are envelopes, which begin with the byte 1): checked while the open reads
//!   the whole prefix into the replica, which it does anyway, so at no extra cost. A refused
//!   open removes the `P/meta/format` it recorded (if it created it).
//!
//! Of two stores opened at once, one nested in the other, at least one is refused: the inner
//! one's transaction sees the outer's record, or the outer's read (after its record) sees the
//! inner's.

/// Version of this layout, recorded at `P/meta/format`.
pub const LAYOUT_VERSION: &str = "1";

pub fn escape_table(name: &str) -> String {
    name.replace('%', "%25").replace('/', "%2F")
}

pub fn unescape_table(escaped: &str) -> String {
    escaped.replace("%2F", "/").replace("%25", "%")
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The keys of one store (prefix).
#[derive(Debug, Clone)]
pub struct Layout {
    /// `P/`
    root: String,
}

/// What a key under the prefix is.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Data {
        table: String,
        key: String,
    },
    Lock {
        table: String,
        key: String,
        lease: i64,
    },
    Other,
}

impl Layout {
    pub fn new(prefix: &str) -> Layout {
        Layout {
            root: format!("{prefix}/"),
        }
    }

    /// `P/`: everything of this store.
    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn format_key(&self) -> String {
        format!("{}meta/format", self.root)
    }

    pub fn codec_prefix(&self) -> String {
        format!("{}meta/codec/", self.root)
    }

    pub fn codec_key(&self, table: &str) -> String {
        format!("{}meta/codec/{}", self.root, escape_table(table))
    }

    pub fn seq_key(&self, table: &str) -> String {
        format!("{}meta/seq/{}", self.root, escape_table(table))
    }

    pub fn keys_key(&self, table: &str) -> String {
        format!("{}meta/keys/{}", self.root, escape_table(table))
    }

    pub fn data_key(&self, table: &str, key: &str) -> String {
        format!("{}data/{}/{key}", self.root, escape_table(table))
    }

    /// `P/lock/<t>/<hex(key)>/`: the queue of `key`'s lock.
    pub fn lock_prefix(&self, table: &str, key: &str) -> String {
        format!(
            "{}lock/{}/{}/",
            self.root,
            escape_table(table),
            hex(key.as_bytes())
        )
    }

    pub fn lock_key(&self, table: &str, key: &str, lease: i64) -> String {
        format!("{}{:016x}", self.lock_prefix(table, key), lease as u64)
    }

    /// The prefixes whose store would hold this one's keys: `P` cut at each `/` (`/a/b/c` →
    /// `/a`, `/a/b`), each as its `meta/format` key.
    pub fn ancestor_format_keys(&self) -> Vec<(String, String)> {
        let prefix = &self.root[..self.root.len() - 1];
        prefix
            .match_indices('/')
            .map(|(at, _)| &prefix[..at])
            .filter(|p| !p.is_empty() && !p.ends_with('/'))
            .map(|p| (p.to_string(), format!("{p}/meta/format")))
            .collect()
    }

    /// Whether a key read under `P/` is the format record of another store whose prefix lies
    /// inside this one (`P/<X>/meta/format` holding a layout version, decimal ASCII): then that
    /// store's prefix `P/<X>`. A record of this store never is one: data values are envelopes,
    /// which begin with the byte 1, and no key of `meta/` or `lock/` ends so.
    pub fn nested_root(&self, raw: &[u8], value: &[u8]) -> Option<String> {
        let rest = raw.strip_prefix(self.root.as_bytes())?;
        let inner = rest.strip_suffix(b"/meta/format")?;
        let is_version = !value.is_empty() && value.iter().all(u8::is_ascii_digit);
        if inner.is_empty() || !is_version {
            return None;
        }
        Some(String::from_utf8_lossy(&raw[..raw.len() - b"/meta/format".len()]).into_owned())
    }

    /// Splits a key read from etcd into what it is.
    pub fn parse(&self, raw: &[u8]) -> Parsed {
        let Some(rest) = raw.strip_prefix(self.root.as_bytes()) else {
            return Parsed::Other;
        };
        if let Some(rest) = rest.strip_prefix(b"data/") {
            let Ok(rest) = std::str::from_utf8(rest) else {
                return Parsed::Other;
            };
            return match rest.split_once('/') {
                Some((table, key)) if !key.is_empty() => Parsed::Data {
                    table: unescape_table(table),
                    key: key.to_string(),
                },
                _ => Parsed::Other,
            };
        }
        if let Some(rest) = rest.strip_prefix(b"lock/") {
            let Ok(rest) = std::str::from_utf8(rest) else {
                return Parsed::Other;
            };
            let mut parts = rest.split('/');
            let (Some(table), Some(key), Some(lease), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Parsed::Other;
            };
            let key = unhex(key).and_then(|k| String::from_utf8(k).ok());
            let lease = u64::from_str_radix(lease, 16).ok();
            if let (Some(key), Some(lease)) = (key, lease) {
                return Parsed::Lock {
                    table: unescape_table(table),
                    key,
                    lease: lease as i64,
                };
            }
        }
        Parsed::Other
    }
}

/// The first key after every key that starts with `prefix` (etcd's `range_end` for a prefix).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_cannot_collide() {
        let l = Layout::new("app");
        assert_eq!(l.data_key("a/b", "c"), "app/data/a%2Fb/c");
        assert_eq!(l.data_key("a%2Fb", "c"), "app/data/a%252Fb/c");
        assert!(!l.data_key("a/b", "k").starts_with("app/data/a/"));
        for name in ["a/b", "a%2Fb", "%", "x/y/z", "plain"] {
            assert_eq!(unescape_table(&escape_table(name)), name);
            assert_eq!(
                l.parse(l.data_key(name, "k/with/slashes").as_bytes()),
                Parsed::Data {
                    table: name.into(),
                    key: "k/with/slashes".into()
                }
            );
            assert_eq!(
                l.parse(l.lock_key(name, "k/é", 0x1234).as_bytes()),
                Parsed::Lock {
                    table: name.into(),
                    key: "k/é".into(),
                    lease: 0x1234
                }
            );
        }
        assert_eq!(l.parse(b"app/meta/format"), Parsed::Other);
        assert_eq!(l.parse(b"other/data/t/k"), Parsed::Other);
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
    }

    #[test]
    fn nested_stores_are_found_both_ways() {
        let l = Layout::new("/a/b//c");
        let ancestors: Vec<String> = l.ancestor_format_keys().into_iter().map(|a| a.1).collect();
        assert_eq!(ancestors, ["/a/meta/format", "/a/b/meta/format"]);
        assert!(Layout::new("/a").ancestor_format_keys().is_empty());
        let n = Layout::new("/n");
        assert_eq!(
            n.nested_root(b"/n/data/t/meta/format", b"1"),
            Some("/n/data/t".to_string())
        );
        assert_eq!(
            n.nested_root(b"/n/x/meta/format", b"12"),
            Some("/n/x".into())
        );
        assert_eq!(n.nested_root(b"/n/meta/format", b"1"), None);
        assert_eq!(n.nested_root(b"/n/data/t/k/meta/format", b"\x011"), None);
        assert_eq!(n.nested_root(b"/nx/meta/format", b"1"), None);
        assert_eq!(n.nested_root(b"/n/data/t/k", b"1"), None);
    }
}
