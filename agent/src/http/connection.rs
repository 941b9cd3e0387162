//! One connection's two byte streams, parsed incrementally and paired into
//! [`Exchange`]s.
//!
//! Each direction is a small state machine (head, body, or lost) fed one
//! captured message at a time. Requests go into a first-in first-out queue
//! when their head is parsed; each response answers the oldest request not
//! yet answered (HTTP/1.x has no other way to pair them), and an exchange
//! leaves the queue once both its request and its response have ended, so
//! exchanges come out in request order even when pipelined.
//!
//! Captured messages can be cut short (`bytes.len() < len`) and, when the
//! kernel's ring buffer overflows, lost entirely. Missing bytes inside a
//! body whose framing says how long it is are simply counted. Anything else
//! makes the direction *desynchronised*: it waits for a message that begins
//! with a start line, and the pairing rules below keep a lost request or
//! response from shifting every later pair by one.

use std::collections::VecDeque;

use super::body::{Body, Outcome, Skip};
use super::framing::{self, BodyFraming, FramingFields, MethodKind, Mode, ResponseKind};
use super::head::{self, Head, Parse, RequestHead, ResponseHead};

/// Which of a connection's two byte streams a message belongs to, in HTTP
/// terms (the capture's send/receive depends on which end is traced).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamDirection {
    /// The stream carrying requests (client to server).
    Requests,
    /// The stream carrying responses (server to client).
    Responses,
}

/// One request and the response that answered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    /// The request's position on its connection, counting from 0: what
    /// [`HttpConnection::requests_parsed`] was before its head parsed.
    pub sequence: u64,
    /// The request head.
    pub request: RequestHead,
    /// The final (non-1xx) response head, or the `101` that switched
    /// protocols; `None` when the connection closed first or the response
    /// was lost.
    pub response: Option<ResponseHead>,
    /// Statuses of the interim (1xx) responses received before the final
    /// one, in order (e.g. `100`, `103`).
    pub informational: Vec<u16>,
    /// Timestamp of the message holding the request's first byte.
    pub request_start_ns: u64,
    /// Timestamp of the message holding the request's last byte. When the
    /// request's framing was lost, the last message seen of it.
    pub request_end_ns: u64,
    /// Timestamp of the message holding the response's last byte; `None`
    /// when there is no response. When the connection closed before the
    /// response ended, or its framing was lost, the last message seen of it.
    pub response_end_ns: Option<u64>,
    /// Request content bytes: chunk framing and trailers not counted. A
    /// lower bound when the request was cut short; framing included for the
    /// stretch after its framing was lost.
    pub request_body_len: u64,
    /// Response content bytes, counted like `request_body_len`.
    pub response_body_len: u64,
}

/// Longest head buffered across messages (RFC 9110 sets no limit; servers
/// use 8 to 64 KiB). Anything longer is taken for something else than HTTP.
const MAX_HEAD: usize = 64 * 1024;
/// Head buffer capacity kept between heads: a rare huge head must not pin
/// 64 KiB for the life of a keep-alive connection.
const KEPT_HEAD_CAPACITY: usize = 16 * 1024;
/// Requests waiting for a response, at most. Beyond it the oldest is given
/// up (emitted without response) so that memory stays bounded.
const MAX_PENDING: usize = 256;
/// Interim responses recorded per exchange; a server may send `102`
/// every few seconds for as long as it likes.
const MAX_INFORMATIONAL: usize = 16;

/// Both directions of one TCP connection, parsed as HTTP/1.x.
///
/// Feed it every captured message of the connection, in order within each
/// direction, then [`close`](Self::close) it. It holds no body bytes: only
/// heads split across messages are buffered, in one reused buffer per
/// direction, and requests waiting for their responses.
#[derive(Debug)]
pub struct HttpConnection {
    requests: Side,
    responses: Side,
    /// Requests in order, until both they and their responses have ended.
    pending: VecDeque<Pending>,
    next_seq: u64,
    /// Final responses still to come for requests given up unanswered
    /// (see [`MAX_PENDING`]): skipping them keeps later pairs in step.
    responses_to_discard: usize,
    /// A head has parsed: the connection is HTTP/1.x, so bytes that do not
    /// parse later mean lost bytes rather than another protocol.
    seen_http: bool,
    /// Either direction lost its framing at least once (see
    /// [`Self::lost_framing`]).
    framing_lost: bool,
    broken: bool,
    tunnel: bool,
    closed: bool,
}

