//! Log output that never makes a request wait on a write.
//!
//! Every event is formatted on the thread that logs it (that is the tracing
//! subscriber's work) and handed, as one line, to a bounded queue; one
//! thread of its own drains the queue into a buffered stderr every
//! millisecond while lines come (every 50 ms at most when idle) and flushes
//! after each batch, so a burst of requests costs one `write` per batch
//! instead of one per line, and no worker thread ever parks on the stderr
//! lock or makes a system call to wake the writer.
//!
//! When the queue is full (stderr cannot keep up: a slow pipe, a stalled
//! journal), request lines and other `info`/`debug` lines are dropped and
//! counted (`latchkey_log_lines_dropped_total` in `/metrics`); warnings,
//! errors and every audit line (`latchkey::audit`) wait for room instead,
//! so what an operator must see is never lost. [`LogGuard`] writes out what
//! is queued when it is dropped (at the end of a command).

use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Lines the queue holds before lossy lines are dropped.
pub const QUEUE_LINES: usize = 65_536;

/// The capacity of the buffer between the queue and stderr.
const OUT_BUFFER: usize = 64 * 1024;

/// How long the writer pauses after writing a batch. It polls the queue
/// instead of sleeping on it: a writer asleep on the queue must be woken by
/// a system call on nearly every line, on the thread that logs it.
const POLL_BUSY: Duration = Duration::from_millis(1);
/// The longest pause, reached by doubling while nothing is logged: how
/// late a line may appear on an idle broker.
const POLL_IDLE: Duration = Duration::from_millis(50);

/// The writer [`init`] installed, and how its subscriber writes lines.
struct Installed {
    writer: NonBlocking,
    json: bool,
    /// Whether request lines may bypass the subscriber (not on a terminal,
    /// where the subscriber writes colours).
    plain: bool,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Lines dropped so far by the installed writer (0 when none is installed,
/// as in a program that embeds the broker with its own subscriber).
pub fn dropped_lines() -> u64 {
    INSTALLED.get().map_or(0, |installed| installed.writer.dropped())
}

/// One finished request, as its log line says it.
pub(crate) struct RequestLine<'a> {
    /// The module that logs it (the line's target).
    pub(crate) target: &'static str,
    pub(crate) method: &'a str,
    pub(crate) route: &'static str,
    pub(crate) status: u16,
    pub(crate) latency_ms: f64,
    pub(crate) keyid: Option<&'a dyn std::fmt::Display>,
}

/// Queues the request line straight to the installed writer, written as
/// the subscriber would write a `tracing::info!` event with the same fields
/// (the tests compare the two) but without its field visitors: the line
/// every request logs is a tenth of a broker's time through them. Answers
/// false when [`init`] installed no writer (an embedder's own subscriber, a
/// terminal, which gets colours): the caller then logs through `tracing`.
/// The caller checks the filter first (`tracing::enabled!`).
pub(crate) fn request_line(line: &RequestLine<'_>) -> bool {
    let Some(installed) = INSTALLED.get().filter(|installed| installed.plain) else { return false };
    let text = format_request(std::time::SystemTime::now(), installed.json, line);
    installed.writer.send(text, true);
    true
}

/// `now` as the subscriber writes it: RFC 3339, microseconds, `Z`.
fn timestamp(out: &mut Vec<u8>, now: std::time::SystemTime) {
    let since = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let t = latchkey_core::Timestamp::from_unix_secs(since.as_secs()).utc();
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year,
        t.month,
        t.day,
        t.hour,
        t.minute,
        t.second,
        since.subsec_micros()
    );
}

fn format_request(now: std::time::SystemTime, json: bool, line: &RequestLine<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(192);
    if json {
        out.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(&mut out, now);
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\",\"method\":");
        let _ = serde_json::to_writer(&mut out, line.method);
        out.extend_from_slice(b",\"route\":");
        let _ = serde_json::to_writer(&mut out, line.route);
        let _ = write!(out, ",\"status\":{},\"latency_ms\":", line.status);
        let _ = serde_json::to_writer(&mut out, &line.latency_ms);
        if let Some(keyid) = line.keyid {
            out.extend_from_slice(b",\"keyid\":");
            let _ = serde_json::to_writer(&mut out, &keyid.to_string());
        }
        out.extend_from_slice(b"},\"target\":");
        let _ = serde_json::to_writer(&mut out, line.target);
        out.extend_from_slice(b"}\n");
    } else {
        timestamp(&mut out, now);
        let _ = write!(
            out,
            "  INFO {}: request method={} route={:?} status={} latency_ms={:?}",
            line.target, line.method, line.route, line.status, line.latency_ms
        );
        if let Some(keyid) = line.keyid {
            let _ = write!(out, " keyid={keyid}");
        }
        out.push(b'\n');
    }
    out
}

enum Message {
    Line(Vec<u8>),
    Flush(SyncSender<()>),
}

/// The subscriber's writer: each event becomes one queued line.
#[derive(Clone)]
pub struct NonBlocking {
    queue: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

/// Writes out everything queued before it is dropped.
#[must_use = "dropping the guard is what writes out the queued lines"]
pub struct LogGuard {
    queue: SyncSender<Message>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        flush_queue(&self.queue);
    }
}

