//! The broker's own accept loop: HTTP/1.1 connections on hyper, with the
//! deadlines and the cap warp's server does not have.
//!
//! - **Headers** must arrive within `header_timeout` of the connection
//!   opening or of the previous answer (so an idle keep-alive connection is
//!   also closed after it); then the connection is closed without an answer.
//!   The previous answer counts from its last byte written, so a client
//!   that stops reading an answer is closed after as long. One timer per
//!   connection watches this, re-armed only when it fires (hyper's own
//!   header timeout allocates and registers a timer for every request).
//!   A request head over [`MAX_HEADER_BYTES`] is answered 431 by hyper.
//! - **A request body** must arrive whole within `body_timeout` of its head:
//!   a handler reading it then gets an error, the client a 408 (`/v1` error
//!   shape) and the connection is closed.
//! - **At most `max_open` connections** are open on a listener. When a new
//!   one arrives at the cap, the keep-alive connection idle the longest is
//!   told to close (it has no request in progress, so nothing is lost); with
//!   none idle, the new connection waits unserved (the listener stops
//!   accepting; the kernel queues up to [`LISTEN_BACKLOG`] more) until one
//!   ends — every busy connection is bounded by the deadlines above or by
//!   its handler.
//! - **Shutdown** stops accepting, lets every request in progress finish,
//!   closes idle connections and resolves when all are gone.
//!
//! Every answer, the 408 included, gets the `headers` the caller names
//! (the security headers); hyper's own answers to heads it cannot parse
//! (400, 414, 431) are bare and have no body. Each of these ends, the cap's
//! included, is counted in the listener's [`ConnectionStats`] (`/metrics`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use warp::Filter;
use warp::http::header::{CONNECTION, HeaderName, HeaderValue};
use warp::http::{Request, StatusCode};
use warp::reply::Response;

use crate::config::ConnectionsConfig;

/// A request head (request line and headers) larger than this is answered 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Connections the kernel completes and queues for us to accept (capped by
/// `net.core.somaxconn`); tokio's listeners are made with 128, which a burst
/// of clients overflows while the accept loop waits its turn, and a client
/// whose attempt is dropped retries only a second later.
pub const LISTEN_BACKLOG: i32 = 1024;

/// The deadlines and the cap of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections at most.
    pub max_open: usize,
    /// How long a request head may take to arrive.
    pub header_timeout: Duration,
    /// How long a request body may take to arrive, from its head.
    pub body_timeout: Duration,
}

impl Limits {
    /// The configured limits.
    pub fn new(config: &ConnectionsConfig) -> Self {
        Limits {
            max_open: config.max_open,
            header_timeout: Duration::from_secs(config.header_timeout_secs),
            body_timeout: Duration::from_secs(config.body_timeout_secs),
        }
    }
}

/// What the accept loop of a listener counted, for `/metrics`: the
/// connections open, and each way the deadlines and the cap ended one.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    open: AtomicU64,
    accepted: AtomicU64,
    shed: AtomicU64,
    waited_at_cap: AtomicU64,
    head_timeouts: AtomicU64,
    body_timeouts: AtomicU64,
    malformed_heads: AtomicU64,
}

/// One reading of [`ConnectionStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCounts {
    /// Connections open now.
    pub open: u64,
    /// Connections accepted.
    pub accepted: u64,
    /// Idle keep-alive connections closed to make room at the cap.
    pub shed: u64,
    /// Connections accepted only after waiting at the cap with every open
    /// connection busy.
    pub waited_at_cap: u64,
    /// Connections closed because no request head arrived in time (idle
    /// keep-alive connections included).
    pub head_timeouts: u64,
    /// Requests answered 408 because their body did not arrive in time.
    pub body_timeouts: u64,
    /// Request heads that did not parse or were too large (hyper's bare 400,
    /// 414 or 431).
    pub malformed_heads: u64,
}

impl ConnectionStats {
    /// The counts now.
    pub fn counts(&self) -> ConnectionCounts {
        let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
        ConnectionCounts {
            open: get(&self.open),
            accepted: get(&self.accepted),
            shed: get(&self.shed),
            waited_at_cap: get(&self.waited_at_cap),
            head_timeouts: get(&self.head_timeouts),
            body_timeouts: get(&self.body_timeouts),
            malformed_heads: get(&self.malformed_heads),
        }
    }

