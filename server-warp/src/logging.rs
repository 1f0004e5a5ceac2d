//! Log output that never makes a request wait on a write.
//!
//! Every event is formatted on the thread that logs it (that is the tracing
//! subscriber's work) and appended, as one line, to a bounded buffer shared
//! by every thread; one thread of its own takes the whole buffer every
//! 10 ms while lines come (every 50 ms at most when idle), writes it
//! to stderr and flushes, so a burst of requests costs one `write` per
//! batch instead of one per line, no worker thread ever parks on the stderr
//! lock or makes a system call to wake the writer, and no line is a heap
//! allocation handed to another thread (freeing it there contended for the
//! allocator's locks). Lines keep the order they were logged in.
//!
//! When the buffer is full (stderr cannot keep up: a slow pipe, a stalled
//! journal), request lines and other `info`/`debug` lines are dropped and
//! counted (`latchkey_log_lines_dropped_total` in `/metrics`); warnings,
//! errors and every audit line (`latchkey::audit`) wait for room instead,
//! so what an operator must see is never lost. [`LogGuard`] writes out what
//! is queued when it is dropped (at the end of a command).

use std::cell::RefCell;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use latchkey_core::KeyId;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Bytes of lines the buffer holds before lossy lines are dropped: about
/// 50,000 request lines, a second of a busy broker's.
pub const QUEUE_BYTES: usize = 8 * 1024 * 1024;

/// How long the writer pauses after writing a batch. It polls the buffer
/// instead of sleeping on it: a writer asleep on the buffer must be woken
/// by a system call on nearly every line, on the thread that logs it. Each
/// wake-up takes a CPU from a worker or a client, so it polls every 10 ms
/// rather than every millisecond (a busy broker's batch: about 1,000 lines,
/// 130 KB; BENCHMARKS.md, sixth round).
const POLL_BUSY: Duration = Duration::from_millis(10);
/// The longest pause, reached by doubling while nothing is logged: how
/// late a line may appear on an idle broker.
const POLL_IDLE: Duration = Duration::from_millis(50);
/// How often a line that must not be lost looks for room again.
const ROOM_POLL: Duration = Duration::from_millis(1);

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
    /// Written as milliseconds (`latency_ms`, three decimals at most).
    pub(crate) latency_us: u64,
    pub(crate) keyid: Option<&'a KeyId>,
}

thread_local! {
    /// Where this thread formats its request lines (reused, never freed
    /// elsewhere), and the second its timestamps were last formatted for.
    static SCRATCH: RefCell<(Vec<u8>, Second)> = RefCell::new((Vec::with_capacity(256), Second::default()));
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
    SCRATCH.with_borrow_mut(|(out, second)| {
        out.clear();
        format_request(out, second, std::time::SystemTime::now(), installed.json, line);
        installed.writer.send(out, true);
    });
    true
}

/// A second's `YYYY-MM-DDTHH:MM:SS`, formatted once.
#[derive(Default)]
struct Second {
    unix: Option<u64>,
    text: [u8; 19],
}

/// `now` as the subscriber writes it: RFC 3339, microseconds, `Z`.
fn timestamp(out: &mut Vec<u8>, second: &mut Second, now: std::time::SystemTime) {
    let since = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    if second.unix != Some(since.as_secs()) {
        let t = latchkey_core::Timestamp::from_unix_secs(since.as_secs()).utc();
        let mut text = Vec::with_capacity(19);
        let _ = write!(text, "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}", t.year, t.month, t.day, t.hour, t.minute, t.second);
        if let Ok(text) = text.try_into() {
            *second = Second { unix: Some(since.as_secs()), text };
        }
    }
    out.extend_from_slice(&second.text);
    out.push(b'.');
    digits(out, u64::from(since.subsec_micros()), 6);
    out.push(b'Z');
}

/// `n` in decimal, zero-padded to `width` digits (20 at most, as many as a
/// `u64` has).
pub(crate) fn digits(out: &mut Vec<u8>, n: u64, width: usize) {
    let mut buf = [b'0'; 20];
    let (mut n, mut at) = (n, buf.len());
    while n > 0 || at == buf.len() {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    at = at.min(buf.len().saturating_sub(width));
    out.extend_from_slice(&buf[at..]);
}

/// Microseconds as the milliseconds the request line reports.
pub(crate) fn micros_as_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// `{:?}` of [`micros_as_ms`]`(us)`, without float formatting: the
/// shortest decimal that reads back as that float is the quotient itself,
/// three decimals at most, trailing zeros dropped but one.
fn ms_debug(out: &mut Vec<u8>, us: u64) {
    // Below 2^40 µs (12 days) floats are far closer together than 0.001.
    if us >= 1 << 40 {
        let _ = write!(out, "{:?}", micros_as_ms(us));
        return;
    }
    let (whole, mut frac, mut width) = (us / 1000, us % 1000, 3);
    digits(out, whole, 1);
    out.push(b'.');
    while width > 1 && frac % 10 == 0 {
        frac /= 10;
        width -= 1;
    }
    digits(out, frac, width);
}

/// `{:?}` of a string, without the formatter for the plain ones (route labels).
fn debug_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\' || b == b' ') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{s:?}");
    }
}