/// Waits until every line queued so far is written out.
fn flush_queue(queue: &SyncSender<Message>) {
    let (done, wait) = sync_channel(1);
    if queue.send(Message::Flush(done)).is_ok() {
        let _ = wait.recv();
    }
}

/// Writes out every line the installed writer has queued so far (nothing
/// to do when [`init`] installed none): what a process calls before it
/// ends, whichever command's guard is still alive.
pub fn flush() {
    if let Some(installed) = INSTALLED.get() {
        flush_queue(&installed.writer.queue);
    }
}

impl NonBlocking {
    /// A writer whose lines go to `out` through a queue of `capacity` lines,
    /// drained by a thread of its own.
    pub fn new<W: Write + Send + 'static>(out: W, capacity: usize) -> std::io::Result<(NonBlocking, LogGuard)> {
        let (queue, lines) = sync_channel(capacity);
        std::thread::Builder::new().name("latchkey-log".into()).spawn(move || drain(lines, out))?;
        Ok((NonBlocking { queue: queue.clone(), dropped: Arc::default() }, LogGuard { queue }))
    }

    /// Lines dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Queues one line: a `lossy` one is dropped (and counted) when the
    /// queue is full, any other waits for room.
    fn send(&self, line: Vec<u8>, lossy: bool) {
        let line = Message::Line(line);
        if !lossy {
            let _ = self.queue.send(line);
        } else if let Err(TrySendError::Full(_)) = self.queue.try_send(line) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn drain<W: Write>(lines: Receiver<Message>, out: W) {
    let mut out = BufWriter::with_capacity(OUT_BUFFER, out);
    let mut pause = POLL_BUSY;
    loop {
        let mut wrote = false;
        loop {
            match lines.try_recv() {
                Ok(Message::Line(line)) => {
                    let _ = out.write_all(&line);
                    wrote = true;
                }
                Ok(Message::Flush(done)) => {
                    let _ = out.flush();
                    let _ = done.send(());
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        if wrote {
            let _ = out.flush();
            pause = POLL_BUSY;
        } else {
            pause = (pause * 2).min(POLL_IDLE);
        }
        std::thread::sleep(pause);
    }
}

/// One event's line, queued when the subscriber has written it.
pub struct Line<'a> {
    writer: &'a NonBlocking,
    buf: Vec<u8>,
    lossy: bool,
}

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.writer.send(std::mem::take(&mut self.buf), self.lossy);
        }
    }
}

/// Whether an event may be dropped when the queue is full: `info` and more
/// verbose, except audit lines.
fn lossy(meta: &Metadata<'_>) -> bool {
    *meta.level() >= Level::INFO && meta.target() != crate::audit::TARGET
}

impl<'a> MakeWriter<'a> for NonBlocking {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line { writer: self, buf: Vec::new(), lossy: false }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        Line { writer: self, buf: Vec::new(), lossy: lossy(meta) }
    }
}

