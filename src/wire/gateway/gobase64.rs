//! Go's `base64.StdEncoding.Decode`, error offsets included, because etcd's gateway decodes
//! every `bytes` field with it: padding is required, `\r` and `\n` are skipped anywhere, the
//! URL-safe alphabet is rejected, and a failure reads `illegal base64 data at input byte N`.

/// `illegal base64 data at input byte N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CorruptInput(pub usize);

impl std::fmt::Display for CorruptInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "illegal base64 data at input byte {}", self.0)
    }
}

fn decode_byte(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// Decodes standard, padded base64 exactly as Go does.
pub fn decode(src: &[u8]) -> Result<Vec<u8>, CorruptInput> {
    let mut dst = Vec::with_capacity(src.len() / 4 * 3 + 3);
    let mut si = 0;
    while si < src.len() {
        let (nsi, done) = quantum(&mut dst, src, si)?;
        si = nsi;
        if done {
            break;
        }
    }
    Ok(dst)
}

/// Go's `decodeQuantum`: one group of four symbols. Returns the next input index and whether
/// decoding is finished (padding seen or input ended).
fn quantum(dst: &mut Vec<u8>, src: &[u8], mut si: usize) -> Result<(usize, bool), CorruptInput> {
    let mut dbuf = [0u8; 4];
    let mut dlen = 4;
    let mut j = 0;
    let mut finished = false;
    while j < 4 {
        if si == src.len() {
            if j == 0 {
                return Ok((si, true));
            }
            // Padding is required: a short final group is corrupt.
            return Err(CorruptInput(si - j));
        }
        let c = src[si];
        si += 1;
        if let Some(v) = decode_byte(c) {
            dbuf[j] = v;
            j += 1;
            continue;
        }
        if c == b'\n' || c == b'\r' {
            continue;
        }
        if c != b'=' {
            return Err(CorruptInput(si - 1));
        }
        // Padding: the end of the data.
        match j {
            0 | 1 => return Err(CorruptInput(si - 1)),
            2 => {
                while si < src.len() && (src[si] == b'\n' || src[si] == b'\r') {
                    si += 1;
                }
                if si == src.len() {
                    return Err(CorruptInput(src.len()));
                }
                if src[si] != b'=' {
                    return Err(CorruptInput(si - 1));
                }
                si += 1;
            }
            _ => {}
        }
        while si < src.len() && (src[si] == b'\n' || src[si] == b'\r') {
            si += 1;
        }
        if si < src.len() {
            return Err(CorruptInput(si));
        }
        dlen = j;
        finished = true;
        break;
    }
    let val = (u32::from(dbuf[0]) << 18)
        | (u32::from(dbuf[1]) << 12)
        | (u32::from(dbuf[2]) << 6)
        | u32::from(dbuf[3]);
    let bytes = [(val >> 16) as u8, (val >> 8) as u8, val as u8];
    dst.extend_from_slice(&bytes[..dlen - 1]);
    Ok((si, finished))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid() {
        assert_eq!(decode(b"Zm9v").unwrap(), b"foo");
        assert_eq!(decode(b"YQ==").unwrap(), b"a");
        assert_eq!(decode(b"YWI=").unwrap(), b"ab");
        assert_eq!(decode(b"").unwrap(), b"");
        assert_eq!(decode(b"Y\nQ==").unwrap(), b"a");
        assert_eq!(decode(b"YQ==\r\n").unwrap(), b"a");
        assert_eq!(decode(b"Zm9vYmFy").unwrap(), b"foobar");
        // Non-zero bits after the last byte are ignored, as by Go's non-strict decoder (the
        // `go_base64` fuzz target's input; its oracle, the `base64` crate, refused it).
        assert_eq!(decode(b"Zm2\r\n/FFy=").unwrap(), [102, 109, 191, 20, 92]);
    }

    #[test]
    fn go_error_offsets() {
        // All checked against etcd 3.4.23's gateway.
        assert_eq!(decode(b"!!"), Err(CorruptInput(0)));
        assert_eq!(decode(b"Zm9"), Err(CorruptInput(0)));
        assert_eq!(decode(b"YQ"), Err(CorruptInput(0)));
        assert_eq!(decode(b"YQ="), Err(CorruptInput(3)));
        assert_eq!(decode(b"Y-Q="), Err(CorruptInput(1)));
        assert_eq!(decode(b"YQ==YQ=="), Err(CorruptInput(4)));
        assert_eq!(decode(b"Zm9vY"), Err(CorruptInput(4)));
        assert_eq!(decode(b"=QQQ"), Err(CorruptInput(0)));
    }
}
