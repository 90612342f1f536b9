//! The ADS gRPC service with zero-copy responses.
//!
//! tonic's generated server would clone every resource into each client's `DiscoveryResponse` and
//! encode it into a per-stream buffer that keeps the capacity of the largest response for the
//! stream's lifetime (hundreds of KiB per proxy after the initial sync). Instead, each resource is
//! encoded once, already framed as field 2 of a (Delta)DiscoveryResponse ([`Encoded::sotw`] /
//! [`Encoded::delta`]); a response is a small per-client envelope (version, nonce, type, removals)
//! followed by references to those shared bytes. Requests are decoded by [`Requests`], which does
//! not keep a large buffer for the stream's lifetime.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use http_body::Frame;
use prost::Message;
use std::marker::PhantomData;
use tokio::sync::mpsc;
use tonic::body::Body;
use tonic::Status;

use super::server::Ads;
use super::snapshot::Res;

const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// Largest request we decode.
const MAX_REQUEST: usize = 16 << 20;

/// The request side of a stream: gRPC messages decoded from the HTTP/2 body.
///
/// Like tonic's `Streaming`, but without a reassembly buffer: the body's chunks (slices of the
/// connection's read buffer) are kept as they come and a message is decoded straight from them.
/// Nothing stays allocated between messages, however large the last one was (Envoy's EDS requests
/// name every cluster: tens of KiB per request).
pub struct Requests<T> {
    body: Body,
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks`.
    buffered: usize,
    done: bool,
    _msg: PhantomData<fn() -> T>,
}

/// The first `remaining` bytes of a chunk list, consumed as they are read.
struct Chunks<'a> {
    chunks: &'a mut VecDeque<Bytes>,
    remaining: usize,
}

impl bytes::Buf for Chunks<'_> {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        match self.chunks.front() {
            Some(c) => &c[..c.len().min(self.remaining)],
            None => &[],
        }
    }

    fn advance(&mut self, mut n: usize) {
        assert!(n <= self.remaining, "advance past the message");
        self.remaining -= n;
        while n > 0 {
            let front = self.chunks.front_mut().expect("buffered bytes");
            if n < front.len() {
                bytes::Buf::advance(front, n);
                return;
            }
            n -= front.len();
            self.chunks.pop_front();
        }
    }
}

impl<T: Message + Default> Requests<T> {
    /// Reads `body`.
    pub fn new(body: Body) -> Self {
        Requests {
            body,
            chunks: VecDeque::new(),
            buffered: 0,
            done: false,
            _msg: PhantomData,
        }
    }

    /// The next message; `None` when the client half-closed the stream.
    pub async fn message(&mut self) -> Result<Option<T>, Status> {
        loop {
            if let Some(msg) = self.decode()? {
                return Ok(Some(msg));
            }
            if self.done {
                return if self.buffered == 0 {
                    Ok(None)
                } else {
                    Err(Status::invalid_argument("stream ended inside a message"))
                };
            }
            let frame = std::future::poll_fn(|cx| {
                http_body::Body::poll_frame(Pin::new(&mut self.body), cx)
            })
            .await;
            match frame {
                None => self.done = true,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            self.buffered += data.len();
                            self.chunks.push_back(data);
                        }
                    }
                }
                Some(Err(status)) => return Err(status),
            }
        }
    }

    fn decode(&mut self) -> Result<Option<T>, Status> {
        if self.buffered < 5 {
            return Ok(None);
        }
        let mut head = [0u8; 5];
        let mut at = 0;
        for c in &self.chunks {
            let n = c.len().min(5 - at);
            head[at..at + n].copy_from_slice(&c[..n]);
            at += n;
            if at == 5 {
                break;
            }
        }
        if head[0] != 0 {
            return Err(Status::unimplemented(
                "compressed requests are not supported",
            ));
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_REQUEST {
            return Err(Status::resource_exhausted(format!(
                "request of {len} bytes exceeds the {MAX_REQUEST} byte limit"
            )));
        }
        if self.buffered < 5 + len {
            return Ok(None);
        }
        let mut buf = Chunks {
            chunks: &mut self.chunks,
            remaining: 5 + len,
        };
        bytes::Buf::advance(&mut buf, 5);
        let msg = T::decode(&mut buf)
            .map_err(|e| Status::invalid_argument(format!("undecodable request: {e}")))?;
        debug_assert_eq!(buf.remaining, 0);
        self.buffered -= 5 + len;
        if self.chunks.is_empty() && self.chunks.capacity() > 8 {
            self.chunks = VecDeque::new();
        }
        Ok(Some(msg))
    }
}

/// One response, ready for the wire: the gRPC frame header and envelope, then the resources' shared
/// pre-framed bytes (8 bytes per resource until it is sent).
#[derive(Debug)]
pub struct Msg {
    head: Bytes,
    resources: Vec<Res>,
    delta: bool,
}

impl Msg {
    fn frame(envelope: Vec<u8>, resources: &[Res], delta: bool) -> Msg {
        let part = |r: &Res| if delta { r.delta.len() } else { r.sotw.len() };
        let len = envelope.len() + resources.iter().map(part).sum::<usize>();
        let mut head = BytesMut::with_capacity(5 + envelope.len());
        head.put_u8(0);
        head.put_u32(len as u32);
        head.put_slice(&envelope);
        Msg {
            head: head.freeze(),
            resources: resources.to_vec(),
            delta,
        }
    }

    /// A SotW response: `resp` must not carry resources; `resources` follow as shared bytes.
    pub fn sotw(resp: &DiscoveryResponse, resources: &[Res]) -> Msg {
        debug_assert!(resp.resources.is_empty());
        Msg::frame(resp.encode_to_vec(), resources, false)
    }

    /// A delta response: `resp` must not carry resources; `resources` follow as shared bytes.
    pub fn delta(resp: &DeltaDiscoveryResponse, resources: &[Res]) -> Msg {
        debug_assert!(resp.resources.is_empty());
        Msg::frame(resp.encode_to_vec(), resources, true)
    }

    /// Bytes on the wire (without HTTP/2 framing).
    pub fn len(&self) -> usize {
        self.head.len()
            + self
                .resources
                .iter()
                .map(|r| self.part(r).len())
                .sum::<usize>()
    }

    /// Whether the message is empty (never: it has a header).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn part<'a>(&self, r: &'a Res) -> &'a Bytes {
        if self.delta {
            &r.delta
        } else {
            &r.sotw
        }
    }
}

/// Sender of a stream's responses. A message is boxed: the channel allocates its slots in blocks
/// of 32 per stream, so the slot size is paid 32 times by every connected proxy.
pub type Tx = mpsc::Sender<Result<Box<Msg>, Box<Status>>>;

/// A stream's state machine: reads requests, queues responses on its [`Tx`]. Its response body
/// polls it, so a stream costs no task of its own and a push wakes one task less.
pub type Driver = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The ADS service for tonic's router.
#[derive(Clone)]
pub struct AdsService {
    ads: Ads,
}

impl AdsService {
    /// Wraps the stream logic.
    pub fn new(ads: Ads) -> Self {
        AdsService { ads }
    }
}

impl tonic::server::NamedService for AdsService {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl tower::Service<http::Request<Body>> for AdsService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let ads = self.ads.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let (tx, rx) = mpsc::channel::<Result<Box<Msg>, Box<Status>>>(2);
            let driver = match path.as_str() {
                SOTW_PATH => {
                    let inbound = Requests::<DiscoveryRequest>::new(req.into_body());
                    ads.sotw_stream(inbound, tx)
                }
                DELTA_PATH => {
                    let inbound = Requests::<DeltaDiscoveryRequest>::new(req.into_body());
                    ads.delta_stream(inbound, tx)
                }
                _ => return Ok(Status::unimplemented(format!("{path} is not served")).into_http()),
            };
            let mut resp = http::Response::new(Body::new(ResponseBody::new(rx, driver)));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            Ok(resp)
        })
    }
}

/// Drives the stream's state machine and streams the parts of each message it queues, then the
/// gRPC status as trailers.
///
/// hyper polls a body only while the stream has send capacity, so a client that reads slowly
/// stops its own state machine: snapshots it misses meanwhile coalesce in the `watch`, and its
/// requests wait in HTTP/2 flow control. Dropping the body (the connection is gone) drops the
/// state machine, which unregisters the stream.
struct ResponseBody {
    /// `None` once the state machine has finished (it then has dropped its sender).
    driver: Option<Driver>,
    rx: mpsc::Receiver<Result<Box<Msg>, Box<Status>>>,
    /// The message being sent and its next part: 0 is the head, `i` the resource `i - 1`.
    current: Option<(Box<Msg>, usize)>,
    done: bool,
}

impl ResponseBody {
    fn new(rx: mpsc::Receiver<Result<Box<Msg>, Box<Status>>>, driver: Driver) -> Self {
        ResponseBody {
            driver: Some(driver),
            rx,
            current: None,
            done: false,
        }
    }
}

/// Parts at least this large go out as they are (zero copy).
const LARGE_PART: usize = 8 << 10;
/// Small parts are copied together into chunks of about this size.
const CHUNK: usize = 16 << 10;

impl ResponseBody {
    /// The next part of the current message.
    fn peek(&self) -> Option<&Bytes> {
        let (msg, i) = self.current.as_ref()?;
        match i {
            0 => Some(&msg.head),
            i => msg.resources.get(i - 1).map(|r| msg.part(r)),
        }
    }

    fn take(&mut self) -> Option<Bytes> {
        let part = self.peek()?.clone();
        let (msg, i) = self.current.as_mut().expect("peeked");
        *i += 1;
        if *i > msg.resources.len() {
            self.current = None;
        }
        Some(part)
    }

    /// The next DATA chunk. Small resources are coalesced so a response of a thousand resources
    /// becomes a few dozen frames: HTTP/2 keeps a slot per queued frame and never shrinks its
    /// queue, so handing it one frame per resource would pin that memory per connection.
    fn next_chunk(&mut self) -> Option<Bytes> {
        let first = self.take()?;
        if first.len() >= LARGE_PART || self.peek().is_none_or(|n| n.len() >= LARGE_PART) {
            return Some(first);
        }
        let mut chunk = BytesMut::with_capacity(CHUNK + LARGE_PART);
        chunk.put_slice(&first);
        while chunk.len() < CHUNK && self.peek().is_some_and(|n| n.len() < LARGE_PART) {
            let n = self.take().expect("peeked");
            chunk.put_slice(&n);
        }
        Some(chunk.freeze())
    }
}

fn trailers(status: &Status) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    if status.add_header(&mut h).is_err() {
        h.insert("grpc-status", http::HeaderValue::from_static("13"));
    }
    h
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(b) = self.next_chunk() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(driver) = self.driver.as_mut() {
            if driver.as_mut().poll(cx).is_ready() {
                self.driver = None;
            }
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(msg))) => {
                self.current = Some((msg, 0));
                let head = self.next_chunk().expect("a message has a head");
                Poll::Ready(Some(Ok(Frame::data(head))))
            }
            Poll::Ready(Some(Err(status))) => {
                self.done = true;
                Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(Some(Ok(Frame::trailers(trailers(&Status::ok(""))))))
            }
        }
    }
}

/// Data the server buffers per stream ahead of what the socket takes. HTTP/2 lets a client open
/// windows of hundreds of MiB; without a bound, a client that reads slowly during its initial
/// sync would have the whole world queued for it in the server's memory.
pub const SEND_BUFFER: usize = 32 << 10;
/// HTTP/2 PING interval on idle connections (detects dead peers behind NATs and proxies).
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves ADS over HTTP/2 (prior knowledge, as gRPC clients speak it) on `listener` until `stop`
/// turns true; then asks every connection to go away and waits for them to close.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: AdsService,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE)
        .max_send_buf_size(SEND_BUFFER);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "xDS accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let svc = service.clone();
        let hyper_svc =
            hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let mut svc = svc.clone();
                tower::Service::call(&mut svc, req.map(Body::new))
            });
        let conn = http2.serve_connection(TokioIo::new(tcp), hyper_svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(peer = %peer, error = %e, "xDS connection ended");
            }
        });
    }
    graceful.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::Node;

    fn framed(msg: &DiscoveryRequest) -> Vec<u8> {
        let body = msg.encode_to_vec();
        let mut out = vec![0];
        out.extend((body.len() as u32).to_be_bytes());
        out.extend(body);
        out
    }

    fn body_of(chunks: Vec<Vec<u8>>) -> Body {
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, Status>(Frame::data(Bytes::from(c))));
        Body::new(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )))
    }

    fn request(i: usize, names: usize) -> DiscoveryRequest {
        DiscoveryRequest {
            node: Some(Node {
                id: format!("node-{i}"),
                ..Default::default()
            }),
            resource_names: (0..names)
                .map(|n| format!("OUTBOUND|default|svc-{n}"))
                .collect(),
            response_nonce: format!("{i:x}"),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn messages_are_decoded_across_any_chunk_boundaries() {
        let msgs: Vec<DiscoveryRequest> = (0..5).map(|i| request(i, i * 300)).collect();
        let wire: Vec<u8> = msgs.iter().flat_map(framed).collect();
        for size in [1, 2, 5, 7, 64, 1000, 16384, wire.len()] {
            let chunks: Vec<Vec<u8>> = wire.chunks(size).map(<[u8]>::to_vec).collect();
            let mut reqs = Requests::<DiscoveryRequest>::new(body_of(chunks));
            for m in &msgs {
                assert_eq!(
                    reqs.message().await.unwrap().as_ref(),
                    Some(m),
                    "chunk size {size}"
                );
            }
            assert_eq!(reqs.message().await.unwrap(), None);
            assert!(reqs.chunks.is_empty() && reqs.buffered == 0);
        }
    }

    #[tokio::test]
    async fn truncated_compressed_and_oversized_messages_are_errors() {
        let mut wire = framed(&request(1, 10));
        wire.truncate(wire.len() - 1);
        let mut reqs = Requests::<DiscoveryRequest>::new(body_of(vec![wire]));
        let e = reqs.message().await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);

        let mut wire = framed(&request(1, 1));
        wire[0] = 1;
        let mut reqs = Requests::<DiscoveryRequest>::new(body_of(vec![wire]));
        assert_eq!(
            reqs.message().await.unwrap_err().code(),
            tonic::Code::Unimplemented
        );

        let mut wire = vec![0];
        wire.extend(((MAX_REQUEST + 1) as u32).to_be_bytes());
        let mut reqs = Requests::<DiscoveryRequest>::new(body_of(vec![wire]));
        assert_eq!(
            reqs.message().await.unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );

        let mut wire = vec![0];
        wire.extend(3u32.to_be_bytes());
        wire.extend([0xff, 0xff, 0xff]);
        let mut reqs = Requests::<DiscoveryRequest>::new(body_of(vec![wire]));
        assert_eq!(
            reqs.message().await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
