//! The SotW `DiscoveryRequest` as the server decodes it: every field as usual but
//! `resource_names`, kept as the bytes they came in.
//!
//! A SotW client repeats every name it holds in every ACK (1,000 load assignments: about 30 KB).
//! Decoded as a `Vec<String>` that is a thousand allocations per ACK, on every proxy, on every
//! change; yet nearly every ACK names exactly what the previous request did. Kept as one buffer,
//! the names are compared by a seeded hash of those bytes ([`SotwRequest::names_hash`]); only a
//! request whose names differ is split into strings ([`SotwRequest::names`]), which is also where
//! their UTF-8 is checked, so a bad name is refused as before.

use bytes::{Buf, BufMut};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::encoding::{self, DecodeContext, WireType};
use prost::DecodeError;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// `envoy.service.discovery.v3.DiscoveryRequest`, field numbers and all; `resource_locators` and
/// any unknown field are skipped, as the server never read them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SotwRequest {
    /// `version_info` (1).
    pub version_info: String,
    /// `node` (2).
    pub node: Option<Node>,
    /// `resource_names` (3): each name as on the wire, its length as a varint then its bytes.
    names_raw: Vec<u8>,
    /// How many names `names_raw` holds.
    names_count: usize,
    /// `type_url` (4).
    pub type_url: String,
    /// `response_nonce` (5).
    pub response_nonce: String,
    /// `error_detail` (6).
    pub error_detail: Option<RpcStatus>,
}

/// The hash's seed: random per process, so that no client can choose names that collide.
fn seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).expect("the OS random source");
        u64::from_le_bytes(b)
    })
}

impl SotwRequest {
    /// A request with these names (tests and clients).
    pub fn with_names<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Self {
        let mut r = SotwRequest::default();
        for n in names {
            r.push_name(n.as_ref().as_bytes());
        }
        r
    }

    fn push_name(&mut self, name: &[u8]) {
        encoding::encode_varint(name.len() as u64, &mut self.names_raw);
        self.names_raw.extend_from_slice(name);
        self.names_count += 1;
    }

    /// The number of names.
    pub fn names_len(&self) -> usize {
        self.names_count
    }

    /// A hash of the names in their order, as sent: equal lists hash equal; a different list
    /// hashes equal with probability 2^-64, and not by a client's choice (the seed is secret).
    /// Never 0, which stands for "no names seen yet".
    pub fn names_hash(&self) -> u64 {
        let h = xxh3_64_with_seed(&self.names_raw, seed()) ^ self.names_count as u64;
        h.max(1)
    }

    /// The names as strings; fails on a name that is not UTF-8 (a request prost would refuse).
    pub fn names(&self) -> Result<Vec<&str>, std::str::Utf8Error> {
        let mut out = Vec::with_capacity(self.names_count);
        let mut rest = &self.names_raw[..];
        while !rest.is_empty() {
            // Written by `push_name` or `merge_field`: a valid varint and that many bytes follow.
            let len = encoding::decode_varint(&mut rest).expect("our own varint") as usize;
            out.push(std::str::from_utf8(&rest[..len])?);
            rest = &rest[len..];
        }
        Ok(out)
    }
}

