//! Where an HTTP/1.x message body ends (RFC 9112 section 6), decided once
//! for the tracer's parser and for the proxy.
//!
//! Both must agree on where a body ends: the proxy rewrites the next request
//! head it finds, and the tracer reports the exchange it parses, so two
//! readings of the same framing fields would let one of them take body
//! bytes for a head. What differs is how much ambiguity each tolerates,
//! chosen by [`Mode`]:
//!
//! - [`Mode::Lenient`], the tracer: an observer of bytes both ends already
//!   agreed on; it reads the fields as RFC 9112 says a recipient should
//!   (Transfer-Encoding overrides Content-Length, codings listed over
//!   several field lines form one list) and keeps the trace.
//! - [`Mode::Strict`], the proxy: it forwards what it decides from, so
//!   anything a server could read another way (both fields on a request,
//!   Transfer-Encoding in HTTP/1.0, any framing field on CONNECT, a folded
//!   framing field, a last Transfer-Encoding line that does not itself end
//!   in `chunked`) is
//!   [`BodyFraming::Unframeable`] and the proxy stops interpreting the
//!   connection instead of guessing: this is what prevents request
//!   smuggling through it.
//!
//! [`FramingFields`] collects the two framing fields from a head's field
//! lines, [`FramingFields::request`] and [`response`] decide.

/// How a message's body is delimited, everything considered: the fields,
/// the request method and the status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body: the next message starts right after the head.
    None,
    /// `Content-Length` bytes (more than zero).
    Length(u64),
    /// `Transfer-Encoding` ending in `chunked`.
    Chunked,
    /// A response delimited by the server closing the connection.
    UntilClose,
    /// Framing fields that are invalid, conflicting or folded: where the
    /// body ends cannot be known with certainty, so the reader stops
    /// interpreting the connection.
    Unframeable,
}

/// How much ambiguity in the framing fields a reader tolerates (see the
/// module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The tracer's parser: reads what RFC 9112 lets a recipient read.
    Lenient,
    /// The proxy: refuses whatever a server could read differently.
    Strict,
}

/// A request method, as far as framing depends on it (RFC 9112 section
/// 6.3): a request's own framing, or that of the response answering it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MethodKind {
    /// `HEAD`: the response has no body whatever its fields say.
    Head,
    /// `CONNECT`: the request has no content, a 2xx response turns the
    /// connection into a tunnel.
    Connect,
    /// Any other method (or a response nobody asked for).
    #[default]
    Other,
}

impl MethodKind {
    /// The kind of `method` as sent (methods are case-sensitive).
    pub fn of(method: &[u8]) -> MethodKind {
        match method {
            b"HEAD" => MethodKind::Head,
            b"CONNECT" => MethodKind::Connect,
            _ => MethodKind::Other,
        }
    }
}

/// What a response head means for the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseKind {
    /// 1xx other than 101: the final response to the same request follows.
    Interim,
    /// 101, or 2xx to CONNECT: from here both directions carry another
    /// protocol.
    Switch,
    /// The final response, with its body framing.
    Final(BodyFraming),
}

/// What the framing fields alone say (RFC 9112 section 6.3, items 3 to 5),
/// before the method, status code and version are taken into account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// `Transfer-Encoding` ending in `chunked`.
    Chunked,
    /// `Transfer-Encoding` present but not ending in `chunked`: a response
    /// then runs until the connection closes; a request cannot be framed.
    OtherEncoding,
    /// A valid `Content-Length` and no `Transfer-Encoding`.
    Length(u64),
    /// Neither field.
    Unspecified,
    /// `Content-Length` values that are not a number or disagree; in strict
    /// mode also a framing field folded over several lines.
    Invalid,
}

/// A Content-Length that is not one decimal number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct InvalidLength;

/// What the `Transfer-Encoding` field lines say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Codings {
    /// Whether the last coding of all the lines together is `chunked`; None
    /// while no line named one. The lenient reading: the lines form one
    /// list (RFC 9110 section 5.3), empty elements ignored.
    last_chunked: Option<bool>,
    /// Whether the last line's own last coding is `chunked`. The strict
    /// reading: an empty line after `chunked` is not taken on trust.
    last_line_chunked: bool,
}

/// The framing fields of one head, collected field line by field line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct FramingFields {
    /// The Content-Length values merged, if any line had the field.
    content_length: Option<Result<u64, InvalidLength>>,
    /// The Transfer-Encoding lines, if any.
    transfer_encoding: Option<Codings>,
    /// Whether a framing field had obs-fold continuation lines.
    folded: bool,
}

