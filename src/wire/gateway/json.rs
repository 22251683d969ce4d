//! Go-compatible JSON reading and string writing, so the gateway accepts, rejects and words
//! errors exactly like etcd's gateway (Go `encoding/json` as used by grpc-gateway v1 and
//! golang/protobuf 1.3 `jsonpb`).
//!
//! - [`Decoder`] reads one JSON value after another from a request body like Go's
//!   `json.Decoder.Decode`: whitespace-only input is "no more values" (`io.EOF`), a truncated
//!   value is `unexpected EOF`, and a syntax error carries Go's scanner message
//!   (`invalid character 'b' looking for beginning of object key string`). Bytes after a
//!   complete value are left for the next call, never an error.
//! - [`check_valid`] is Go's `json.Unmarshal` syntax pass over a whole buffer (used for the
//!   quoted-number quirk of `jsonpb`).
//! - [`Value`] keeps the raw text of every value, because `jsonpb` looks at raw bytes (enum
//!   names are not unescaped; quoted numbers are re-parsed from their raw inner text).
//! - [`unquote`] is Go's string literal decoding (escapes, surrogates, invalid UTF-8 -> U+FFFD).
//! - [`write_string`] is Go's `json.Marshal` of a string (HTML-safe escaping, Go 1.19 rules).

use std::fmt::Write as _;

/// A syntax or end-of-input error, worded like Go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError(pub String);

/// One parsed JSON value with its raw text.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A number literal, as written.
    Number(&'a [u8]),
    /// A string literal: the bytes between the quotes, still escaped.
    String(&'a [u8]),
    /// An array.
    Array(Vec<Value<'a>>),
    /// An object: members in input order (duplicates kept; the last one wins when read).
    Object(Vec<(&'a [u8], Value<'a>)>),
}

impl Value<'_> {
    /// Go's name of the JSON kind in `UnmarshalTypeError` ("string", "number", ...).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r' | b'\n')
}

/// Go's `quoteChar`: how the scanner shows an offending byte.
pub fn quote_char(c: u8) -> String {
    match c {
        b'\'' => "'\\''".to_string(),
        b'"' => "'\"'".to_string(),
        _ => {
            let q = go_quote_rune(c as u32);
            format!("'{}'", &q[1..q.len() - 1])
        }
    }
}

/// Go's `strconv.Quote` of a single rune (enough for bytes and Latin-1 code points).
fn go_quote_rune(r: u32) -> String {
    let mut s = String::from("\"");
    go_quote_rune_into(&mut s, r);
    s.push('"');
    s
}

fn go_quote_rune_into(s: &mut String, r: u32) {
    match r {
        0x07 => s.push_str("\\a"),
        0x08 => s.push_str("\\b"),
        0x0c => s.push_str("\\f"),
        0x0a => s.push_str("\\n"),
        0x0d => s.push_str("\\r"),
        0x09 => s.push_str("\\t"),
        0x0b => s.push_str("\\v"),
        0x5c => s.push_str("\\\\"),
        0x22 => s.push_str("\\\""),
        r if r < 0x20 || r == 0x7f => {
            let _ = write!(s, "\\x{r:02x}");
        }
        r if (0x80..0xa1).contains(&r) || r == 0xad => {
            let _ = write!(s, "\\u{r:04x}");
        }
        r => match char::from_u32(r) {
            Some(c) => s.push(c),
            None => s.push('\u{fffd}'),
        },
    }
}

/// Go's `%q` of a byte string (used in `jsonpb`'s "unknown value %q for enum" error).
pub fn go_quote_bytes(b: &[u8]) -> String {
    let mut s = String::from("\"");
    let text = String::from_utf8_lossy(b);
    let mut raw = b;
    // Invalid UTF-8 bytes print as \xNN; valid runes as Go's Quote does.
    for ch in text.chars() {
        let len = ch.len_utf8();
        if ch == '\u{fffd}' && !raw.starts_with("\u{fffd}".as_bytes()) {
            let _ = write!(s, "\\x{:02x}", raw.first().copied().unwrap_or(0));
            raw = raw.get(1..).unwrap_or_default();
            continue;
        }
        if (ch as u32) < 0x80 || ch as u32 == 0xad || (0x80..0xa1).contains(&(ch as u32)) {
            go_quote_rune_into(&mut s, ch as u32);
        } else {
            s.push(ch);
        }
        raw = raw.get(len..).unwrap_or_default();
    }
    s.push('"');
    s
}

/// Where the scanner is, for the wording of its errors.
#[derive(Clone, Copy)]
enum Ctx {
    /// Expecting any value.
    BeginValue,
    /// After a value inside an object.
    AfterObjectValue,
    /// After a value inside an array.
    AfterArrayElement,
    /// After the top-level value (only `check_valid`).
    AfterTop,
}

/// Result of scanning: a value, or an error, or end of input in the middle of something.
enum Scan<T> {
    Ok(T),
    Err(SyntaxError),
    Eof,
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Scan::Ok(v) => v,
            Scan::Err(e) => return Scan::Err(e),
            Scan::Eof => return Scan::Eof,
        }
    };
}

