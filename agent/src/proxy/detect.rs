//! Telling HTTP/1.x from anything else by a connection's first bytes.
//!
//! A connection is treated as HTTP only when the client opens with a whole
//! HTTP/1.x request line. Anything else is copied opaquely, so a protocol
//! that happens to start with a word and a space (and then waits for the
//! server) is never held back waiting for a head that will not come.

use crate::http::is_tchar;

/// The HTTP/2 connection preface; its first line parses as a request line
/// with method `PRI`, but the connection is not HTTP/1.x.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// What a connection's first bytes say about its protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FirstBytes {
    /// A complete HTTP/1.x request line.
    Http,
    /// Not HTTP/1.x: TLS, HTTP/2, binary, text protocols.
    Opaque,
    /// A plausible request line that has not ended yet.
    Undecided,
}

/// Classifies the first bytes a client sent.
pub(crate) fn classify(prefix: &[u8]) -> FirstBytes {
    let method_len = prefix.iter().take_while(|&&b| is_tchar(b)).count();
    match prefix.get(method_len) {
        // Only method characters so far: a request line may still follow.
        None => return FirstBytes::Undecided,
        Some(b' ') if method_len > 0 => {}
        // TLS (0x16), binary, an empty method, a leading CR LF.
        Some(_) => return FirstBytes::Opaque,
    }
    let compared = prefix.len().min(HTTP2_PREFACE.len());
    if prefix[..compared] == HTTP2_PREFACE[..compared] {
        return if compared == HTTP2_PREFACE.len() {
            FirstBytes::Opaque
        } else {
            FirstBytes::Undecided
        };
    }
    let Some(line_end) = prefix.iter().position(|&b| b == b'\n') else {
        return FirstBytes::Undecided;
    };
    // No header slots: httparse stops right after the request line, with
    // TooManyHeaders when a field follows.
    let mut no_headers = [];
    let mut request = httparse::Request::new(&mut no_headers);
    let line = &prefix[..=line_end];
    // As lenient as the head parser, so detection never refuses what the
    // relay would have rewritten.
    let parsed = httparse::ParserConfig::default()
        .allow_multiple_spaces_in_request_line_delimiters(true)
        .parse_request(&mut request, line);
    match parsed {
        Ok(_) | Err(httparse::Error::TooManyHeaders) if request.version.is_some() => {
            FirstBytes::Http
        }
        _ => FirstBytes::Opaque,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_http() {
        for bytes in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /upload?x=1 HTTP/1.0\r\nContent-Length: 3\r\n",
            b"M-SEARCH * HTTP/1.1\n",
        ] {
            assert_eq!(classify(bytes), FirstBytes::Http, "{bytes:?}");
        }
    }

    #[test]
    fn prefixes_of_a_request_line_wait_for_more() {
        let line = b"GET /index.html HTTP/1.1\r\n";
        for end in 0..line.len() - 1 {
            assert_eq!(classify(&line[..end]), FirstBytes::Undecided, "{end}");
        }
        assert_eq!(classify(b"PRI * HTTP/2"), FirstBytes::Undecided);
    }

    #[test]
    fn other_protocols_are_opaque() {
        for bytes in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"\x00\x01\x02",
            b"\r\nGET / HTTP/1.1\r\n",
            b" GET / HTTP/1.1\r\n",
            b"SET key value\r\n",
            b"GET / HTTP/2.0\r\n",
            b"HELO example.com\r\n",
            b"GET\t/ HTTP/1.1\r\n",
        ] {
            assert_eq!(classify(bytes), FirstBytes::Opaque, "{bytes:?}");
        }
    }
}
