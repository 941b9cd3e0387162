//! [`Text`], the string type of span names and attribute values.
//!
//! Nearly every string a span carries is short (`/`, `GET /users/{id}`,
//! `127.0.0.1`) and is built on the correlation thread but read and freed on
//! the outputs' thread. A `String` per value is an allocation there and a
//! free here, on memory the other core wrote; `Text` keeps values of up to
//! [`Text::INLINE`] bytes inside itself, and static ones by reference, so a
//! typical span's strings cost no allocation at all (docs/benchmarks.md).

use std::borrow::Cow;
use std::fmt;
use std::ops::Deref;

/// An immutable string: a static one by reference, a short one inline, a
/// longer one on the heap. Compares and prints as its `str`.
#[derive(Clone)]
pub struct Text(Repr);

#[derive(Clone)]
enum Repr {
    Static(&'static str),
    /// Invariant: `bytes[..len]` is UTF-8 (only ever copied from a `str`,
    /// whole, or appended to by whole `str`s).
    Inline {
        len: u8,
        bytes: [u8; Text::INLINE],
    },
    Heap(Box<str>),
}

impl Text {
    /// The longest string kept inline (the type is as large as a `String`).
    pub const INLINE: usize = 22;

    /// A static string, by reference.
    pub const fn from_static(text: &'static str) -> Self {
        Self(Repr::Static(text))
    }

    /// A copy of `text`: inline when it fits, else on the heap.
    pub fn copy(text: &str) -> Self {
        if text.len() <= Self::INLINE {
            let mut bytes = [0; Self::INLINE];
            bytes[..text.len()].copy_from_slice(text.as_bytes());
            Self(Repr::Inline {
                len: text.len() as u8,
                bytes,
            })
        } else {
            Self(Repr::Heap(text.into()))
        }
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Static(text) => text,
            // SAFETY: the invariant of `Repr::Inline`: its first `len` bytes
            // are always whole `str`s copied in.
            Repr::Inline { len, bytes } => unsafe {
                std::str::from_utf8_unchecked(&bytes[..usize::from(*len)])
            },
            Repr::Heap(text) => text,
        }
    }
}

impl Default for Text {
    fn default() -> Self {
        Self::from_static("")
    }
}

impl Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl From<&'static str> for Text {
    fn from(text: &'static str) -> Self {
        Self::from_static(text)
    }
}

/// Takes the string: moved to the heap representation when it does not fit
/// inline (no copy), copied inline (and freed) when it does.
impl From<String> for Text {
    fn from(text: String) -> Self {
        if text.len() <= Self::INLINE {
            Self::copy(&text)
        } else {
            Self(Repr::Heap(text.into_boxed_str()))
        }
    }
}

impl From<Cow<'static, str>> for Text {
    fn from(text: Cow<'static, str>) -> Self {
        match text {
            Cow::Borrowed(text) => Self::from_static(text),
            Cow::Owned(text) => text.into(),
        }
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Text {}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Text {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<Text> for String {
    fn eq(&self, other: &Text) -> bool {
        self == other.as_str()
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Builds a [`Text`] from pieces without allocating while it fits inline.
#[derive(Default)]
pub struct TextBuilder {
    len: usize,
    bytes: [u8; Text::INLINE],
    /// Everything so far, once it stopped fitting inline.
    spilled: Option<String>,
}

impl TextBuilder {
    /// An empty builder that expects about `capacity` bytes (it allocates at
    /// once only when they cannot fit inline).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            spilled: (capacity > Text::INLINE).then(|| String::with_capacity(capacity)),
            ..Self::default()
        }
    }

    /// Appends `piece`.
    pub fn push_str(&mut self, piece: &str) {
        if let Some(spilled) = &mut self.spilled {
            spilled.push_str(piece);
        } else if self.len + piece.len() <= Text::INLINE {
            self.bytes[self.len..self.len + piece.len()].copy_from_slice(piece.as_bytes());
            self.len += piece.len();
        } else {
            let mut spilled = String::with_capacity((self.len + piece.len()) * 2);
            spilled.push_str(self.inline_str());
            spilled.push_str(piece);
            self.spilled = Some(spilled);
        }
    }

    /// Appends `c`.
    pub fn push(&mut self, c: char) {
        self.push_str(c.encode_utf8(&mut [0; 4]));
    }

    /// The text built.
    pub fn finish(self) -> Text {
        match self.spilled {
            Some(spilled) => Text(Repr::Heap(spilled.into_boxed_str())),
            None => Text(Repr::Inline {
                len: self.len as u8,
                bytes: self.bytes,
            }),
        }
    }

    fn inline_str(&self) -> &str {
        // SAFETY: only whole `str`s are appended to `bytes[..len]`.
        unsafe { std::str::from_utf8_unchecked(&self.bytes[..self.len]) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_as_large_as_a_string() {
        assert_eq!(size_of::<Text>(), size_of::<String>());
    }

    #[test]
    fn every_representation_reads_back_and_compares_by_content() {
        let long = "x".repeat(Text::INLINE + 1);
        let fits = "y".repeat(Text::INLINE);
        for (text, expected) in [
            (Text::from_static("GET /"), "GET /"),
            (Text::copy("GET /"), "GET /"),
            (Text::from(String::from("GET /")), "GET /"),
            (Text::copy(&fits), fits.as_str()),
            (Text::copy(&long), long.as_str()),
            (Text::from(long.clone()), long.as_str()),
            (Text::copy("é/ü"), "é/ü"),
            (Text::default(), ""),
        ] {
            assert_eq!(text.as_str(), expected);
            assert_eq!(text, Text::from(expected.to_string()));
            assert_eq!(text.to_string(), expected);
            assert_eq!(format!("{text:?}"), format!("{expected:?}"));
        }
    }

    #[test]
    fn builder_spills_to_the_heap_at_the_inline_limit() {
        for pieces in [
            vec![],
            vec!["GET", " ", "/users/{id}"],
            vec!["a"; Text::INLINE],
            vec!["a"; Text::INLINE + 1],
            vec!["0123456789", "0123456789", "é", "ü", "0123456789"],
        ] {
            for capacity in [0, 8, 64] {
                let mut builder = TextBuilder::with_capacity(capacity);
                for piece in &pieces {
                    builder.push_str(piece);
                }
                builder.push('/');
                let expected = pieces.concat() + "/";
                assert_eq!(builder.finish().as_str(), expected);
            }
        }
    }
}
