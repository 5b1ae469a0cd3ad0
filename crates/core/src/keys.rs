//! Key rules and the formatting of auto-generated keys.

use crate::error::{Error, Result};

/// Longest key accepted, in UTF-8 bytes. Keys are short identifiers or paths; a bound keeps the
/// lock table and the B-tree pages small.
pub const MAX_KEY_BYTES: usize = 2048;

/// Checks a key given by a caller: non-empty and at most [`MAX_KEY_BYTES`] bytes.
pub fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::illegal_key("a key must not be empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Error::illegal_key(format!(
            "a key must be at most {MAX_KEY_BYTES} bytes, got {}",
            key.len()
        )));
    }
    Ok(())
}

/// How auto-generated keys are spelled: zero-padded to `width` digits in `base` (10 or 36), so
/// that byte order equals numeric order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyFormat {
    pub width: usize,
    pub base: u32,
}

impl Default for KeyFormat {
    fn default() -> Self {
        KeyFormat {
            width: 13,
            base: 36,
        }
    }
}

impl KeyFormat {
    pub fn new(width: usize, base: u32) -> Result<Self> {
        if base != 10 && base != 36 {
            return Err(Error::invalid(format!(
                "keys.base must be 10 or 36, got {base}"
            )));
        }
        if width == 0 || width > 64 {
            return Err(Error::invalid(format!(
                "keys.width must be between 1 and 64, got {width}"
            )));
        }
        Ok(KeyFormat { width, base })
    }

    /// As recorded in the file: `"<width>,<base>"` in UTF-8.
    pub(crate) fn encode(&self) -> String {
        format!("{},{}", self.width, self.base)
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (width, base) = text.split_once(',')?;
        KeyFormat::new(width.parse().ok()?, base.parse().ok()?).ok()
    }

    /// Spells `n`, or fails when `n` needs more than `width` digits.
    pub fn format(&self, n: u64) -> Result<String> {
        let mut digits = Vec::with_capacity(self.width);
        let mut rest = n;
        loop {
            let d = (rest % self.base as u64) as u32;
            digits.push(char::from_digit(d, self.base).expect("digit below base"));
            rest /= self.base as u64;
            if rest == 0 {
                break;
            }
        }
        if digits.len() > self.width {
            return Err(Error::illegal_key(format!(
                "the key sequence is exhausted: {n} needs more than {} digits in base {}",
                self.width, self.base
            )));
        }
        let mut key = String::with_capacity(self.width);
        key.extend(std::iter::repeat_n('0', self.width - digits.len()));
        key.extend(digits.iter().rev());
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_oversize_keys_are_illegal() {
        assert!(validate_key("a").is_ok());
        assert_eq!(
            validate_key("").unwrap_err().code(),
            crate::ErrorCode::IllegalKey
        );
        let long = "x".repeat(MAX_KEY_BYTES + 1);
        assert_eq!(
            validate_key(&long).unwrap_err().code(),
            crate::ErrorCode::IllegalKey
        );
        assert!(validate_key(&long[..MAX_KEY_BYTES]).is_ok());
    }

    #[test]
    fn auto_keys_are_padded_and_sort_like_numbers() {
        let f = KeyFormat::default();
        assert_eq!(f.format(0).unwrap(), "0000000000000");
        assert_eq!(f.format(10).unwrap(), "000000000000a");
        assert_eq!(f.format(36).unwrap(), "0000000000010");
        let mut keys: Vec<String> = (0..2000u64).map(|n| f.format(n * 7919).unwrap()).collect();
        let sorted = {
            let mut k = keys.clone();
            k.sort();
            k
        };
        assert_eq!(keys, sorted);
        keys.dedup();
        assert_eq!(keys.len(), 2000);
        let dec = KeyFormat::new(4, 10).unwrap();
        assert_eq!(dec.format(42).unwrap(), "0042");
        assert_eq!(
            dec.format(10_000).unwrap_err().code(),
            crate::ErrorCode::IllegalKey
        );
    }

    #[test]
    fn bad_formats_are_rejected() {
        assert!(KeyFormat::new(13, 16).is_err());
        assert!(KeyFormat::new(0, 10).is_err());
    }
}
