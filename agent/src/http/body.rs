//! Body framing: finding where a body ends without keeping its bytes.
//!
//! Bodies are only ever walked over, never copied: the tracer needs their
//! length and their end, not their content. The chunked decoder is a byte
//! state machine so that a chunk-size line, a CRLF or a trailer can be split
//! across any number of messages without buffering.

/// Longest chunk extension skipped; longer means the bytes are not chunked
/// framing after all (they came from somewhere else).
const MAX_CHUNK_EXTENSION: u32 = 4096;
/// Longest trailer field line skipped, for the same reason.
const MAX_TRAILER_LINE: u32 = 64 * 1024;
/// Hex digits a chunk size may have before it overflows 64 bits.
const MAX_CHUNK_SIZE_DIGITS: u8 = 16;

/// How far a body has got, for each way of delimiting it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Body {
    /// `Content-Length`: this many bytes are still to come (never 0 while
    /// the body is in progress).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked(Chunked),
    /// A response without length: everything until the connection closes.
    UntilClose,
}

/// Where the chunked decoder is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Chunked {
    /// Reading the hex chunk size.
    Size { value: u64, digits: u8 },
    /// After the size: whitespace, extensions and CR, up to the LF; `len`
    /// counts the bytes skipped.
    Extension { size: u64, len: u32 },
    /// Inside chunk data.
    Data { remaining: u64 },
    /// The CRLF after chunk data; `cr`: the CR was seen.
    DataEnd { cr: bool },
    /// After the last chunk: trailer fields, then an empty line. `line`
    /// counts the bytes of the current line, CRs left out.
    Trailer { line: u32 },
}

impl Chunked {
    /// A chunked body about to start.
    pub(crate) fn new() -> Self {
        Self::Size {
            value: 0,
            digits: 0,
        }
    }
}

/// What walking over some bytes gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Bytes of the input that belong to the body (framing included).
    pub consumed: usize,
    /// Of those, bytes of content (chunk framing left out).
    pub payload: u64,
    /// Where the body stands after them.
    pub outcome: Outcome,
}

/// Where a body stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// All input consumed, the body goes on.
    More,
    /// The body ended after `consumed` bytes; the rest is the next message.
    Done,
    /// The bytes at `consumed` cannot be chunked framing.
    Invalid,
}

/// What skipping bytes that were not captured gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Skip {
    /// All of them were body bytes (`payload` of them content); `done` if
    /// the body ended with the last.
    Within { payload: u64, done: bool },
    /// The body ended after `payload` of them; what the rest were is
    /// unknown.
    Overran { payload: u64 },
    /// The framing cannot be followed across bytes that were not seen (a
    /// chunk boundary fell among them).
    Lost,
}

impl Body {
    /// Walks over `data`, the next bytes of the stream.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Progress {
        match self {
            Self::Length(remaining) => {
                let take = bounded(*remaining, data.len());
                *remaining -= take as u64;
                Progress {
                    consumed: take,
                    payload: take as u64,
                    outcome: if *remaining == 0 {
                        Outcome::Done
                    } else {
                        Outcome::More
                    },
                }
            }
            Self::Chunked(state) => state.feed(data),
            Self::UntilClose => Progress {
                consumed: data.len(),
                payload: data.len() as u64,
                outcome: Outcome::More,
            },
        }
    }

    /// Accounts for `n` bytes that passed on the wire but were not captured.
    pub(crate) fn skip(&mut self, n: u64) -> Skip {
        match self {
            Self::Length(remaining) => {
                if n > *remaining {
                    let payload = *remaining;
                    *remaining = 0;
                    Skip::Overran { payload }
                } else {
                    *remaining -= n;
                    Skip::Within {
                        payload: n,
                        done: *remaining == 0,
                    }
                }
            }
            Self::UntilClose => Skip::Within {
                payload: n,
                done: false,
            },
            // Inside one chunk the unseen bytes are data: a large chunk cut
            // by the capture limit is the common case and stays followable.
            Self::Chunked(Chunked::Data { remaining }) if n <= *remaining => {
                *remaining -= n;
                if *remaining == 0 {
                    *self = Self::Chunked(Chunked::DataEnd { cr: false });
                }
                Skip::Within {
                    payload: n,
                    done: false,
                }
            }
            Self::Chunked(_) => Skip::Lost,
        }
    }
}

/// `remaining` capped at `available`, as a size.
fn bounded(remaining: u64, available: usize) -> usize {
    usize::try_from(remaining).map_or(available, |r| r.min(available))
}

