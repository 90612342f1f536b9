//! Encoded resources: each encoded once per content, framed for both protocols, shared by `Arc`.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::config::route::v3::VirtualHost;
use prost::{Message, Name};
use xxhash_rust::xxh3::Xxh3;

use super::super::resources::TRANSLATOR_SALT;

/// One encoded resource, in one buffer: the delta framing holds the SotW framing, which holds the
/// message (so a large route configuration is held once, not three times).
#[derive(Debug)]
pub struct Encoded {
    /// Resource name.
    pub name: Arc<str>,
    /// Content hash.
    pub version: u64,
    /// The encoded message (the `Any`'s value; empty for an absent VHDS host): a slice of `delta`.
    pub value: Bytes,
    /// The resource framed as field 2 of a `DiscoveryResponse` (an `Any`): a slice of `delta`.
    pub sotw: Bytes,
    /// The resource framed as field 2 of a `DeltaDiscoveryResponse` (a `Resource`).
    pub delta: Bytes,
}

/// `msg` as a length-delimited field 2 (prost's framing, which [`build`]'s must equal).
#[cfg(test)]
fn field2(msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut b = BytesMut::with_capacity(1 + prost::length_delimiter_len(len) + len);
    prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, &mut b);
    prost::encoding::encode_varint(len as u64, &mut b);
    msg.encode(&mut b).expect("capacity reserved");
    b.freeze()
}

/// Length of a length-delimited field with a one-byte key.
fn field_len(len: usize) -> usize {
    1 + prost::length_delimiter_len(len) + len
}

/// Appends a length-delimited field `tag` (< 16) holding `bytes`, unless empty (as prost does).
fn put_field(b: &mut BytesMut, tag: u32, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, b);
    prost::encoding::encode_varint(bytes.len() as u64, b);
    b.put_slice(bytes);
}

/// Frames `value` (a message of `type_url`) as a delta `Resource` of `name` at `version` (with
/// `name` as its one alias when `alias`), fields in tag order, in one buffer the SotW `Any` and the
/// value are slices of. `value` `None`: a `Resource` without a body.
fn build(
    name: Arc<str>,
    version: u64,
    type_url: &str,
    value: Option<&[u8]>,
    alias: bool,
) -> Arc<Encoded> {
    let v = format!("{version:016x}");
    let (value_len, any_len) = match value {
        Some(value) => {
            let value_len = if value.is_empty() {
                0
            } else {
                field_len(value.len())
            };
            (value_len, field_len(type_url.len()) + value_len)
        }
        None => (0, 0),
    };
    let res_len = field_len(v.len())
        + if value.is_some() {
            field_len(any_len)
        } else {
            0
        }
        + if name.is_empty() {
            0
        } else {
            field_len(name.len())
        }
        + if alias { field_len(name.len()) } else { 0 };
    let mut b = BytesMut::with_capacity(field_len(res_len));
    prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, &mut b);
    prost::encoding::encode_varint(res_len as u64, &mut b);
    put_field(&mut b, 1, v.as_bytes());
    let mut sotw = None;
    let mut body = 0..0;
    if let Some(value) = value {
        let start = b.len();
        prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, &mut b);
        prost::encoding::encode_varint(any_len as u64, &mut b);
        put_field(&mut b, 1, type_url.as_bytes());
        let value_start = b.len() + value_len - value.len();
        put_field(&mut b, 2, value);
        sotw = Some(start..b.len());
        body = value_start..b.len();
    }
    put_field(&mut b, 3, name.as_bytes());
    if alias {
        put_field(&mut b, 4, name.as_bytes());
    }
    debug_assert_eq!(b.len(), field_len(res_len));
    let delta = b.freeze();
    Arc::new(Encoded {
        name,
        version,
        // An absent body is an empty `Any` in SotW (VHDS, which has no SotW form, is the only one).
        sotw: sotw.map_or_else(|| Bytes::from_static(&[0x12, 0]), |r| delta.slice(r)),
        value: delta.slice(body),
        delta,
    })
}

