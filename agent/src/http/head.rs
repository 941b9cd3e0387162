//! Message heads: httparse finds the fields, and a [`RequestHead`] or
//! [`ResponseHead`] keeps the head's bytes (copied once) with where each
//! field lies in them; the framing fields are read back out of them (by
//! `super::framing`).
//!
//! One copy of the head and its table of positions, in a single allocation
//! per head, rather than a string per field: a head is parsed for every
//! exchange on the node, sampled or not, and the allocations per field
//! were the largest part of the agent's own cost per request.

use std::mem::MaybeUninit;

/// Where a name or value lies in a head's bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Range {
    start: u32,
    end: u32,
}

impl Range {
    /// The range of `part`, a slice of `base`.
    fn of(base: &[u8], part: &[u8]) -> Range {
        let start = (part.as_ptr() as usize).saturating_sub(base.as_ptr() as usize);
        Range {
            start: start as u32,
            end: (start + part.len()) as u32,
        }
    }

    fn get(self, bytes: &[u8]) -> &[u8] {
        bytes
            .get(self.start as usize..self.end as usize)
            .unwrap_or_default()
    }
}

/// The header fields of a head, in the order received, repeats kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fields {
    /// Where each field's name and value lie ([`RANGE_PAIR_SIZE`] bytes
    /// per field), then the head's bytes: one allocation per head.
    data: Box<[u8]>,
    /// Number of fields.
    count: u32,
}

/// Bytes of one field's entry in [`Fields::data`]: name and value
/// [`Range`]s, four native-endian `u32`s.
const RANGE_PAIR_SIZE: usize = 16;

impl Fields {
    /// Fields of the head in `parsed[..len]`, as httparse found them in
    /// `parsed`.
    fn new(parsed: &[u8], len: usize, headers: &[httparse::Header<'_>]) -> Fields {
        let pairs = headers.iter().map(|h| {
            (
                Range::of(parsed, h.name.as_bytes()),
                Range::of(parsed, h.value),
            )
        });
        Fields::assemble(pairs, &parsed[..len])
    }

    fn assemble(pairs: impl ExactSizeIterator<Item = (Range, Range)>, raw: &[u8]) -> Fields {
        let count = pairs.len();
        let mut data = Vec::with_capacity(count * RANGE_PAIR_SIZE + raw.len());
        for (name, value) in pairs {
            for word in [name.start, name.end, value.start, value.end] {
                data.extend_from_slice(&word.to_ne_bytes());
            }
        }
        data.extend_from_slice(raw);
        Fields {
            data: data.into_boxed_slice(),
            count: count as u32,
        }
    }

    /// Fields from (name, value) pairs, for tests.
    #[cfg(test)]
    pub(crate) fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Fields {
        let mut raw = Vec::new();
        let mut ranges = Vec::new();
        for (name, value) in pairs {
            let name_at = raw.len() as u32;
            raw.extend_from_slice(name.as_bytes());
            let value_at = raw.len() as u32;
            raw.extend_from_slice(value);
            ranges.push((
                Range {
                    start: name_at,
                    end: value_at,
                },
                Range {
                    start: value_at,
                    end: raw.len() as u32,
                },
            ));
        }
        Fields::assemble(ranges.into_iter(), &raw)
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The head's bytes.
    fn raw(&self) -> &[u8] {
        self.data
            .get(self.len() * RANGE_PAIR_SIZE..)
            .unwrap_or_default()
    }

    /// Name and value range of each field, in order.
    fn ranges(&self) -> impl Iterator<Item = (Range, Range)> + '_ {
        let table = self.data.get(..self.len() * RANGE_PAIR_SIZE);
        let (entries, _) = table.unwrap_or_default().as_chunks::<RANGE_PAIR_SIZE>();
        entries.iter().map(|entry| {
            let word = |i: usize| {
                u32::from_ne_bytes([
                    entry[4 * i],
                    entry[4 * i + 1],
                    entry[4 * i + 2],
                    entry[4 * i + 3],
                ])
            };
            (
                Range {
                    start: word(0),
                    end: word(1),
                },
                Range {
                    start: word(2),
                    end: word(3),
                },
            )
        })
    }

    /// Each field's name (with the case the peer sent) and value (not
    /// necessarily UTF-8), in the order received.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        let raw = self.raw();
        self.ranges().map(move |(name, value)| {
            // httparse accepts only token characters in a name.
            let name = std::str::from_utf8(name.get(raw)).unwrap_or_default();
            (name, value.get(raw))
        })
    }