impl Chunked {
    fn feed(&mut self, data: &[u8]) -> Progress {
        let mut i = 0;
        let mut payload = 0;
        let invalid = |consumed, payload| Progress {
            consumed,
            payload,
            outcome: Outcome::Invalid,
        };
        while i < data.len() {
            if let Self::Data { remaining } = self {
                let take = bounded(*remaining, data.len() - i);
                *remaining -= take as u64;
                payload += take as u64;
                i += take;
                if *remaining == 0 {
                    *self = Self::DataEnd { cr: false };
                }
                continue;
            }
            let b = data[i];
            match self {
                Self::Size { value, digits } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if *digits == MAX_CHUNK_SIZE_DIGITS {
                            return invalid(i, payload);
                        }
                        let digit = (b as char).to_digit(16).unwrap_or_default();
                        *value = *value << 4 | u64::from(digit);
                        *digits += 1;
                    }
                    b';' | b' ' | b'\t' | b'\r' if *digits > 0 => {
                        *self = Self::Extension {
                            size: *value,
                            len: 0,
                        };
                    }
                    b'\n' if *digits > 0 => *self = Self::after_size(*value),
                    _ => return invalid(i, payload),
                },
                Self::Extension { size, len } => match b {
                    b'\n' => *self = Self::after_size(*size),
                    // Extensions are tokens and quoted strings: control
                    // bytes mean this is not a chunk-size line.
                    b'\t' | b'\r' | 0x20..=0x7e | 0x80..=0xff => {
                        *len += 1;
                        if *len > MAX_CHUNK_EXTENSION {
                            return invalid(i, payload);
                        }
                    }
                    _ => return invalid(i, payload),
                },
                Self::DataEnd { cr } => match b {
                    b'\r' if !*cr => *cr = true,
                    b'\n' => *self = Self::new(),
                    _ => return invalid(i, payload),
                },
                Self::Trailer { line } => match b {
                    b'\n' if *line == 0 => {
                        return Progress {
                            consumed: i + 1,
                            payload,
                            outcome: Outcome::Done,
                        };
                    }
                    b'\n' => *line = 0,
                    b'\r' => {}
                    _ => {
                        *line += 1;
                        if *line > MAX_TRAILER_LINE {
                            return invalid(i, payload);
                        }
                    }
                },
                Self::Data { .. } => {}
            }
            i += 1;
        }
        Progress {
            consumed: i,
            payload,
            outcome: Outcome::More,
        }
    }

    /// The chunk-size line ended: data follows, or the trailer after the
    /// last chunk.
    fn after_size(size: u64) -> Self {
        if size == 0 {
            Self::Trailer { line: 0 }
        } else {
            Self::Data { remaining: size }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNKED: &[u8] =
        b"5;name=\"va;l\"\r\nhello\r\n1A \r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nTrailer: x\r\nMore: y\r\n\r\nNEXT";

    /// Feeds `pieces` one after the other, as messages would arrive.
    fn feed_all(body: &mut Body, pieces: &[&[u8]]) -> (usize, u64, Outcome) {
        let (mut consumed, mut payload) = (0, 0);
        let mut outcome = Outcome::More;
        for piece in pieces {
            let p = body.feed(piece);
            consumed += p.consumed;
            payload += p.payload;
            outcome = p.outcome;
            if outcome != Outcome::More {
                break;
            }
        }
        (consumed, payload, outcome)
    }

    #[test]
    fn length_body_ends_exactly() {
        let mut body = Body::Length(5);
        assert_eq!(feed_all(&mut body, &[b"he"]), (2, 2, Outcome::More));
        assert_eq!(feed_all(&mut body, &[b"lloGET"]), (3, 3, Outcome::Done));
    }

    #[test]
    fn chunked_body_with_extensions_and_trailers() {
        let mut body = Body::Chunked(Chunked::new());
        assert_eq!(
            feed_all(&mut body, &[CHUNKED]),
            (CHUNKED.len() - 4, 31, Outcome::Done)
        );
    }

    #[test]
    fn chunked_body_split_anywhere_ends_at_the_same_place() {
        for split in 0..=CHUNKED.len() {
            for second in split..=CHUNKED.len() {
                let mut body = Body::Chunked(Chunked::new());
                let pieces = [
                    &CHUNKED[..split],
                    &CHUNKED[split..second],
                    &CHUNKED[second..],
                ];
                assert_eq!(
                    feed_all(&mut body, &pieces),
                    (CHUNKED.len() - 4, 31, Outcome::Done),
                    "split at {split} and {second}"
                );
            }
        }
    }

    #[test]
    fn bare_lf_line_endings_are_accepted() {
        let mut body = Body::Chunked(Chunked::new());
        assert_eq!(
            feed_all(&mut body, &[b"3\nabc\n0\n\nX"]),
            (9, 3, Outcome::Done)
        );
    }

    #[test]
    fn bytes_that_are_not_chunked_framing_are_invalid() {
        for (bytes, at) in [
            (&b"zz\r\n"[..], 0),
            (b"\r\n", 0),
            (b"3\r\nabcX", 6),
            (b"3\r\nabc\rX", 7),
            (b"11111111111111111\r\n", 16),
            (b"1;\x00\r\n", 2),
        ] {
            let mut body = Body::Chunked(Chunked::new());
            let p = body.feed(bytes);
            assert_eq!((p.consumed, p.outcome), (at, Outcome::Invalid), "{bytes:?}");
        }
    }

    #[test]
    fn unseen_bytes_are_skipped_where_framing_allows() {
        let mut body = Body::Length(10);
        assert_eq!(
            body.skip(4),
            Skip::Within {
                payload: 4,
                done: false
            }
        );
        assert_eq!(body.skip(8), Skip::Overran { payload: 6 });

        let mut body = Body::UntilClose;
        assert_eq!(
            body.skip(1 << 40),
            Skip::Within {
                payload: 1 << 40,
                done: false
            }
        );

        let mut body = Body::Chunked(Chunked::new());
        body.feed(b"10\r\nab");
        assert_eq!(
            body.skip(14),
            Skip::Within {
                payload: 14,
                done: false
            }
        );
        assert_eq!(
            feed_all(&mut body, &[b"\r\n0\r\n\r\n"]),
            (7, 0, Outcome::Done)
        );

        let mut body = Body::Chunked(Chunked::new());
        body.feed(b"10\r\nab");
        assert_eq!(body.skip(15), Skip::Lost);
        let mut body = Body::Chunked(Chunked::new());
        body.feed(b"10\r");
        assert_eq!(body.skip(1), Skip::Lost);
    }
}