    fn bump(n: &AtomicU64) {
        n.fetch_add(1, Ordering::Relaxed);
    }
}

/// What answers a request from a peer: the routes, as a future.
pub type Handler = Arc<
    dyn Fn(Request<RequestBody>, SocketAddr) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync + 'static,
>;

/// The peer's address, as a request extension (warp's own is private to
/// warp): what a [`Handler`] that hands the request to warp puts on it.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// The peer's address as a filter: what `warp::addr::remote()` answers
/// under warp's own server.
pub fn remote() -> impl Filter<Extract = (Option<SocketAddr>,), Error = Infallible> + Copy {
    warp::ext::optional::<Peer>().map(|peer: Option<Peer>| peer.map(|Peer(addr)| addr))
}

/// Serves `listener` until `shutdown` turns true, then shuts down gracefully;
/// resolves when every connection has ended. `stats` counts what happened
/// to its connections.
pub async fn serve(
    listener: TcpListener,
    handler: Handler,
    limits: Limits,
    headers: Arc<[(HeaderName, HeaderValue)]>,
    stats: Arc<ConnectionStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = match deepen(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "cannot set up the listening socket");
            return;
        }
    };
    let site = Arc::new(Site { handler, limits, headers, stats, registry: Registry::default() });
    let mut next_id = 0u64;
    'accept: loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors, most likely: wait for some to close.
                tracing::error!(error = %e, "accept failed");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = shutdown.wait_for(|stop| *stop) => break,
                }
            }
        };
        // At the cap: shed the longest idle connection, or wait for one to end.
        let mut waited = false;
        loop {
            let changed = site.registry.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if site.registry.open() < site.limits.max_open {
                break;
            }
            let _waiting = Waiting::start(&site.registry);
            if let Some(idle) = site.registry.longest_idle() {
                tracing::debug!(peer = %peer, "connection cap reached: closing an idle keep-alive connection");
                idle.shed.store(true, Ordering::Relaxed);
                idle.close.notify_one();
                ConnectionStats::bump(&site.stats.shed);
            } else if !waited {
                waited = true;
                ConnectionStats::bump(&site.stats.waited_at_cap);
            }
            tokio::select! {
                () = changed => {}
                _ = shutdown.wait_for(|stop| *stop) => break 'accept,
            }
        }
        next_id += 1;
        ConnectionStats::bump(&site.stats.accepted);
        site.stats.open.fetch_add(1, Ordering::Relaxed);
        let conn = site.registry.add(next_id);
        tokio::spawn(serve_connection(Arc::clone(&site), conn, stream, peer));
    }
    drop(listener);
    site.registry.close_all();
    site.registry.until_empty().await;
}

/// `listener` with a listen queue of [`LISTEN_BACKLOG`] (listening again
/// changes the queue of a listening socket).
fn deepen(listener: TcpListener) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::from(listener.into_std()?);
    if let Err(e) = socket.listen(LISTEN_BACKLOG) {
        tracing::warn!(error = %e, "cannot lengthen the listen queue; keeping it as it is");
    }
    TcpListener::from_std(socket.into())
}

fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// What every connection of a listener shares.
struct Site {
    handler: Handler,
    limits: Limits,
    headers: Arc<[(HeaderName, HeaderValue)]>,
    stats: Arc<ConnectionStats>,
    registry: Registry,
}

/// The open connections of a listener.
#[derive(Default)]
struct Registry {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// A connection ended, or went idle while someone waits for that.
    changed: Notify,
    /// Waiters for a connection to go idle (the accept loop at the cap):
    /// answering a request notifies `changed` only when there are some, so
    /// the busy path takes no lock.
    waiting: AtomicUsize,
    epoch: EpochInstant,
}

struct EpochInstant(Instant);