/// The parsing state of one direction.
#[derive(Debug)]
struct Side {
    state: State,
    /// Bytes of a head that began in an earlier message.
    head: Vec<u8>,
    /// Timestamp of the message holding the buffered head's first byte.
    head_start_ns: u64,
    /// The queued request the body in progress belongs to (for responses,
    /// the request it answers); `None` when its bytes are to be skipped.
    /// Kept while desynchronised so the lost stretch is counted to it.
    target: Option<u64>,
    /// Some body bytes of the current message were seen.
    body_started: bool,
    /// Bytes were lost since the last message parsed here: requests or
    /// responses may be missing, so the next pairing must not trust plain
    /// queue order.
    gap: bool,
}

#[derive(Debug)]
enum State {
    /// At (or inside a buffered) head.
    Head,
    /// Walking over a body.
    Body(Body),
    /// Framing lost: waiting for a message that begins with a start line.
    Desync,
}

/// A request in the queue.
#[derive(Debug)]
struct Pending {
    seq: u64,
    request: RequestHead,
    kind: MethodKind,
    expect_continue: bool,
    /// Parsed right after its direction lost bytes: requests before it may
    /// be missing, and their responses must not be taken for its.
    after_gap: bool,
    request_start_ns: u64,
    /// End of the request so far; its end once `request_done`.
    request_last_ns: u64,
    request_body_len: u64,
    request_done: bool,
    informational: Vec<u16>,
    response: Option<ResponseHead>,
    response_last_ns: u64,
    response_body_len: u64,
    /// The response ended, or will never be known.
    response_done: bool,
}

impl Pending {
    fn unanswered(&self) -> bool {
        self.response.is_none() && !self.response_done
    }

    fn into_exchange(self) -> Exchange {
        Exchange {
            sequence: self.seq,
            response_end_ns: self.response.as_ref().map(|_| self.response_last_ns),
            request: self.request,
            response: self.response,
            informational: self.informational,
            request_start_ns: self.request_start_ns,
            request_end_ns: self.request_last_ns,
            request_body_len: self.request_body_len,
            response_body_len: self.response_body_len,
        }
    }
}

impl Default for HttpConnection {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpConnection {
    /// A connection with nothing seen yet.
    pub fn new() -> Self {
        Self {
            requests: Side::new(),
            responses: Side::new(),
            pending: VecDeque::new(),
            next_seq: 0,
            responses_to_discard: 0,
            seen_http: false,
            framing_lost: false,
            broken: false,
            tunnel: false,
            closed: false,
        }
    }

    /// Whether the connection stopped looking like HTTP/1.x: another
    /// protocol (binary, the HTTP/2 preface, another HTTP version), or a
    /// head longer than 64 KiB. [`feed`](Self::feed) then ignores it;
    /// [`close`](Self::close) still emits the requests parsed before.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Whether either direction ever lost its framing (bytes that did not
    /// parse where a message had to start). Where parsing picks up again
    /// then depends on where messages (syscalls) began.
    pub fn lost_framing(&self) -> bool {
        self.framing_lost
    }

    /// Whether the connection switched protocols (`101`, or a `2xx` to
    /// `CONNECT`): its bytes are opaque from then on and ignored.
    pub fn is_tunnel(&self) -> bool {
        self.tunnel
    }

    /// How many request heads have parsed on this connection so far. The
    /// caller compares it before and after [`feed`](Self::feed) to learn of
    /// new requests while they are still being served.
    pub fn requests_parsed(&self) -> u64 {
        self.next_seq
    }

    /// The head of the request with this [`Exchange::sequence`], while its
    /// exchange has not completed.
    pub fn request_head(&self, sequence: u64) -> Option<&RequestHead> {
        self.pending
            .iter()
            .find(|p| p.seq == sequence)
            .map(|p| &p.request)
    }

