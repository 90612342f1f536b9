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
/// Like tonic's `Streaming`, but a large buffer (Envoy's first delta EDS request names every cluster)
/// is released once only small messages follow, instead of being kept for the stream's lifetime.
pub struct Requests<T> {
    body: Body,
    buf: BytesMut,
    done: bool,
    /// Small messages decoded since the last large one.
    small_streak: u8,
    _msg: PhantomData<fn() -> T>,
}

/// Buffer capacity kept between messages.
const KEEP_CAPACITY: usize = 4 << 10;

impl<T: Message + Default> Requests<T> {
    /// Reads `body`.
    pub fn new(body: Body) -> Self {
        Requests {
            body,
            buf: BytesMut::new(),
            done: false,
            small_streak: 0,
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
                return if self.buf.is_empty() {
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
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(status)) => return Err(status),
            }
        }
    }

    fn decode(&mut self) -> Result<Option<T>, Status> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err(Status::unimplemented(
                "compressed requests are not supported",
            ));
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_REQUEST {
            return Err(Status::resource_exhausted(format!(
                "request of {len} bytes exceeds the {MAX_REQUEST} byte limit"
            )));
        }
        if self.buf.len() < 5 + len {
            self.buf.reserve(5 + len - self.buf.len());
            return Ok(None);
        }
        let msg = T::decode(&self.buf[5..5 + len])
            .map_err(|e| Status::invalid_argument(format!("undecodable request: {e}")))?;
        let _ = self.buf.split_to(5 + len);
        // A large buffer is released once large messages stop coming (delta: after the first
        // subscriptions); SotW clients that repeat every name in each ACK keep theirs.
        self.small_streak = if len > KEEP_CAPACITY {
            0
        } else {
            self.small_streak.saturating_add(1)
        };
        if self.buf.is_empty() && self.buf.capacity() > KEEP_CAPACITY && self.small_streak >= 4 {
            self.buf = BytesMut::new();
        }
        Ok(Some(msg))
    }
}

/// One response, ready for the wire: the gRPC frame header and envelope, then shared parts.
#[derive(Debug)]
pub struct Msg {
    parts: Vec<Bytes>,
}

impl Msg {
    fn frame(envelope: Vec<u8>, shared: impl Iterator<Item = Bytes>) -> Msg {
        let shared: Vec<Bytes> = shared.collect();
        let len = envelope.len() + shared.iter().map(Bytes::len).sum::<usize>();
        let mut head = BytesMut::with_capacity(5 + envelope.len());
        head.put_u8(0);
        head.put_u32(len as u32);
        head.put_slice(&envelope);
        let mut parts = Vec::with_capacity(1 + shared.len());
        parts.push(head.freeze());
        parts.extend(shared);
        Msg { parts }
    }

    /// A SotW response: `resp` must not carry resources; `resources` follow as shared bytes.
    pub fn sotw(resp: &DiscoveryResponse, resources: &[Res]) -> Msg {
        debug_assert!(resp.resources.is_empty());
        Msg::frame(
            resp.encode_to_vec(),
            resources.iter().map(|r| r.sotw.clone()),
        )
    }

    /// A delta response: `resp` must not carry resources; `resources` follow as shared bytes.
    pub fn delta(resp: &DeltaDiscoveryResponse, resources: &[Res]) -> Msg {
        debug_assert!(resp.resources.is_empty());
        Msg::frame(
            resp.encode_to_vec(),
            resources.iter().map(|r| r.delta.clone()),
        )
    }

    /// Bytes on the wire (without HTTP/2 framing).
    pub fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }

    /// Whether the message is empty (never: it has a header).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sender of a stream's responses.
pub type Tx = mpsc::Sender<Result<Msg, Status>>;

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
            let (tx, rx) = mpsc::channel::<Result<Msg, Status>>(2);
            match path.as_str() {
                SOTW_PATH => {
                    let inbound = Requests::<DiscoveryRequest>::new(req.into_body());
                    ads.spawn_sotw(inbound, tx);
                }
                DELTA_PATH => {
                    let inbound = Requests::<DeltaDiscoveryRequest>::new(req.into_body());
                    ads.spawn_delta(inbound, tx);
                }
                _ => return Ok(Status::unimplemented(format!("{path} is not served")).into_http()),
            }
            let mut resp = http::Response::new(Body::new(ResponseBody::new(rx)));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            Ok(resp)
        })
    }
}

/// Streams the parts of each message, then the gRPC status as trailers.
struct ResponseBody {
    rx: mpsc::Receiver<Result<Msg, Status>>,
    pending: VecDeque<Bytes>,
    done: bool,
}

impl ResponseBody {
    fn new(rx: mpsc::Receiver<Result<Msg, Status>>) -> Self {
        ResponseBody {
            rx,
            pending: VecDeque::new(),
            done: false,
        }
    }
}

/// Parts at least this large go out as they are (zero copy).
const LARGE_PART: usize = 8 << 10;
/// Small parts are copied together into chunks of about this size.
const CHUNK: usize = 16 << 10;

impl ResponseBody {
    /// The next DATA chunk. Small resources are coalesced so a response of a thousand resources
    /// becomes a few dozen frames: HTTP/2 keeps a slot per queued frame and never shrinks its
    /// queue, so handing it one frame per resource would pin that memory per connection.
    fn next_chunk(&mut self) -> Option<Bytes> {
        let first = self.pending.pop_front()?;
        if first.len() >= LARGE_PART || self.pending.front().is_none_or(|n| n.len() >= LARGE_PART) {
            self.shrink();
            return Some(first);
        }
        let mut chunk = BytesMut::with_capacity(CHUNK + LARGE_PART);
        chunk.put_slice(&first);
        while chunk.len() < CHUNK {
            match self.pending.front() {
                Some(n) if n.len() < LARGE_PART => {
                    let n = self.pending.pop_front().expect("peeked");
                    chunk.put_slice(&n);
                }
                _ => break,
            }
        }
        self.shrink();
        Some(chunk.freeze())
    }

    fn shrink(&mut self) {
        if self.pending.is_empty() && self.pending.capacity() > 64 {
            self.pending = VecDeque::new();
        }
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
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(msg))) => {
                self.pending.extend(msg.parts);
                match self.next_chunk() {
                    Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                    None => Poll::Pending,
                }
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