impl Default for EpochInstant {
    fn default() -> Self {
        EpochInstant(Instant::now())
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn open(&self) -> usize {
        self.lock().len()
    }

    fn add(&self, id: u64) -> Arc<Conn> {
        let opened = self.millis();
        let conn = Arc::new(Conn {
            id,
            epoch: self.epoch.0,
            written_at: AtomicU64::new(opened),
            read: AtomicU64::new(0),
            read_when_answered: AtomicU64::new(0),
            answered_at: AtomicU64::new(opened),
            in_flight: AtomicUsize::new(0),
            answered: AtomicBool::new(false),
            shed: AtomicBool::new(false),
            close: Notify::new(),
        });
        self.lock().insert(id, Arc::clone(&conn));
        conn
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
        self.changed.notify_waiters();
    }

    /// The keep-alive connection idle the longest, not already told to close.
    fn longest_idle(&self) -> Option<Arc<Conn>> {
        self.lock()
            .values()
            .filter(|c| c.is_idle() && !c.shed.load(Ordering::Relaxed))
            .min_by_key(|c| c.answered_at.load(Ordering::Relaxed))
            .cloned()
    }

    fn close_all(&self) {
        for conn in self.lock().values() {
            conn.close.notify_one();
        }
    }

    async fn until_empty(&self) {
        loop {
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            changed.await;
        }
    }

    fn millis(&self) -> u64 {
        millis_since(self.epoch.0)
    }
}

/// The accept loop waiting for a connection to go idle (see
/// [`Registry::waiting`]). Between its count and the connections' state
/// the two sides fence, so either an answered request sees the count and
/// notifies, or the loop, counted first, sees the connection idle.
struct Waiting<'a>(&'a Registry);

