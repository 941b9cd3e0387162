//! W3C Trace Context: traceparent and tracestate.
//!
//! A strict parser of its own rather than a generic propagator's: the stock
//! OpenTelemetry one accepts ids the specification rejects (upper-case hex,
//! extra fields after version 00), and a tracing proxy that forwards what the
//! next hop would refuse breaks the trace there instead of here.
//!
//! Level 2 of the specification is followed where it differs from level 1:
//! the random trace-flag, and the unified tracestate key grammar in which `@`
//! is an ordinary key character (so the level 1 `tenant@system` keys are a
//! subset of what is accepted).

use std::fmt;

use rand::rngs::{StdRng, SysRng};
use rand::{Rng, SeedableRng};

use crate::span::encode_hex;
pub use crate::span::{SpanId, TraceId, flags};

/// Length of a version 00 traceparent, and the minimum of any version.
pub const TRACEPARENT_LEN: usize = 55;

/// Most list-members a tracestate may hold.
pub const MAX_TRACESTATE_MEMBERS: usize = 32;

/// Tracestate length propagated downstream: the specification asks for at
/// least 512 characters, and more is not needed by any known vendor.
pub const MAX_PROPAGATED_LEN: usize = 512;

/// Tracestate members longer than this are the first removed when cutting.
pub const LONG_MEMBER_LEN: usize = 128;

/// Longest tracestate key.
pub const MAX_KEY_LEN: usize = 256;

/// Longest tracestate value.
pub const MAX_VALUE_LEN: usize = 256;

/// A parsed traceparent: which trace, which span called, and its flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// The trace; never all zero.
    pub trace_id: TraceId,
    /// The caller's span; never all zero.
    pub parent_id: SpanId,
    /// W3C trace-flags as received (see [`child_flags`] for what is forwarded).
    pub flags: u8,
}

/// Why a traceparent value was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TraceParentError {
    /// Shorter than the 55 characters every version needs.
    #[error("traceparent is {len} characters, fewer than the {TRACEPARENT_LEN} required")]
    TooShort {
        /// Length after trimming spaces and tabs.
        len: usize,
    },
    /// Version 00 with other than exactly 55 characters.
    #[error("traceparent version 00 must be exactly {TRACEPARENT_LEN} characters, got {len}")]
    Version00WrongLength {
        /// Length after trimming spaces and tabs.
        len: usize,
    },
    /// The version is not two lower-case hex digits.
    #[error("traceparent version is not two lower-case hex digits")]
    InvalidVersion,
    /// Version `ff`, which the specification forbids.
    #[error("traceparent version ff is forbidden")]
    ForbiddenVersion,
    /// A `-` was expected at this (0-based) character.
    #[error("traceparent needs '-' at character {position}")]
    MissingSeparator {
        /// Index into the trimmed value.
        position: usize,
    },
    /// The trace-id is not 32 lower-case hex digits.
    #[error("traceparent trace-id is not 32 lower-case hex digits")]
    InvalidTraceId,
    /// The trace-id is all zero.
    #[error("traceparent trace-id is all zero")]
    ZeroTraceId,
    /// The parent-id is not 16 lower-case hex digits.
    #[error("traceparent parent-id is not 16 lower-case hex digits")]
    InvalidParentId,
    /// The parent-id is all zero.
    #[error("traceparent parent-id is all zero")]
    ZeroParentId,
    /// The trace-flags are not two lower-case hex digits.
    #[error("traceparent trace-flags are not two lower-case hex digits")]
    InvalidFlags,
    /// A higher version continues after the flags with something other than `-`.
    #[error("traceparent of a higher version has something other than '-' after the flags")]
    TrailingData,
}

