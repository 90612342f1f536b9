//! Protobuf-JSON field names on input: a struct field may be sent under its lowerCamelCase name
//! (`aliasNamespace`) or its protobuf name (`alias_namespace`), as protobuf JSON parsers accept
//! both. PolarisMesh's own clients send whichever their message's `json_name` is, which is the
//! protobuf name for some fields (`alias_namespace`, `logic_set`, `cmdb_mod1`) and camelCase for
//! others (`healthCheck`).
//!
//! One mechanism for every input type: [`ProtoNames`] wraps a serde `Deserializer` and, wherever a
//! *struct* is deserialized, rewrites each `snake_case` key to `lowerCamelCase` before the struct's
//! derived field matching sees it (our input types are `rename_all = "camelCase"`). Keys of maps
//! (`metadata`, `labels`) are user data and pass untouched, and so do enum variant names
//! (`NOT_EQUALS`): only keys read as struct field identifiers are rewritten.

use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

/// `snake_case` → `lowerCamelCase`; names without `_` come back unchanged.
pub fn camel(name: &str) -> std::borrow::Cow<'_, str> {
    if !name.contains('_') {
        return std::borrow::Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = !out.is_empty();
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A deserializer whose structs accept protobuf field names as well as camelCase ones.
pub struct ProtoNames<D>(pub D);

/// Wraps every nested deserializer, so structs at any depth get the same treatment.
struct Nested<V>(V);
/// Reads the keys of a struct's map: each key goes through [`FieldName`].
struct StructVisitor<V>(V);
struct StructMap<A>(A);
struct FieldSeed<S>(S);
struct FieldName<D>(D);
struct FieldIdent<V>(V);
struct Seq<A>(A);
struct Map<A>(A);
struct Seed<S>(S);
struct Enum<A>(A);
struct Variant<A>(A);

macro_rules! forward {
    ($($method:ident),*) => {$(
        fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
            self.0.$method(Nested(v))
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for ProtoNames<D> {
    type Error = D::Error;

    forward!(
        deserialize_any,
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_option,
        deserialize_unit,
        deserialize_seq,
        deserialize_map,
        deserialize_identifier,
        deserialize_ignored_any
    );

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        v: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_unit_struct(name, Nested(v))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        v: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_newtype_struct(name, Nested(v))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, Self::Error> {
        self.0.deserialize_tuple(len, Nested(v))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        v: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_tuple_struct(name, len, Nested(v))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_struct(name, fields, StructVisitor(v))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_enum(name, variants, Nested(v))
    }
}

/// Forwards primitive visits and wraps compound ones.
macro_rules! visit_forward {
    () => {
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            self.0.expecting(f)
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            self.0.visit_bool(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            self.0.visit_i64(v)
        }
        fn visit_i128<E: de::Error>(self, v: i128) -> Result<Self::Value, E> {
            self.0.visit_i128(v)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            self.0.visit_u64(v)
        }
        fn visit_u128<E: de::Error>(self, v: u128) -> Result<Self::Value, E> {
            self.0.visit_u128(v)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            self.0.visit_f64(v)
        }
        fn visit_char<E: de::Error>(self, v: char) -> Result<Self::Value, E> {
            self.0.visit_char(v)
        }
        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
            self.0.visit_bytes(v)
        }
        fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Self::Value, E> {
            self.0.visit_borrowed_bytes(v)
        }
        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
            self.0.visit_byte_buf(v)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            self.0.visit_none()
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            self.0.visit_some(ProtoNames(d))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            self.0.visit_unit()
        }
        fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            self.0.visit_newtype_struct(ProtoNames(d))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            self.0.visit_seq(Seq(seq))
        }
        fn visit_enum<A: EnumAccess<'de>>(self, e: A) -> Result<Self::Value, A::Error> {
            self.0.visit_enum(Enum(e))
        }
    };
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Nested<V> {
    type Value = V::Value;
    visit_forward!();
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.0.visit_str(v)
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        self.0.visit_borrowed_str(v)
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        self.0.visit_string(v)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.visit_map(Map(map))
    }
}

