//! JSON with protobuf default values left out, written in one pass.
//!
//! `opentelemetry-proto`'s `with-serde` mapping writes every field, defaults
//! included (`"traceState":""`, `"status":null`, ...). The protobuf JSON
//! mapping lets a writer leave them out and the Collector does. Building a
//! `serde_json::Value` tree and pruning it cost about 11 µs of CPU per span,
//! more than the rest of the pipeline together; this adapter prunes while
//! serializing instead: before a struct field or map entry is written, a
//! probe serializer walks its value and says whether it would come out as a
//! default (null, "", 0, false, an empty list, or an object whose members
//! are all defaults themselves).
//!
//! Two names are exceptions, kept with everything inside: `key` (the
//! `with-serde` reader requires it in every `KeyValue`) and `value` (the
//! `value` of a `KeyValue` holds a oneof member, whose presence is the
//! information: `{"intValue":"0"}`, `{"stringValue":""}`).
//!
//! One difference from pruning a finished tree, in a case the OTLP types
//! never produce: a struct or tuple enum variant with nothing but defaults
//! inside, where it is written at all (in a list, at the top), comes out as
//! `{"variant":{}}` or `{"variant":[]}`, where the tree would give `{}`.

use serde::Serialize;
use serde::ser::{
    self, Error as _, SerializeMap, SerializeSeq, SerializeStruct, SerializeStructVariant,
    SerializeTuple, SerializeTupleStruct, SerializeTupleVariant, Serializer,
};

/// Appends `value` as JSON, defaults left out, to `out`.
pub(crate) fn to_writer<T: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    value: &T,
) -> serde_json::Result<()> {
    value.serialize(SkipDefaults(&mut serde_json::Serializer::new(out)))
}

/// Members written whole, defaults and all.
fn kept_whole(name: &str) -> bool {
    name == "key" || name == "value"
}

/// Whether `value` would be left out: what it serializes to is a default
/// once its own members have been pruned.
fn is_default<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<bool> {
    value.serialize(DefaultProbe)
}

/// A serializer that writes through `S`, leaving defaults out of every
/// struct and map below.
struct SkipDefaults<S>(S);

/// Serializes the wrapped value with [`SkipDefaults`] around the
/// serializer it is given.
struct Pruned<'a, T: ?Sized>(&'a T);

impl<T: Serialize + ?Sized> Serialize for Pruned<'_, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(SkipDefaults(serializer))
    }
}

macro_rules! forward_scalars {
    ($($method:ident($type:ty)),* $(,)?) => {
        $(fn $method(self, v: $type) -> Result<S::Ok, S::Error> {
            self.0.$method(v)
        })*
    };
}

impl<S: Serializer> Serializer for SkipDefaults<S> {
    type Ok = S::Ok;
    type Error = S::Error;
    type SerializeSeq = Elements<S::SerializeSeq>;
    type SerializeTuple = Elements<S::SerializeTuple>;
    type SerializeTupleStruct = Elements<S::SerializeTupleStruct>;
    type SerializeTupleVariant = Elements<S::SerializeTupleVariant>;
    type SerializeMap = Members<S::SerializeMap>;
    type SerializeStruct = Members<S::SerializeStruct>;
    type SerializeStructVariant = Members<S::SerializeStructVariant>;