impl TraceParent {
    /// Parses one traceparent field value. Spaces and tabs around it are
    /// allowed. A version above 00 is read by its first three fields, so a
    /// future format still continues the trace; it is re-emitted as 00.
    pub fn parse(value: &[u8]) -> Result<TraceParent, TraceParentError> {
        let value = trim_ows(value);
        let Some(head) = value.first_chunk::<TRACEPARENT_LEN>() else {
            return Err(TraceParentError::TooShort { len: value.len() });
        };
        let [version] = decode_hex::<1>(&head[0..2]).ok_or(TraceParentError::InvalidVersion)?;
        if version == 0xff {
            return Err(TraceParentError::ForbiddenVersion);
        }
        if version == 0 && value.len() != TRACEPARENT_LEN {
            return Err(TraceParentError::Version00WrongLength { len: value.len() });
        }
        for position in [2, 35, 52] {
            if head[position] != b'-' {
                return Err(TraceParentError::MissingSeparator { position });
            }
        }
        let trace_id = TraceId(decode_hex(&head[3..35]).ok_or(TraceParentError::InvalidTraceId)?);
        let parent_id = SpanId(decode_hex(&head[36..52]).ok_or(TraceParentError::InvalidParentId)?);
        let [flags] = decode_hex::<1>(&head[53..55]).ok_or(TraceParentError::InvalidFlags)?;
        // Only reachable for a higher version: 00 was held to exactly 55 above.
        if value
            .get(TRACEPARENT_LEN)
            .is_some_and(|&after_flags| after_flags != b'-')
        {
            return Err(TraceParentError::TrailingData);
        }
        if !trace_id.is_valid() {
            return Err(TraceParentError::ZeroTraceId);
        }
        if !parent_id.is_valid() {
            return Err(TraceParentError::ZeroParentId);
        }
        Ok(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The header value, always version 00: `00-<trace-id>-<parent-id>-<flags>`.
    pub fn to_header_value(&self) -> String {
        let mut buf = [0; TRACEPARENT_LEN];
        self.write_header_value(&mut buf);
        buf.iter().copied().map(char::from).collect()
    }

    /// Writes the same value as [`Self::to_header_value`] without allocating.
    pub fn write_header_value(&self, out: &mut [u8; TRACEPARENT_LEN]) {
        out[0..3].copy_from_slice(b"00-");
        encode_hex(&self.trace_id.0, &mut out[3..35]);
        out[35] = b'-';
        encode_hex(&self.parent_id.0, &mut out[36..52]);
        out[52] = b'-';
        encode_hex(&[self.flags], &mut out[53..55]);
    }

    /// Whether the caller may have recorded the trace.
    pub fn is_sampled(&self) -> bool {
        self.flags & flags::SAMPLED != 0
    }

    /// Whether the trace-id's right-most 7 bytes are declared random.
    pub fn is_random(&self) -> bool {
        self.flags & flags::RANDOM != 0
    }

    /// The traceparent to send on behalf of span `span_id`, a child of this
    /// one: same trace, `span_id` as the new parent-id, flags per [`child_flags`].
    pub fn child(&self, span_id: SpanId, sampled: bool) -> TraceParent {
        TraceParent {
            trace_id: self.trace_id,
            parent_id: span_id,
            flags: child_flags(self.flags, sampled),
        }
    }

    /// The traceparent of a new trace (random flag set, see [`root_flags`]).
    pub fn root(trace_id: TraceId, span_id: SpanId, sampled: bool) -> TraceParent {
        TraceParent {
            trace_id,
            parent_id: span_id,
            flags: root_flags(sampled),
        }
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0; TRACEPARENT_LEN];
        self.write_header_value(&mut buf);
        // Always ASCII; the fallback only keeps this free of panics.
        f.write_str(std::str::from_utf8(&buf).unwrap_or_default())
    }
}

/// Flags for a child span that continues `parent_flags`: the sampled bit as
/// this hop decided, the random bit copied because the trace-id is unchanged,
/// unknown bits cleared because this hop cannot vouch for them.
pub fn child_flags(parent_flags: u8, sampled: bool) -> u8 {
    (parent_flags & flags::RANDOM) | sampled_bit(sampled)
}

/// Flags for a new trace: its id comes from [`IdGenerator`], so it is random.
pub fn root_flags(sampled: bool) -> u8 {
    flags::RANDOM | sampled_bit(sampled)
}

fn sampled_bit(sampled: bool) -> u8 {
    if sampled { flags::SAMPLED } else { 0 }
}

/// Why a tracestate was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TraceStateError {
    /// More than [`MAX_TRACESTATE_MEMBERS`] non-empty list-members.
    #[error("tracestate has more than {MAX_TRACESTATE_MEMBERS} list-members")]
    TooManyMembers,
    /// A list-member without `=`.
    #[error("tracestate member {member} has no '='")]
    MissingEquals {
        /// 0-based position among the non-empty members.
        member: usize,
    },
    /// A key outside the grammar or longer than [`MAX_KEY_LEN`].
    #[error("tracestate member {member} has an invalid key")]
    InvalidKey {
        /// 0-based position among the non-empty members.
        member: usize,
    },
    /// A value outside the grammar, empty, or longer than [`MAX_VALUE_LEN`].
    #[error("tracestate member {member} has an invalid value")]
    InvalidValue {
        /// 0-based position among the non-empty members.
        member: usize,
    },
    /// A key that an earlier member already used.
    #[error("tracestate member {member} repeats an earlier key")]
    DuplicateKey {
        /// 0-based position among the non-empty members.
        member: usize,
    },
}

/// Where one list-member lies in [`TraceState::text`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MemberSpan {
    start: usize,
    equals: usize,
    end: usize,
}

impl MemberSpan {
    fn len(&self) -> usize {
        self.end - self.start
    }
}

/// A validated tracestate: its list-members in order, without empty members
/// or optional whitespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceState {
    /// `key=value,key=value`; one buffer instead of a string per key and value.
    text: String,
    members: Vec<MemberSpan>,
}

impl TraceState {
    /// Parses all tracestate field values of a request, in order; they form
    /// one list. Any invalid member invalidates the whole list, as the
    /// specification requires.
    pub fn parse_fields(fields: &[&[u8]]) -> Result<TraceState, TraceStateError> {
        let mut state = TraceState {
            text: String::with_capacity(fields.iter().map(|field| field.len() + 1).sum()),
            members: Vec::new(),
        };
        let members = fields.iter().flat_map(|field| field.split(|&b| b == b','));
        for member in members.map(trim_ows).filter(|member| !member.is_empty()) {
            let index = state.members.len();
            if index == MAX_TRACESTATE_MEMBERS {
                return Err(TraceStateError::TooManyMembers);
            }
            let equals = member
                .iter()
                .position(|&b| b == b'=')
                .ok_or(TraceStateError::MissingEquals { member: index })?;
            let (key, value) = (&member[..equals], &member[equals + 1..]);
            let key = ascii_str(key)
                .filter(|key| is_valid_key(key))
                .ok_or(TraceStateError::InvalidKey { member: index })?;
            let value = ascii_str(value)
                .filter(|value| is_valid_value(value))
                .ok_or(TraceStateError::InvalidValue { member: index })?;
            if state.get(key).is_some() {
                return Err(TraceStateError::DuplicateKey { member: index });
            }
            state.push(key, value);
        }
        Ok(state)
    }

