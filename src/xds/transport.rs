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

use super::server::{Ads, SotwRequest};
use super::snapshot::Res;
use crate::metrics::{Metrics, RequestError};
use crate::net::Acceptor;

const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// SDS on its own service (how Envoy reaches an SDS server that is not its ADS server): the same
/// messages, served by the same engine.
const SDS_SOTW_PATH: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
const SDS_DELTA_PATH: &str = "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets";

/// Bounds on what clients send, shared by every stream.
///
/// Memory for requests is bounded twice: a request larger than `max_request` ends its stream
/// before its body is read, and the bytes of requests being received and decoded at once, across
/// all streams, stay within `budget`: a stream reads the rest of a message only once it holds
/// budget for all of it, so past the budget new reads wait, and HTTP/2 flow control stops the
/// senders (each connection can have at most its receive window, [`RECV_WINDOW`], unread in the
/// server). A message must arrive whole within `deadline` of its first bytes, so a sender that
/// stalls cannot keep budget for ever.
#[derive(Debug)]
pub struct RequestLimits {
    /// Largest request decoded.
    pub max_request: usize,
    budget: std::sync::Arc<tokio::sync::Semaphore>,
    budget_bytes: usize,
    /// Time for a started message to arrive whole.
    pub deadline: std::time::Duration,
    metrics: std::sync::Arc<Metrics>,
}

impl RequestLimits {
    /// Limits with `budget` bytes decoded at once.
    pub fn new(
        max_request: usize,
        budget: usize,
        deadline: std::time::Duration,
        metrics: std::sync::Arc<Metrics>,
    ) -> Self {
        RequestLimits {
            max_request,
            budget: std::sync::Arc::new(tokio::sync::Semaphore::new(budget)),
            budget_bytes: budget,
            deadline,
            metrics,
        }
    }

    /// Bytes of the budget in use now.
    pub fn budget_in_use(&self) -> usize {
        self.budget_bytes - self.budget.available_permits()
    }
}

/// Why a stream's requests could not be read.
#[derive(Debug)]
pub struct ReadError {
    /// The status the stream ends with.
    pub status: Status,
    /// What was wrong with the request, if it was the request (not, say, a reset connection).
    pub kind: Option<RequestError>,
}

impl ReadError {
    fn request(kind: RequestError, status: Status) -> Self {
        ReadError {
            status,
            kind: Some(kind),
        }
    }
}

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
    limits: std::sync::Arc<RequestLimits>,
    /// Budget held for the message being received (and, once delivered, until the next call).
    held: Option<tokio::sync::OwnedSemaphorePermit>,
    /// A message was returned: its budget goes back at the next call (it has been handled).
    delivered: bool,
    /// When the first bytes of the message being received arrived.
    started: Option<tokio::time::Instant>,
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

/// A request message of an xDS stream.
pub trait RequestMessage: Message + Default {
    /// Its protobuf name, for errors.
    const NAME: &'static str;
}

impl RequestMessage for DiscoveryRequest {
    const NAME: &'static str = "DiscoveryRequest";
}

impl RequestMessage for DeltaDiscoveryRequest {
    const NAME: &'static str = "DeltaDiscoveryRequest";
}

impl RequestMessage for SotwRequest {
    const NAME: &'static str = "DiscoveryRequest";
}

impl<T: RequestMessage> Requests<T> {
    /// Reads `body` within `limits`.
    pub fn new(body: Body, limits: std::sync::Arc<RequestLimits>) -> Self {
        Requests {
            body,
            chunks: VecDeque::new(),
            buffered: 0,
            done: false,
            limits,
            held: None,
            delivered: false,
            started: None,
            _msg: PhantomData,
        }
    }

    fn fail(&self, kind: RequestError, status: Status) -> ReadError {
        self.limits.metrics.xds_request_error(kind);
        ReadError::request(kind, status)
    }