    /// Each field's name and value as bytes, in the order received: for
    /// readers that compare names as bytes anyway (no UTF-8 check).
    pub(crate) fn iter_bytes(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let raw = self.raw();
        self.ranges()
            .map(move |(name, value)| (name.get(raw), value.get(raw)))
    }

    /// The value of the first field called `name` (compared ignoring ASCII
    /// case), if any.
    pub fn first(&self, name: &str) -> Option<&[u8]> {
        let raw = self.raw();
        self.ranges()
            .find(|(n, _)| n.get(raw).eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, value)| value.get(raw))
    }

    /// The values of every field called `name` (compared ignoring ASCII
    /// case), in the order received.
    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> {
        let raw = self.raw();
        self.ranges()
            .filter(move |(n, _)| n.get(raw).eq_ignore_ascii_case(name.as_bytes()))
            .map(move |(_, value)| value.get(raw))
    }

    /// A string part of the head's bytes.
    fn text(&self, range: Range) -> &str {
        std::str::from_utf8(range.get(self.raw())).unwrap_or_default()
    }
}

/// A parsed request head: request line and header fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    method: Range,
    target: Range,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Header fields (they hold the head's bytes).
    pub headers: Fields,
}

/// A parsed response head: status line and header fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    /// Status code.
    pub status: u16,
    reason: Range,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Header fields (they hold the head's bytes).
    pub headers: Fields,
}

impl RequestHead {
    /// Request method, e.g. `GET`.
    pub fn method(&self) -> &str {
        self.headers.text(self.method)
    }

    /// Request target as sent (usually path and query).
    pub fn target(&self) -> &str {
        self.headers.text(self.target)
    }

    /// The value of the first field called `name` (compared ignoring ASCII
    /// case), if any.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.first(name)
    }

    /// The values of every field called `name` (compared ignoring ASCII
    /// case), in the order received.
    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> {
        self.headers.named(name)
    }
}

impl ResponseHead {
    /// Reason phrase; empty when absent or not plain ASCII.
    pub fn reason(&self) -> &str {
        self.headers.text(self.reason)
    }

    /// The value of the first field called `name` (compared ignoring ASCII
    /// case), if any.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.first(name)
    }

    /// The values of every field called `name` (compared ignoring ASCII
    /// case), in the order received.
    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> {
        self.headers.named(name)
    }
}

/// A head of either kind.
#[derive(Debug)]
pub(crate) enum Head {
    Request(RequestHead),
    Response(ResponseHead),
}

/// What parsing the bytes at a head position gave.
#[derive(Debug)]
pub(crate) enum Parse {
    /// A whole head, `len` bytes long (leading blank lines included).
    Complete { head: Head, len: usize },
    /// Valid so far, more bytes needed.
    Partial,
    /// Not an HTTP/1.x head. `other_version`: the start line names another
    /// HTTP version (HTTP/2 preface, `HTTP/2.0`), which is proof that the
    /// connection is not HTTP/1.x rather than a sign of lost bytes.
    Invalid { other_version: bool },
}

/// Header slots tried first; on the stack, enough for nearly every head.
const STACK_HEADERS: usize = 128;

/// Parses the head at the start of `buf`: a request head when `request`,
/// else a response head.
pub(crate) fn parse(request: bool, buf: &[u8]) -> Parse {
    // Left uninitialised: httparse writes the slots it uses, and zeroing
    // all of them was the largest part of parsing a short head.
    let mut headers = [const { MaybeUninit::uninit() }; STACK_HEADERS];
    let result = parse_with(request, buf, &mut headers);
    let result = match result {
        Err(httparse::Error::TooManyHeaders) => {
            // Rare, so a heap allocation is fine here. A field line takes at
            // least 3 bytes ("a:\n"), which bounds how many there can be.
            let mut headers = Vec::new();
            headers.resize_with(buf.len() / 3 + 1, MaybeUninit::uninit);
            parse_with(request, buf, &mut headers)
        }
        other => other,
    };
    match result {
        Ok(Some((head, len))) => Parse::Complete { head, len },
        Ok(None) => Parse::Partial,
        Err(_) => Parse::Invalid {
            other_version: names_other_version(buf),
        },
    }
}

