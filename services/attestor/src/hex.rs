//! Lower-case hex encoding and strict decoding, for measurements and hashes (no `hex` dependency needed).

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// `bytes` as lower-case hex.
pub(crate) fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Decodes hex of either case into exactly `N` bytes; `Err` says what is wrong.
pub(crate) fn decode_array<const N: usize>(s: &str) -> Result<[u8; N], String> {
    if s.len() != N * 2 {
        return Err(format!(
            "expected {} hex characters ({N} bytes), got {}",
            N * 2,
            s.len()
        ));
    }
    let mut out = [0u8; N];
    for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
        let hi = nibble(pair[0]).ok_or_else(|| format!("non-hex character at {}", i * 2))?;
        let lo = nibble(pair[1]).ok_or_else(|| format!("non-hex character at {}", i * 2 + 1))?;
        out[i] = (hi << 4) | lo;
    }
    Ok(out)
}

/// Decodes hex of either case (an even number of digits, nothing else) into bytes.
pub(crate) fn decode_vec(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("odd number of hex characters ({})", s.len()));
    }
    s.as_bytes()
        .chunks_exact(2)
        .enumerate()
        .map(|(i, pair)| {
            let hi = nibble(pair[0]).ok_or_else(|| format!("non-hex character at {}", i * 2))?;
            let lo =
                nibble(pair[1]).ok_or_else(|| format!("non-hex character at {}", i * 2 + 1))?;
            Ok((hi << 4) | lo)
        })
        .collect()
}

/// `bytes` as upper-case hex (the form PCS URLs use for an FMSPC).
pub(crate) fn encode_upper(bytes: &[u8]) -> String {
    encode(bytes).to_ascii_uppercase()
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_bad_input() {
        let bytes = [0x00, 0x9f, 0xa0, 0xff];
        assert_eq!(encode(&bytes), "009fa0ff");
        assert_eq!(decode_array::<4>("009FA0ff"), Ok(bytes));
        assert!(decode_array::<4>("009fa0f").is_err());
        assert!(decode_array::<4>("009fa0fg").unwrap_err().contains("at 7"));
        // A multi-byte character must not split a char boundary or panic.
        assert!(decode_array::<2>("é0a").is_err());
        assert_eq!(decode_vec("009FA0ff"), Ok(bytes.to_vec()));
        assert_eq!(decode_vec(""), Ok(vec![]));
        assert!(decode_vec("009").is_err());
        assert!(decode_vec("0g").is_err());
        assert!(decode_vec("é0").is_err());
        assert_eq!(encode_upper(&[0xb0, 0xc0]), "B0C0");
    }
}
