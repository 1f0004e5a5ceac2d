//! Log output that never makes a request wait on a write.
//!
//! Every event is formatted on the thread that logs it (that is the tracing
//! subscriber's work) and handed, as one line, to a bounded queue; one
//! thread of its own drains the queue into a buffered stderr and flushes
//! whenever the queue runs empty, so a burst of requests costs one `write`
//! per burst instead of one per line, and no worker thread ever parks on the
//! stderr lock.
//!
//! When the queue is full (stderr cannot keep up: a slow pipe, a stalled
//! journal), request lines and other `info`/`debug` lines are dropped and
//! counted (`latchkey_log_lines_dropped_total` in `/metrics`); warnings,
//! errors and every audit line (`latchkey::audit`) wait for room instead,
//! so what an operator must see is never lost. [`LogGuard`] writes out what
//! is queued when it is dropped (at the end of a command).

use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, OnceLock};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Lines the queue holds before lossy lines are dropped.
pub const QUEUE_LINES: usize = 65_536;

/// The capacity of the buffer between the queue and stderr.
const OUT_BUFFER: usize = 64 * 1024;

/// The drop counter of the writer [`init`] installed.
static INSTALLED: OnceLock<Arc<AtomicU64>> = OnceLock::new();

/// Lines dropped so far by the installed writer (0 when none is installed,
/// as in a program that embeds the broker with its own subscriber).
pub fn dropped_lines() -> u64 {
    INSTALLED.get().map_or(0, |n| n.load(Ordering::Relaxed))
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
        let (done, wait) = sync_channel(1);
        if self.queue.send(Message::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
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
}

fn drain<W: Write>(lines: Receiver<Message>, out: W) {
    let mut out = BufWriter::with_capacity(OUT_BUFFER, out);
    let handle = |message: Message, out: &mut BufWriter<W>| match message {
        Message::Line(line) => {
            let _ = out.write_all(&line);
        }
        Message::Flush(done) => {
            let _ = out.flush();
            let _ = done.send(());
        }
    };
    while let Ok(first) = lines.recv() {
        handle(first, &mut out);
        while let Ok(next) = lines.try_recv() {
            handle(next, &mut out);
        }
        let _ = out.flush();
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
        if self.buf.is_empty() {
            return;
        }
        let line = Message::Line(std::mem::take(&mut self.buf));
        if !self.lossy {
            let _ = self.writer.queue.send(line);
        } else if let Err(TrySendError::Full(_)) = self.writer.queue.try_send(line) {
            self.writer.dropped.fetch_add(1, Ordering::Relaxed);
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
    let _ = INSTALLED.set(Arc::clone(&writer.dropped));
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
