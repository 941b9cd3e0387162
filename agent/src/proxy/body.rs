//! Where a message body ends, found by walking its framing without keeping
//! its bytes.
//!
//! The proxy forwards bodies as they arrive; all it needs is the position of
//! the next head. The chunked decoder is a byte state machine, so a size
//! line, a CRLF or a trailer may be split across any number of reads.
//!
//! It is deliberately strict: when these bytes are not what the framing
//! says, the proxy stops interpreting the connection and copies the rest
//! unchanged, which is always safe, whereas a lenient guess could make it
//! write a traceparent into the middle of someone's body.

/// Longest chunk extension accepted.
const MAX_CHUNK_EXTENSION: u32 = 4096;
/// Longest trailer field line accepted.
const MAX_TRAILER_LINE: u32 = 64 * 1024;
/// Hex digits of a chunk size that still fit in 64 bits.
const MAX_CHUNK_SIZE_DIGITS: u8 = 16;

/// A body in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Body {
    /// `Content-Length`: this many bytes are still to come (never 0 while
    /// the body is in progress).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked(Chunked),
}

/// Where the chunked decoder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Chunked {
    /// Reading the hex chunk size; `digits` read so far.
    Size { value: u64, digits: u8 },
    /// After the size: extensions up to the end of the line.
    Extension { size: u64, len: u32 },
    /// After the size line's CR: only LF may follow.
    SizeLf { size: u64 },
    /// Inside chunk data.
    Data { remaining: u64 },
    /// After chunk data: CRLF (or a bare LF) must follow; `cr`: CR seen.
    DataEnd { cr: bool },
    /// After the last chunk: trailer fields, then an empty line; `line`
    /// counts the bytes of the current line, CR left out.
    Trailer { line: u32, cr: bool },
}

/// Where a body stands after some bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// All input belongs to the body, which goes on.
    More,
    /// The body ended after `consumed` bytes; the rest is the next message.
    Done,
    /// The byte at `consumed` cannot be chunked framing.
    Invalid,
}

/// What walking over some bytes gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Bytes of the input that belong to the body (framing included).
    pub consumed: usize,
    /// Where the body stands after them.
    pub outcome: Outcome,
}

impl Body {
    /// A body of `length` bytes; `None` when there is nothing to walk.
    pub(crate) fn with_length(length: u64) -> Option<Body> {
        (length > 0).then_some(Body::Length(length))
    }

    /// A chunked body about to start.
    pub(crate) fn chunked() -> Body {
        Body::Chunked(Chunked::Size {
            value: 0,
            digits: 0,
        })
    }

    /// Walks over `data`, the next bytes of the stream.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Progress {
        match self {
            Body::Length(remaining) => {
                let take = usize::try_from(*remaining).map_or(data.len(), |r| r.min(data.len()));
                *remaining -= take as u64;
                Progress {
                    consumed: take,
                    outcome: if *remaining == 0 {
                        Outcome::Done
                    } else {
                        Outcome::More
                    },
                }
            }
            Body::Chunked(state) => state.feed(data),
        }
    }
}