    /// Feeds one captured message: `bytes` are its first bytes as copied,
    /// `len` what the syscall really moved (the rest was not copied).
    /// Exchanges that complete are appended to `out` in request order.
    pub fn feed(
        &mut self,
        direction: StreamDirection,
        bytes: &[u8],
        len: usize,
        timestamp_ns: u64,
        out: &mut Vec<Exchange>,
    ) {
        if !self.active() {
            return;
        }
        let missing = len.saturating_sub(bytes.len()) as u64;
        if bytes.is_empty() && missing == 0 {
            return;
        }
        if self.begin_message(direction, bytes, missing, timestamp_ns) {
            let mut pos = 0;
            while pos < bytes.len() && self.active() {
                match self.step(direction, &bytes[pos..], missing, timestamp_ns, out) {
                    Some(consumed) => pos += consumed,
                    None => break,
                }
            }
            if pos == bytes.len() && missing > 0 && self.active() {
                self.skip_missing(direction, missing, timestamp_ns);
            }
        }
        self.emit_ready(out);
    }

    /// The connection closed. A response delimited by the close ends; every
    /// request still queued is emitted, with `response: None` if nothing
    /// answered it, and messages cut short end at their last byte seen.
    pub fn close(&mut self, timestamp_ns: u64, out: &mut Vec<Exchange>) {
        // End times stay those of the last bytes seen rather than the
        // close: a process may close long after reading the last byte.
        let _ = timestamp_ns;
        if self.closed {
            return;
        }
        self.closed = true;
        self.finish_all();
        self.emit_ready(out);
        self.requests.release();
        self.responses.release();
    }

    fn active(&self) -> bool {
        !(self.broken || self.tunnel || self.closed)
    }

    fn side(&mut self, direction: StreamDirection) -> &mut Side {
        match direction {
            StreamDirection::Requests => &mut self.requests,
            StreamDirection::Responses => &mut self.responses,
        }
    }

    fn entry(&mut self, seq: Option<u64>) -> Option<&mut Pending> {
        let seq = seq?;
        let front = self.pending.front()?.seq;
        let index = usize::try_from(seq.checked_sub(front)?).ok()?;
        self.pending.get_mut(index).filter(|e| e.seq == seq)
    }

    /// What a message's first bytes decide before parsing: whether a lost
    /// direction finds its feet again. Returns whether to parse the message.
    fn begin_message(
        &mut self,
        direction: StreamDirection,
        bytes: &[u8],
        missing: u64,
        timestamp_ns: u64,
    ) -> bool {
        let request = direction == StreamDirection::Requests;
        let side = self.side(direction);
        match side.state {
            State::Desync => {
                if head::begins_with_start_line(request, bytes) {
                    // The lost stretch belonged to the message in progress,
                    // which therefore ended with the last message before.
                    let target = side.target.take();
                    side.state = State::Head;
                    self.finish_target(direction, target, None);
                    true
                } else {
                    self.extend(direction, bytes.len() as u64 + missing, timestamp_ns);
                    false
                }
            }
            State::Body(_) if request && !side.body_started => {
                // A client that sent `Expect: 100-continue` and got a final
                // response instead of 100 may skip the body (RFC 9110
                // 10.1.1). A request line where the body should start means
                // that is what happened.
                let target = side.target;
                let skipped = self
                    .entry(target)
                    .is_some_and(|e| e.expect_continue && e.response.is_some())
                    && head::begins_with_start_line(true, bytes);
                if skipped {
                    let side = self.side(direction);
                    side.target = None;
                    side.state = State::Head;
                    self.finish_target(direction, target, None);
                }
                true
            }
            _ => true,
        }
    }

