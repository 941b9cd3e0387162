//! The HTTP/1.x parser (`http::HttpConnection`), fed what a capture could
//! give: a request stream and a response stream, the request stream split
//! into two messages at every offset. Never a panic; what one connection
//! reports is sound (requests in order, bodies no longer than what was
//! fed); and where neither feed lost its framing (nor stopped looking like
//! HTTP), splitting the requests changes nothing.
//!
//! Input: request bytes, optionally followed by `0xff 0xff` and the
//! response bytes.
#![no_main]

use agent::http::{Exchange, HttpConnection, StreamDirection};
use libfuzzer_sys::fuzz_target;

/// Longest request stream split at every offset (quadratic work).
const MAX_SPLIT: usize = 2048;

fn run(requests: &[&[u8]], responses: &[u8]) -> (Vec<Exchange>, bool) {
    let mut connection = HttpConnection::new();
    let mut out = Vec::new();
    for (i, part) in requests.iter().enumerate() {
        connection.feed(
            StreamDirection::Requests,
            part,
            part.len(),
            1 + i as u64,
            &mut out,
        );
    }
    connection.feed(
        StreamDirection::Responses,
        responses,
        responses.len(),
        10,
        &mut out,
    );
    connection.close(11, &mut out);
    // Where a lost framing is found again depends on message boundaries.
    (out, connection.is_broken() || connection.lost_framing())
}

fn check(exchanges: &[Exchange], requests_len: usize, responses_len: usize) {
    for pair in exchanges.windows(2) {
        assert!(pair[0].sequence < pair[1].sequence, "in request order");
    }
    for e in exchanges {
        assert!(e.request_body_len <= requests_len as u64);
        assert!(e.response_body_len <= responses_len as u64);
        assert!(e.request_start_ns <= e.request_end_ns);
    }
}

/// What must not depend on where a message boundary fell (timestamps do).
fn shape(exchanges: &[Exchange]) -> Vec<(u64, String, Option<u16>, u64, u64)> {
    exchanges
        .iter()
        .map(|e| {
            (
                e.sequence,
                format!("{:?}", e.request),
                e.response.as_ref().map(|r| r.status),
                e.request_body_len,
                e.response_body_len,
            )
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let (requests, responses) = match data.windows(2).position(|w| w == [0xff, 0xff]) {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let (whole, whole_lost) = run(&[requests], responses);
    check(&whole, requests.len(), responses.len());
    if requests.len() > MAX_SPLIT {
        return;
    }
    for at in 0..=requests.len() {
        let (split, split_lost) = run(&[&requests[..at], &requests[at..]], responses);
        check(&split, requests.len(), responses.len());
        if !whole_lost && !split_lost {
            assert_eq!(shape(&whole), shape(&split), "split at {at}");
        }
    }
});