impl prost::Message for SotwRequest {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if !self.version_info.is_empty() {
            encoding::string::encode(1, &self.version_info, buf);
        }
        if let Some(n) = &self.node {
            encoding::message::encode(2, n, buf);
        }
        let mut rest = &self.names_raw[..];
        while !rest.is_empty() {
            let before = rest.len();
            let len = encoding::decode_varint(&mut rest).expect("our own varint") as usize;
            let prefix = before - rest.len();
            encoding::encode_key(3, WireType::LengthDelimited, buf);
            let start = self.names_raw.len() - before;
            buf.put_slice(&self.names_raw[start..start + prefix + len]);
            rest = &rest[len..];
        }
        if !self.type_url.is_empty() {
            encoding::string::encode(4, &self.type_url, buf);
        }
        if !self.response_nonce.is_empty() {
            encoding::string::encode(5, &self.response_nonce, buf);
        }
        if let Some(e) = &self.error_detail {
            encoding::message::encode(6, e, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => encoding::string::merge(wire_type, &mut self.version_info, buf, ctx),
            2 => encoding::message::merge(
                wire_type,
                self.node.get_or_insert_with(Default::default),
                buf,
                ctx,
            ),
            3 => {
                encoding::check_wire_type(WireType::LengthDelimited, wire_type)?;
                let len = encoding::decode_varint(buf)?;
                if len > buf.remaining() as u64 {
                    // The error prost's own decoders give; a hand-written message has no other
                    // way to build one (prost 0.14).
                    #[allow(deprecated)]
                    return Err(DecodeError::new("buffer underflow"));
                }
                let mut len = len as usize;
                encoding::encode_varint(len as u64, &mut self.names_raw);
                self.names_raw.reserve(len);
                while len > 0 {
                    let chunk = buf.chunk();
                    let n = chunk.len().min(len);
                    self.names_raw.extend_from_slice(&chunk[..n]);
                    buf.advance(n);
                    len -= n;
                }
                self.names_count += 1;
                Ok(())
            }
            4 => encoding::string::merge(wire_type, &mut self.type_url, buf, ctx),
            5 => encoding::string::merge(wire_type, &mut self.response_nonce, buf, ctx),
            6 => encoding::message::merge(
                wire_type,
                self.error_detail.get_or_insert_with(Default::default),
                buf,
                ctx,
            ),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let names = self.names_raw.len() + self.names_count * encoding::key_len(3);
        (if self.version_info.is_empty() {
            0
        } else {
            encoding::string::encoded_len(1, &self.version_info)
        }) + self
            .node
            .as_ref()
            .map_or(0, |n| encoding::message::encoded_len(2, n))
            + names
            + (if self.type_url.is_empty() {
                0
            } else {
                encoding::string::encoded_len(4, &self.type_url)
            })
            + (if self.response_nonce.is_empty() {
                0
            } else {
                encoding::string::encoded_len(5, &self.response_nonce)
            })
            + self
                .error_detail
                .as_ref()
                .map_or(0, |e| encoding::message::encoded_len(6, e))
    }

    fn clear(&mut self) {
        *self = SotwRequest::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use prost::Message;

    fn envoy(names: &[&str]) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: "v1".into(),
            node: Some(Node {
                id: "n".into(),
                ..Default::default()
            }),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            type_url: "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment".into(),
            response_nonce: "a".into(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: "bad".into(),
                details: vec![],
            }),
            ..Default::default()
        }
    }

    #[test]
    fn decodes_what_envoy_encodes_and_encodes_it_back_byte_for_byte() {
        let long = "x".repeat(300); // a two-byte length varint
        for names in [vec![], vec!["a"], vec!["b", "a", "", long.as_str(), "é"]] {
            let wire = envoy(&names).encode_to_vec();
            let r = SotwRequest::decode(&wire[..]).unwrap();
            assert_eq!(r.names().unwrap(), names);
            assert_eq!(r.names_len(), names.len());
            assert_eq!(r.version_info, "v1");
            assert_eq!(r.node.as_ref().unwrap().id, "n");
            assert_eq!(r.response_nonce, "a");
            assert_eq!(r.error_detail.as_ref().unwrap().message, "bad");
            assert!(r.type_url.ends_with("ClusterLoadAssignment"));
            assert_eq!(r.encode_to_vec(), wire);
            assert_eq!(r.encoded_len(), wire.len());
            assert_eq!(
                DiscoveryRequest::decode(&r.encode_to_vec()[..]).unwrap(),
                envoy(&names)
            );
        }
    }

    #[test]
    fn equal_lists_hash_equal_and_any_difference_shows() {
        let h = |n: &[&str]| SotwRequest::with_names(n.iter().copied()).names_hash();
        assert_eq!(h(&["a", "b"]), h(&["a", "b"]));
        assert_ne!(
            h(&["a", "b"]),
            h(&["b", "a"]),
            "order counts: the slow path sorts"
        );
        assert_ne!(h(&["ab"]), h(&["a", "b"]), "boundaries count");
        assert_ne!(h(&["a"]), h(&["a", ""]));
        assert_ne!(h(&[]), 0);
        // Everything else about the request does not change the names' hash.
        let a = SotwRequest::decode(&envoy(&["a", "b"]).encode_to_vec()[..]).unwrap();
        assert_eq!(a.names_hash(), h(&["a", "b"]));
    }

    #[test]
    fn a_name_that_is_not_utf8_is_refused_and_a_short_one_does_not_decode() {
        let mut wire = envoy(&["ok", "zz"]).encode_to_vec();
        let at = wire.windows(2).position(|w| w == b"zz").unwrap();
        wire[at] = 0xff;
        let r = SotwRequest::decode(&wire[..]).unwrap();
        assert!(r.names().is_err());
        // A name whose length runs past the message.
        let bad = [0x1a, 0x05, b'a'];
        assert!(SotwRequest::decode(&bad[..]).is_err());
    }
}