    /// Parses from the start of `data`, the unparsed rest of a message.
    /// Returns how many bytes it used, or `None` when the rest of the
    /// message is not to be parsed (framing lost, connection broken).
    fn step(
        &mut self,
        direction: StreamDirection,
        data: &[u8],
        missing: u64,
        timestamp_ns: u64,
        out: &mut Vec<Exchange>,
    ) -> Option<usize> {
        let side = self.side(direction);
        match &mut side.state {
            State::Head => self.head_step(direction, data, timestamp_ns, out),
            State::Body(body) => {
                let progress = body.feed(data);
                if progress.consumed > 0 {
                    side.body_started = true;
                    self.add_body(direction, progress.payload, timestamp_ns);
                }
                match progress.outcome {
                    Outcome::More => Some(progress.consumed),
                    Outcome::Done => {
                        let target = self.side(direction).end_message();
                        self.finish_target(direction, target, Some(timestamp_ns));
                        Some(progress.consumed)
                    }
                    Outcome::Invalid => {
                        let rest = (data.len() - progress.consumed) as u64 + missing;
                        self.desync(direction, rest, timestamp_ns);
                        None
                    }
                }
            }
            State::Desync => {
                self.extend(direction, data.len() as u64 + missing, timestamp_ns);
                None
            }
        }
    }

    fn head_step(
        &mut self,
        direction: StreamDirection,
        data: &[u8],
        timestamp_ns: u64,
        out: &mut Vec<Exchange>,
    ) -> Option<usize> {
        let request = direction == StreamDirection::Requests;
        let side = self.side(direction);
        let buffered = !side.head.is_empty();
        // Blank lines between messages belong to no message (RFC 9112
        // 2.2): skipped, they cannot date or start the next head.
        let blank = if buffered {
            0
        } else {
            data.iter()
                .take_while(|&&b| matches!(b, b'\r' | b'\n'))
                .count()
        };
        if blank == data.len() {
            return Some(blank);
        }
        let start_ns = if buffered {
            side.head_start_ns
        } else {
            timestamp_ns
        };
        let (used, parse) = side.take_head(request, &data[blank..], timestamp_ns);
        match parse {
            HeadProgress::Partial => Some(blank + used),
            HeadProgress::TooLong => {
                self.break_connection();
                None
            }
            HeadProgress::Invalid { other_version } => {
                if other_version || !self.seen_http {
                    self.break_connection();
                } else {
                    // Known to be HTTP/1.x: these bytes are the rest of
                    // something whose start was lost.
                    self.desync(direction, 0, timestamp_ns);
                }
                None
            }
            HeadProgress::Complete(head) => {
                self.seen_http = true;
                match head {
                    Head::Request(head) => self.on_request(head, start_ns, timestamp_ns, out),
                    Head::Response(head) => self.on_response(head, start_ns, timestamp_ns),
                }
                Some(blank + used)
            }
        }
    }