impl<'a> Waiting<'a> {
    fn start(registry: &'a Registry) -> Self {
        registry.waiting.fetch_add(1, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        Waiting(registry)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One connection, as the accept loop sees it.
struct Conn {
    id: u64,
    /// The registry's epoch, for the times below.
    epoch: Instant,
    /// When bytes were last written to the client ([`Registry::millis`]);
    /// opening counts as a write.
    written_at: AtomicU64,
    /// Bytes read from the client.
    read: AtomicU64,
    /// `read` when the last answer was handed to hyper.
    read_when_answered: AtomicU64,
    /// When that was ([`Registry::millis`]; opening counts as an answer).
    answered_at: AtomicU64,
    /// Requests being answered.
    in_flight: AtomicUsize,
    /// At least one request was answered.
    answered: AtomicBool,
    /// Told to close to make room.
    shed: AtomicBool,
    /// Close when idle; finish the request in progress first.
    close: Notify,
}

impl Conn {
    /// Idle keep-alive: answered at least once, nothing in progress, and not
    /// a byte of a next request received.
    fn is_idle(&self) -> bool {
        self.answered.load(Ordering::Acquire)
            && self.in_flight.load(Ordering::Acquire) == 0
            && self.read.load(Ordering::Acquire) == self.read_when_answered.load(Ordering::Acquire)
    }

    /// Since when the connection waits for a request head: its last answer
    /// handed over or written, or its opening; `None` while a request is
    /// being answered.
    fn waiting_since(&self) -> Option<u64> {
        (self.in_flight.load(Ordering::Acquire) == 0)
            .then(|| self.answered_at.load(Ordering::Acquire).max(self.written_at.load(Ordering::Acquire)))
    }
}

/// Resolves when `conn` has waited `within` for a request head: a timer
/// that sleeps until the earliest such moment and, woken early by answers
/// in between, sleeps again until the next.
async fn head_deadline(conn: &Conn, within: Duration) {
    let within_ms = u64::try_from(within.as_millis()).unwrap_or(u64::MAX);
    let at = |ms: u64| tokio::time::Instant::from_std(conn.epoch + Duration::from_millis(ms));
    let sleep = tokio::time::sleep(within);
    let mut sleep = std::pin::pin!(sleep);
    loop {
        sleep.as_mut().await;
        let now = millis_since(conn.epoch);
        let next = match conn.waiting_since() {
            Some(since) if now.saturating_sub(since) >= within_ms => return,
            Some(since) => since.saturating_add(within_ms),
            None => now.saturating_add(within_ms),
        };
        sleep.as_mut().reset(at(next));
    }
}

async fn serve_connection(site: Arc<Site>, conn: Arc<Conn>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(Counted { inner: stream, conn: Arc::clone(&conn) });
    let service = {
        let (site, conn) = (Arc::clone(&site), Arc::clone(&conn));
        hyper::service::service_fn(move |request| answer(Arc::clone(&site), Arc::clone(&conn), peer, request))
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    // The head deadline is `head_deadline`'s, not hyper's header timeout.
    http.timer(TokioTimer::new()).header_read_timeout(None).max_header_size(MAX_HEADER_BYTES).keep_alive(true);
    let connection = http.serve_connection(io, service);
    let mut connection = std::pin::pin!(connection);
    let deadline = head_deadline(&conn, site.limits.header_timeout);
    let mut deadline = std::pin::pin!(deadline);
    let result = tokio::select! {
        biased;
        result = connection.as_mut() => Some(result),
        () = conn.close.notified() => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                biased;
                result = connection.as_mut() => Some(result),
                () = deadline.as_mut() => None,
            }
        }
        () = deadline.as_mut() => None,
    };
    match result {
        None => {
            ConnectionStats::bump(&site.stats.head_timeouts);
            tracing::debug!(peer = %peer, "closed a connection whose request head did not arrive in time");
        }
        Some(Err(e)) => {
            if e.is_parse() {
                ConnectionStats::bump(&site.stats.malformed_heads);
            }
            tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
        }
        Some(Ok(())) => {}
    }
    site.stats.open.fetch_sub(1, Ordering::Relaxed);
    site.registry.remove(conn.id);
}

/// Answers one request: the body under its deadline, the handler, then the
/// headers every answer carries.
async fn answer(
    site: Arc<Site>,
    conn: Arc<Conn>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response, Infallible> {
    let in_flight = InFlight::start(&site, &conn);
    let deadline = site.limits.body_timeout;
    // Only a body can miss its deadline.
    let expired = (!request.body().is_end_stream()).then(|| Arc::new(AtomicBool::new(false)));
    let request = request.map(|body| RequestBody::new(body, deadline, expired.clone()));
    let mut response = (site.handler)(request, peer).await;
    if expired.is_some_and(|expired| expired.load(Ordering::Acquire)) {
        ConnectionStats::bump(&site.stats.body_timeouts);
        tracing::info!(peer = %peer, "closed a connection whose request body did not arrive in time");
        response = body_timeout(deadline);
    }
    let headers = response.headers_mut();
    for (name, value) in site.headers.iter() {
        headers.insert(name.clone(), value.clone());
    }
    drop(in_flight);
    Ok(response)
}

/// A request being answered; when it is, the connection may be idle.
struct InFlight<'a> {
    site: &'a Site,
    conn: &'a Conn,
}

impl<'a> InFlight<'a> {
    fn start(site: &'a Site, conn: &'a Conn) -> Self {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight { site, conn }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let conn = self.conn;
        conn.read_when_answered.store(conn.read.load(Ordering::Acquire), Ordering::Release);
        conn.answered_at.store(self.site.registry.millis(), Ordering::Relaxed);
        conn.answered.store(true, Ordering::Release);
        conn.in_flight.fetch_sub(1, Ordering::AcqRel);
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.site.registry.waiting.load(Ordering::SeqCst) > 0 {
            self.site.registry.changed.notify_waiters();
        }
    }
}

/// The 408 for a body that did not arrive in time; the connection closes.
fn body_timeout(deadline: Duration) -> Response {
    let mut response = crate::http::reply::json_reply(
        StatusCode::REQUEST_TIMEOUT,
        &json!({
            "error": "bad_request",
            "error_description": format!("the request body did not arrive within {} s", deadline.as_secs()),
        }),
    );
    response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The body did not arrive by its deadline.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub struct BodyTimeout;

/// A request body that fails once its deadline passes before its end.
pub struct RequestBody {
    inner: Incoming,
    /// `None` once the body has ended (or when there is none).
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Set when the deadline passed (`None` when there is no body).
    expired: Option<Arc<AtomicBool>>,
}

impl RequestBody {
    fn new(inner: Incoming, within: Duration, expired: Option<Arc<AtomicBool>>) -> Self {
        let deadline = (!inner.is_end_stream()).then(|| Box::pin(tokio::time::sleep(within)));
        RequestBody { inner, deadline, expired }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(deadline) = self.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                self.deadline = None;
                if let Some(expired) = &self.expired {
                    expired.store(true, Ordering::Release);
                }
                return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
            }
        }
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(frame, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) || self.inner.is_end_stream() {
            self.deadline = None;
        }
        frame.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, counting the bytes the client sent: a connection that has
/// received nothing since its last answer is idle.
struct Counted {
    inner: TcpStream,
    conn: Arc<Conn>,
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.conn.read.fetch_add(read as u64, Ordering::AcqRel);
        }
        result
    }
}

impl Counted {
    /// Notes when bytes went out: the wait for the next head starts then.
    fn wrote(&self, result: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = result {
            if n > 0 {
                self.conn.written_at.store(millis_since(self.conn.epoch), Ordering::Release);
            }
        }
        result
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