impl Encoded {
    /// Encodes `msg`; the version hashes the bytes.
    pub fn new<M: Message + Name>(name: Arc<str>, msg: &M) -> Arc<Encoded> {
        Self::from_encoded::<M>(name, msg.encode_to_vec())
    }

    /// A resource of type `M` already encoded (`value`), versioned by its content like
    /// [`Encoded::new`].
    pub fn from_encoded<M: Name>(name: Arc<str>, value: Vec<u8>) -> Arc<Encoded> {
        let mut h = Xxh3::new();
        h.update(TRANSLATOR_SALT);
        h.update(&value);
        build(name, h.digest(), &M::type_url(), Some(&value), false)
    }

    /// A VHDS resource answering `name` (`<route config>/<host>`): the virtual host, with the
    /// requested name as its alias so Envoy resumes the paused request, or no body when the host
    /// is unknown (Envoy then answers 404 instead of waiting).
    pub fn vhds(name: Arc<str>, vhost: Option<&VirtualHost>) -> Arc<Encoded> {
        let value = vhost.map(|v| v.encode_to_vec());
        let mut h = Xxh3::new();
        h.update(TRANSLATOR_SALT);
        h.update(name.as_bytes());
        h.update(value.as_deref().unwrap_or(b"absent"));
        let version = h.digest();
        build(
            name,
            version,
            &VirtualHost::type_url(),
            value.as_deref(),
            true,
        )
    }

    /// Encodes `msg` with an explicit version (for messages whose encoding is not canonical).
    pub fn with_version<M: Message + Name>(name: Arc<str>, msg: &M, version: u64) -> Arc<Encoded> {
        build(
            name,
            version,
            &M::type_url(),
            Some(&msg.encode_to_vec()),
            false,
        )
    }

    /// The version as sent on the wire.
    pub fn version_string(&self) -> String {
        format!("{:016x}", self.version)
    }
}

/// A shared, encoded resource.
pub type Res = Arc<Encoded>;

/// A content version from canonical parts (for resources whose encoding is not canonical).
pub(crate) fn content_version(parts: &[&[u8]]) -> u64 {
    let mut h = Xxh3::new();
    h.update(TRANSLATOR_SALT);
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::service::discovery::v3::Resource;
    use envoy_types::pb::google::protobuf::Any;

    /// The one-buffer framing is byte for byte prost's, for both protocols, and its slices are the
    /// message and its `Any`.
    #[test]
    fn one_buffer_framing_is_prosts() {
        let c = Cluster {
            name: "OUTBOUND|default|echo".into(),
            ..Default::default()
        };
        for (name, msg) in [
            ("OUTBOUND|default|echo", c.clone()),
            ("", Cluster::default()),
        ] {
            let e = Encoded::new(Arc::from(name), &msg);
            let any = Any {
                type_url: Cluster::type_url(),
                value: msg.encode_to_vec(),
            };
            assert_eq!(&e.value[..], &any.value[..]);
            assert_eq!(e.sotw, field2(&any));
            let r = Resource {
                name: name.into(),
                version: e.version_string(),
                resource: Some(any),
                ..Default::default()
            };
            assert_eq!(e.delta, field2(&r), "{name:?}");
        }
        let vh = VirtualHost {
            name: "echo".into(),
            domains: vec!["echo".into()],
            ..Default::default()
        };
        for host in [Some(&vh), None] {
            let name = "polaris-on-demand-router/echo";
            let e = Encoded::vhds(Arc::from(name), host);
            let any = host.map(|v| Any {
                type_url: VirtualHost::type_url(),
                value: v.encode_to_vec(),
            });
            let r = Resource {
                name: name.into(),
                aliases: vec![name.into()],
                version: e.version_string(),
                resource: any.clone(),
                ..Default::default()
            };
            assert_eq!(e.delta, field2(&r));
            assert_eq!(e.sotw, field2(&any.unwrap_or_default()));
        }
    }
}
