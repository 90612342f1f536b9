//! Encoded resources: each encoded once per content, framed for both protocols, shared by `Arc`.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use envoy_types::pb::envoy::config::route::v3::VirtualHost;
use envoy_types::pb::envoy::service::discovery::v3::Resource;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use xxhash_rust::xxh3::Xxh3;

use super::super::resources::TRANSLATOR_SALT;

/// One encoded resource.
#[derive(Debug)]
pub struct Encoded {
    /// Resource name.
    pub name: Arc<str>,
    /// Content hash.
    pub version: u64,
    /// The encoded message.
    pub any: Any,
    /// The resource framed as field 2 of a `DiscoveryResponse` (an `Any`).
    pub sotw: Bytes,
    /// The resource framed as field 2 of a `DeltaDiscoveryResponse` (a `Resource`).
    pub delta: Bytes,
}

/// `msg` as a length-delimited field 2.
fn field2(msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut b = BytesMut::with_capacity(1 + prost::length_delimiter_len(len) + len);
    prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, &mut b);
    prost::encoding::encode_varint(len as u64, &mut b);
    msg.encode(&mut b).expect("capacity reserved");
    b.freeze()
}

fn build(name: Arc<str>, version: u64, any: Any) -> Arc<Encoded> {
    let resource = Resource {
        name: name.to_string(),
        version: format!("{version:016x}"),
        resource: Some(any),
        ..Default::default()
    };
    let delta = field2(&resource);
    let any = resource.resource.expect("set above");
    Arc::new(Encoded {
        name,
        version,
        sotw: field2(&any),
        delta,
        any,
    })
}

impl Encoded {
    /// Encodes `msg`; the version hashes the bytes.
    pub fn new<M: Message + Name>(name: Arc<str>, msg: &M) -> Arc<Encoded> {
        let value = msg.encode_to_vec();
        let mut h = Xxh3::new();
        h.update(TRANSLATOR_SALT);
        h.update(&value);
        build(
            name,
            h.digest(),
            Any {
                type_url: M::type_url(),
                value,
            },
        )
    }

    /// A resource of type `M` already encoded (`value`), versioned by its content like
    /// [`Encoded::new`].
    pub fn from_encoded<M: Name>(name: Arc<str>, value: Vec<u8>) -> Arc<Encoded> {
        let mut h = Xxh3::new();
        h.update(TRANSLATOR_SALT);
        h.update(&value);
        build(
            name,
            h.digest(),
            Any {
                type_url: M::type_url(),
                value,
            },
        )
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
        let any = value.map(|value| Any {
            type_url: VirtualHost::type_url(),
            value,
        });
        let resource = Resource {
            name: name.to_string(),
            aliases: vec![name.to_string()],
            version: format!("{version:016x}"),
            resource: any.clone(),
            ..Default::default()
        };
        let any = any.unwrap_or_default();
        Arc::new(Encoded {
            name,
            version,
            sotw: field2(&any),
            delta: field2(&resource),
            any,
        })
    }

    /// Encodes `msg` with an explicit version (for messages whose encoding is not canonical).
    pub fn with_version<M: Message + Name>(name: Arc<str>, msg: &M, version: u64) -> Arc<Encoded> {
        build(
            name,
            version,
            Any {
                type_url: M::type_url(),
                value: msg.encode_to_vec(),
            },
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