    /// Whether there are no list-members (nothing to propagate).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Number of list-members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// The list-members as `(key, value)`, left (most recent) first.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.members.iter().map(|span| {
            (
                self.text.get(span.start..span.equals).unwrap_or_default(),
                self.text.get(span.equals + 1..span.end).unwrap_or_default(),
            )
        })
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, value)| value)
    }

    /// The header value to propagate, cut to [`MAX_PROPAGATED_LEN`] characters
    /// by [`Self::truncated_to`].
    pub fn to_header_value(&self) -> String {
        self.truncated_to(MAX_PROPAGATED_LEN).text
    }

    /// At most `limit` characters of the header value, cut the way the
    /// specification recommends: members longer than [`LONG_MEMBER_LEN`] go
    /// first (right-most first), then members from the right, because the
    /// left-most members are the most recently updated. Only as many members
    /// go as needed to fit.
    pub fn truncated_to(&self, limit: usize) -> TraceState {
        if self.text.len() <= limit {
            return self.clone();
        }
        // A fixed array: parsing never yields more than MAX_TRACESTATE_MEMBERS.
        let mut kept = [false; MAX_TRACESTATE_MEMBERS];
        kept.iter_mut()
            .take(self.members.len())
            .for_each(|keep| *keep = true);
        let joined_len = |kept: &[bool; MAX_TRACESTATE_MEMBERS]| {
            let mut count = 0usize;
            let mut sum = 0;
            for (span, _) in self.members.iter().zip(kept).filter(|(_, keep)| **keep) {
                count += 1;
                sum += span.len();
            }
            sum + count.saturating_sub(1)
        };
        let is_long = |index: usize| {
            self.members
                .get(index)
                .is_some_and(|span| span.len() > LONG_MEMBER_LEN)
        };
        for only_long in [true, false] {
            for index in (0..self.members.len().min(MAX_TRACESTATE_MEMBERS)).rev() {
                if joined_len(&kept) <= limit {
                    break;
                }
                if !only_long || is_long(index) {
                    kept[index] = false;
                }
            }
        }
        let mut cut = TraceState {
            text: String::with_capacity(limit),
            members: Vec::new(),
        };
        for ((key, value), _) in self.iter().zip(kept).filter(|(_, keep)| *keep) {
            cut.push(key, value);
        }
        cut
    }

    /// Appends a member already known to be valid and new.
    fn push(&mut self, key: &str, value: &str) {
        if !self.text.is_empty() {
            self.text.push(',');
        }
        let start = self.text.len();
        self.text.push_str(key);
        let equals = self.text.len();
        self.text.push('=');
        self.text.push_str(value);
        self.members.push(MemberSpan {
            start,
            equals,
            end: self.text.len(),
        });
    }
}

/// Whether `key` is a tracestate key: `[a-z0-9][a-z0-9_\-*/@]{0,255}`
/// (level 2; includes the level 1 `tenant@system` form).
pub fn is_valid_key(key: &str) -> bool {
    let bytes = key.as_bytes();
    let Some((first, rest)) = bytes.split_first() else {
        return false;
    };
    bytes.len() <= MAX_KEY_LEN
        && (first.is_ascii_lowercase() || first.is_ascii_digit())
        && rest.iter().all(|&b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'_' | b'-' | b'*' | b'/' | b'@')
        })
}

/// Whether `value` is a tracestate value: 1 to 256 printable ASCII
/// characters other than `,` and `=`, not ending in a space.
pub fn is_valid_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_VALUE_LEN
        && bytes.last() != Some(&b' ')
        && bytes
            .iter()
            .all(|&b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=')
}

/// The inbound trace context of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// The caller's traceparent.
    pub traceparent: TraceParent,
    /// The caller's tracestate; empty when absent or invalid.
    pub tracestate: TraceState,
}

/// The trace context a hop writes into an outbound request: its
/// `traceparent`, and the `tracestate` it continues (the header value as
/// [`TraceState::to_header_value`] gives it: valid, cut to
/// [`MAX_PROPAGATED_LEN`]; empty for none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PropagatedContext {
    /// The outbound request's traceparent (its parent-id is the hop's
    /// CLIENT span).
    pub traceparent: TraceParent,
    /// The tracestate header value, or empty.
    pub tracestate: String,
}

impl PropagatedContext {
    /// A context with no tracestate (a new trace, or one that had none).
    pub fn without_state(traceparent: TraceParent) -> Self {
        Self {
            traceparent,
            tracestate: String::new(),
        }
    }
}

/// Why a request has no usable inbound context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    /// No traceparent field.
    #[error("no traceparent header")]
    Missing,
    /// Two or more traceparent fields: which one the caller meant is unknowable.
    #[error("more than one traceparent header")]
    MultipleTraceparents,
    /// The traceparent field is invalid.
    #[error("{0}")]
    Invalid(TraceParentError),
}

/// The inbound context of a request from its headers in wire order (name,
/// value). None: start a new trace (and send no tracestate).
pub fn extract<'a, N: AsRef<[u8]>>(
    headers: impl IntoIterator<Item = (N, &'a [u8])>,
) -> Option<TraceContext> {
    try_extract(headers).ok()
}

/// As [`extract`], saying why there is no context. An invalid tracestate is
/// not an error: the trace continues without it.
pub fn try_extract<'a, N: AsRef<[u8]>>(
    headers: impl IntoIterator<Item = (N, &'a [u8])>,
) -> Result<TraceContext, ExtractError> {
    let mut traceparent = None;
    let mut traceparent_count = 0usize;
    // Stays unallocated for the usual request without tracestate.
    let mut tracestate_fields: Vec<&[u8]> = Vec::new();
    for (name, value) in headers {
        let name = name.as_ref();
        if name.eq_ignore_ascii_case(b"traceparent") {
            traceparent_count += 1;
            traceparent = Some(value);
        } else if name.eq_ignore_ascii_case(b"tracestate") {
            tracestate_fields.push(value);
        }
    }
    let traceparent = match (traceparent_count, traceparent) {
        (1, Some(value)) => TraceParent::parse(value).map_err(ExtractError::Invalid)?,
        (0, _) | (_, None) => return Err(ExtractError::Missing),
        _ => return Err(ExtractError::MultipleTraceparents),
    };
    let tracestate = TraceState::parse_fields(&tracestate_fields).unwrap_or_default();
    Ok(TraceContext {
        traceparent,
        tracestate,
    })
}