struct Parser<'a> {
    buf: &'a [u8],
    pos: usize,
    depth: usize,
}

/// Nesting limit. Go allows 10,000 levels (`maxNestingDepth`) with the same error wording;
/// this parser is recursive, so it stops far earlier (etcd's messages nest a few levels).
const MAX_DEPTH: usize = 512;

impl<'a> Parser<'a> {
    fn err(&self, c: u8, ctx: &str) -> SyntaxError {
        SyntaxError(format!("invalid character {} {}", quote_char(c), ctx))
    }

    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(is_space) {
            self.pos += 1;
        }
    }

    fn value(&mut self) -> Scan<Value<'a>> {
        let Some(c) = self.peek() else {
            return Scan::Eof;
        };
        match c {
            b'{' => self.object(),
            b'[' => self.array(),
            b'"' => {
                let s = tri!(self.string());
                Scan::Ok(Value::String(s))
            }
            b'-' | b'0'..=b'9' => self.number(),
            b't' => self.literal(b"true", Value::Bool(true)),
            b'f' => self.literal(b"false", Value::Bool(false)),
            b'n' => self.literal(b"null", Value::Null),
            _ => Scan::Err(self.err(c, "looking for beginning of value")),
        }
    }

    fn literal(&mut self, word: &'static [u8], v: Value<'a>) -> Scan<Value<'a>> {
        let name = match word[0] {
            b't' => "true",
            b'f' => "false",
            _ => "null",
        };
        self.pos += 1;
        for &want in &word[1..] {
            let Some(c) = self.peek() else {
                return Scan::Eof;
            };
            if c != want {
                return Scan::Err(self.err(
                    c,
                    &format!("in literal {name} (expecting {})", quote_char(want)),
                ));
            }
            self.pos += 1;
        }
        Scan::Ok(v)
    }

    fn number(&mut self) -> Scan<Value<'a>> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
            match self.peek() {
                None => return Scan::Eof,
                Some(b'0'..=b'9') => {}
                Some(c) => return Scan::Err(self.err(c, "in numeric literal")),
            }
        }
        if self.peek() == Some(b'0') {
            self.pos += 1;
        } else {
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1;
            }
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            match self.peek() {
                None => return Scan::Eof,
                Some(b'0'..=b'9') => {}
                Some(c) => return Scan::Err(self.err(c, "after decimal point in numeric literal")),
            }
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1;
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            match self.peek() {
                None => return Scan::Eof,
                Some(b'0'..=b'9') => {}
                Some(c) => return Scan::Err(self.err(c, "in exponent of numeric literal")),
            }
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1;
            }
        }
        Scan::Ok(Value::Number(&self.buf[start..self.pos]))
    }

    /// A string literal; returns the escaped bytes between the quotes.
    fn string(&mut self) -> Scan<&'a [u8]> {
        self.pos += 1;
        let start = self.pos;
        loop {
            let Some(c) = self.peek() else {
                return Scan::Eof;
            };
            match c {
                b'"' => {
                    let s = &self.buf[start..self.pos];
                    self.pos += 1;
                    return Scan::Ok(s);
                }
                b'\\' => {
                    self.pos += 1;
                    let Some(e) = self.peek() else {
                        return Scan::Eof;
                    };
                    match e {
                        b'b' | b'f' | b'n' | b'r' | b't' | b'\\' | b'/' | b'"' => self.pos += 1,
                        b'u' => {
                            self.pos += 1;
                            for _ in 0..4 {
                                let Some(h) = self.peek() else {
                                    return Scan::Eof;
                                };
                                if !h.is_ascii_hexdigit() {
                                    return Scan::Err(
                                        self.err(h, "in \\u hexadecimal character escape"),
                                    );
                                }
                                self.pos += 1;
                            }
                        }
                        _ => return Scan::Err(self.err(e, "in string escape code")),
                    }
                }
                c if c < 0x20 => return Scan::Err(self.err(c, "in string literal")),
                _ => self.pos += 1,
            }
        }
    }

    fn enter(&mut self, c: u8) -> Result<(), SyntaxError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.err(c, "exceeded max depth"));
        }
        Ok(())
    }

    fn object(&mut self) -> Scan<Value<'a>> {
        if let Err(e) = self.enter(b'{') {
            return Scan::Err(e);
        }
        self.pos += 1;
        let mut members = Vec::new();
        self.skip_space();
        match self.peek() {
            None => return Scan::Eof,
            Some(b'}') => {
                self.pos += 1;
                self.depth -= 1;
                return Scan::Ok(Value::Object(members));
            }
            Some(b'"') => {}
            Some(c) => return Scan::Err(self.err(c, "looking for beginning of object key string")),
        }
        loop {
            let key = tri!(self.string());
            self.skip_space();
            match self.peek() {
                None => return Scan::Eof,
                Some(b':') => self.pos += 1,
                Some(c) => return Scan::Err(self.err(c, "after object key")),
            }
            self.skip_space();
            let v = tri!(self.value());
            members.push((key, v));
            tri!(self.after(Ctx::AfterObjectValue));
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.skip_space();
                    match self.peek() {
                        None => return Scan::Eof,
                        Some(b'"') => {}
                        Some(c) => {
                            return Scan::Err(
                                self.err(c, "looking for beginning of object key string"),
                            )
                        }
                    }
                }
                _ => {
                    // '}' (checked by `after`).
                    self.pos += 1;
                    self.depth -= 1;
                    return Scan::Ok(Value::Object(members));
                }
            }
        }
    }

    fn array(&mut self) -> Scan<Value<'a>> {
        if let Err(e) = self.enter(b'[') {
            return Scan::Err(e);
        }
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_space();
        match self.peek() {
            None => return Scan::Eof,
            Some(b']') => {
                self.pos += 1;
                self.depth -= 1;
                return Scan::Ok(Value::Array(items));
            }
            _ => {}
        }
        loop {
            let v = tri!(self.value());
            items.push(v);
            tri!(self.after(Ctx::AfterArrayElement));
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.skip_space();
                }
                _ => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Scan::Ok(Value::Array(items));
                }
            }
        }
    }

    /// Skips spaces after a value and checks the next byte fits `ctx`.
    fn after(&mut self, ctx: Ctx) -> Scan<()> {
        self.skip_space();
        let Some(c) = self.peek() else {
            return Scan::Eof;
        };
        match (ctx, c) {
            (Ctx::AfterObjectValue, b',' | b'}') | (Ctx::AfterArrayElement, b',' | b']') => {
                Scan::Ok(())
            }
            (Ctx::AfterObjectValue, _) => Scan::Err(self.err(c, "after object key:value pair")),
            (Ctx::AfterArrayElement, _) => Scan::Err(self.err(c, "after array element")),
            (Ctx::AfterTop, _) => Scan::Err(self.err(c, "after top-level value")),
            (Ctx::BeginValue, _) => Scan::Ok(()),
        }
    }
}