    /// The next message; `None` when the client half-closed the stream.
    pub async fn message(&mut self) -> Result<Option<T>, ReadError> {
        if self.delivered {
            self.held = None;
            self.delivered = false;
        }
        loop {
            if let Some(msg) = self.decode()? {
                self.delivered = true;
                self.started = None;
                return Ok(Some(msg));
            }
            if self.done {
                return if self.buffered == 0 {
                    Ok(None)
                } else {
                    Err(self.fail(
                        RequestError::Truncated,
                        Status::invalid_argument(format!(
                            "the stream ended inside a request ({} bytes of it received)",
                            self.buffered
                        )),
                    ))
                };
            }
            if let Some(len) = self.pending_len() {
                self.reserve(len).await;
            }
            // The deadline runs once the budget is held: waiting for it is not the sender's fault.
            let mut deadline = None;
            if self.buffered > 0 {
                let started = *self.started.get_or_insert_with(tokio::time::Instant::now);
                deadline = Some(started + self.limits.deadline);
            }
            let read = std::future::poll_fn(|cx| {
                http_body::Body::poll_frame(Pin::new(&mut self.body), cx)
            });
            let frame = match deadline {
                None => read.await,
                Some(at) => match tokio::time::timeout_at(at, read).await {
                    Ok(f) => f,
                    Err(_) => {
                        return Err(self.fail(
                            RequestError::Truncated,
                            Status::deadline_exceeded(format!(
                                "a request did not arrive whole within {} ms of its first bytes ({} bytes received)",
                                self.limits.deadline.as_millis(),
                                self.buffered
                            )),
                        ))
                    }
                },
            };
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
                Some(Err(status)) => return Err(ReadError { status, kind: None }),
            }
        }
    }

    /// The framed length of the message being received, once its header is in.
    fn pending_len(&self) -> Option<usize> {
        (self.buffered >= 5).then(|| 5 + self.header().1)
    }

    /// Holds budget for a message of `len` framed bytes before reading more of it. Messages that
    /// are already complete are decoded without waiting.
    async fn reserve(&mut self, len: usize) {
        if self.held.is_some() || self.buffered >= len {
            return;
        }
        let n = len.min(self.limits.budget_bytes) as u32;
        let budget = self.limits.budget.clone();
        self.held = Some(match budget.clone().try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(_) => {
                self.limits.metrics.xds_decode_waits.inc();
                budget
                    .acquire_many_owned(n)
                    .await
                    .expect("the budget is never closed")
            }
        });
    }

    /// The compressed flag and length of the message at the front.
    fn header(&self) -> (u8, usize) {
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
        (
            head[0],
            u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize,
        )
    }

    fn decode(&mut self) -> Result<Option<T>, ReadError> {
        if self.buffered < 5 {
            return Ok(None);
        }
        let (flag, len) = self.header();
        if flag != 0 {
            return Err(self.fail(
                RequestError::Compressed,
                Status::unimplemented(
                    "compressed requests are not supported (no grpc-encoding is accepted)",
                ),
            ));
        }
        let max = self.limits.max_request;
        if len > max {
            return Err(self.fail(
                RequestError::TooLarge,
                Status::resource_exhausted(format!(
                    "request of {len} bytes exceeds the limit of {max} bytes (xdsMaxRequestBytes)"
                )),
            ));
        }
        if self.buffered < 5 + len {
            return Ok(None);
        }
        let mut buf = Chunks {
            chunks: &mut self.chunks,
            remaining: 5 + len,
        };
        bytes::Buf::advance(&mut buf, 5);
        // Decoded from one slice: prost's varint and field loops take their fast paths there,
        // where across chunks every field pays for the chunk bookkeeping (a SotW ACK naming a
        // thousand resources spans several HTTP/2 frames). A message split over chunks is copied
        // once into a buffer freed right after.
        let msg = if bytes::Buf::chunk(&buf).len() >= len {
            let m = T::decode(&bytes::Buf::chunk(&buf)[..len]);
            bytes::Buf::advance(&mut buf, len);
            m
        } else {
            let mut whole = vec![0; len];
            bytes::Buf::copy_to_slice(&mut buf, &mut whole);
            T::decode(&whole[..])
        };
        let msg = msg.map_err(|e| {
            ReadError::request(
                RequestError::Undecodable,
                Status::invalid_argument(format!(
                    "request of {len} bytes is not a {}: {e}",
                    T::NAME
                )),
            )
        });
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                self.limits
                    .metrics
                    .xds_request_error(RequestError::Undecodable);
                return Err(e);
            }
        };
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

/// The ADS service: gRPC framing around the stream logic.
#[derive(Clone)]
pub struct AdsService {
    ads: Ads,
    limits: std::sync::Arc<RequestLimits>,
}

impl AdsService {
    /// Wraps the stream logic; requests are read within `limits`.
    pub fn new(ads: Ads, limits: std::sync::Arc<RequestLimits>) -> Self {
        AdsService { ads, limits }
    }

