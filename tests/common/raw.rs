//! A raw gRPC client on HTTP/2 (the `h2` crate), for requests a well-behaved client never sends:
//! garbage bodies, compressed flags, oversized length prefixes, wrong content types.

use bytes::{Buf, Bytes, BytesMut};
use h2::client::SendRequest;
use prost::Message;
use std::time::Duration;

pub const SOTW: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
pub const DELTA: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
pub const SDS_SOTW: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
pub const SDS_DELTA: &str = "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets";

/// One HTTP/2 connection.
pub struct RawConn {
    send: SendRequest<Bytes>,
}

/// One stream on it.
pub struct RawStream {
    send: h2::SendStream<Bytes>,
    resp: Option<h2::client::ResponseFuture>,
    recv: Option<h2::RecvStream>,
    buf: BytesMut,
    /// HTTP status of the response.
    pub http_status: Option<u16>,
}

/// How a stream ended: its gRPC status code and message.
#[derive(Debug, PartialEq, Eq)]
pub struct Ended {
    pub code: i32,
    pub message: String,
}

/// The 5-byte gRPC frame header and `body`.
pub fn frame(compressed: bool, body: &[u8]) -> Vec<u8> {
    let mut out = vec![u8::from(compressed)];
    out.extend((body.len() as u32).to_be_bytes());
    out.extend(body);
    out
}

impl RawConn {
    pub fn from_parts(send: SendRequest<Bytes>) -> RawConn {
        RawConn { send }
    }

    /// Opens a stream, or `None` if the connection no longer takes one.
    pub async fn try_stream(&mut self, path: &str, content_type: &str) -> Option<RawStream> {
        self.try_stream_with(path, content_type, &[]).await
    }

    /// [`RawConn::try_stream`] with extra headers (gRPC metadata).
    pub async fn try_stream_with(
        &mut self,
        path: &str,
        content_type: &str,
        headers: &[(&str, &str)],
    ) -> Option<RawStream> {
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("http://localhost{path}"))
            .header("content-type", content_type)
            .header("te", "trailers");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(()).unwrap();
        let mut send = self.send.clone().ready().await.ok()?;
        let (resp, stream) = send.send_request(req, false).ok()?;
        Some(RawStream {
            send: stream,
            resp: Some(resp),
            recv: None,
            buf: BytesMut::new(),
            http_status: None,
        })
    }

    /// An HTTP/2 connection over a Unix socket.
    pub async fn unix(path: &std::path::Path) -> RawConn {
        let s = tokio::net::UnixStream::connect(path).await.unwrap();
        let (send, conn) = h2::client::handshake(s).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        RawConn { send }
    }

    /// An HTTP/2 connection over TLS with `cfg` (which must offer ALPN `h2`), or the handshake's
    /// error.
    pub async fn tls(
        port: u16,
        cfg: std::sync::Arc<rustls::ClientConfig>,
    ) -> Result<RawConn, String> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let (send, conn) = h2::client::handshake(tls)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(RawConn { send })
    }

    /// An HTTP/2 connection in plaintext, or the handshake's error.
    pub async fn try_connect(port: u16) -> Result<RawConn, String> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let (send, conn) = h2::client::handshake(tcp)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(RawConn { send })
    }

    pub async fn connect(port: u16) -> RawConn {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (send, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        RawConn { send }
    }

    /// Opens a stream to `path` with `content_type`.
    pub async fn stream(&mut self, path: &str, content_type: &str) -> RawStream {
        self.try_stream(path, content_type)
            .await
            .expect("the connection takes a stream")
    }

    pub async fn grpc(&mut self, path: &str) -> RawStream {
        self.stream(path, "application/grpc").await
    }
}

impl RawStream {
    /// Sends bytes as they are.
    pub fn send_raw(&mut self, data: Vec<u8>) {
        self.send.reserve_capacity(data.len());
        self.send.send_data(Bytes::from(data), false).unwrap();
    }

    /// Sends bytes as they are, if the stream still takes them.
    pub fn try_send_raw(&mut self, data: Vec<u8>) {
        self.send.reserve_capacity(data.len());
        let _ = self.send.send_data(Bytes::from(data), false);
    }

    /// Sends one framed message.
    pub fn send_msg<M: Message>(&mut self, m: &M) {
        self.send_raw(frame(false, &m.encode_to_vec()));
    }

    async fn response(&mut self) -> Result<(), Ended> {
        if let Some(resp) = self.resp.take() {
            let r = resp.await.map_err(|e| Ended {
                code: -1,
                message: format!("stream reset: {e}"),
            })?;
            self.http_status = Some(r.status().as_u16());
            // A trailers-only response carries its status in the headers.
            if let Some(code) = r
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
            {
                let message = r
                    .headers()
                    .get("grpc-message")
                    .and_then(|v| v.to_str().ok())
                    .map(percent_decode)
                    .unwrap_or_default();
                return Err(Ended { code, message });
            }
            self.recv = Some(r.into_body());
        }
        Ok(())
    }

    /// The next message, or how the stream ended (within 5 s).
    pub async fn next<M: Message + Default>(&mut self) -> Result<M, Ended> {
        tokio::time::timeout(Duration::from_secs(5), self.next_inner())
            .await
            .expect("no message and no end within 5 s")
    }

    async fn next_inner<M: Message + Default>(&mut self) -> Result<M, Ended> {
        self.response().await?;
        let recv = self.recv.as_mut().expect("response received");
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    let body = self.buf.split_to(len);
                    return Ok(M::decode(body.freeze()).unwrap());
                }
            }
            match recv.data().await {
                Some(Ok(d)) => {
                    let _ = recv.flow_control().release_capacity(d.len());
                    self.buf.extend_from_slice(&d);
                }
                Some(Err(e)) => {
                    return Err(Ended {
                        code: -1,
                        message: format!("stream reset: {e}"),
                    })
                }
                None => {
                    let trailers = recv.trailers().await.ok().flatten().unwrap_or_default();
                    let code = trailers
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(-2);
                    let message = trailers
                        .get("grpc-message")
                        .and_then(|v| v.to_str().ok())
                        .map(percent_decode)
                        .unwrap_or_default();
                    return Err(Ended { code, message });
                }
            }
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A deterministic pseudo-random source (xorshift64*), so a failing fuzz run can be repeated.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}