/// Random, valid ids (never all zero). Holds a fast RNG seeded from the OS
/// once, so id generation neither allocates nor makes a syscall per id.
pub struct IdGenerator {
    // ChaCha: fast enough per id and, unlike xoshiro, its output does not
    // reveal future ids to someone who sees a few trace ids.
    rng: StdRng,
}

impl IdGenerator {
    /// A generator seeded from the OS; if the OS has no randomness to give,
    /// from the clock and process id, since weak ids beat no tracing.
    pub fn new() -> Self {
        let rng = StdRng::try_from_rng(&mut SysRng).unwrap_or_else(|err| {
            log::warn!("no OS randomness ({err}); trace ids seeded from the clock");
            StdRng::seed_from_u64(fallback_seed())
        });
        Self { rng }
    }

    /// A generator with a fixed seed: the same ids every run, for tests.
    pub fn with_seed(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// A new random trace id.
    pub fn trace_id(&mut self) -> TraceId {
        loop {
            let mut id = TraceId::default();
            self.rng.fill_bytes(&mut id.0);
            if id.is_valid() {
                return id;
            }
        }
    }

    /// A new random span id.
    pub fn span_id(&mut self) -> SpanId {
        loop {
            let mut id = SpanId::default();
            self.rng.fill_bytes(&mut id.0);
            if id.is_valid() {
                return id;
            }
        }
    }
}

impl Default for IdGenerator {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for IdGenerator {
    // The RNG state would let a reader predict every later id.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdGenerator").finish_non_exhaustive()
    }
}

fn fallback_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64);
    let local = 0u8;
    nanos ^ (u64::from(std::process::id()) << 32) ^ (&raw const local).addr() as u64
}

/// Strips HTTP optional whitespace (spaces and tabs) from both ends.
fn trim_ows(bytes: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |last| last + 1);
    bytes.get(start..end).unwrap_or_default()
}

fn ascii_str(bytes: &[u8]) -> Option<&str> {
    if bytes.is_ascii() {
        std::str::from_utf8(bytes).ok()
    } else {
        None
    }
}

/// Lower-case hex to `N` bytes; None on any other character or length.
fn decode_hex<const N: usize>(hex: &[u8]) -> Option<[u8; N]> {
    if hex.len() != 2 * N {
        return None;
    }
    let mut bytes = [0; N];
    for (byte, &[high, low]) in bytes.iter_mut().zip(hex.as_chunks::<2>().0) {
        *byte = lower_hex_digit(high)? << 4 | lower_hex_digit(low)?;
    }
    Some(bytes)
}