impl FramingFields {
    /// The framing fields among `fields`, (name, value) pairs in the order
    /// received, none of them folded (or folded and joined by the caller).
    pub(crate) fn read<'a, N: AsRef<[u8]>>(
        fields: impl IntoIterator<Item = (N, &'a [u8])>,
    ) -> FramingFields {
        let mut framing = FramingFields::default();
        for (name, value) in fields {
            framing.add(name.as_ref(), value, false);
        }
        framing
    }

    /// Takes one more field line into account: `value` is its value without
    /// surrounding whitespace, `folded` whether continuation lines followed
    /// (their bytes are not looked at: strict mode refuses such a field,
    /// lenient mode reads `value` as given). Returns whether it was a
    /// framing field.
    pub(crate) fn add(&mut self, name: &[u8], value: &[u8], folded: bool) -> bool {
        if name.eq_ignore_ascii_case(b"content-length") {
            self.content_length = Some(merge_content_length(self.content_length, value));
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let last = value
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .rfind(|coding| !coding.is_empty());
            let chunked = last.is_some_and(|coding| coding.eq_ignore_ascii_case(b"chunked"));
            let before = self.transfer_encoding.and_then(|c| c.last_chunked);
            self.transfer_encoding = Some(Codings {
                last_chunked: if last.is_some() {
                    Some(chunked)
                } else {
                    before
                },
                last_line_chunked: chunked,
            });
        } else {
            return false;
        }
        self.folded |= folded;
        true
    }

    /// Whether either framing field is present.
    pub(crate) fn any(&self) -> bool {
        self.content_length.is_some() || self.transfer_encoding.is_some()
    }

    /// What the fields alone say, read in `mode`. Transfer-Encoding
    /// overrides Content-Length (RFC 9112 section 6.3, item 3).
    pub(crate) fn framing(&self, mode: Mode) -> Framing {
        if mode == Mode::Strict && self.folded {
            return Framing::Invalid;
        }
        if let Some(codings) = self.transfer_encoding {
            let chunked = match mode {
                Mode::Lenient => codings.last_chunked == Some(true),
                Mode::Strict => codings.last_line_chunked,
            };
            return if chunked {
                Framing::Chunked
            } else {
                Framing::OtherEncoding
            };
        }
        match self.content_length {
            None => Framing::Unspecified,
            Some(Ok(length)) => Framing::Length(length),
            Some(Err(InvalidLength)) => Framing::Invalid,
        }
    }

    /// How the body of a request with these fields is delimited.
    pub(crate) fn request(&self, mode: Mode, minor_version: u8, method: MethodKind) -> BodyFraming {
        if mode == Mode::Strict {
            if method == MethodKind::Connect {
                // A CONNECT request has no content (RFC 9110 section
                // 9.3.6); one that claims some is read differently by
                // different servers.
                return if self.any() {
                    BodyFraming::Unframeable
                } else {
                    BodyFraming::None
                };
            }
            // Both fields, or Transfer-Encoding in HTTP/1.0, are how
            // requests are smuggled past one parser and not another (RFC
            // 9112 section 6.1): do not guess which one the server believes.
            if self.transfer_encoding.is_some()
                && (self.content_length.is_some() || minor_version == 0)
            {
                return BodyFraming::Unframeable;
            }
        }
        match self.framing(mode) {
            Framing::Chunked => BodyFraming::Chunked,
            // Requests without either field have no body (item 7).
            Framing::Length(0) | Framing::Unspecified => BodyFraming::None,
            Framing::Length(length) => BodyFraming::Length(length),
            // A request body that is not chunked last has no length (item 4).
            Framing::OtherEncoding | Framing::Invalid => BodyFraming::Unframeable,
        }
    }

    /// How the body of a final response with these fields is delimited,
    /// when neither its status nor its request rule the body out.
    pub(crate) fn response_body(&self, mode: Mode) -> BodyFraming {
        match self.framing(mode) {
            Framing::Chunked => BodyFraming::Chunked,
            Framing::Length(0) => BodyFraming::None,
            Framing::Length(length) => BodyFraming::Length(length),
            // A response whose coding is not chunked, or with neither
            // field, runs until the close (items 4 and 8).
            Framing::OtherEncoding | Framing::Unspecified => BodyFraming::UntilClose,
            Framing::Invalid => BodyFraming::Unframeable,
        }
    }
}

/// Whether `status` is an interim response (1xx other than 101): the
/// final response to the same request follows it.
pub(crate) fn is_interim(status: u16) -> bool {
    (100..200).contains(&status) && status != 101
}