/// Reads consecutive JSON values from a buffer like Go's `json.Decoder`.
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// What [`Decoder::next_value`] found.
#[derive(Debug)]
pub enum Next<'a> {
    /// A complete value.
    Value(Value<'a>),
    /// Only whitespace was left (Go: `io.EOF`).
    End,
}

impl<'a> Decoder<'a> {
    /// A decoder over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Decoder { buf, pos: 0 }
    }

    /// The next value; errors are Go's (`unexpected EOF` for a truncated value).
    pub fn next_value(&mut self) -> Result<Next<'a>, SyntaxError> {
        let mut p = Parser {
            buf: self.buf,
            pos: self.pos,
            depth: 0,
        };
        p.skip_space();
        if p.peek().is_none() {
            self.pos = p.pos;
            return Ok(Next::End);
        }
        match p.value() {
            Scan::Ok(v) => {
                self.pos = p.pos;
                Ok(Next::Value(v))
            }
            Scan::Err(e) => {
                self.pos = self.buf.len();
                Err(e)
            }
            Scan::Eof => {
                self.pos = self.buf.len();
                Err(SyntaxError("unexpected EOF".into()))
            }
        }
    }
}

/// Go's `json.Unmarshal` syntax check of a whole buffer, returning the single value.
pub fn check_valid(buf: &[u8]) -> Result<Value<'_>, SyntaxError> {
    let mut p = Parser {
        buf,
        pos: 0,
        depth: 0,
    };
    p.skip_space();
    let v = match p.value() {
        Scan::Ok(v) => v,
        Scan::Err(e) => return Err(e),
        // Go feeds a space at the end: a value that a space cannot end is reported as such.
        Scan::Eof => {
            let mut padded = buf.to_vec();
            padded.push(b' ');
            let mut p = Parser {
                buf: &padded,
                pos: 0,
                depth: 0,
            };
            p.skip_space();
            return Err(match p.value() {
                Scan::Err(e) => e,
                _ => SyntaxError("unexpected end of JSON input".into()),
            });
        }
    };
    p.skip_space();
    if let Some(c) = p.peek() {
        return Err(p.err(c, "after top-level value"));
    }
    let _ = Ctx::AfterTop;
    let _ = Ctx::BeginValue;
    Ok(v)
}