fn lower_hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngExt;

    const TRACE_HEX: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT_HEX: &str = "00f067aa0ba902b7";
    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn parse(value: &str) -> Result<TraceParent, TraceParentError> {
        TraceParent::parse(value.as_bytes())
    }

    fn state<S: AsRef<str>>(fields: &[S]) -> Result<TraceState, TraceStateError> {
        let fields: Vec<&[u8]> = fields
            .iter()
            .map(|field| field.as_ref().as_bytes())
            .collect();
        TraceState::parse_fields(&fields)
    }

    fn headers<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = (&'a str, &'a [u8])> {
        pairs.iter().map(|(name, value)| (*name, value.as_bytes()))
    }

    /// `count` members `k<i>=<value>`, joined.
    fn members(count: usize, value: &str) -> String {
        (0..count)
            .map(|i| format!("k{i}={value}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    // ---- traceparent ----

    #[test]
    fn valid_version_00_is_parsed() {
        let tp = parse(VALID).unwrap();
        assert_eq!(tp.trace_id.to_hex(), TRACE_HEX);
        assert_eq!(tp.parent_id.to_hex(), PARENT_HEX);
        assert_eq!(tp.flags, 0x01);
        assert!(tp.is_sampled());
        assert!(!parse(&VALID.replace("-01", "-00")).unwrap().is_sampled());
    }

    #[test]
    fn uppercase_hex_is_invalid() {
        let upper_trace = VALID.replace("4bf92f", "4BF92F");
        assert_eq!(parse(&upper_trace), Err(TraceParentError::InvalidTraceId));
        let upper_parent = VALID.replace("00f067aa", "00F067AA");
        assert_eq!(parse(&upper_parent), Err(TraceParentError::InvalidParentId));
        let upper_flags = format!("00-{TRACE_HEX}-{PARENT_HEX}-0A");
        assert_eq!(parse(&upper_flags), Err(TraceParentError::InvalidFlags));
        let upper_version = format!("0A-{TRACE_HEX}-{PARENT_HEX}-01");
        assert_eq!(parse(&upper_version), Err(TraceParentError::InvalidVersion));
    }

    #[test]
    fn version_ff_is_invalid() {
        let value = format!("ff-{TRACE_HEX}-{PARENT_HEX}-01");
        assert_eq!(parse(&value), Err(TraceParentError::ForbiddenVersion));
        assert_eq!(
            parse(&format!("{value}-extra")),
            Err(TraceParentError::ForbiddenVersion)
        );
    }

    #[test]
    fn all_zero_trace_id_is_invalid() {
        let value = format!("00-{}-{PARENT_HEX}-01", "0".repeat(32));
        assert_eq!(parse(&value), Err(TraceParentError::ZeroTraceId));
    }

    #[test]
    fn all_zero_parent_id_is_invalid() {
        let value = format!("00-{TRACE_HEX}-{}-01", "0".repeat(16));
        assert_eq!(parse(&value), Err(TraceParentError::ZeroParentId));
    }

    #[test]
    fn wrong_lengths_are_invalid() {
        for value in [
            String::new(),
            "00".to_owned(),
            VALID[..54].to_owned(),
            format!("00-{}-{PARENT_HEX}-01", &TRACE_HEX[..31]),
            format!("00-{TRACE_HEX}0-{PARENT_HEX}-01"),
            format!("00-{TRACE_HEX}-{}-01", &PARENT_HEX[..15]),
            format!("00-{TRACE_HEX}-{PARENT_HEX}0-01"),
            format!("00-{TRACE_HEX}-{PARENT_HEX}-1"),
            format!("00-{TRACE_HEX}-{PARENT_HEX}-001"),
            format!("0-{TRACE_HEX}-{PARENT_HEX}-01"),
            format!("000-{TRACE_HEX}-{PARENT_HEX}-01"),
        ] {
            assert!(parse(&value).is_err(), "{value:?} was accepted");
        }
    }

    #[test]
    fn wrong_characters_are_invalid() {
        for (index, bad) in [
            (0, b'g'),
            (1, b'.'),
            (2, b'_'),
            (10, b'g'),
            (35, b'.'),
            (40, b'x'),
            (52, b' '),
            (54, b'z'),
        ] {
            let mut value = VALID.as_bytes().to_vec();
            value[index] = bad;
            assert!(
                TraceParent::parse(&value).is_err(),
                "{} was accepted",
                String::from_utf8_lossy(&value)
            );
        }
        let non_ascii = VALID.replace("4b", "é");
        assert!(parse(&non_ascii).is_err());
        assert!(parse(&VALID.replace('-', "\t")).is_err());
    }

    #[test]
    fn version_00_must_be_exactly_55_characters() {
        for value in [
            format!("{VALID}-"),
            format!("{VALID}-what-the-future-will-be-like"),
            format!("{VALID}0"),
        ] {
            assert_eq!(
                parse(&value),
                Err(TraceParentError::Version00WrongLength { len: value.len() })
            );
        }
        assert_eq!(
            parse(VALID).unwrap().to_header_value().len(),
            TRACEPARENT_LEN
        );
    }

    #[test]
    fn higher_version_with_extra_fields_is_accepted_and_reemitted_as_00() {
        let value = format!("cc-{TRACE_HEX}-{PARENT_HEX}-01-what-the-future-will-be-like");
        let tp = parse(&value).unwrap();
        assert_eq!(tp, parse(VALID).unwrap());
        assert_eq!(tp.to_header_value(), VALID);
    }

    #[test]
    fn higher_version_of_exactly_55_characters_is_accepted() {
        let tp = parse(&format!("01-{TRACE_HEX}-{PARENT_HEX}-01")).unwrap();
        assert_eq!(tp.to_header_value(), VALID);
    }

    #[test]
    fn higher_version_shorter_than_55_characters_is_invalid() {
        let value = format!("cc-{TRACE_HEX}-{PARENT_HEX}-1");
        assert_eq!(parse(&value), Err(TraceParentError::TooShort { len: 54 }));
    }

    #[test]
    fn higher_version_needs_dash_or_end_after_flags() {
        let value = format!("cc-{TRACE_HEX}-{PARENT_HEX}-01.what-the-future-will-be-like");
        assert_eq!(parse(&value), Err(TraceParentError::TrailingData));
        let value = format!("cc-{TRACE_HEX}-{PARENT_HEX}-012");
        assert_eq!(parse(&value), Err(TraceParentError::TrailingData));
    }

    #[test]
    fn higher_version_still_checks_its_fields() {
        for value in [
            format!("cc-{}-{PARENT_HEX}-01-x", "0".repeat(32)),
            format!("cc-{TRACE_HEX}-{}-01-x", "0".repeat(16)),
            format!("cc-{}-{PARENT_HEX}-01-x", TRACE_HEX.to_uppercase()),
            format!("cc-{TRACE_HEX}-{PARENT_HEX}-0g-x"),
            format!("cc_{TRACE_HEX}-{PARENT_HEX}-01-x"),
        ] {
            assert!(parse(&value).is_err(), "{value} was accepted");
        }
    }

    #[test]
    fn unknown_flag_bits_are_parsed() {
        let tp = parse(&format!("00-{TRACE_HEX}-{PARENT_HEX}-ff")).unwrap();
        assert_eq!(tp.flags, 0xff);
        assert!(tp.is_sampled() && tp.is_random());
    }

    #[test]
    fn two_traceparent_fields_make_the_header_invalid() {
        let same_twice = [("traceparent", VALID), ("traceparent", VALID)];
        assert_eq!(
            try_extract(headers(&same_twice)),
            Err(ExtractError::MultipleTraceparents)
        );
        let other = format!("00-{TRACE_HEX}-{}-01", "1".repeat(16));
        let mixed_case = [
            ("traceparent", VALID),
            ("tracestate", "a=1"),
            ("TraceParent", other.as_str()),
        ];
        assert_eq!(extract(headers(&mixed_case)), None);
        let one_empty = [("traceparent", VALID), ("traceparent", "")];
        assert_eq!(extract(headers(&one_empty)), None);
    }

    #[test]
    fn header_names_are_case_insensitive() {
        for (parent_name, state_name) in [
            ("TRACEPARENT", "TRACESTATE"),
            ("TraceParent", "TraceState"),
            ("traceparent", "tracestate"),
        ] {
            let ctx = extract(headers(&[(parent_name, VALID), (state_name, "a=1")])).unwrap();
            assert_eq!(ctx.traceparent.to_header_value(), VALID);
            assert_eq!(ctx.tracestate.to_header_value(), "a=1");
        }
        assert_eq!(
            try_extract(headers(&[("trace-parent", VALID)])),
            Err(ExtractError::Missing)
        );
    }

    #[test]
    fn spaces_and_tabs_around_the_value_are_allowed() {
        for value in [
            format!(" {VALID}"),
            format!("{VALID}\t"),
            format!(" \t {VALID} \t "),
        ] {
            assert_eq!(parse(&value).unwrap().to_header_value(), VALID);
        }
        let inner = VALID.replace("-01", "- 01");
        assert!(parse(&inner).is_err());
    }

    #[test]
    fn invalid_traceparent_starts_a_new_trace_and_drops_tracestate() {
        let invalid = VALID.replace('4', "G");
        let ctx = try_extract(headers(&[
            ("traceparent", invalid.as_str()),
            ("tracestate", "a=1"),
        ]));
        assert_eq!(
            ctx,
            Err(ExtractError::Invalid(TraceParentError::InvalidTraceId))
        );
    }

    #[test]
    fn tracestate_without_valid_traceparent_is_dropped() {
        assert_eq!(
            try_extract(headers(&[("tracestate", "a=1")])),
            Err(ExtractError::Missing)
        );
        assert_eq!(extract(headers(&[])), None);
    }

    #[test]
    fn continuing_a_trace_keeps_the_trace_id_and_sets_a_new_parent_id() {
        let parent = parse(VALID).unwrap();
        let span_id = SpanId([7; 8]);
        let child = parent.child(span_id, true);
        assert_eq!(child.trace_id, parent.trace_id);
        assert_eq!(child.parent_id, span_id);
        assert_eq!(
            child.to_header_value(),
            format!("00-{TRACE_HEX}-0707070707070707-01")
        );
    }

    #[test]
    fn continuing_a_trace_keeps_the_sampled_bit_as_decided() {
        assert_eq!(child_flags(flags::SAMPLED, false), 0);
        assert_eq!(child_flags(0, true), flags::SAMPLED);
        assert_eq!(child_flags(flags::SAMPLED, true), flags::SAMPLED);
    }

    #[test]
    fn continuing_a_trace_copies_the_random_flag_exactly() {
        assert_eq!(child_flags(flags::RANDOM, false), flags::RANDOM);
        assert_eq!(
            child_flags(flags::RANDOM | flags::SAMPLED, true),
            flags::RANDOM | flags::SAMPLED
        );
        assert_eq!(child_flags(0, true) & flags::RANDOM, 0);
    }

    #[test]
    fn continuing_a_trace_zeroes_unknown_flag_bits() {
        assert_eq!(child_flags(0xfc, false), 0);
        assert_eq!(child_flags(0xff, true), flags::RANDOM | flags::SAMPLED);
        let parent = parse(&format!("00-{TRACE_HEX}-{PARENT_HEX}-f9")).unwrap();
        assert_eq!(parent.child(SpanId([1; 8]), true).flags, flags::SAMPLED);
    }

    #[test]
    fn new_trace_id_is_random_and_emitted_with_the_random_flag() {
        assert_eq!(root_flags(true), flags::RANDOM | flags::SAMPLED);
        assert_eq!(root_flags(false), flags::RANDOM);
        let mut ids = IdGenerator::new();
        let (a, b) = (ids.trace_id(), ids.trace_id());
        assert_ne!(a, b);
        let root = TraceParent::root(a, ids.span_id(), false);
        assert!(root.is_random() && !root.is_sampled());
        assert!(root.to_header_value().ends_with("-02"));
        // Two generators are seeded independently.
        assert_ne!(IdGenerator::new().trace_id(), IdGenerator::new().trace_id());
    }

    #[test]
    fn generated_ids_are_never_all_zero_and_spread() {
        let mut ids = IdGenerator::with_seed(1);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let (trace_id, span_id) = (ids.trace_id(), ids.span_id());
            assert!(trace_id.is_valid() && span_id.is_valid());
            assert!(seen.insert(trace_id));
        }
        assert_eq!(
            IdGenerator::with_seed(9).trace_id(),
            IdGenerator::with_seed(9).trace_id()
        );
    }

    #[test]
    fn write_header_value_matches_to_header_value() {
        let tp = TraceParent {
            trace_id: TraceId([0xab; 16]),
            parent_id: SpanId([0x01; 8]),
            flags: 0x03,
        };
        let mut buf = [0; TRACEPARENT_LEN];
        tp.write_header_value(&mut buf);
        assert_eq!(&buf[..], tp.to_header_value().as_bytes());
        assert_eq!(tp.to_string(), tp.to_header_value());
        assert_eq!(
            tp.to_header_value(),
            format!("00-{}-{}-03", "ab".repeat(16), "01".repeat(8))
        );
    }

    #[test]
    fn traceparent_round_trips() {
        let mut ids = IdGenerator::with_seed(2);
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..2_000 {
            let tp = TraceParent {
                trace_id: ids.trace_id(),
                parent_id: ids.span_id(),
                flags: rng.random(),
            };
            assert_eq!(parse(&tp.to_header_value()), Ok(tp));
        }
        assert_eq!(parse(VALID).unwrap().to_header_value(), VALID);
    }

    #[test]
    fn errors_say_why() {
        let reason = parse(&format!("ff-{TRACE_HEX}-{PARENT_HEX}-01"))
            .unwrap_err()
            .to_string();
        assert!(reason.contains("ff"), "{reason}");
        assert!(parse("00-").unwrap_err().to_string().contains("55"));
        let reason = ExtractError::Invalid(TraceParentError::ZeroParentId).to_string();
        assert!(reason.contains("parent-id"), "{reason}");
        assert!(
            TraceStateError::DuplicateKey { member: 3 }
                .to_string()
                .contains('3')
        );
    }

    // ---- tracestate ----

    #[test]
    fn several_tracestate_fields_are_joined_in_order() {
        let ts = state(&["foo=1,bar=2", "rojo=1,congo=2", "baz=3"]).unwrap();
        assert_eq!(ts.to_header_value(), "foo=1,bar=2,rojo=1,congo=2,baz=3");
        assert_eq!(ts.len(), 5);
        assert_eq!(ts.get("congo"), Some("2"));
        assert_eq!(ts.iter().next(), Some(("foo", "1")));
    }

    #[test]
    fn empty_tracestate_members_are_skipped() {
        let ts = state(&["", "foo=1,,", " , \t,bar=2", ""]).unwrap();
        assert_eq!(ts.to_header_value(), "foo=1,bar=2");
        assert!(state(&[""]).unwrap().is_empty());
        assert!(state::<&str>(&[]).unwrap().is_empty());
        assert!(state(&[" , "]).unwrap().is_empty());
    }

    #[test]
    fn empty_members_do_not_count_towards_the_limit() {
        let many = format!("{},,,,,,,,,", members(32, "v"));
        assert_eq!(state(&[&many]).unwrap().len(), 32);
    }

    #[test]
    fn tracestate_of_32_members_is_kept() {
        let ts = state(&[&members(32, "v")]).unwrap();
        assert_eq!(ts.len(), 32);
        assert_eq!(ts.to_header_value(), members(32, "v"));
    }

    #[test]
    fn tracestate_over_32_members_is_dropped() {
        assert_eq!(
            state(&[&members(33, "v")]),
            Err(TraceStateError::TooManyMembers)
        );
        let split = [
            members(20, "v"),
            (20..33)
                .map(|i| format!("k{i}=v"))
                .collect::<Vec<_>>()
                .join(","),
        ];
        assert_eq!(state(&split), Err(TraceStateError::TooManyMembers));
        let too_many = members(33, "v");
        let ctx = extract(headers(&[
            ("traceparent", VALID),
            ("tracestate", too_many.as_str()),
        ]))
        .unwrap();
        assert!(ctx.tracestate.is_empty());
    }

    #[test]
    fn key_starts_with_lowercase_letter_or_digit() {
        assert!(state(&["foo=1,0foo=2,9=3,a=4"]).is_ok());
        for bad in [
            "_foo=1", "-foo=1", "*foo=1", "/foo=1", "@foo=1", "Foo=1", "=1",
        ] {
            assert_eq!(
                state(&[bad]),
                Err(TraceStateError::InvalidKey { member: 0 }),
                "{bad}"
            );
        }
    }

    #[test]
    fn key_characters_are_lowercase_digits_and_underscore_dash_star_slash_at() {
        assert!(state(&["abcdefghijklmnopqrstuvwxyz0123456789_-*/@=1"]).is_ok());
        for bad in [
            "fOo=1",
            "foo.bar=1",
            "foo bar=1",
            "foo =1",
            "fo\to=1",
            "foo:bar=1",
            "föo=1",
        ] {
            assert!(state(&[bad]).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn multi_tenant_key_is_accepted() {
        let ts = state(&["fw529a3039@dt=1,0tenant@system=2,t*/-_@s*/-_9=3"]).unwrap();
        assert_eq!(ts.get("fw529a3039@dt"), Some("1"));
        let longest_tenant = format!("{}@{}=1", "t".repeat(241), "v".repeat(14));
        assert!(state(&[&longest_tenant]).is_ok());
    }

    #[test]
    fn at_sign_is_an_ordinary_key_character_in_level_2() {
        assert!(state(&["foo@=1,foo@@bar=2,foo@bar@baz=3,t@vvvvvvvvvvvvvvv=4"]).is_ok());
    }

    #[test]
    fn key_of_at_most_256_characters_is_accepted() {
        assert!(state(&[&format!("{}=1", "k".repeat(256))]).is_ok());
        let too_long = format!("{}=1", "k".repeat(257));
        assert_eq!(
            state(&[&too_long]),
            Err(TraceStateError::InvalidKey { member: 0 })
        );
        let too_long_tenant = format!("{}@v=1", "t".repeat(255));
        assert!(state(&[&too_long_tenant]).is_err());
    }

    #[test]
    fn value_is_printable_ascii_except_comma_and_equals() {
        // Starts with the space and ends with `~`.
        let all: String = (0x20u8..=0x7e)
            .filter(|&b| b != b',' && b != b'=')
            .map(char::from)
            .collect();
        let ts = state(&[&format!("foo={all}")]).unwrap();
        assert_eq!(ts.get("foo"), Some(all.as_str()));
        for bad in [
            "foo=bar=baz",
            "foo=\u{7f}",
            "foo=a\tb",
            "foo=é",
            "foo=a\u{1}",
        ] {
            assert_eq!(
                state(&[bad]),
                Err(TraceStateError::InvalidValue { member: 0 }),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn value_may_contain_and_start_with_spaces() {
        assert_eq!(state(&["foo=a b"]).unwrap().get("foo"), Some("a b"));
        assert!(is_valid_value(" a"));
    }

    #[test]
    fn value_ending_in_space_is_invalid() {
        assert!(!is_valid_value("a "));
        // On the wire a trailing space is OWS around the member, not value.
        assert_eq!(state(&["foo=a "]).unwrap().get("foo"), Some("a"));
    }

    #[test]
    fn empty_value_is_invalid() {
        assert_eq!(
            state(&["foo=,bar=3"]),
            Err(TraceStateError::InvalidValue { member: 0 })
        );
        assert!(!is_valid_value(""));
    }

    #[test]
    fn value_of_at_most_256_characters_is_accepted() {
        assert!(state(&[&format!("foo={}", "v".repeat(256))]).is_ok());
        let too_long = format!("foo={}", "v".repeat(257));
        assert_eq!(
            state(&[&too_long]),
            Err(TraceStateError::InvalidValue { member: 0 })
        );
    }

    #[test]
    fn member_without_equals_is_invalid() {
        assert_eq!(
            state(&["foo=1,bar"]),
            Err(TraceStateError::MissingEquals { member: 1 })
        );
    }

    #[test]
    fn ows_around_members_is_allowed() {
        let ts = state(&["foo=1 \t , \t bar=2, \t baz=3", " \t qux=4 \t "]).unwrap();
        assert_eq!(ts.to_header_value(), "foo=1,bar=2,baz=3,qux=4");
    }

    #[test]
    fn any_invalid_member_drops_the_whole_tracestate() {
        assert!(state(&["foo=1,BAR=2,baz=3"]).is_err());
        assert!(state(&["foo=1", "bar=2,=3"]).is_err());
        let ctx = extract(headers(&[
            ("traceparent", VALID),
            ("tracestate", "foo=1"),
            ("tracestate", "x=,y=1"),
        ]))
        .unwrap();
        assert_eq!(ctx.traceparent.to_header_value(), VALID);
        assert!(ctx.tracestate.is_empty());
    }

    #[test]
    fn duplicate_keys_make_tracestate_invalid() {
        assert_eq!(
            state(&["foo=1,foo=1"]),
            Err(TraceStateError::DuplicateKey { member: 1 })
        );
        assert_eq!(
            state(&["foo=1,bar=2", "foo=3"]),
            Err(TraceStateError::DuplicateKey { member: 2 })
        );
        assert!(state(&["foo=1,foo@x=1"]).is_ok());
    }

    #[test]
    fn tracestate_of_512_characters_is_propagated_whole() {
        let full = members(16, &"v".repeat(26));
        let ts = state(&[&full]).unwrap();
        let exact = format!(
            "{full},z={}",
            "v".repeat(MAX_PROPAGATED_LEN - full.len() - 3)
        );
        assert_eq!(exact.len(), MAX_PROPAGATED_LEN);
        assert_eq!(state(&[&exact]).unwrap().to_header_value(), exact);
        assert_eq!(ts.to_header_value(), full);
    }

    #[test]
    fn cutting_removes_members_over_128_characters_first() {
        let long = format!("long={}", "l".repeat(200));
        let small = members(10, &"v".repeat(30));
        let ts = state(&[&format!("a=1,{long},{small},b={}", "l".repeat(150))]).unwrap();
        assert!(ts.text.len() > MAX_PROPAGATED_LEN);
        let cut = ts.truncated_to(MAX_PROPAGATED_LEN);
        assert_eq!(cut.to_header_value(), format!("a=1,{small}"));
        // Only as many long members go as needed: the right-most one first.
        let cut = ts.truncated_to(ts.text.len() - 100);
        assert_eq!(cut.text, format!("a=1,{long},{small}"));
    }

    #[test]
    fn cutting_then_removes_members_from_the_right() {
        let ts = state(&[&members(32, &"v".repeat(20))]).unwrap();
        let cut = ts.truncated_to(MAX_PROPAGATED_LEN);
        let header = cut.to_header_value();
        assert!(header.len() <= MAX_PROPAGATED_LEN);
        assert!(ts.to_header_value().len() <= MAX_PROPAGATED_LEN);
        assert!(ts.text.starts_with(&header));
        // 10 members of 23 characters and 10 of 24, plus 19 commas: 489; one more would be 514.
        assert_eq!(cut.len(), 20);
        assert!(ts.truncated_to(0).is_empty());
        assert_eq!(ts.truncated_to(usize::MAX), ts);
    }

    #[test]
    fn tracestate_round_trips() {
        let ts = state(&["a=1, b@c=x y , 0=~", "d=!\"#$%&'()*+-./:;<>?@[\\]^_`{|}~"]).unwrap();
        let header = ts.to_header_value();
        assert_eq!(state(&[&header]).unwrap(), ts);
    }

    // ---- no panics ----

    #[test]
    fn parsing_never_panics_on_arbitrary_bytes() {
        let mut rng = StdRng::seed_from_u64(0x7ace);
        let alphabet = b"0123456789abcdefABCDEF-=, \t@_*/\x00\xff";
        for _ in 0..5_000 {
            let len = rng.random_range(0..80);
            let bytes: Vec<u8> = if rng.random() {
                (0..len).map(|_| rng.random()).collect()
            } else {
                (0..len)
                    .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                    .collect()
            };
            check_no_panic(&bytes);
        }
    }

    #[test]
    fn parsing_never_panics_on_mutated_valid_headers() {
        let mut rng = StdRng::seed_from_u64(0xbeef);
        let seeds = [
            VALID.to_owned(),
            format!("cc-{TRACE_HEX}-{PARENT_HEX}-01-future"),
            "foo=1,bar@baz=2, qux=a b".to_owned(),
        ];
        for _ in 0..5_000 {
            let mut bytes = seeds[rng.random_range(0..seeds.len())].as_bytes().to_vec();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..=bytes.len());
                match rng.random_range(0..4) {
                    0 if at < bytes.len() => bytes[at] = rng.random(),
                    1 => bytes.insert(at, rng.random()),
                    2 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    _ => bytes.truncate(at),
                }
            }
            check_no_panic(&bytes);
        }
    }

    fn check_no_panic(bytes: &[u8]) {
        if let Ok(tp) = TraceParent::parse(bytes) {
            assert_eq!(TraceParent::parse(tp.to_header_value().as_bytes()), Ok(tp));
        }
        if let Ok(ts) = TraceState::parse_fields(&[bytes, b" , zz=1"]) {
            let header = ts.to_header_value();
            assert!(header.len() <= MAX_PROPAGATED_LEN);
            assert!(TraceState::parse_fields(&[header.as_bytes()]).is_ok());
        }
        let _ = extract([("traceparent", bytes), ("tracestate", bytes)]);
    }
}