/// What a response with `status`, answering a request made with `method`,
/// means for the connection; `fields`, its (name, value) pairs, are read
/// (in `mode`) only when they decide.
pub(crate) fn response<'a, N: AsRef<[u8]>>(
    mode: Mode,
    status: u16,
    method: MethodKind,
    fields: impl IntoIterator<Item = (N, &'a [u8])>,
) -> ResponseKind {
    match (status, method) {
        (101, _) => ResponseKind::Switch,
        _ if is_interim(status) => ResponseKind::Interim,
        (200..=299, MethodKind::Connect) => ResponseKind::Switch,
        (204 | 304, _) | (_, MethodKind::Head) => ResponseKind::Final(BodyFraming::None),
        _ => ResponseKind::Final(FramingFields::read(fields).response_body(mode)),
    }
}

/// Folds one more Content-Length field line into what was seen: a list of
/// identical numbers is allowed, on one line or several (RFC 9112 section
/// 6.3, item 5); anything else spoils the length for good.
fn merge_content_length(
    seen: Option<Result<u64, InvalidLength>>,
    value: &[u8],
) -> Result<u64, InvalidLength> {
    let mut length = match seen {
        Some(Err(InvalidLength)) => return Err(InvalidLength),
        Some(Ok(n)) => Some(n),
        None => None,
    };
    for item in value.split(|&b| b == b',') {
        let n = parse_decimal(item.trim_ascii()).ok_or(InvalidLength)?;
        if length.is_some_and(|l| l != n) {
            return Err(InvalidLength);
        }
        length = Some(n);
    }
    // `split` yields at least one item, so this is always a length.
    length.ok_or(InvalidLength)
}