fn parse_with<'b>(
    request: bool,
    buf: &'b [u8],
    headers: &mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Option<(Head, usize)>, httparse::Error> {
    // Lenient where real peers are sloppy: this is an observer, the two ends
    // already agreed on these bytes, and rejecting them would lose the trace.
    let mut config = httparse::ParserConfig::default();
    if request {
        config
            .allow_multiple_spaces_in_request_line_delimiters(true)
            .ignore_invalid_headers_in_requests(true);
        let mut req = httparse::Request::new(&mut []);
        let httparse::Status::Complete(len) =
            config.parse_request_with_uninit_headers(&mut req, buf, headers)?
        else {
            return Ok(None);
        };
        let (Some(method), Some(target), Some(minor_version)) = (req.method, req.path, req.version)
        else {
            return Err(httparse::Error::Token);
        };
        let head = RequestHead {
            method: Range::of(buf, method.as_bytes()),
            target: Range::of(buf, target.as_bytes()),
            minor_version,
            headers: Fields::new(buf, len, req.headers),
        };
        Ok(Some((Head::Request(head), len)))
    } else {
        config
            .allow_multiple_spaces_in_response_status_delimiters(true)
            .allow_spaces_after_header_name_in_responses(true)
            .allow_obsolete_multiline_headers_in_responses(true)
            .ignore_invalid_headers_in_responses(true);
        let mut resp = httparse::Response::new(&mut []);
        let httparse::Status::Complete(len) =
            config.parse_response_with_uninit_headers(&mut resp, buf, headers)?
        else {
            return Ok(None);
        };
        let (Some(status), Some(minor_version)) = (resp.code, resp.version) else {
            return Err(httparse::Error::Status);
        };
        let head = ResponseHead {
            status,
            reason: Range::of(buf, resp.reason.unwrap_or_default().as_bytes()),
            minor_version,
            headers: Fields::new(buf, len, resp.headers),
        };
        Ok(Some((Head::Response(head), len)))
    }
}

/// Whether the first line of `buf` names an HTTP version other than 1.0 and
/// 1.1 where a start line has it (`PRI * HTTP/2.0`, `HTTP/2 200`). Only
/// called once httparse refused the bytes, to tell "another protocol" from
/// "not a head at all" (say, body text that mentions HTTP/2).
fn names_other_version(buf: &[u8]) -> bool {
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let version = if line.starts_with(b"HTTP/") {
        line.split(|&b| b == b' ').next()
    } else {
        line.rsplit(|&b| b == b' ').next()
    };
    version.is_some_and(|v| {
        v.strip_prefix(b"HTTP/").is_some_and(|n| {
            n.first().is_some_and(u8::is_ascii_digit) && n != b"1.0" && n != b"1.1"
        })
    })
}