/// A key id as its `Display` writes it, without a `String`.
fn keyid_text(out: &mut Vec<u8>, keyid: &KeyId) {
    out.extend_from_slice(keyid.text().as_bytes());
}

fn format_request(
    out: &mut Vec<u8>,
    second: &mut Second,
    now: std::time::SystemTime,
    json: bool,
    line: &RequestLine<'_>,
) {
    if json {
        out.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(out, second, now);
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\",\"method\":");
        let _ = serde_json::to_writer(&mut *out, line.method);
        out.extend_from_slice(b",\"route\":");
        let _ = serde_json::to_writer(&mut *out, line.route);
        out.extend_from_slice(b",\"status\":");
        digits(out, u64::from(line.status), 1);
        out.extend_from_slice(b",\"latency_ms\":");
        let _ = serde_json::to_writer(&mut *out, &micros_as_ms(line.latency_us));
        if let Some(keyid) = line.keyid {
            out.extend_from_slice(b",\"keyid\":\"");
            keyid_text(out, keyid);
            out.push(b'"');
        }
        out.extend_from_slice(b"},\"target\":");
        let _ = serde_json::to_writer(&mut *out, line.target);
        out.extend_from_slice(b"}\n");
    } else {
        timestamp(out, second, now);
        out.extend_from_slice(b"  INFO ");
        out.extend_from_slice(line.target.as_bytes());
        out.extend_from_slice(b": request method=");
        out.extend_from_slice(line.method.as_bytes());
        out.extend_from_slice(b" route=");
        debug_str(out, line.route);
        out.extend_from_slice(b" status=");
        digits(out, u64::from(line.status), 1);
        out.extend_from_slice(b" latency_ms=");
        ms_debug(out, line.latency_us);
        if let Some(keyid) = line.keyid {
            out.extend_from_slice(b" keyid=");
            keyid_text(out, keyid);
        }
        out.push(b'\n');
    }
}

/// What the writer's handles and its thread share.
struct Shared {
    /// Lines logged and not yet taken by the writer, in the order logged.
    pending: Mutex<Vec<u8>>,
    /// Held while a batch is taken and written, so batches keep their order.
    out: Mutex<Box<dyn Write + Send>>,
    /// The most `pending` holds before lossy lines are dropped.
    capacity: usize,
    dropped: AtomicU64,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    /// Writes out what is pending, swapping it with `spare` (an empty
    /// buffer, kept for the next batch); answers whether there was any.
    fn write_out(&self, spare: &mut Vec<u8>) -> bool {
        let mut out = lock(&self.out);
        std::mem::swap(&mut *lock(&self.pending), spare);
        if spare.is_empty() {
            return false;
        }
        let _ = out.write_all(spare);
        let _ = out.flush();
        spare.clear();
        true
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let pending = self.pending.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        let out = self.out.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        let _ = out.write_all(pending);
        let _ = out.flush();
    }
}

/// The subscriber's writer: each event becomes one queued line.
#[derive(Clone)]
pub struct NonBlocking {
    shared: Arc<Shared>,
}

/// Writes out everything queued before it is dropped.
#[must_use = "dropping the guard is what writes out the queued lines"]
pub struct LogGuard {
    shared: Arc<Shared>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.write_out(&mut Vec::new());
    }
}

/// Writes out every line the installed writer has queued so far (nothing
/// to do when [`init`] installed none): what a process calls before it
/// ends, whichever command's guard is still alive.
pub fn flush() {
    if let Some(installed) = INSTALLED.get() {
        installed.writer.shared.write_out(&mut Vec::new());
    }
}

impl NonBlocking {
    /// A writer whose lines go to `out` through a buffer of `capacity`
    /// bytes, written out by a thread of its own.
    pub fn new<W: Write + Send + 'static>(out: W, capacity: usize) -> std::io::Result<(NonBlocking, LogGuard)> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Vec::new()),
            out: Mutex::new(Box::new(out)),
            capacity,
            dropped: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new().name("latchkey-log".into()).spawn(move || drain(weak))?;
        Ok((NonBlocking { shared: Arc::clone(&shared) }, LogGuard { shared }))
    }

    /// Lines dropped so far because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Queues one line: a `lossy` one is dropped (and counted) when the
    /// buffer is full, any other waits for room.
    fn send(&self, line: &[u8], lossy: bool) {
        loop {
            {
                let mut pending = lock(&self.shared.pending);
                // A line longer than the whole buffer still goes, alone.
                if pending.len() + line.len() <= self.shared.capacity || pending.is_empty() {
                    pending.extend_from_slice(line);
                    return;
                }
            }
            if lossy {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            std::thread::sleep(ROOM_POLL);
        }
    }
}