/// Installs the process's subscriber: `filter` (a tracing filter such as
/// `info`; an invalid one falls back to `info`), text or JSON lines, to
/// stderr through a [`NonBlocking`] writer. Keep the guard until the end of
/// the command.
pub fn init(filter: &str, json: bool) -> Option<LogGuard> {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = match NonBlocking::new(std::io::stderr(), QUEUE_LINES) {
        Ok(pair) => pair,
        Err(_) => {
            // No thread for the writer: log straight to stderr.
            tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
            return None;
        }
    };
    // A terminal gets the subscriber's colours on every line, request lines included.
    let _ = INSTALLED.set(Installed { writer: writer.clone(), json, plain: !ansi });
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    Some(guard)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A destination that holds every write until it is opened.
    #[derive(Clone, Default)]
    struct Gate {
        open: Arc<(Mutex<bool>, std::sync::Condvar)>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Gate {
        fn open(&self) {
            *self.open.0.lock().unwrap() = true;
            self.open.1.notify_all();
        }

        fn text(&self) -> String {
            String::from_utf8(self.written.lock().unwrap().clone()).unwrap()
        }
    }

    impl Write for Gate {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let mut open = self.open.0.lock().unwrap();
            while !*open {
                open = self.open.1.wait(open).unwrap();
            }
            self.written.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn line(writer: &NonBlocking, text: &str, lossy: bool) {
        let mut line = Line { writer, buf: Vec::new(), lossy };
        line.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn a_full_queue_drops_and_counts_lossy_lines_and_keeps_the_rest() {
        let gate = Gate::default();
        let (writer, guard) = NonBlocking::new(gate.clone(), 2).unwrap();
        // The drain thread takes what is queued and blocks writing it out
        // behind the closed gate; the queue then fills and a line is dropped.
        line(&writer, "first\n", true);
        let mut queued = 1;
        while writer.dropped() == 0 {
            line(&writer, &format!("lossy {queued}\n"), true);
            queued += 1;
        }
        let dropped = writer.dropped();
        // A line that must not be lost waits for room instead.
        let keeper = {
            let writer = writer.clone();
            std::thread::spawn(move || line(&writer, "audit\n", false))
        };
        gate.open();
        keeper.join().unwrap();
        drop(guard);
        let text = gate.text();
        assert!(text.starts_with("first\n"), "{text}");
        assert!(text.ends_with("audit\n"), "{text}");
        assert_eq!(text.lines().count() as u64 + dropped, queued + 1, "every line written or counted: {text}");
        assert_eq!(writer.dropped(), dropped, "the line that waited was not dropped");
    }

    #[test]
    fn the_guard_writes_out_what_is_queued() {
        let out = Gate::default();
        out.open();
        let (writer, guard) = NonBlocking::new(out.clone(), 16).unwrap();
        for i in 0..10 {
            line(&writer, &format!("line {i}\n"), true);
        }
        drop(guard);
        assert_eq!(out.text().lines().count(), 10);
        assert_eq!(writer.dropped(), 0);
    }

    /// What the subscriber writes for `event`, in text or JSON, without colours.
    fn through_tracing(json: bool, event: impl FnOnce()) -> String {
        let out = Gate::default();
        out.open();
        let (writer, guard) = NonBlocking::new(out.clone(), 16).unwrap();
        let builder = tracing_subscriber::fmt().with_writer(writer).with_ansi(false);
        if json {
            tracing::subscriber::with_default(builder.json().finish(), event);
        } else {
            tracing::subscriber::with_default(builder.finish(), event);
        }
        drop(guard);
        out.text()
    }

    #[test]
    fn the_request_line_is_the_line_the_subscriber_would_write() {
        let keyid = "AbCdEfGhIjKlMnOpQrStUv";
        for json in [false, true] {
            for key in [Some(keyid), None] {
                let ours = RequestLine {
                    target: "latchkey_server::http::metrics",
                    method: "GET",
                    route: "/refresh",
                    status: 200,
                    latency_ms: 0.123_456,
                    keyid: key.as_ref().map(|k| k as &dyn std::fmt::Display),
                };
                let ours = String::from_utf8(format_request(std::time::SystemTime::now(), json, &ours)).unwrap();
                let theirs = through_tracing(json, || {
                    let (method, route, status, latency_ms) = ("GET", "/refresh", 200u16, 0.123_456f64);
                    match key {
                        Some(keyid) => {
                            tracing::info!(target: "latchkey_server::http::metrics", %method, route, status, latency_ms, %keyid, "request")
                        }
                        None => {
                            tracing::info!(target: "latchkey_server::http::metrics", %method, route, status, latency_ms, "request")
                        }
                    }
                });
                if json {
                    let mut ours: serde_json::Value = serde_json::from_str(&ours).unwrap();
                    let mut theirs: serde_json::Value = serde_json::from_str(&theirs).unwrap();
                    let (a, b) = (ours["timestamp"].take(), theirs["timestamp"].take());
                    assert_eq!(ours, theirs, "json, keyid {key:?}");
                    assert_eq!(a.as_str().unwrap().len(), b.as_str().unwrap().len(), "{a} {b}");
                } else {
                    // The same after the timestamp, and a timestamp of the same shape.
                    let (a, rest_ours) = ours.split_once(' ').unwrap();
                    let (b, rest_theirs) = theirs.split_once(' ').unwrap();
                    assert_eq!(rest_ours, rest_theirs, "text, keyid {key:?}");
                    let shape =
                        |t: &str| t.chars().map(|c| if c.is_ascii_digit() { '0' } else { c }).collect::<String>();
                    assert_eq!(shape(a), shape(b));
                }
            }
        }
    }

    #[test]
    fn timestamps_are_utc_with_microseconds() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::new(1_764_486_366, 123_456_789);
        let mut out = Vec::new();
        timestamp(&mut out, at);
        assert_eq!(String::from_utf8(out).unwrap(), "2025-11-30T07:06:06.123456Z");
    }

    #[test]
    fn audit_warnings_and_errors_are_never_lossy() {
        use tracing::callsite::Identifier;
        use tracing::field::FieldSet;
        use tracing::metadata::Kind;
        struct Callsite;
        impl tracing::callsite::Callsite for Callsite {
            fn set_interest(&self, _: tracing::subscriber::Interest) {}
            fn metadata(&self) -> &Metadata<'_> {
                unreachable!()
            }
        }
        static CALLSITE: Callsite = Callsite;
        let meta = |level, target| {
            Metadata::new("e", target, level, None, None, None, FieldSet::new(&[], Identifier(&CALLSITE)), Kind::EVENT)
        };
        assert!(lossy(&meta(Level::INFO, "latchkey_server::http::metrics")));
        assert!(lossy(&meta(Level::DEBUG, "latchkey_server")));
        assert!(!lossy(&meta(Level::INFO, crate::audit::TARGET)));
        assert!(!lossy(&meta(Level::WARN, "latchkey_server")));
        assert!(!lossy(&meta(Level::ERROR, "latchkey_core")));
    }
}
