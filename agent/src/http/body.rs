//! Where a message body ends, found by walking its framing without keeping
//! its bytes.
//!
//! Both users need the position of the next head, never the content: the
//! tracer ([`super::connection`]) to parse captured messages and count body
//! bytes, the proxy (`crate::proxy`) to know how far to forward before it
//! may rewrite a head. One walker serves both so that they agree on where
//! a body ends. The chunked decoder is a byte state machine, so a size
//! line, a CRLF or a trailer may be split across any number of reads or
//! captured messages without buffering.
//!
//! It is deliberately strict: when the bytes are not what the framing says
//! it reports [`Outcome::Invalid`] rather than guessing. The proxy then
//! stops interpreting the connection and copies the rest unchanged, which
//! is always safe, whereas a lenient guess could make it write a
//! traceparent into the middle of someone's body; the tracer resynchronises
//! on the next start line, which beats counting another message's bytes as
//! this one's body.
//!
//! The tracer also sees bytes it cannot read: the kernel reports how many
//! were not captured. [`Body::skip`] advances the framing over them where
//! that needs no guessing either.

/// Longest chunk extension accepted; longer means the bytes are not
/// chunked framing after all (they came from somewhere else).
const MAX_CHUNK_EXTENSION: u32 = 4096;
/// Longest trailer field line accepted, for the same reason.
const MAX_TRAILER_LINE: u32 = 64 * 1024;
/// Hex digits of a chunk size that still fit in 64 bits.
const MAX_CHUNK_SIZE_DIGITS: u8 = 16;

/// A body in progress, for each way of delimiting it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Body {
    /// `Content-Length`: this many bytes are still to come (never 0 while
    /// the body is in progress).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked(Chunked),
    /// A response without length: everything until the connection closes.
    /// Only the tracer walks one; the proxy has nothing left to find in it
    /// and copies the rest of the connection as it is.
    UntilClose,
}

/// Where the chunked decoder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Chunked {
    /// Reading the hex chunk size; `digits` read so far.
    Size { value: u64, digits: u8 },
    /// After the size: whitespace and extensions up to the end of the
    /// line; `len` counts the bytes skipped.
    Extension { size: u64, len: u32 },
    /// After the size line's CR: only LF may follow, since a bare CR is
    /// read differently by different parsers.
    SizeLf { size: u64 },
    /// Inside chunk data.
    Data { remaining: u64 },
    /// After chunk data: CRLF (or a bare LF) must follow; `cr`: CR seen.
    DataEnd { cr: bool },
    /// After the last chunk: trailer fields, then an empty line; `line`
    /// counts the bytes of the current line, CR left out; `cr`: the line's
    /// CR was seen, so only LF may follow.
    Trailer { line: u32, cr: bool },
}

/// What walking over some bytes gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Bytes of the input that belong to the body (framing included).
    pub consumed: usize,
    /// Of those, bytes of content (chunk framing left out): what the
    /// tracer reports as the body's length.
    pub payload: u64,
    /// Where the body stands after them.
    pub outcome: Outcome,
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
    /// chunk boundary or framing bytes fell among them).
    Lost,
}

impl Body {
    /// A body of `length` bytes; `None` when there is nothing to walk, so
    /// that a `Length` in progress is never 0.
    pub(crate) fn with_length(length: u64) -> Option<Body> {
        (length > 0).then_some(Body::Length(length))
    }

    /// A chunked body about to start.
    pub(crate) fn chunked() -> Body {
        Body::Chunked(Chunked::new())
    }

    /// Walks over `data`, the next bytes of the stream.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Progress {
        match self {
            Body::Length(remaining) => {
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
            Body::Chunked(state) => state.feed(data),
            Body::UntilClose => Progress {
                consumed: data.len(),
                payload: data.len() as u64,
                outcome: Outcome::More,
            },
        }
    }

    /// Accounts for `n` bytes that passed on the wire but were not captured.
    pub(crate) fn skip(&mut self, n: u64) -> Skip {
        match self {
            Body::Length(remaining) => {
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
            Body::UntilClose => Skip::Within {
                payload: n,
                done: false,
            },
            // Inside one chunk the unseen bytes are data: a large chunk cut
            // by the capture limit is the common case and stays followable.
            Body::Chunked(Chunked::Data { remaining }) if n <= *remaining => {
                *remaining -= n;
                if *remaining == 0 {
                    *self = Body::Chunked(Chunked::DataEnd { cr: false });
                }
                Skip::Within {
                    payload: n,
                    done: false,
                }
            }
            // Anywhere else unseen bytes would be framing, and assuming
            // what it said is the guess the strict walker exists to avoid.
            Body::Chunked(_) => Skip::Lost,
        }
    }
}

/// `remaining` capped at `available`, as a size.
fn bounded(remaining: u64, available: usize) -> usize {
    usize::try_from(remaining).map_or(available, |r| r.min(available))
}

impl Chunked {
    /// The decoder at the start of a chunk-size line.
    fn new() -> Chunked {
        Chunked::Size {
            value: 0,
            digits: 0,
        }
    }