/// Go's decoding of the escaped bytes of a string literal into UTF-8 bytes.
pub fn unquote(raw: &[u8]) -> Vec<u8> {
    if !raw.iter().any(|&c| c == b'\\' || c >= 0x80) {
        return raw.to_vec();
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    let push_char = |out: &mut Vec<u8>, c: char| {
        let mut b = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
    };
    let hex4 = |s: &[u8]| -> Option<u32> {
        let s = std::str::from_utf8(s.get(..4)?).ok()?;
        u32::from_str_radix(s, 16).ok()
    };
    while i < raw.len() {
        let c = raw[i];
        if c == b'\\' {
            let Some(&e) = raw.get(i + 1) else { break };
            i += 2;
            match e {
                b'b' => out.push(0x08),
                b'f' => out.push(0x0c),
                b'n' => out.push(b'\n'),
                b'r' => out.push(b'\r'),
                b't' => out.push(b'\t'),
                b'u' => {
                    let Some(r) = raw.get(i..).and_then(hex4) else {
                        break;
                    };
                    i += 4;
                    if (0xd800..0xe000).contains(&r) {
                        // A surrogate: valid only as a high/low pair.
                        if r < 0xdc00 && raw.get(i) == Some(&b'\\') && raw.get(i + 1) == Some(&b'u')
                        {
                            if let Some(r2) = raw.get(i + 2..).and_then(hex4) {
                                if (0xdc00..0xe000).contains(&r2) {
                                    let cp = 0x10000 + ((r - 0xd800) << 10) + (r2 - 0xdc00);
                                    push_char(&mut out, char::from_u32(cp).unwrap_or('\u{fffd}'));
                                    i += 6;
                                    continue;
                                }
                            }
                        }
                        push_char(&mut out, '\u{fffd}');
                    } else {
                        push_char(&mut out, char::from_u32(r).unwrap_or('\u{fffd}'));
                    }
                }
                other => out.push(other),
            }
        } else if c < 0x80 {
            out.push(c);
            i += 1;
        } else {
            // Copy one UTF-8 sequence, or U+FFFD for an invalid byte.
            let end = (i + 4).min(raw.len());
            let chunk = &raw[i..end];
            let valid = match std::str::from_utf8(chunk) {
                Ok(s) => s.chars().next(),
                Err(e) if e.valid_up_to() > 0 => std::str::from_utf8(&chunk[..e.valid_up_to()])
                    .ok()
                    .and_then(|s| s.chars().next()),
                Err(_) => None,
            };
            match valid {
                Some(ch) => {
                    push_char(&mut out, ch);
                    i += ch.len_utf8();
                }
                None => {
                    push_char(&mut out, '\u{fffd}');
                    i += 1;
                }
            }
        }
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `s` as a JSON string exactly as Go 1.19's `json.Marshal` writes it (HTML-safe).
pub fn write_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let b = s.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c < 0x80 {
            let safe = c >= 0x20 && c != b'"' && c != b'\\' && c != b'<' && c != b'>' && c != b'&';
            if safe {
                i += 1;
                continue;
            }
            out.extend_from_slice(&b[start..i]);
            match c {
                b'"' | b'\\' => {
                    out.push(b'\\');
                    out.push(c);
                }
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                _ => {
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[(c >> 4) as usize]);
                    out.push(HEX[(c & 0xf) as usize]);
                }
            }
            i += 1;
            start = i;
            continue;
        }
        // `s` is valid UTF-8: only U+2028 and U+2029 need escaping.
        if c == 0xe2 && b.get(i + 1) == Some(&0x80) && matches!(b.get(i + 2), Some(0xa8 | 0xa9)) {
            out.extend_from_slice(&b[start..i]);
            out.extend_from_slice(if b[i + 2] == 0xa8 {
                b"\\u2028"
            } else {
                b"\\u2029"
            });
            i += 3;
            start = i;
            continue;
        }
        i += 1;
    }
    out.extend_from_slice(&b[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first(s: &str) -> Result<Next<'_>, SyntaxError> {
        Decoder::new(s.as_bytes()).next_value()
    }

    fn err(s: &str) -> String {
        match first(s) {
            Err(e) => e.0,
            Ok(v) => panic!("no error for {s:?}: {v:?}"),
        }
    }

    #[test]
    fn go_syntax_errors() {
        assert_eq!(
            err("{bad"),
            "invalid character 'b' looking for beginning of object key string"
        );
        assert_eq!(err(r#"{"key":"YQ==","#), "unexpected EOF");
        assert_eq!(err(r#"{"a" 1}"#), "invalid character '1' after object key");
        assert_eq!(
            err(r#"{"a":01}"#),
            "invalid character '1' after object key:value pair"
        );
        assert_eq!(err("[1 2]"), "invalid character '2' after array element");
        assert_eq!(
            err("x"),
            "invalid character 'x' looking for beginning of value"
        );
        assert_eq!(
            err("tru!"),
            "invalid character '!' in literal true (expecting 'e')"
        );
        assert_eq!(err("-a"), "invalid character 'a' in numeric literal");
        assert_eq!(
            err("1.x"),
            "invalid character 'x' after decimal point in numeric literal"
        );
        assert_eq!(err("1e+"), "unexpected EOF");
        assert_eq!(
            err("\"a\\x\""),
            "invalid character 'x' in string escape code"
        );
        assert_eq!(err("\"a\nb\""), "invalid character '\\n' in string literal");
        assert_eq!(
            err("{'a':1}"),
            "invalid character '\\'' looking for beginning of object key string"
        );
        assert_eq!(
            err("\"\\u12g4\""),
            "invalid character 'g' in \\u hexadecimal character escape"
        );
    }

    #[test]
    fn decoder_stream_and_eof() {
        let mut d = Decoder::new(b" {\"a\":1} {\"b\":2} trailing");
        assert!(matches!(d.next_value(), Ok(Next::Value(Value::Object(_)))));
        assert!(matches!(d.next_value(), Ok(Next::Value(Value::Object(_)))));
        assert!(d.next_value().is_err());
        assert!(matches!(first("  \n"), Ok(Next::End)));
        assert!(matches!(first(""), Ok(Next::End)));
    }

    #[test]
    fn check_valid_like_unmarshal() {
        assert_eq!(
            check_valid(b"").unwrap_err().0,
            "unexpected end of JSON input"
        );
        assert_eq!(
            check_valid(b"1 2").unwrap_err().0,
            "invalid character '2' after top-level value"
        );
        assert_eq!(check_valid(b" 1").unwrap(), Value::Number(b"1"));
        assert_eq!(
            check_valid(b"-").unwrap_err().0,
            "invalid character ' ' in numeric literal"
        );
        assert_eq!(
            check_valid(b"{\"a\":").unwrap_err().0,
            "unexpected end of JSON input"
        );
    }

    #[test]
    fn unquote_go_rules() {
        assert_eq!(unquote(br"a\nb\u0041\/"), b"a\nbA/");
        assert_eq!(unquote(br"\ud83d\ude00"), "\u{1f600}".as_bytes());
        assert_eq!(unquote(br"\ud83d"), "\u{fffd}".as_bytes());
        assert_eq!(unquote(b"\xff"), "\u{fffd}".as_bytes());
    }

    #[test]
    fn go_string_escaping() {
        let mut out = Vec::new();
        write_string(&mut out, "a<b>&\"\\\n\u{1}\u{8}\u{2028}é");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#""a\u003cb\u003e\u0026\"\\\n\u0001\u0008\u2028é""#
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_char(b'\''), "'\\''");
        assert_eq!(quote_char(0x01), "'\\x01'");
        assert_eq!(go_quote_bytes(b"FOO"), "\"FOO\"");
        assert_eq!(go_quote_bytes(b"a\\b"), "\"a\\\\b\"");
    }
}
