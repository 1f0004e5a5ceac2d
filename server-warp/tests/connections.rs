// Connections that never finish their request: cut off at their deadlines
// (short ones here: 1 s for headers, 2 s for a body) while other clients are
// served; the connection cap sheds idle keep-alive connections and makes a
// new client wait while every connection is busy; shutdown with slow and
// idle connections open. Each test takes a few seconds of real time: the
// deadlines it checks, and nothing beyond them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::support::{Harness, fake_config, harness, read_until_closed};

const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
const BODY_TIMEOUT: Duration = Duration::from_secs(2);
/// How late a deadline may be enforced on a loaded two-core machine.
const SLACK: Duration = Duration::from_secs(3);

fn addr(h: &Harness) -> String {
    h.url.trim_start_matches("http://").to_owned()
}

/// The soft limit on open files: each connection here is two descriptors
/// (both ends live in this process).
fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|soft| soft.parse().ok())
        .unwrap_or(u64::MAX)
}

/// What a client that stopped sending saw: how long until the broker closed
/// the connection, and what it answered before that.
struct Cut {
    /// How long connecting took, waiting for a turn included.
    connect: Duration,
    /// From connected (as this task saw it, which may be a little late on a
    /// busy runtime) to closed.
    after: Duration,
    answer: String,
}

/// Connects (holding a permit of `connecting` meanwhile), sends `start` and
/// nothing more, and reads until the broker closes the connection (at most
/// `give_up`).
async fn stall(addr: String, connecting: Arc<Semaphore>, start: String, give_up: Duration) -> Cut {
    let began = Instant::now();
    let permit = connecting.acquire().await.unwrap();
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    drop(permit);
    let connect = began.elapsed();
    let began = Instant::now();
    stream.write_all(start.as_bytes()).await.unwrap();
    let answer = read_until_closed(&mut stream, give_up).await;
    let answer = answer.unwrap_or_else(|| panic!("the broker never closed a stalled connection (sent {start:?})"));
    Cut { connect, after: began.elapsed(), answer }
}

/// Reads one whole answer (head and `Content-Length` body) off `stream`.
async fn read_answer(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed mid-answer: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_owned))
                .map_or(0, |l| l.trim().parse::<usize>().unwrap());
            if answer.len() >= end + 4 + length {
                return text;
            }
        }
    }
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: broker\r\n\r\n";

/// Whether the broker has closed `stream` (without waiting).
fn is_closed(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 1];
    match stream.try_read(&mut buf) {
        Ok(0) => true,
        Ok(_) => panic!("an idle connection got bytes nobody asked for"),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::print_stdout)]