    fn on_request(
        &mut self,
        head: RequestHead,
        start_ns: u64,
        timestamp_ns: u64,
        out: &mut Vec<Exchange>,
    ) {
        self.make_room(out);
        let kind = MethodKind::of(head.method().as_bytes());
        let expect_continue = head
            .headers_named("expect")
            .any(|v| v.trim_ascii().eq_ignore_ascii_case(b"100-continue"));
        let fields = FramingFields::read(head.headers.iter_bytes());
        let body = match fields.request(Mode::Lenient, head.minor_version, kind) {
            BodyFraming::None => BodyStart::None,
            BodyFraming::Length(n) => BodyStart::Body(Body::Length(n)),
            BodyFraming::Chunked => BodyStart::Body(Body::chunked()),
            // A request cannot run until the close (RFC 9112 6.3, item 7);
            // the framing never says so, but if it did it would be lost.
            BodyFraming::UntilClose | BodyFraming::Unframeable => BodyStart::Unframeable,
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let after_gap = std::mem::take(&mut self.requests.gap);
        self.pending.push_back(Pending {
            seq,
            request: head,
            kind,
            expect_continue,
            after_gap,
            request_start_ns: start_ns,
            request_last_ns: timestamp_ns,
            request_body_len: 0,
            request_done: false,
            informational: Vec::new(),
            response: None,
            response_last_ns: 0,
            response_body_len: 0,
            response_done: false,
        });
        self.begin_body(StreamDirection::Requests, Some(seq), body, timestamp_ns);
    }

    fn on_response(&mut self, head: ResponseHead, start_ns: u64, timestamp_ns: u64) {
        let status = head.status;
        let target = self.response_target(start_ns, !framing::is_interim(status));
        let method = self.entry(target).map_or(MethodKind::Other, |e| e.kind);
        let kind = framing::response(Mode::Lenient, status, method, head.headers.iter_bytes());
        let body = match kind {
            ResponseKind::Interim => {
                if let Some(entry) = self.entry(target)
                    && entry.informational.len() < MAX_INFORMATIONAL
                {
                    entry.informational.push(status);
                }
                return;
            }
            ResponseKind::Switch => {
                self.switch_protocols(target, head, timestamp_ns);
                return;
            }
            ResponseKind::Final(BodyFraming::None) => BodyStart::None,
            ResponseKind::Final(BodyFraming::Length(n)) => BodyStart::Body(Body::Length(n)),
            ResponseKind::Final(BodyFraming::Chunked) => BodyStart::Body(Body::chunked()),
            // Nothing waits for this response, so its request method is
            // unknown: if it answered a HEAD, reading to the close would
            // swallow every later response. Waiting for the next status
            // line costs nothing if it really is close-delimited.
            ResponseKind::Final(BodyFraming::UntilClose) if target.is_none() => {
                BodyStart::Unframeable
            }
            ResponseKind::Final(BodyFraming::UntilClose) => BodyStart::Body(Body::UntilClose),
            ResponseKind::Final(BodyFraming::Unframeable) => BodyStart::Unframeable,
        };
        if let Some(entry) = self.entry(target) {
            entry.response = Some(head);
            entry.response_last_ns = timestamp_ns;
        }
        self.begin_body(StreamDirection::Responses, target, body, timestamp_ns);
    }

    /// Starts the body of the message whose head just ended.
    fn begin_body(
        &mut self,
        direction: StreamDirection,
        target: Option<u64>,
        body: BodyStart,
        timestamp_ns: u64,
    ) {
        let side = self.side(direction);
        side.target = target;
        side.body_started = false;
        match body {
            BodyStart::None => {
                let target = side.end_message();
                self.finish_target(direction, target, Some(timestamp_ns));
            }
            BodyStart::Body(body) => side.state = State::Body(body),
            BodyStart::Unframeable => self.desync(direction, 0, timestamp_ns),
        }
    }

    /// Which queued request a response starting at `start_ns` answers;
    /// `None` to skip it. `is_final`: not a 1xx.
    fn response_target(&mut self, start_ns: u64, is_final: bool) -> Option<u64> {
        if self.responses_to_discard > 0 {
            if is_final {
                self.responses_to_discard -= 1;
            }
            return None;
        }
        let index = if self.responses.gap {
            // Responses may have been lost, so plain queue order could pair
            // this one with a request whose response is gone. A response
            // cannot start before its request, and a client that does not
            // pipeline sends a request only once the previous response
            // ended: so this answers the newest request sent before it,
            // and older unanswered ones lost theirs.
            let index = self
                .pending
                .iter()
                .rposition(|e| e.unanswered() && e.request_start_ns <= start_ns)?;
            for i in 0..index {
                let seq = self.pending[i].seq;
                if self.pending[i].unanswered() {
                    self.finish_target(StreamDirection::Responses, Some(seq), None);
                }
            }
            self.responses.gap = false;
            index
        } else {
            self.pending.iter().position(Pending::unanswered)?
        };
        let entry = &mut self.pending[index];
        if entry.after_gap {
            // Requests before this one may have been lost on their way in;
            // a response that started before this request was sent belongs
            // to one of them.
            if start_ns < entry.request_start_ns {
                return None;
            }
            entry.after_gap = false;
        }
        Some(entry.seq)
    }

    /// A `101` or a successful `CONNECT`: that exchange is complete and
    /// the bytes after it are another protocol.
    fn switch_protocols(&mut self, target: Option<u64>, head: ResponseHead, timestamp_ns: u64) {
        if let Some(seq) = target {
            // Requests queued after it were the new protocol's bytes read
            // as HTTP (a client must wait for the switch before sending).
            while self.pending.back().is_some_and(|e| e.seq > seq) {
                self.pending.pop_back();
            }
        }
        if let Some(entry) = self.entry(target) {
            entry.response = Some(head);
            entry.response_last_ns = timestamp_ns;
        }
        self.tunnel = true;
        self.finish_all();
        self.requests.release();
        self.responses.release();
    }

    /// Ends the request (for `Responses`: the response) of the queued
    /// exchange `target`. `timestamp_ns`: the message holding its last
    /// byte, or `None` when that is the last message seen of it.
    fn finish_target(
        &mut self,
        direction: StreamDirection,
        target: Option<u64>,
        timestamp_ns: Option<u64>,
    ) {
        let Some(entry) = self.entry(target) else {
            return;
        };
        match direction {
            StreamDirection::Requests => {
                entry.request_done = true;
                if let Some(ts) = timestamp_ns {
                    entry.request_last_ns = ts;
                }
            }
            StreamDirection::Responses => {
                entry.response_done = true;
                if let Some(ts) = timestamp_ns {
                    entry.response_last_ns = ts;
                }
                // A request whose framing was lost has surely ended once
                // its response has (short of pipelining, which the loss
                // makes unknowable anyway).
                if self.requests.target == target && matches!(self.requests.state, State::Desync) {
                    self.requests.target = None;
                    if let Some(entry) = self.entry(target) {
                        entry.request_done = true;
                    }
                }
            }
        }
    }

    fn add_body(&mut self, direction: StreamDirection, payload: u64, timestamp_ns: u64) {
        let target = self.side(direction).target;
        let Some(entry) = self.entry(target) else {
            return;
        };
        match direction {
            StreamDirection::Requests => {
                entry.request_body_len += payload;
                entry.request_last_ns = timestamp_ns;
            }
            StreamDirection::Responses => {
                entry.response_body_len += payload;
                entry.response_last_ns = timestamp_ns;
            }
        }
    }

    /// Counts bytes of a desynchronised direction to the message in
    /// progress when it lost track, if any: most likely they are the rest
    /// of its body.
    fn extend(&mut self, direction: StreamDirection, n: u64, timestamp_ns: u64) {
        self.add_body(direction, n, timestamp_ns);
    }

    /// The framing of `direction` is lost; `rest` more bytes of the current
    /// message go uncounted by it.
    fn desync(&mut self, direction: StreamDirection, rest: u64, timestamp_ns: u64) {
        self.framing_lost = true;
        let side = self.side(direction);
        side.state = State::Desync;
        side.gap = true;
        side.release();
        if rest > 0 {
            self.extend(direction, rest, timestamp_ns);
        }
    }

    /// Accounts for the bytes of a message that were not captured.
    fn skip_missing(&mut self, direction: StreamDirection, missing: u64, timestamp_ns: u64) {
        let side = self.side(direction);
        match &mut side.state {
            State::Body(body) => match body.skip(missing) {
                Skip::Within { payload, done } => {
                    side.body_started = true;
                    self.add_body(direction, payload, timestamp_ns);
                    if done {
                        let target = self.side(direction).end_message();
                        self.finish_target(direction, target, Some(timestamp_ns));
                    }
                }
                Skip::Overran { payload } => {
                    self.add_body(direction, payload, timestamp_ns);
                    let target = self.side(direction).end_message();
                    self.finish_target(direction, target, Some(timestamp_ns));
                    // What followed the body in the unseen bytes is unknown.
                    self.desync(direction, 0, timestamp_ns);
                }
                Skip::Lost => self.desync(direction, missing, timestamp_ns),
            },
            // A head starts, or a buffered one goes on, in bytes not seen.
            State::Head => self.desync(direction, 0, timestamp_ns),
            State::Desync => self.extend(direction, missing, timestamp_ns),
        }
    }

    /// Makes room in the queue for one more request by giving up the
    /// oldest when full.
    fn make_room(&mut self, out: &mut Vec<Exchange>) {
        while self.pending.len() >= MAX_PENDING {
            let Some(mut entry) = self.pending.pop_front() else {
                break;
            };
            if entry.response.is_none() && !entry.response_done {
                self.responses_to_discard += 1;
            }
            entry.request_done = true;
            entry.response_done = true;
            out.push(entry.into_exchange());
        }
    }

    /// Ends every queued request and response where it stands.
    fn finish_all(&mut self) {
        for entry in &mut self.pending {
            entry.request_done = true;
            entry.response_done = true;
        }
        self.requests.target = None;
        self.responses.target = None;
    }

    fn emit_ready(&mut self, out: &mut Vec<Exchange>) {
        while self
            .pending
            .front()
            .is_some_and(|e| e.request_done && e.response_done)
        {
            if let Some(entry) = self.pending.pop_front() {
                out.push(entry.into_exchange());
            }
        }
    }

    fn break_connection(&mut self) {
        self.broken = true;
        self.requests.release();
        self.responses.release();
    }
}

/// What follows a head.
enum BodyStart {
    None,
    Body(Body),
    /// The framing fields make no sense: where the body ends is unknown.
    Unframeable,
}

/// What feeding bytes to a head gave.
enum HeadProgress {
    Complete(Head),
    Partial,
    Invalid { other_version: bool },
    TooLong,
}

impl Side {
    fn new() -> Self {
        Self {
            state: State::Head,
            head: Vec::new(),
            head_start_ns: 0,
            target: None,
            body_started: false,
            gap: false,
        }
    }