impl Chunked {
    fn feed(&mut self, data: &[u8]) -> Progress {
        let mut i = 0;
        let invalid = |consumed| Progress {
            consumed,
            outcome: Outcome::Invalid,
        };
        while i < data.len() {
            if let Chunked::Data { remaining } = self {
                let take =
                    usize::try_from(*remaining).map_or(data.len() - i, |r| r.min(data.len() - i));
                *remaining -= take as u64;
                i += take;
                if *remaining == 0 {
                    *self = Chunked::DataEnd { cr: false };
                }
                continue;
            }
            let b = data[i];
            match self {
                Chunked::Size { value, digits } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if *digits == MAX_CHUNK_SIZE_DIGITS {
                            return invalid(i);
                        }
                        let digit = (b as char).to_digit(16).unwrap_or_default();
                        *value = (*value << 4) | u64::from(digit);
                        *digits += 1;
                    }
                    b';' | b' ' | b'\t' if *digits > 0 => {
                        *self = Chunked::Extension {
                            size: *value,
                            len: 0,
                        };
                    }
                    b'\r' if *digits > 0 => *self = Chunked::SizeLf { size: *value },
                    b'\n' if *digits > 0 => *self = Chunked::after_size(*value),
                    _ => return invalid(i),
                },
                Chunked::Extension { size, len } => match b {
                    b'\r' => *self = Chunked::SizeLf { size: *size },
                    b'\n' => *self = Chunked::after_size(*size),
                    // Extensions are tokens and quoted strings: control
                    // bytes mean this is not a chunk-size line.
                    b'\t' | 0x20..=0x7e | 0x80..=0xff => {
                        *len += 1;
                        if *len > MAX_CHUNK_EXTENSION {
                            return invalid(i);
                        }
                    }
                    _ => return invalid(i),
                },
                Chunked::SizeLf { size } => match b {
                    b'\n' => *self = Chunked::after_size(*size),
                    _ => return invalid(i),
                },
                Chunked::DataEnd { cr } => match b {
                    b'\r' if !*cr => *cr = true,
                    b'\n' => {
                        *self = Chunked::Size {
                            value: 0,
                            digits: 0,
                        }
                    }
                    _ => return invalid(i),
                },
                Chunked::Trailer { line, cr } => match b {
                    b'\n' if *line == 0 => {
                        return Progress {
                            consumed: i + 1,
                            outcome: Outcome::Done,
                        };
                    }
                    b'\n' => {
                        *line = 0;
                        *cr = false;
                    }
                    // A CR anywhere but before the LF is a bare CR, which
                    // no parser agrees on.
                    _ if *cr => return invalid(i),
                    b'\r' => *cr = true,
                    0 => return invalid(i),
                    _ => {
                        *line += 1;
                        if *line > MAX_TRAILER_LINE {
                            return invalid(i);
                        }
                    }
                },
                Chunked::Data { .. } => {}
            }
            i += 1;
        }
        Progress {
            consumed: i,
            outcome: Outcome::More,
        }
    }

    /// The chunk-size line ended: data follows, or the trailer section
    /// after the last chunk.
    fn after_size(size: u64) -> Chunked {
        if size == 0 {
            Chunked::Trailer { line: 0, cr: false }
        } else {
            Chunked::Data { remaining: size }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNKED: &[u8] = b"5;name=\"va;l\"\r\nhello\r\n1A \r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nTrailer: x\r\nMore: y\r\n\r\nNEXT";

    fn feed_all(body: &mut Body, pieces: &[&[u8]]) -> (usize, Outcome) {
        let mut consumed = 0;
        let mut outcome = Outcome::More;
        for piece in pieces {
            let p = body.feed(piece);
            consumed += p.consumed;
            outcome = p.outcome;
            if outcome != Outcome::More {
                break;
            }
        }
        (consumed, outcome)
    }

    #[test]
    fn length_body_ends_exactly() {
        let mut body = Body::with_length(5).unwrap();
        assert_eq!(feed_all(&mut body, &[b"he"]), (2, Outcome::More));
        assert_eq!(feed_all(&mut body, &[b"lloGET"]), (3, Outcome::Done));
        assert_eq!(Body::with_length(0), None);
    }

    #[test]
    fn chunked_body_split_anywhere_ends_at_the_same_place() {
        for split in 0..=CHUNKED.len() {
            for second in split..=CHUNKED.len() {
                let mut body = Body::chunked();
                let pieces = [
                    &CHUNKED[..split],
                    &CHUNKED[split..second],
                    &CHUNKED[second..],
                ];
                assert_eq!(
                    feed_all(&mut body, &pieces),
                    (CHUNKED.len() - 4, Outcome::Done),
                    "split at {split} and {second}"
                );
            }
        }
    }

    #[test]
    fn bare_lf_line_endings_are_accepted() {
        let mut body = Body::chunked();
        assert_eq!(
            feed_all(&mut body, &[b"3\nabc\n0\n\nX"]),
            (9, Outcome::Done)
        );
    }

    #[test]
    fn bytes_that_are_not_chunked_framing_are_invalid() {
        for (bytes, at) in [
            (&b"zz\r\n"[..], 0),
            (b"\r\n", 0),
            (b"3\r\nabcX", 6),
            (b"3\r\nabc\rX", 7),
            (b"3\rX", 2),
            (b"11111111111111111\r\n", 16),
            (b"1;\x00\r\n", 2),
            (b"0\r\nA: b\rc\r\n\r\n", 8),
        ] {
            let mut body = Body::chunked();
            let p = body.feed(bytes);
            assert_eq!((p.consumed, p.outcome), (at, Outcome::Invalid), "{bytes:?}");
        }
    }

    #[test]
    fn huge_chunk_sizes_do_not_overflow() {
        let mut body = Body::chunked();
        let p = body.feed(b"ffffffffffffffff\r\nabc");
        assert_eq!((p.consumed, p.outcome), (21, Outcome::More));
        assert_eq!(
            body,
            Body::Chunked(Chunked::Data {
                remaining: u64::MAX - 3
            })
        );
        let mut body = Body::Length(u64::MAX);
        assert_eq!(body.feed(b"abc").outcome, Outcome::More);
    }
}