/// `1*DIGIT` as a number; None for anything else (signs, spaces, empty)
/// and for values past `u64`.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    use super::*;
    use crate::http::head::{self, Fields, Head, Parse};
    use crate::proxy::head::{HeadParse, parse_request_head};

    fn headers(fields: &[(&str, &str)]) -> Fields {
        Fields::from_pairs(fields.iter().map(|(n, v)| (*n, v.as_bytes())))
    }

    /// The tracer's reading of a head's framing fields.
    fn framing(headers: &Fields) -> Framing {
        FramingFields::read(headers.iter()).framing(Mode::Lenient)
    }

    fn fields(fields: &[(&str, &str)]) -> FramingFields {
        FramingFields::read(fields.iter().map(|(n, v)| (*n, v.as_bytes())))
    }

    /// A request's framing in both modes: (lenient, strict).
    fn request(minor_version: u8, method: &str, pairs: &[(&str, &str)]) -> [BodyFraming; 2] {
        let fields = fields(pairs);
        let method = MethodKind::of(method.as_bytes());
        [Mode::Lenient, Mode::Strict].map(|mode| fields.request(mode, minor_version, method))
    }

    #[test]
    fn framing_follows_rfc_9112() {
        assert_eq!(framing(&headers(&[])), Framing::Unspecified);
        assert_eq!(
            framing(&headers(&[("Content-Length", " 42 ")])),
            Framing::Length(42)
        );
        assert_eq!(
            framing(&headers(&[
                ("content-length", "5, 5"),
                ("Content-Length", "5")
            ])),
            Framing::Length(5)
        );
        assert_eq!(
            framing(&headers(&[
                ("Content-Length", "5"),
                ("Content-Length", "6")
            ])),
            Framing::Invalid
        );
        assert_eq!(
            framing(&headers(&[("Content-Length", "-1")])),
            Framing::Invalid
        );
        assert_eq!(
            framing(&headers(&[("Content-Length", "99999999999999999999999")])),
            Framing::Invalid
        );
        assert_eq!(
            framing(&headers(&[
                ("Content-Length", "10"),
                ("Transfer-Encoding", "gzip, Chunked")
            ])),
            Framing::Chunked
        );
        assert_eq!(
            framing(&headers(&[
                ("Transfer-Encoding", "chunked"),
                ("Transfer-Encoding", "gzip")
            ])),
            Framing::OtherEncoding
        );
        assert_eq!(
            framing(&headers(&[("Transfer-Encoding", "")])),
            Framing::OtherEncoding
        );
    }

    #[test]
    fn content_length_lists_must_agree() {
        for (values, expected) in [
            (&["7"][..], Some(7)),
            (&["007", "7"], Some(7)),
            (&["7,7,  7"], Some(7)),
            (&["7", "7, 8"], None),
            (&["7,"], None),
            (&[""], None),
            (&["+7"], None),
            (&["7 7"], None),
            (&["0x7"], None),
            (&["18446744073709551615"], Some(u64::MAX)),
            (&["18446744073709551616"], None),
            // Once invalid, a later valid line does not repair it.
            (&["x", "7"], None),
        ] {
            let pairs: Vec<_> = values.iter().map(|v| ("Content-Length", *v)).collect();
            let got = fields(&pairs).framing(Mode::Strict);
            let want = expected.map_or(Framing::Invalid, Framing::Length);
            assert_eq!(got, want, "{values:?}");
            assert_eq!(fields(&pairs).framing(Mode::Lenient), want, "{values:?}");
        }
    }

    /// Every input on which the tracer and the proxy read a request
    /// differently: the proxy refuses, the tracer follows RFC 9112's
    /// recipient rules. The strict answers are the proxy's
    /// `request_framing_follows_rfc_9112`.
    #[test]
    fn strict_refuses_requests_lenient_reads() {
        use BodyFraming::{Chunked, Length, Unframeable};
        // Transfer-Encoding with Content-Length: Transfer-Encoding wins.
        assert_eq!(
            request(
                1,
                "POST",
                &[("Transfer-Encoding", "chunked"), ("Content-Length", "3")]
            ),
            [Chunked, Unframeable]
        );
        // Transfer-Encoding in HTTP/1.0.
        assert_eq!(
            request(0, "POST", &[("Transfer-Encoding", "chunked")]),
            [Chunked, Unframeable]
        );
        // CONNECT with content.
        assert_eq!(
            request(1, "CONNECT", &[("Content-Length", "3")]),
            [Length(3), Unframeable]
        );
        assert_eq!(
            request(1, "CONNECT", &[("Content-Length", "0")]),
            [BodyFraming::None, Unframeable]
        );
        // `chunked` then an empty Transfer-Encoding line: one list whose
        // last coding is chunked, or a last line that does not say so.
        assert_eq!(
            request(
                1,
                "POST",
                &[("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "")]
            ),
            [Chunked, Unframeable]
        );
        // A folded framing field: the tracer never sees one (httparse
        // drops or joins continuation lines first); the proxy refuses it.
        for name in ["Content-Length", "Transfer-Encoding"] {
            let mut folded = fields(&[]);
            folded.add(name.as_bytes(), b"", true);
            folded.add(b"Transfer-Encoding", b"chunked", false);
            assert_eq!(
                folded.request(Mode::Strict, 1, MethodKind::Other),
                Unframeable
            );
            assert_eq!(folded.request(Mode::Lenient, 1, MethodKind::Other), Chunked);
        }
        // Where neither is ambiguous, both agree.
        assert_eq!(
            request(1, "CONNECT", &[]),
            [BodyFraming::None, BodyFraming::None]
        );
        assert_eq!(
            request(0, "POST", &[("Content-Length", "4")]),
            [Length(4), Length(4)]
        );
        assert_eq!(
            request(1, "POST", &[("Transfer-Encoding", "gzip, chunked")]),
            [Chunked, Chunked]
        );
        assert_eq!(
            request(1, "POST", &[("Transfer-Encoding", "chunked, gzip")]),
            [Unframeable, Unframeable]
        );
    }

    /// The same request heads through both callers: the tracer's head
    /// parser read leniently, the proxy's head parser (its own field walk,
    /// which sees obs-fold) read strictly.
    #[test]
    fn the_two_callers_differ_only_by_mode() {
        use BodyFraming::{Chunked, Length, Unframeable};
        let tracer = |bytes: &str| match head::parse(true, bytes.as_bytes()) {
            Parse::Complete {
                head: Head::Request(request),
                ..
            } => FramingFields::read(request.headers.iter()).request(
                Mode::Lenient,
                request.minor_version,
                MethodKind::of(request.method().as_bytes()),
            ),
            other => panic!("{bytes:?} gave {other:?}"),
        };
        let proxy = |bytes: &str| match parse_request_head(bytes.as_bytes()) {
            HeadParse::Complete(info) => info.framing,
            other => panic!("{bytes:?} gave {other:?}"),
        };
        for (bytes, lenient, strict) in [
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
                Length(5),
                Length(5),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                Chunked,
                Chunked,
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                Chunked,
                Unframeable,
            ),
            (
                "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                Chunked,
                Unframeable,
            ),
            (
                "CONNECT a:1 HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
                Length(5),
                Unframeable,
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding:\r\n\r\n",
                Chunked,
                Unframeable,
            ),
            // httparse skips a continuation line in a request as an invalid
            // field line; the proxy's walk keeps it with its field.
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\n 6\r\n\r\n",
                Length(5),
                Unframeable,
            ),
        ] {
            assert_eq!(tracer(bytes), lenient, "tracer, {bytes:?}");
            assert_eq!(proxy(bytes), strict, "proxy, {bytes:?}");
        }
    }

    #[test]
    fn strict_response_wants_the_last_line_chunked() {
        let fields = [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", " ")];
        let kind = |mode| {
            response(
                mode,
                200,
                MethodKind::Other,
                fields.map(|(n, v)| (n, v.as_bytes())),
            )
        };
        assert_eq!(
            kind(Mode::Lenient),
            ResponseKind::Final(BodyFraming::Chunked)
        );
        assert_eq!(
            kind(Mode::Strict),
            ResponseKind::Final(BodyFraming::UntilClose)
        );
    }

    #[test]
    fn responses_follow_status_and_method() {
        use BodyFraming::{Chunked, Length, Unframeable, UntilClose};
        use MethodKind::{Connect, Head, Other};
        use ResponseKind::{Final, Interim, Switch};
        let empty = Final(BodyFraming::None);
        for mode in [Mode::Lenient, Mode::Strict] {
            let kind = |status, method, fields: &[(&str, &str)]| {
                response(
                    mode,
                    status,
                    method,
                    fields.iter().map(|(n, v)| (*n, v.as_bytes())),
                )
            };
            assert_eq!(kind(100, Other, &[]), Interim);
            assert_eq!(kind(103, Connect, &[]), Interim);
            assert_eq!(kind(101, Head, &[]), Switch);
            assert_eq!(kind(200, Connect, &[]), Switch);
            assert_eq!(
                kind(407, Connect, &[("Content-Length", "2")]),
                Final(Length(2))
            );
            assert_eq!(kind(200, Head, &[("Content-Length", "2")]), empty);
            assert_eq!(kind(204, Other, &[("Content-Length", "2")]), empty);
            assert_eq!(kind(304, Other, &[("Transfer-Encoding", "chunked")]), empty);
            assert_eq!(kind(200, Other, &[("Content-Length", "0")]), empty);
            assert_eq!(kind(200, Other, &[]), Final(UntilClose));
            assert_eq!(
                kind(
                    200,
                    Other,
                    &[("Content-Length", "3"), ("Transfer-Encoding", "chunked")]
                ),
                Final(Chunked)
            );
            assert_eq!(
                kind(200, Other, &[("Transfer-Encoding", "gzip")]),
                Final(UntilClose)
            );
            assert_eq!(
                kind(200, Other, &[("Content-Length", "x")]),
                Final(Unframeable)
            );
        }
        assert!(is_interim(199) && !is_interim(101) && !is_interim(200));
    }

    #[test]
    fn methods_are_case_sensitive() {
        assert_eq!(MethodKind::of(b"HEAD"), MethodKind::Head);
        assert_eq!(MethodKind::of(b"CONNECT"), MethodKind::Connect);
        assert_eq!(MethodKind::of(b"connect"), MethodKind::Other);
        assert_eq!(MethodKind::of(b"GET"), MethodKind::Other);
    }

    /// Strict mode only ever refuses: whenever it frames a message, the
    /// lenient reading frames it the same way, so the proxy and the tracer
    /// never disagree on where a body it interprets ends.
    #[test]
    fn strict_only_refuses() {
        let mut rng = StdRng::seed_from_u64(0xf7a);
        let names = ["Content-Length", "transfer-encoding", "X-Other"];
        let values = [
            "",
            " ",
            "0",
            "5",
            "5, 5",
            "6",
            "chunked",
            "Chunked",
            "gzip",
            "gzip, chunked",
            "chunked, gzip",
            "chunked,",
            ",",
            "x",
        ];
        for _ in 0..20_000 {
            let mut fields = FramingFields::default();
            for _ in 0..rng.random_range(0..4) {
                let name = names[rng.random_range(0..names.len())];
                let value = values[rng.random_range(0..values.len())];
                fields.add(name.as_bytes(), value.as_bytes(), rng.random_ratio(1, 20));
            }
            let minor_version = rng.random_range(0..2);
            let method =
                [MethodKind::Head, MethodKind::Connect, MethodKind::Other][rng.random_range(0..3)];
            let strict = fields.request(Mode::Strict, minor_version, method);
            if strict != BodyFraming::Unframeable {
                assert_eq!(
                    strict,
                    fields.request(Mode::Lenient, minor_version, method),
                    "{fields:?}"
                );
            }
            let strict = fields.response_body(Mode::Strict);
            if !matches!(strict, BodyFraming::Unframeable | BodyFraming::UntilClose) {
                assert_eq!(strict, fields.response_body(Mode::Lenient), "{fields:?}");
            }
        }
    }
}