/// The writer's thread: until every handle is gone (the last one writes out
/// what is left as it drops).
fn drain(shared: Weak<Shared>) {
    let mut spare = Vec::new();
    let mut pause = POLL_BUSY;
    while let Some(shared) = shared.upgrade() {
        if shared.write_out(&mut spare) {
            pause = POLL_BUSY;
        } else {
            pause = (pause * 2).min(POLL_IDLE);
        }
        drop(shared);
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
            self.writer.send(&self.buf, self.lossy);
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
    let (writer, guard) = match NonBlocking::new(std::io::stderr(), QUEUE_BYTES) {
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
        let (writer, guard) = NonBlocking::new(gate.clone(), 16).unwrap();
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
        let (writer, guard) = NonBlocking::new(out.clone(), 1024).unwrap();
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
        let (writer, guard) = NonBlocking::new(out.clone(), 4096).unwrap();
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
        let keyid = KeyId::from_bytes(*b"0123456789abcdef");
        for json in [false, true] {
            for key in [Some(&keyid), None] {
                let ours = RequestLine {
                    target: "latchkey_server::http::metrics",
                    method: "GET",
                    route: "/refresh",
                    status: 200,
                    latency_us: 1_234_560,
                    keyid: key,
                };
                let mut out = Vec::new();
                format_request(&mut out, &mut Second::default(), std::time::SystemTime::now(), json, &ours);
                let ours = String::from_utf8(out).unwrap();
                let theirs = through_tracing(json, || {
                    let (method, route, status, latency_ms) = ("GET", "/refresh", 200u16, 1234.56f64);
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
    fn latencies_and_labels_are_written_as_their_debug_formats() {
        let mut cases: Vec<u64> = (0..=12_000).collect();
        cases.extend([
            99_999,
            100_000,
            1_000_001,
            123_456_789,
            u64::from(u32::MAX) * 1000 + 7,
            (1 << 40) - 1,
            1 << 40,
            (1 << 53) - 1,
        ]);
        for us in cases {
            let mut out = Vec::new();
            ms_debug(&mut out, us);
            assert_eq!(String::from_utf8(out).unwrap(), format!("{:?}", micros_as_ms(us)), "{us} µs");
        }
        for label in ["/refresh", "/static", "other", "/v1/token", "with \"quote\"", "back\\slash", "tab\t", "é"] {
            let mut out = Vec::new();
            debug_str(&mut out, label);
            assert_eq!(String::from_utf8(out).unwrap(), format!("{label:?}"));
        }
    }

    #[test]
    fn numbers_are_written_in_decimal_zero_padded() {
        let mut values: Vec<u64> = (0..=1_100).collect();
        values.extend((1..20).flat_map(|e| [10u64.pow(e) - 1, 10u64.pow(e), 10u64.pow(e) + 1]));
        values.extend([u64::from(u32::MAX), u64::MAX - 1, u64::MAX]);
        for n in values {
            for width in [1, 3, 6, 20] {
                let mut out = Vec::new();
                digits(&mut out, n, width);
                assert_eq!(String::from_utf8(out).unwrap(), format!("{n:0width$}"), "{n} to {width}");
            }
        }
    }

    #[test]
    fn timestamps_are_utc_with_microseconds() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::new(1_764_486_366, 123_456_789);
        let (mut out, mut second) = (Vec::new(), Second::default());
        timestamp(&mut out, &mut second, at);
        assert_eq!(String::from_utf8(out).unwrap(), "2025-11-30T07:06:06.123456Z");
        // The second is formatted once and reused; the next one is its own.
        for (later, text) in [
            (at + Duration::from_micros(1), "2025-11-30T07:06:06.123457Z"),
            (at + Duration::from_secs(1) - Duration::from_micros(123_456), "2025-11-30T07:06:07.000000Z"),
            (at + Duration::from_secs(86_400 + 3_600), "2025-12-01T08:06:06.123456Z"),
            (at + Duration::from_micros(7), "2025-11-30T07:06:06.123463Z"),
        ] {
            let mut out = Vec::new();
            timestamp(&mut out, &mut second, later);
            assert_eq!(String::from_utf8(out).unwrap(), text);
        }
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