impl<'de, V: Visitor<'de>> Visitor<'de> for StructVisitor<V> {
    type Value = V::Value;
    visit_forward!();
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.0.visit_str(v)
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        self.0.visit_borrowed_str(v)
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        self.0.visit_string(v)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.visit_map(StructMap(map))
    }
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Seq<A> {
    type Error = A::Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Self::Error> {
        self.0.next_element_seed(Seed(seed))
    }
    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Map<A> {
    type Error = A::Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        self.0.next_key_seed(Seed(seed))
    }
    fn next_value_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<T::Value, Self::Error> {
        self.0.next_value_seed(Seed(seed))
    }
    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for StructMap<A> {
    type Error = A::Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        self.0.next_key_seed(FieldSeed(seed))
    }
    fn next_value_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<T::Value, Self::Error> {
        self.0.next_value_seed(Seed(seed))
    }
    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<S> {
    type Value = S::Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.0.deserialize(ProtoNames(d))
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for FieldSeed<S> {
    type Value = S::Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.0.deserialize(FieldName(d))
    }
}

/// The deserializer of one struct key: only `deserialize_identifier` (how derived structs read
/// their field names) rewrites; anything else is passed through.
impl<'de, D: Deserializer<'de>> Deserializer<'de> for FieldName<D> {
    type Error = D::Error;

    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        self.0.deserialize_identifier(FieldIdent(v))
    }

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        ProtoNames(self.0).deserialize_any(v)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum ignored_any
    }
}

impl<'de, V: Visitor<'de>> Visitor<'de> for FieldIdent<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        match camel(v) {
            std::borrow::Cow::Borrowed(_) => self.0.visit_str(v),
            std::borrow::Cow::Owned(c) => self.0.visit_string(c),
        }
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        match camel(v) {
            std::borrow::Cow::Borrowed(_) => self.0.visit_borrowed_str(v),
            std::borrow::Cow::Owned(c) => self.0.visit_string(c),
        }
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        match camel(&v) {
            std::borrow::Cow::Borrowed(_) => self.0.visit_string(v),
            std::borrow::Cow::Owned(c) => self.0.visit_string(c),
        }
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        self.0.visit_u64(v)
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        self.0.visit_bytes(v)
    }
}

impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for Enum<A> {
    type Error = A::Error;
    type Variant = Variant<A::Variant>;
    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self::Variant), Self::Error> {
        // Variant names are matched as they are (`NOT_EQUALS` is a value, not a field).
        self.0.variant_seed(seed).map(|(v, a)| (v, Variant(a)))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Variant<A> {
    type Error = A::Error;
    fn unit_variant(self) -> Result<(), Self::Error> {
        self.0.unit_variant()
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, Self::Error> {
        self.0.newtype_variant_seed(Seed(seed))
    }
    fn tuple_variant<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, Self::Error> {
        self.0.tuple_variant(len, Nested(v))
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.struct_variant(fields, StructVisitor(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase")]
    struct Inner {
        heartbeat_ttl: Option<u32>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
    enum Kind {
        NotEquals,
        Exact,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase")]
    struct Outer {
        alias_namespace: Option<String>,
        cmdb_mod1: Option<String>,
        metadata: Option<BTreeMap<String, String>>,
        health_check: Option<Inner>,
        list: Option<Vec<Inner>>,
        kind: Option<Kind>,
    }

    fn parse(s: &str) -> Outer {
        let mut de = serde_json::Deserializer::from_str(s);
        Outer::deserialize(ProtoNames(&mut de)).unwrap()
    }

    #[test]
    fn protobuf_and_camel_names_both_reach_the_field() {
        let want = Outer {
            alias_namespace: Some("prod".into()),
            cmdb_mod1: Some("m".into()),
            metadata: Some([("my_key".to_string(), "v".to_string())].into()),
            health_check: Some(Inner {
                heartbeat_ttl: Some(5),
            }),
            list: Some(vec![Inner {
                heartbeat_ttl: Some(1),
            }]),
            kind: Some(Kind::NotEquals),
        };
        let snake = r#"{"alias_namespace":"prod","cmdb_mod1":"m","metadata":{"my_key":"v"},
            "health_check":{"heartbeat_ttl":5},"list":[{"heartbeat_ttl":1}],"kind":"NOT_EQUALS"}"#;
        let camel = r#"{"aliasNamespace":"prod","cmdbMod1":"m","metadata":{"my_key":"v"},
            "healthCheck":{"heartbeatTtl":5},"list":[{"heartbeatTtl":1}],"kind":"NOT_EQUALS"}"#;
        assert_eq!(parse(snake), want);
        assert_eq!(parse(camel), want);
        // Map keys are data: `my_key` stays `my_key`.
        assert!(parse(snake).metadata.unwrap().contains_key("my_key"));
        assert_eq!(
            parse(r#"{"kind":"EXACT"}"#).kind,
            Some(Kind::Exact),
            "enum variants are not rewritten"
        );
    }

    #[test]
    fn camel_case_conversion() {
        assert_eq!(camel("alias_namespace"), "aliasNamespace");
        assert_eq!(camel("cmdb_mod1"), "cmdbMod1");
        assert_eq!(camel("name"), "name");
        assert_eq!(camel("_leading"), "leading");
        assert_eq!(camel("total_instance_count"), "totalInstanceCount");
    }
}