    /// Back to a head position; returns the target of the message that
    /// ended.
    fn end_message(&mut self) -> Option<u64> {
        self.state = State::Head;
        self.body_started = false;
        self.target.take()
    }

    /// Drops a partly buffered head, and the buffer too if a huge head
    /// grew it.
    fn release(&mut self) {
        self.head.clear();
        if self.head.capacity() > KEPT_HEAD_CAPACITY {
            self.head = Vec::new();
        }
    }

    /// Feeds `data` to the head at this position. Returns how many bytes of
    /// `data` belong to the head, and what it gave.
    fn take_head(
        &mut self,
        request: bool,
        data: &[u8],
        timestamp_ns: u64,
    ) -> (usize, HeadProgress) {
        if self.head.is_empty() {
            // The usual case: the whole head is in this message, parsed in
            // place without copying.
            return match head::parse(request, data) {
                Parse::Complete { head, len } => (len, HeadProgress::Complete(head)),
                Parse::Partial if data.len() >= MAX_HEAD => (data.len(), HeadProgress::TooLong),
                Parse::Partial => {
                    self.head.extend_from_slice(data);
                    self.head_start_ns = timestamp_ns;
                    (data.len(), HeadProgress::Partial)
                }
                Parse::Invalid { other_version } => (0, HeadProgress::Invalid { other_version }),
            };
        }
        let old = self.head.len();
        let take = data.len().min(MAX_HEAD - old);
        self.head.extend_from_slice(&data[..take]);
        // Reparsing the whole buffer for every fragment would be quadratic
        // in a head trickling in byte by byte: parse only once the empty
        // line that ends a head may have arrived. The first fragment was
        // parsed, so garbage was caught early.
        let from = old.saturating_sub(3);
        let progress = if ends_head(&self.head[from..]) {
            match head::parse(request, &self.head) {
                Parse::Complete { head, len } => {
                    self.release();
                    return (len.saturating_sub(old), HeadProgress::Complete(head));
                }
                Parse::Partial => HeadProgress::Partial,
                Parse::Invalid { other_version } => HeadProgress::Invalid { other_version },
            }
        } else {
            HeadProgress::Partial
        };
        if matches!(progress, HeadProgress::Partial) && self.head.len() >= MAX_HEAD {
            return (take, HeadProgress::TooLong);
        }
        (take, progress)
    }
}

/// Whether `bytes` hold an empty line, which is how a head ends.
fn ends_head(bytes: &[u8]) -> bool {
    bytes.windows(2).any(|w| w == b"\n\n") || bytes.windows(3).any(|w| w == b"\n\r\n")
}

#[cfg(test)]
#[path = "connection_tests.rs"]
mod tests;