    /// The identity in a connection's verified client certificate chain, when streams are
    /// authenticated.
    fn client_identity(
        &self,
        chain: &[rustls_pki_types::CertificateDer<'_>],
    ) -> Option<crate::ca::sign::Identity> {
        self.ads.auth.as_ref()?.certificate_identity(chain)
    }
}

/// The client's address, put in each request's extensions by [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub crate::net::Peer);

/// The identity of the connection's verified client certificate, put in each request's
/// extensions by [`serve`] (TLS with a client certificate only).
#[derive(Debug, Clone)]
pub struct ClientIdentity(pub crate::ca::sign::Identity);

fn plain_response(status: http::StatusCode, text: &'static str) -> http::Response<Body> {
    let mut resp = http::Response::new(Body::new(http_body_util::Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *resp.status_mut() = status;
    resp
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
        let limits = self.limits.clone();
        Box::pin(async move {
            // gRPC's HTTP/2 mapping: POST with a content type of application/grpc[+proto].
            if req.method() != http::Method::POST {
                return Ok(plain_response(
                    http::StatusCode::METHOD_NOT_ALLOWED,
                    "gRPC requests use POST\n",
                ));
            }
            let grpc = req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/grpc"));
            if !grpc {
                return Ok(plain_response(
                    http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "content-type must be application/grpc\n",
                ));
            }
            let path = req.uri().path().to_string();
            let peer = req.extensions().get::<PeerAddr>().map(|p| p.0);
            let caller = match &ads.auth {
                None => None,
                Some(auth) => {
                    let cert = req
                        .extensions()
                        .get::<ClientIdentity>()
                        .map(|c| c.0.clone());
                    let bearer = req
                        .headers()
                        .get(http::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .map(str::trim);
                    match auth.authenticate(cert, bearer).await {
                        Ok(c) => Some(c),
                        Err(status) => {
                            ads.auth_refused(peer, &status);
                            return Ok(status.into_http());
                        }
                    }
                }
            };
            let (tx, rx) = mpsc::channel::<Result<Box<Msg>, Box<Status>>>(2);
            let driver = match path.as_str() {
                SOTW_PATH | SDS_SOTW_PATH => {
                    let inbound = Requests::<SotwRequest>::new(req.into_body(), limits);
                    ads.sotw_stream(inbound, tx, peer, caller)
                }
                DELTA_PATH | SDS_DELTA_PATH => {
                    let inbound = Requests::<DeltaDiscoveryRequest>::new(req.into_body(), limits);
                    ads.delta_stream(inbound, tx, peer, caller)
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
/// How long a keepalive PING may go unanswered before the connection is closed. hyper's 20 s
/// default counts the time this server takes to read the answer: when ten thousand proxies sync at
/// once after a restart, a busy server read PONGs late and closed healthy connections, which then
/// reconnected into the same herd. A dead peer is still found within 30 + 60 s.
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Receive window of each stream and of each connection: what a client can have sent that the
/// server has not read yet. The HTTP/2 default; a request larger than this (Envoy's EDS
/// subscription naming every cluster of a big mesh) simply takes a few more round trips.
pub const RECV_WINDOW: u32 = 65_535;
/// Concurrent streams a client may open on one connection (Envoy and gRPC open one for ADS).
const MAX_STREAMS: u32 = 100;

/// Serves ADS over HTTP/2 (prior knowledge, as gRPC clients speak it) on `acceptor` until `stop`
/// turns true; then asks every connection to go away and waits for them to close.
pub async fn serve(
    acceptor: Acceptor,
    service: AdsService,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .max_send_buf_size(SEND_BUFFER)
        .initial_stream_window_size(RECV_WINDOW)
        .initial_connection_window_size(RECV_WINDOW)
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(16 << 10);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer, slot) = tokio::select! {
            biased;
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            accepted = acceptor.accept() => accepted,
        };
        let (svc, http2, watcher) = (service.clone(), http2.clone(), graceful.watcher());
        acceptor.spawn(stream, peer, slot, move |io, first| {
            let client = io
                .peer_certificates()
                .and_then(|chain| svc.client_identity(chain))
                .map(ClientIdentity);
            let hyper_svc =
                hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                    first.seen();
                    req.extensions_mut().insert(PeerAddr(peer));
                    if let Some(c) = &client {
                        req.extensions_mut().insert(c.clone());
                    }
                    let mut svc = svc.clone();
                    tower::Service::call(&mut svc, req.map(Body::new))
                });
            // A combinator, not an `async` block, which would hold the connection twice.
            futures::FutureExt::map(
                watcher.watch(http2.serve_connection(TokioIo::new(io), hyper_svc)),
                move |r| {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "xDS connection ended");
                    }
                },
            )
        });
    }
    graceful.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use std::sync::Arc;
    use std::time::Duration;

    const MAX: usize = 4 << 20;

    fn limits(budget: usize) -> Arc<RequestLimits> {
        Arc::new(RequestLimits::new(
            MAX,
            budget,
            Duration::from_secs(10),
            Arc::new(Metrics::default()),
        ))
    }

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

    /// A body fed by the test, chunk by chunk; it stays open until the sender is dropped.
    fn channel_body() -> (mpsc::UnboundedSender<Vec<u8>>, Body) {
        let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let frames = futures::StreamExt::map(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
            |c| Ok::<_, Status>(Frame::data(Bytes::from(c))),
        );
        (tx, Body::new(http_body_util::StreamBody::new(frames)))
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

    fn code(r: Result<Option<DiscoveryRequest>, ReadError>) -> (tonic::Code, Option<RequestError>) {
        let e = r.unwrap_err();
        (e.status.code(), e.kind)
    }

    #[tokio::test]
    async fn messages_are_decoded_across_any_chunk_boundaries() {
        let msgs: Vec<DiscoveryRequest> = (0..5).map(|i| request(i, i * 300)).collect();
        let wire: Vec<u8> = msgs.iter().flat_map(framed).collect();
        for size in [1, 2, 5, 7, 64, 1000, 16384, wire.len()] {
            let chunks: Vec<Vec<u8>> = wire.chunks(size).map(<[u8]>::to_vec).collect();
            let mut reqs = Requests::<DiscoveryRequest>::new(body_of(chunks), limits(64 << 20));
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
    async fn truncated_compressed_oversized_and_undecodable_messages_say_what_was_wrong() {
        let l = limits(64 << 20);
        let mut wire = framed(&request(1, 10));
        wire.truncate(wire.len() - 1);
        let mut reqs = Requests::<DiscoveryRequest>::new(body_of(vec![wire]), l.clone());
        assert_eq!(
            code(reqs.message().await),
            (tonic::Code::InvalidArgument, Some(RequestError::Truncated))
        );

        let mut wire = framed(&request(1, 1));
        wire[0] = 1;
        let mut reqs = Requests::<DiscoveryRequest>::new(body_of(vec![wire]), l.clone());
        assert_eq!(
            code(reqs.message().await),
            (tonic::Code::Unimplemented, Some(RequestError::Compressed))
        );

        // Refused from its header alone: the body is never read.
        let mut wire = vec![0];
        wire.extend(((MAX + 1) as u32).to_be_bytes());
        let mut reqs = Requests::<DiscoveryRequest>::new(body_of(vec![wire]), l.clone());
        let e = reqs.message().await.unwrap_err();
        assert_eq!(e.status.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.status.message().contains(&(MAX + 1).to_string())
                && e.status.message().contains(&MAX.to_string()),
            "{}",
            e.status.message()
        );

        let mut wire = vec![0];
        wire.extend(4u32.to_be_bytes());
        wire.extend([0xff, 0xff, 0xff, 0xff]);
        let mut reqs = Requests::<DiscoveryRequest>::new(body_of(vec![wire]), l.clone());
        let e = reqs.message().await.unwrap_err();
        assert_eq!(
            (e.status.code(), e.kind),
            (
                tonic::Code::InvalidArgument,
                Some(RequestError::Undecodable)
            )
        );
        assert!(
            e.status.message().contains("DiscoveryRequest"),
            "{}",
            e.status.message()
        );
        for k in RequestError::ALL {
            assert_eq!(l.metrics.xds_request_errors(k), 1, "{k:?}");
        }
    }

    /// Past the budget, a stream does not read the rest of a large message until the budget held
    /// by another is given back (its message handled).
    #[tokio::test]
    async fn the_decode_budget_bounds_bytes_read_at_once_across_streams() {
        let big = framed(&request(1, 20_000));
        let l = limits(big.len() + 100);
        let (tx_a, body_a) = channel_body();
        let (tx_b, body_b) = channel_body();
        let mut a = Requests::<DiscoveryRequest>::new(body_a, l.clone());
        let mut b = Requests::<DiscoveryRequest>::new(body_b, l.clone());
        // A's header and part of its body: A holds budget for all of its message.
        tx_a.send(big[..1000].to_vec()).unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(50), a.message())
            .await
            .is_err());
        assert_eq!(l.budget_in_use(), big.len());
        // B's header: it waits for budget and reads no further.
        tx_b.send(big[..1000].to_vec()).unwrap();
        tx_b.send(big[1000..].to_vec()).unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(50), b.message())
            .await
            .is_err());
        assert_eq!(b.buffered, 1000, "B read past its header without budget");
        // A completes and is handled; the next call gives its budget back and B proceeds.
        tx_a.send(big[1000..].to_vec()).unwrap();
        assert!(a.message().await.unwrap().is_some());
        drop(tx_a);
        assert!(a.message().await.unwrap().is_none());
        assert!(b.message().await.unwrap().is_some());
        assert_eq!(l.metrics.xds_decode_waits.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_that_stalls_ends_its_stream_after_the_deadline() {
        let l = limits(64 << 20);
        let (tx, body) = channel_body();
        let mut reqs = Requests::<DiscoveryRequest>::new(body, l.clone());
        let wire = framed(&request(1, 100));
        tx.send(wire[..20].to_vec()).unwrap();
        let e = reqs.message().await.unwrap_err();
        assert_eq!(
            (e.status.code(), e.kind),
            (tonic::Code::DeadlineExceeded, Some(RequestError::Truncated))
        );
        drop(tx);
    }
}