async fn five_hundred_slow_heads_and_five_hundred_slow_bodies_are_cut_off_while_a_client_is_served() {
    const EACH: usize = 500;
    assert!(
        open_files_limit() >= 4 * EACH as u64 + 500,
        "this test holds {} sockets; raise the open-files limit (ulimit -n) above {}",
        4 * EACH,
        4 * EACH + 500
    );
    let h = harness(
        fake_config(),
        "[connections]\nheader_timeout_secs = 1\nbody_timeout_secs = 2\n\
         [limits]\ntoken_requests_per_minute_per_keyid = 100000\ntoken_requests_per_minute_per_address = 100000",
    )
    .await;
    let authid = h.login().await;

    // A normal client asking for its token every 20 ms all along, each time
    // on a new connection.
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let served = Arc::new(AtomicUsize::new(0));
    let normal = tokio::spawn({
        let (http, url, authid, served) = (http, h.url.clone(), authid.clone(), Arc::clone(&served));
        async move {
            let mut latencies = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.wait_for(|s| *s) => return latencies,
                }
                let started = Instant::now();
                let status = crate::support::refresh(&http, &url, &authid).await.status();
                assert_eq!(status, 200, "the normal client is refused after {} requests", latencies.len());
                latencies.push(started.elapsed());
                served.fetch_add(1, Ordering::Relaxed);
            }
        }
    });

    let started = Instant::now();
    let mut stalled = JoinSet::new();
    let head = "GET /refresh HTTP/1.1\r\nHost: broker\r\nX-AuthID: ".to_owned();
    let body = format!(
        "POST /v1/token HTTP/1.1\r\nHost: broker\r\nAuthorization: Bearer {authid}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"min_validity\": "
    );
    // 64 connecting at a time, so the burst stays well inside the broker's
    // listen queue (1024): past it the kernel drops connection attempts, and
    // the normal client's would be retried only a second later.
    let connecting = Arc::new(Semaphore::new(64));
    for _ in 0..EACH {
        let (slow_head, slow_body) = (
            stall(addr(&h), Arc::clone(&connecting), head.clone(), HEADER_TIMEOUT + SLACK),
            stall(addr(&h), Arc::clone(&connecting), body.clone(), BODY_TIMEOUT + SLACK),
        );
        stalled.spawn(async move { ("head", slow_head.await) });
        stalled.spawn(async move { ("body", slow_body.await) });
    }
    let mut heads = Vec::new();
    let mut bodies = Vec::new();
    while let Some(done) = stalled.join_next().await {
        let (kind, cut) = done.unwrap();
        if kind == "head" { heads.push(cut) } else { bodies.push(cut) }
    }
    let all_cut = started.elapsed();
    // A few more answers to the normal client once they are gone, then stop it.
    let before = served.load(Ordering::Relaxed);
    let give_up = Instant::now() + SLACK;
    while served.load(Ordering::Relaxed) < before + 5 {
        assert!(Instant::now() < give_up, "the normal client goes on being served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(true).unwrap();
    let latencies = normal.await.unwrap();

    let span = |cuts: &[Cut]| {
        let min = cuts.iter().map(|c| c.after).min().unwrap();
        let max = cuts.iter().map(|c| c.after).max().unwrap();
        (min, max)
    };
    let (head_min, head_max) = span(&heads);
    let (body_min, body_max) = span(&bodies);
    let slowest = latencies.iter().max().copied().unwrap_or_default();
    let slowest_connect = heads.iter().chain(&bodies).map(|c| c.connect).max().unwrap();
    println!(
        "slow heads: {} closed without an answer after {:.2}–{:.2} s (deadline {} s); \
         slow bodies: {} answered 408 and closed after {:.2}–{:.2} s (deadline {} s); all cut within {:.2} s; \
         slowest connect {} ms; normal client meanwhile: {} requests on new connections, all 200, slowest {} ms",
        heads.len(),
        head_min.as_secs_f64(),
        head_max.as_secs_f64(),
        HEADER_TIMEOUT.as_secs(),
        bodies.len(),
        body_min.as_secs_f64(),
        body_max.as_secs_f64(),
        BODY_TIMEOUT.as_secs(),
        all_cut.as_secs_f64(),
        slowest_connect.as_millis(),
        latencies.len(),
        slowest.as_millis(),
    );
    assert_eq!((heads.len(), bodies.len()), (EACH, EACH));
    for cut in &heads {
        assert!(cut.answer.is_empty(), "a slow head is closed, not answered: {}", cut.answer);
        assert!(cut.connect + cut.after >= HEADER_TIMEOUT && cut.after < HEADER_TIMEOUT + SLACK, "{:?}", cut.after);
    }
    for cut in &bodies {
        assert!(cut.answer.starts_with("HTTP/1.1 408 "), "{}", cut.answer);
        let lower = cut.answer.to_ascii_lowercase();
        assert!(lower.contains("connection: close") && lower.contains("x-content-type-options: nosniff"));
        assert!(cut.answer.contains("did not arrive within 2 s"), "{}", cut.answer);
        assert!(cut.connect + cut.after >= BODY_TIMEOUT && cut.after < BODY_TIMEOUT + SLACK, "{:?}", cut.after);
    }
    // Every 20 ms for the whole time, give or take the client's own waits.
    let expected = (all_cut.as_millis() / 20) as usize;
    assert!(latencies.len() >= expected / 2, "{} requests in {all_cut:?}", latencies.len());
    assert!(slowest < Duration::from_secs(1), "no request waited for the stalled ones: {slowest:?}");
    // The operator sees it on /metrics: every stalled body and head counted
    // (a few idle keep-alive connections of the test's clients with them),
    // and none of them still open.
    assert_eq!(h.metric("latchkey_connections_body_timeouts_total").await, EACH as u64);
    let heads = h.metric("latchkey_connections_head_timeouts_total").await;
    assert!((EACH as u64..=EACH as u64 + 10).contains(&heads), "{heads} head timeouts");
    assert!(h.metric("latchkey_connections_accepted_total").await > 2 * EACH as u64);
    assert!(h.metric("latchkey_connections_open").await <= 5);
}

/// The head deadline runs from each answer: a keep-alive client that asks
/// again within it, three times over (longer in all than one deadline), is
/// served each time; once it stops asking, the connection is closed one
/// deadline after its last answer, with nothing more sent.
#[tokio::test]
async fn a_keep_alive_connection_has_a_head_deadline_from_each_answer() {
    let h = harness(fake_config(), "[connections]\nheader_timeout_secs = 1").await;
    let mut stream = TcpStream::connect(addr(&h)).await.unwrap();
    let pause = HEADER_TIMEOUT * 3 / 5;
    for _ in 0..3 {
        stream.write_all(HEALTHZ).await.unwrap();
        assert!(read_answer(&mut stream).await.starts_with("HTTP/1.1 200 "));
        // The client's own pacing, not a wait for the broker.
        tokio::time::sleep(pause).await;
    }
    stream.write_all(HEALTHZ).await.unwrap();
    assert!(read_answer(&mut stream).await.starts_with("HTTP/1.1 200 "), "served after {:?} in all", pause * 3);
    let answered = Instant::now();
    let rest = read_until_closed(&mut stream, HEADER_TIMEOUT + SLACK).await;
    let after = answered.elapsed();
    assert_eq!(rest.as_deref(), Some(""), "closed with nothing more sent");
    assert!(after >= HEADER_TIMEOUT - Duration::from_millis(50) && after < HEADER_TIMEOUT + SLACK, "{after:?}");
    h.server.stop().await;
}

/// At a cap of 50: with 50 idle keep-alive connections a new client is
/// served at once and one idle connection is closed for it; with 50
/// connections stuck in their request heads, a new client waits unserved
/// (it is not refused) until their header deadline frees room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::print_stdout)]
async fn the_connection_cap_sheds_idle_connections_and_makes_new_ones_wait_while_all_are_busy() {
    const CAP: usize = 50;
    // Idle: a header timeout far longer than the test, so only the cap closes them.
    let h = harness(fake_config(), "[connections]\nmax_open = 50\nheader_timeout_secs = 30").await;
    let mut idle = Vec::new();
    for _ in 0..CAP {
        let mut stream = TcpStream::connect(addr(&h)).await.unwrap();
        stream.write_all(HEALTHZ).await.unwrap();
        assert!(read_answer(&mut stream).await.starts_with("HTTP/1.1 200 "));
        idle.push(stream);
    }
    let mut newcomers = Vec::new();
    let mut slowest = Duration::ZERO;
    for n in 1..=10 {
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr(&h)).await.unwrap();
        stream.write_all(HEALTHZ).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), read_answer(&mut stream)).await;
        let answer = answer.unwrap_or_else(|_| panic!("newcomer {n} was not served at the cap"));
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        slowest = slowest.max(started.elapsed());
        newcomers.push(stream);
        // Its room was made by closing one idle connection, already gone.
        let closed = idle.iter().filter(|s| is_closed(s)).count();
        assert_eq!(closed, n, "one idle connection closed per newcomer");
    }
    assert!(slowest < Duration::from_secs(2), "served at once, not after a deadline: {slowest:?}");
    // The idle connections left are still good, and so is a newcomer's.
    let survivor = idle.iter_mut().find(|s| !is_closed(s)).unwrap();
    survivor.write_all(HEALTHZ).await.unwrap();
    assert!(read_answer(survivor).await.starts_with("HTTP/1.1 200 "));
    newcomers[0].write_all(HEALTHZ).await.unwrap();
    assert!(read_answer(&mut newcomers[0]).await.starts_with("HTTP/1.1 200 "));
    let shed_at = slowest;
    // Counted: ten shed, and one more for the scrape's own new connection;
    // none waited.
    assert_eq!(h.metric("latchkey_connections_shed_total").await, 11);
    assert_eq!(h.metric("latchkey_connections_waited_at_cap_total").await, 0);
    assert_eq!(h.metric("latchkey_connections_open").await, CAP as u64);

    // Busy: 50 connections in the middle of their heads.
    let h = harness(fake_config(), "[connections]\nmax_open = 50\nheader_timeout_secs = 1").await;
    let mut stuck = Vec::new();
    for _ in 0..CAP {
        let mut stream = TcpStream::connect(addr(&h)).await.unwrap();
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: broker\r\nX-Waiting: ").await.unwrap();
        stuck.push(stream);
    }
    let started = Instant::now();
    let mut newcomer = TcpStream::connect(addr(&h)).await.expect("the kernel queues it; the broker waits to accept");
    newcomer.write_all(HEALTHZ).await.unwrap();
    let early = tokio::time::timeout(HEADER_TIMEOUT / 2, read_answer(&mut newcomer)).await;
    assert!(early.is_err(), "served while every connection was busy");
    let answer = tokio::time::timeout(HEADER_TIMEOUT + SLACK, read_answer(&mut newcomer))
        .await
        .expect("served once the stuck heads hit their deadline");
    let waited = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(waited >= HEADER_TIMEOUT / 2, "{waited:?}");
    let give_up = Instant::now() + SLACK;
    while stuck.iter().any(|s| !is_closed(s)) {
        assert!(Instant::now() < give_up, "every stuck head is closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(newcomer);
    assert_eq!(h.metric("latchkey_connections_waited_at_cap_total").await, 1, "the newcomer waited");
    assert_eq!(h.metric("latchkey_connections_head_timeouts_total").await, CAP as u64, "every stuck head");
    assert_eq!(h.metric("latchkey_connections_shed_total").await, 0, "none was idle");
    println!(
        "cap {CAP}: with {CAP} idle keep-alive connections, 10 newcomers served in at most {} ms, \
         closing 10 idle ones; with {CAP} stuck heads, a newcomer waited {} ms (header deadline {} s)",
        shed_at.as_millis(),
        waited.as_millis(),
        HEADER_TIMEOUT.as_secs()
    );
}

/// Shutdown finishes the request in progress, closes idle keep-alive
/// connections at once, and a connection stuck in its head delays it no
/// longer than the header deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight_with_idle_and_stalled_connections_open() {
    let fake = latchkey_testkit::FakeConfig { access_lifetime: Some(Duration::ZERO), ..fake_config() };
    let h = harness(fake, "[connections]\nheader_timeout_secs = 1").await;
    let authid = h.login().await;
    let mut idle = TcpStream::connect(addr(&h)).await.unwrap();
    idle.write_all(HEALTHZ).await.unwrap();
    read_answer(&mut idle).await;
    let mut stalled = TcpStream::connect(addr(&h)).await.unwrap();
    stalled.write_all(b"GET /healthz HTTP/1.1\r\nHost: broker\r\n").await.unwrap();
    h.fake.configure(|c| c.latency = Duration::from_millis(500));
    let asked = h.fake.token_requests().len();
    let in_flight = tokio::spawn({
        let (http, url, authid) = (h.http.clone(), h.url.clone(), authid.clone());
        async move { crate::support::refresh(&http, &url, &authid).await.status() }
    });
    let give_up = Instant::now() + Duration::from_secs(5);
    while h.fake.token_requests().len() == asked {
        assert!(Instant::now() < give_up, "the refresh reached the provider");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let url = h.url.clone();
    h.server.stop().await;
    let took = started.elapsed();
    assert_eq!(in_flight.await.unwrap(), 200, "the request in flight is answered");
    assert!(took < HEADER_TIMEOUT + SLACK, "bounded by the header deadline: {took:?}");
    let mut buf = [0u8; 16];
    assert_eq!(idle.read(&mut buf).await.unwrap_or(0), 0, "the idle connection is closed");
    assert_eq!(stalled.read(&mut buf).await.unwrap_or(0), 0, "the stalled one too");
    assert!(TcpStream::connect(url.trim_start_matches("http://")).await.is_err(), "nothing listens any more");
}