    forward_scalars!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_i128(i128),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_u128(u128),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_str(&str),
        serialize_bytes(&[u8]),
    );

    fn serialize_none(self) -> Result<S::Ok, S::Error> {
        self.0.serialize_none()
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<S::Ok, S::Error> {
        self.0.serialize_some(&Pruned(value))
    }

    fn serialize_unit(self) -> Result<S::Ok, S::Error> {
        self.0.serialize_unit()
    }

    fn serialize_unit_struct(self, name: &'static str) -> Result<S::Ok, S::Error> {
        self.0.serialize_unit_struct(name)
    }

    fn serialize_unit_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
    ) -> Result<S::Ok, S::Error> {
        self.0.serialize_unit_variant(name, index, variant)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<S::Ok, S::Error> {
        self.0.serialize_newtype_struct(name, &Pruned(value))
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<S::Ok, S::Error> {
        // `{"variant": value}`: an object of one member, pruned like any.
        if kept_whole(variant) {
            return self
                .0
                .serialize_newtype_variant(name, index, variant, value);
        }
        if is_default(value).map_err(S::Error::custom)? {
            return self.0.serialize_map(Some(0))?.end();
        }
        self.0
            .serialize_newtype_variant(name, index, variant, &Pruned(value))
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<Self::SerializeSeq, S::Error> {
        self.0.serialize_seq(len).map(Elements::pruned)
    }

    fn serialize_tuple(self, len: usize) -> Result<Self::SerializeTuple, S::Error> {
        self.0.serialize_tuple(len).map(Elements::pruned)
    }

    fn serialize_tuple_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleStruct, S::Error> {
        self.0
            .serialize_tuple_struct(name, len)
            .map(Elements::pruned)
    }

    fn serialize_tuple_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleVariant, S::Error> {
        let whole = kept_whole(variant);
        self.0
            .serialize_tuple_variant(name, index, variant, len)
            .map(|inner| Elements { inner, whole })
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Self::SerializeMap, S::Error> {
        self.0
            .serialize_map(len)
            .map(|inner| Members::new(inner, false))
    }

    fn serialize_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStruct, S::Error> {
        self.0
            .serialize_struct(name, len)
            .map(|inner| Members::new(inner, false))
    }

    fn serialize_struct_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStructVariant, S::Error> {
        let whole = kept_whole(variant);
        self.0
            .serialize_struct_variant(name, index, variant, len)
            .map(|inner| Members::new(inner, whole))
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

/// The elements of a list: every one is written (a list is left out only
/// when empty, and only as a whole), each pruned inside unless the list is
/// a variant kept whole.
struct Elements<C> {
    inner: C,
    whole: bool,
}

impl<C> Elements<C> {
    fn pruned(inner: C) -> Self {
        Self {
            inner,
            whole: false,
        }
    }
}

macro_rules! elements {
    ($trait:ident, $method:ident) => {
        impl<C: $trait> $trait for Elements<C> {
            type Ok = C::Ok;
            type Error = C::Error;

            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), C::Error> {
                if self.whole {
                    self.inner.$method(value)
                } else {
                    self.inner.$method(&Pruned(value))
                }
            }

            fn end(self) -> Result<C::Ok, C::Error> {
                self.inner.end()
            }
        }
    };
}

elements!(SerializeSeq, serialize_element);
elements!(SerializeTuple, serialize_element);
elements!(SerializeTupleStruct, serialize_field);
elements!(SerializeTupleVariant, serialize_field);

/// The members of an object (a struct or a map): a member is written only
/// if it is kept whole or its value is not a default.
struct Members<C> {
    inner: C,
    /// A map's key, held until its value says whether the entry is written.
    key: String,
    /// Inside a variant kept whole: every member is written as it is.
    whole: bool,
}

impl<C> Members<C> {
    fn new(inner: C, whole: bool) -> Self {
        Self {
            inner,
            key: String::new(),
            whole,
        }
    }

    fn member<T: Serialize + ?Sized, E: ser::Error>(
        &self,
        name: &str,
        value: &T,
    ) -> Result<Member, E> {
        if self.whole || kept_whole(name) {
            Ok(Member::Whole)
        } else if is_default(value).map_err(E::custom)? {
            Ok(Member::LeftOut)
        } else {
            Ok(Member::Pruned)
        }
    }
}

/// What to do with one member.
enum Member {
    Whole,
    Pruned,
    LeftOut,
}

macro_rules! struct_members {
    ($trait:ident) => {
        impl<C: $trait> $trait for Members<C> {
            type Ok = C::Ok;
            type Error = C::Error;

            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                name: &'static str,
                value: &T,
            ) -> Result<(), C::Error> {
                match self.member::<_, C::Error>(name, value)? {
                    Member::Whole => self.inner.serialize_field(name, value),
                    Member::Pruned => self.inner.serialize_field(name, &Pruned(value)),
                    Member::LeftOut => self.inner.skip_field(name),
                }
            }

            fn end(self) -> Result<C::Ok, C::Error> {
                self.inner.end()
            }
        }
    };
}

struct_members!(SerializeStruct);
struct_members!(SerializeStructVariant);

impl<C: SerializeMap> SerializeMap for Members<C> {
    type Ok = C::Ok;
    type Error = C::Error;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), C::Error> {
        self.key = key_text(key).map_err(C::Error::custom)?;
        Ok(())
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), C::Error> {
        match self.member::<_, C::Error>(&self.key, value)? {
            Member::Whole => self.inner.serialize_entry(self.key.as_str(), value),
            Member::Pruned => self
                .inner
                .serialize_entry(self.key.as_str(), &Pruned(value)),
            Member::LeftOut => Ok(()),
        }
    }

    fn end(self) -> Result<C::Ok, C::Error> {
        self.inner.end()
    }
}

/// A map key as the text JSON shows it: serde_json writes the key alone
/// and a string is read back, so numbers and booleans keep serde_json's own
/// spelling (`1.0`, `true`). Map keys are rare here (the OTLP types have
/// none), so the two small allocations do not matter.
fn key_text<T: Serialize + ?Sized>(key: &T) -> serde_json::Result<String> {
    let json = serde_json::to_string(key)?;
    match json.as_bytes().first() {
        Some(b'"') => serde_json::from_str(&json),
        Some(b'-' | b'0'..=b'9' | b't' | b'f') => Ok(json),
        // null (NaN, infinity, None, unit), a list or an object.
        _ => Err(serde_json::Error::custom(
            "a map key must be a string, a finite number or a boolean",
        )),
    }
}

/// Says whether a value serializes to a default (see [`is_default`]),
/// writing nothing.
struct DefaultProbe;

/// Walks a list: default only if it has no element. Elements are not
/// looked into.
struct SeqProbe {
    empty: bool,
}

/// Walks an object's members: default only if every member is left out.
struct MembersProbe {
    all_default: bool,
    /// A map entry's key, held for its value.
    key: String,
}

impl MembersProbe {
    fn new() -> Self {
        Self {
            all_default: true,
            key: String::new(),
        }
    }

    fn member<T: Serialize + ?Sized>(&mut self, name: &str, value: &T) -> serde_json::Result<()> {
        // Once one member is kept, the rest need no look.
        if self.all_default {
            self.all_default = !kept_whole(name) && is_default(value)?;
        }
        Ok(())
    }
}

macro_rules! zero_is_default {
    ($($method:ident($type:ty)),* $(,)?) => {
        $(fn $method(self, v: $type) -> serde_json::Result<bool> {
            Ok(v == 0)
        })*
    };
}

impl Serializer for DefaultProbe {
    type Ok = bool;
    type Error = serde_json::Error;
    type SerializeSeq = SeqProbe;
    type SerializeTuple = SeqProbe;
    type SerializeTupleStruct = SeqProbe;
    type SerializeTupleVariant = SeqProbe;
    type SerializeMap = MembersProbe;
    type SerializeStruct = MembersProbe;
    type SerializeStructVariant = MembersProbe;

    fn serialize_bool(self, v: bool) -> serde_json::Result<bool> {
        Ok(!v)
    }
    zero_is_default!(
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_i128(i128),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_u128(u128),
    );

    fn serialize_f32(self, v: f32) -> serde_json::Result<bool> {
        self.serialize_f64(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> serde_json::Result<bool> {
        // JSON has no NaN or infinity: serde_json writes them as null.
        Ok(v == 0.0 || !v.is_finite())
    }
    fn serialize_char(self, _: char) -> serde_json::Result<bool> {
        Ok(false)
    }
    fn serialize_str(self, v: &str) -> serde_json::Result<bool> {
        Ok(v.is_empty())
    }
    fn serialize_bytes(self, v: &[u8]) -> serde_json::Result<bool> {
        // Written as a list of numbers.
        Ok(v.is_empty())
    }
    fn serialize_none(self) -> serde_json::Result<bool> {
        Ok(true)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> serde_json::Result<bool> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> serde_json::Result<bool> {
        Ok(true)
    }
    fn serialize_unit_struct(self, _: &'static str) -> serde_json::Result<bool> {
        Ok(true)
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> serde_json::Result<bool> {
        Ok(variant.is_empty())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> serde_json::Result<bool> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> serde_json::Result<bool> {
        Ok(!kept_whole(variant) && is_default(value)?)
    }
    fn serialize_seq(self, _: Option<usize>) -> serde_json::Result<SeqProbe> {
        Ok(SeqProbe { empty: true })
    }
    fn serialize_tuple(self, _: usize) -> serde_json::Result<SeqProbe> {
        Ok(SeqProbe { empty: true })
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> serde_json::Result<SeqProbe> {
        Ok(SeqProbe { empty: true })
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> serde_json::Result<SeqProbe> {
        // `{"variant": [...]}`: the list decides, unless kept whole.
        Ok(SeqProbe {
            empty: !kept_whole(variant),
        })
    }
    fn serialize_map(self, _: Option<usize>) -> serde_json::Result<MembersProbe> {
        Ok(MembersProbe::new())
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> serde_json::Result<MembersProbe> {
        Ok(MembersProbe::new())
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> serde_json::Result<MembersProbe> {
        // `{"variant": {...}}`: the inner object decides, unless kept whole.
        let mut probe = MembersProbe::new();
        probe.all_default = !kept_whole(variant);
        Ok(probe)
    }
}

macro_rules! seq_probe {
    ($trait:ident, $method:ident) => {
        impl $trait for SeqProbe {
            type Ok = bool;
            type Error = serde_json::Error;

            fn $method<T: Serialize + ?Sized>(&mut self, _: &T) -> serde_json::Result<()> {
                self.empty = false;
                Ok(())
            }

            fn end(self) -> serde_json::Result<bool> {
                Ok(self.empty)
            }
        }
    };
}

seq_probe!(SerializeSeq, serialize_element);
seq_probe!(SerializeTuple, serialize_element);
seq_probe!(SerializeTupleStruct, serialize_field);
seq_probe!(SerializeTupleVariant, serialize_field);

macro_rules! struct_members_probe {
    ($trait:ident) => {
        impl $trait for MembersProbe {
            type Ok = bool;
            type Error = serde_json::Error;

            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                name: &'static str,
                value: &T,
            ) -> serde_json::Result<()> {
                self.member(name, value)
            }

            fn end(self) -> serde_json::Result<bool> {
                Ok(self.all_default)
            }
        }
    };
}

struct_members_probe!(SerializeStruct);
struct_members_probe!(SerializeStructVariant);

impl SerializeMap for MembersProbe {
    type Ok = bool;
    type Error = serde_json::Error;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> serde_json::Result<()> {
        if self.all_default {
            self.key = key_text(key)?;
        }
        Ok(())
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> serde_json::Result<()> {
        let key = std::mem::take(&mut self.key);
        let result = self.member(&key, value);
        self.key = key;
        result
    }

    fn end(self) -> serde_json::Result<bool> {
        Ok(self.all_default)
    }
}

/// The pruning rules applied to a finished tree, the plain way: what
/// [`to_string`] must give without building one.
#[cfg(test)]
pub(crate) fn omit_defaults(value: &mut serde_json::Value) {
    use serde_json::Value;
    fn is_default(value: &Value) -> bool {
        match value {
            Value::Null => true,
            Value::Bool(b) => !b,
            Value::Number(n) => n.as_f64() == Some(0.0),
            Value::String(s) => s.is_empty(),
            Value::Array(items) => items.is_empty(),
            Value::Object(fields) => fields.is_empty(),
        }
    }
    match value {
        Value::Object(fields) => fields.retain(|name, field| {
            if kept_whole(name) {
                return true;
            }
            omit_defaults(field);
            !is_default(field)
        }),
        Value::Array(items) => items.iter_mut().for_each(omit_defaults),
        _ => {}
    }
}

#[cfg(test)]
fn to_string<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    let mut out = Vec::new();
    to_writer(&mut out, value)?;
    String::from_utf8(out).map_err(serde_json::Error::custom)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};
    use serde_json::Value;

    use super::*;

    /// What pruning the finished tree of `value` gives.
    fn expected<T: Serialize>(value: &T) -> Value {
        let mut tree = serde_json::to_value(value).unwrap();
        omit_defaults(&mut tree);
        tree
    }

    fn written<T: Serialize>(value: &T) -> Value {
        serde_json::from_str(&to_string(value).unwrap()).unwrap()
    }

    /// A small JSON tree full of defaults, `key` and `value` members.
    fn random_tree(rng: &mut StdRng, depth: u32) -> Value {
        const NAMES: [&str; 5] = ["a", "b", "key", "value", "c"];
        let leaf = depth == 0 || rng.random_range(0..3) == 0;
        match rng.random_range(0..if leaf { 6 } else { 8 }) {
            0 => Value::Null,
            1 => Value::Bool(rng.random_range(0..2) == 1),
            2 => Value::from(rng.random_range(0..3) - 1),
            3 => Value::from(f64::from(rng.random_range(0..3)) / 2.0),
            4 => Value::from(["", "x"][rng.random_range(0..2)]),
            5 => Value::Array(vec![]),
            6 => Value::Array(
                (0..rng.random_range(0..3))
                    .map(|_| random_tree(rng, depth - 1))
                    .collect(),
            ),
            _ => Value::Object(
                (0..rng.random_range(0..4))
                    .map(|_| {
                        let name = NAMES[rng.random_range(0..NAMES.len())].to_string();
                        (name, random_tree(rng, depth - 1))
                    })
                    .collect(),
            ),
        }
    }

    #[test]
    fn json_trees_prune_as_their_finished_tree_does() {
        let mut rng = StdRng::seed_from_u64(0x0715);
        for _ in 0..5_000 {
            let tree = random_tree(&mut rng, 4);
            assert_eq!(written(&tree), expected(&tree), "from {tree}");
        }
    }

    #[test]
    fn oneof_members_keep_their_zero_values() {
        let value: Value = serde_json::from_str(
            r#"{"z":1,"a":0,"b":"","c":null,"d":[],"e":{"f":false},"key":"",
                "value":{"stringValue":""},"g":[{"h":0,"i":1.5}]}"#,
        )
        .unwrap();
        let pruned: Value =
            serde_json::from_str(r#"{"z":1,"key":"","value":{"stringValue":""},"g":[{"i":1.5}]}"#)
                .unwrap();
        assert_eq!(written(&value), pruned);
    }

    #[derive(Serialize, Default)]
    struct Inner {
        x: i64,
        y: String,
    }

    #[derive(Serialize, Default)]
    struct Wrapper(Inner);

    #[derive(Serialize)]
    #[allow(dead_code)]
    enum Choice {
        Unit,
        Newtype(Inner),
        #[serde(rename = "value")]
        Whole {
            x: i64,
        },
        Fields {
            x: i64,
        },
        Pair(u8, u8),
    }

    /// Number keys: written as their text.
    struct FloatKeys;

    impl Serialize for FloatKeys {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_map([(1.0f64, 1u8), (0.5, 0), (-2.25, 3)])
        }
    }

    #[derive(Serialize, Default)]
    struct Outer {
        a: Option<u32>,
        b: Option<Inner>,
        c: Wrapper,
        d: Vec<Choice>,
        e: f64,
        f: Option<Choice>,
        value: Inner,
        g: Vec<u8>,
        h: BTreeMap<u32, Inner>,
        i: (u8, String),
        j: f32,
        k: Option<FloatKeys>,
    }

    #[test]
    fn rust_types_prune_as_their_finished_tree_does() {
        let all_defaults = Outer::default();
        let mixed = Outer {
            a: Some(0),
            b: Some(Inner {
                x: 0,
                y: "y".into(),
            }),
            c: Wrapper(Inner { x: 3, y: "".into() }),
            d: vec![
                Choice::Unit,
                Choice::Newtype(Inner::default()),
                Choice::Newtype(Inner { x: 1, y: "".into() }),
                Choice::Whole { x: 0 },
                Choice::Fields { x: 2 },
                Choice::Pair(0, 0),
            ],
            e: f64::NAN,
            f: Some(Choice::Whole { x: 0 }),
            value: Inner::default(),
            g: vec![0, 1],
            h: BTreeMap::from([(0, Inner::default()), (7, Inner { x: 7, y: "".into() })]),
            i: (0, String::new()),
            j: 0.5,
            k: Some(FloatKeys),
        };
        for value in [&all_defaults, &mixed] {
            assert_eq!(written(value), expected(value));
        }
        // The kept-whole variant keeps its zero inside.
        assert_eq!(written(&mixed)["f"], serde_json::json!({"value": {"x": 0}}));
    }

    #[test]
    fn an_all_default_struct_variant_in_a_list_keeps_its_name() {
        // The one documented difference from the finished tree, `{}`.
        assert_eq!(
            to_string(&[Choice::Fields { x: 0 }]).unwrap(),
            r#"[{"Fields":{}}]"#
        );
    }

    #[test]
    fn keys_that_json_cannot_hold_are_errors() {
        struct NanKey;
        impl Serialize for NanKey {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_map([(f64::NAN, 1u8)])
            }
        }
        let err = to_string(&NanKey).unwrap_err();
        assert!(err.to_string().contains("map key must be"), "{err}");
        let err = to_string(&BTreeMap::from([(vec![1u8], 1u8)])).unwrap_err();
        assert!(err.to_string().contains("map key must be"), "{err}");
    }
}