    /// Walks over `data`; see [`Body::feed`].
    fn feed(&mut self, data: &[u8]) -> Progress {
        let mut i = 0;
        let mut payload = 0;
        let invalid = |consumed, payload| Progress {
            consumed,
            payload,
            outcome: Outcome::Invalid,
        };
        while i < data.len() {
            if let Chunked::Data { remaining } = self {
                let take = bounded(*remaining, data.len() - i);
                *remaining -= take as u64;
                payload += take as u64;
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
                            return invalid(i, payload);
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
                    _ => return invalid(i, payload),
                },
                Chunked::Extension { size, len } => match b {
                    b'\r' => *self = Chunked::SizeLf { size: *size },
                    b'\n' => *self = Chunked::after_size(*size),
                    // Extensions are tokens and quoted strings: control
                    // bytes mean this is not a chunk-size line.
                    b'\t' | 0x20..=0x7e | 0x80..=0xff => {
                        *len += 1;
                        if *len > MAX_CHUNK_EXTENSION {
                            return invalid(i, payload);
                        }
                    }
                    _ => return invalid(i, payload),
                },
                Chunked::SizeLf { size } => match b {
                    b'\n' => *self = Chunked::after_size(*size),
                    _ => return invalid(i, payload),
                },
                Chunked::DataEnd { cr } => match b {
                    b'\r' if !*cr => *cr = true,
                    b'\n' => *self = Chunked::new(),
                    _ => return invalid(i, payload),
                },
                Chunked::Trailer { line, cr } => match b {
                    b'\n' if *line == 0 => {
                        return Progress {
                            consumed: i + 1,
                            payload,
                            outcome: Outcome::Done,
                        };
                    }
                    b'\n' => {
                        *line = 0;
                        *cr = false;
                    }
                    // A CR anywhere but before the LF is a bare CR, which
                    // no parser agrees on.
                    _ if *cr => return invalid(i, payload),
                    b'\r' => *cr = true,
                    0 => return invalid(i, payload),
                    _ => {
                        *line += 1;
                        if *line > MAX_TRAILER_LINE {
                            return invalid(i, payload);
                        }
                    }
                },
                Chunked::Data { .. } => {}
            }
            i += 1;
        }
        Progress {
            consumed: i,
            payload,
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

    /// Feeds `pieces` one after the other, as reads or captured messages
    /// would arrive; sums what they gave.
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
        let mut body = Body::with_length(5).unwrap();
        assert_eq!(feed_all(&mut body, &[b"he"]), (2, 2, Outcome::More));
        assert_eq!(feed_all(&mut body, &[b"lloGET"]), (3, 3, Outcome::Done));
        assert_eq!(Body::with_length(0), None);
    }

    #[test]
    fn until_close_body_takes_everything_and_never_ends() {
        let mut body = Body::UntilClose;
        assert_eq!(
            feed_all(&mut body, &[b"abc", b"", b"HTTP/1.1 200 OK\r\n"]),
            (20, 20, Outcome::More)
        );
    }

    #[test]
    fn chunked_body_with_extensions_and_trailers() {
        let mut body = Body::chunked();
        assert_eq!(
            feed_all(&mut body, &[CHUNKED]),
            (CHUNKED.len() - 4, 31, Outcome::Done)
        );
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
                    (CHUNKED.len() - 4, 31, Outcome::Done),
                    "split at {split} and {second}"
                );
            }
        }
    }

    #[test]
    fn bare_lf_line_endings_are_accepted() {
        for (bytes, consumed) in [
            (&b"3\nabc\n0\n\nX"[..], 9),
            // After an extension, and ending trailer fields.
            (b"3;a=b\nabc\r\n0 \nT: 1\n\nX", 20),
        ] {
            let mut body = Body::chunked();
            assert_eq!(
                feed_all(&mut body, &[bytes]),
                (consumed, 3, Outcome::Done),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn bytes_that_are_not_chunked_framing_are_invalid() {
        for (bytes, at) in [
            (&b"zz\r\n"[..], 0),
            (b"\r\n", 0),
            (b"3\r\nabcX", 6),
            (b"3\r\nabc\rX", 7),
            // A CR in a size line must end it.
            (b"3\rX", 2),
            (b"3;a\rb\r\n", 4),
            (b"3 \r\r\n", 3),
            (b"11111111111111111\r\n", 16),
            (b"1;\x00\r\n", 2),
            // A CR in a trailer line must end it, and NUL is never a
            // field's.
            (b"0\r\nA: b\rc\r\n\r\n", 8),
            (b"0\r\n\r\r\n", 4),
            (b"0\r\nA\x00\r\n\r\n", 4),
        ] {
            let mut body = Body::chunked();
            let p = body.feed(bytes);
            assert_eq!((p.consumed, p.outcome), (at, Outcome::Invalid), "{bytes:?}");
        }
    }

    #[test]
    fn invalid_framing_after_data_reports_the_payload_before_it() {
        let mut body = Body::chunked();
        assert_eq!(
            body.feed(b"3\r\nabc\r\nzz"),
            Progress {
                consumed: 8,
                payload: 3,
                outcome: Outcome::Invalid
            }
        );
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

        let mut body = Body::chunked();
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

        let mut body = Body::chunked();
        body.feed(b"10\r\nab");
        assert_eq!(body.skip(15), Skip::Lost);
    }

    #[test]
    fn unseen_framing_bytes_are_not_guessed() {
        // Each prefix leaves the decoder where the next byte is framing:
        // after the size line's CR (only LF may follow), in an extension,
        // after chunk data, in the trailer section.
        for (prefix, state) in [
            (&b"10\r"[..], Chunked::SizeLf { size: 16 }),
            (b"10;x", Chunked::Extension { size: 16, len: 1 }),
            (b"1\r\na", Chunked::DataEnd { cr: false }),
            (b"0\r\nT", Chunked::Trailer { line: 1, cr: false }),
        ] {
            let mut body = Body::chunked();
            body.feed(prefix);
            assert_eq!(body, Body::Chunked(state), "{prefix:?}");
            assert_eq!(body.skip(1), Skip::Lost, "{prefix:?}");
        }
    }
}