/// Whether `bytes` begin with a complete, plausible start line: a request
/// line when `request`, else an `HTTP/1.x` status line. This is how a
/// direction that lost track of the framing finds its feet again, so it is
/// stricter than parsing: body bytes must not pass for a start line.
pub(crate) fn begins_with_start_line(request: bool, bytes: &[u8]) -> bool {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(bytes.len());
    let bytes = &bytes[start..];
    let Some(end) = bytes.iter().position(|&b| b == b'\n') else {
        return false;
    };
    let line = &bytes[..=end];
    let mut no_headers = [];
    if request {
        let mut req = httparse::Request::new(&mut no_headers);
        let parsed = httparse::ParserConfig::default()
            .allow_multiple_spaces_in_request_line_delimiters(true)
            .parse_request(&mut req, line);
        // Any token is a valid method, but real methods are upper case; this
        // keeps a line of text in a body from passing for a request line.
        parsed.is_ok()
            && req.version.is_some()
            && req.method.is_some_and(|m| {
                m.bytes()
                    .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
            })
    } else {
        let mut resp = httparse::Response::new(&mut no_headers);
        let parsed = httparse::ParserConfig::default()
            .allow_multiple_spaces_in_response_status_delimiters(true)
            .parse_response(&mut resp, line);
        line.starts_with(b"HTTP/1.") && parsed.is_ok() && resp.code.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(bytes: &[u8]) -> RequestHead {
        match parse(true, bytes) {
            Parse::Complete {
                head: Head::Request(h),
                ..
            } => h,
            other => panic!("not a complete request: {other:?}"),
        }
    }

    #[test]
    fn request_head_is_owned_with_fields_in_order() {
        let head = request(b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a: 2\r\n\r\nbody");
        assert_eq!(head.method(), "GET");
        assert_eq!(head.target(), "/x");
        assert_eq!(head.minor_version, 1);
        assert_eq!(head.header("HOST"), Some(&b"a"[..]));
        assert_eq!(head.headers_named("X-a").collect::<Vec<_>>(), [b"1", b"2"]);
        assert_eq!(head.header("missing"), None);
    }

    #[test]
    fn complete_length_excludes_the_body() {
        let Parse::Complete { len, .. } = parse(true, b"GET / HTTP/1.1\r\n\r\nxyz") else {
            panic!()
        };
        assert_eq!(len, 18);
    }

    #[test]
    fn heads_with_many_fields_fall_back_to_the_heap() {
        let mut bytes = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..500 {
            bytes.extend_from_slice(format!("f{i}: v\r\n").as_bytes());
        }
        bytes.extend_from_slice(b"\r\n");
        let Parse::Complete {
            head: Head::Response(head),
            len,
        } = parse(false, &bytes)
        else {
            panic!()
        };
        assert_eq!(len, bytes.len());
        assert_eq!(head.headers.len(), 500);
        assert_eq!(head.header("F499"), Some(&b"v"[..]));
    }

    #[test]
    fn partial_and_invalid_heads() {
        assert!(matches!(
            parse(true, b"GET / HTTP/1.1\r\nHo"),
            Parse::Partial
        ));
        assert!(matches!(parse(false, b"HTTP/1.1 20"), Parse::Partial));
        assert!(matches!(
            parse(true, b"\x16\x03\x01\x02\x00"),
            Parse::Invalid {
                other_version: false
            }
        ));
        assert!(matches!(
            parse(true, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Parse::Invalid {
                other_version: true
            }
        ));
        assert!(matches!(
            parse(false, b"HTTP/2 200\r\n\r\n"),
            Parse::Invalid {
                other_version: true
            }
        ));
        assert!(matches!(
            parse(true, b"GET / HTTP/1.2\r\n"),
            Parse::Invalid {
                other_version: true
            }
        ));
        // Text is not another HTTP version, even when it mentions one.
        assert!(matches!(
            parse(true, b"some words here\r\n"),
            Parse::Invalid {
                other_version: false
            }
        ));
        assert!(matches!(
            parse(true, b"{\"proto\": \"HTTP/2.0\", \"x\": 1}"),
            Parse::Invalid {
                other_version: false
            }
        ));
    }

    #[test]
    fn start_lines_for_resynchronisation() {
        assert!(begins_with_start_line(true, b"GET / HTTP/1.1\r\n"));
        assert!(begins_with_start_line(
            true,
            b"\r\nM-SEARCH * HTTP/1.1\r\nx"
        ));
        assert!(!begins_with_start_line(true, b"GET / HTTP/1.1"));
        assert!(!begins_with_start_line(true, b"get / HTTP/1.1\r\n"));
        assert!(!begins_with_start_line(true, b"some words here\r\n"));
        assert!(!begins_with_start_line(true, b"HTTP/1.1 200 OK\r\n"));
        assert!(begins_with_start_line(false, b"HTTP/1.1 200 OK\r\n"));
        assert!(begins_with_start_line(false, b"HTTP/1.0 404\r\n"));
        assert!(!begins_with_start_line(false, b"HTTP/1.1 200 OK"));
        assert!(!begins_with_start_line(false, b"GET / HTTP/1.1\r\n"));
        assert!(!begins_with_start_line(false, b""));
    }
}
