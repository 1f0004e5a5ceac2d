//! Notices over LISTEN/NOTIFY: one dedicated connection per store, fanned out
//! to every subscriber, reconnected with backoff when the server goes away.
//! Notices sent while it was away are lost, so after every reconnect the
//! subscribers get [`Notice::Resync`] (drop every cache, re-read).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_channel::mpsc;
use futures_util::StreamExt;
use futures_util::stream::poll_fn;
use latchkey_core::{GrantId, Notice, NoticeStream, StoreError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, Connection, NoTls};

use crate::tls::Transport;

/// How long `subscribe` waits for the listening connection.
const LISTEN_WAIT: Duration = Duration::from_secs(5);
/// First and longest pause between reconnection attempts.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));

/// Encodes a notice as the NOTIFY payload: `c:` (grant changed) or `r:`
/// (token refreshed), then the grant id in lowercase hex. `None` for
/// [`Notice::Resync`], which never goes over the wire.
pub(crate) fn encode(notice: Notice) -> Option<String> {
    let (tag, grant) = match notice {
        Notice::GrantChanged(g) => ('c', g),
        Notice::TokenRefreshed(g) => ('r', g),
        Notice::Resync => return None,
    };
    let mut out = format!("{tag}:");
    for b in grant.as_bytes() {
        out.push_str(&format!("{b:02x}"));
    }
    Some(out)
}

/// Decodes a payload written by [`encode`]; anything else is `None`.
pub(crate) fn decode(payload: &str) -> Option<Notice> {
    let (tag, hex) = payload.split_once(':')?;
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    let grant = GrantId::from_bytes(id);
    match tag {
        "c" => Some(Notice::GrantChanged(grant)),
        "r" => Some(Notice::TokenRefreshed(grant)),
        _ => None,
    }
}

/// What the listening task shares with the store.
struct Shared {
    subscribers: Mutex<Vec<mpsc::UnboundedSender<Notice>>>,
    /// Whether the LISTEN is in effect on a live connection.
    listening: watch::Sender<bool>,
}

impl Shared {
    fn subscribers(&self) -> MutexGuard<'_, Vec<mpsc::UnboundedSender<Notice>>> {
        // Every mutation is a single Vec operation; a poisoned lock holds a valid list.
        self.subscribers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn deliver(&self, payload: &str) {
        if let Some(notice) = decode(payload) {
            self.send(notice);
        }
    }

    fn send(&self, notice: Notice) {
        self.subscribers().retain(|tx| tx.unbounded_send(notice).is_ok());
    }
}

/// The store's listening side; the task starts with the first subscriber and
/// stops when the store is dropped.
pub(crate) struct Listener {
    config: tokio_postgres::Config,
    transport: Transport,
    listen_sql: String,
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Listener {
    pub(crate) fn new(config: tokio_postgres::Config, transport: Transport, channel: &str) -> Self {
        Listener {
            config,
            transport,
            listen_sql: format!("LISTEN \"{channel}\""),
            shared: Arc::new(Shared { subscribers: Mutex::default(), listening: watch::Sender::new(false) }),
            task: Mutex::default(),
        }
    }

    /// Registers a subscriber, then returns once the LISTEN is in effect, so
    /// every notice published afterwards reaches it.
    pub(crate) async fn subscribe(&self) -> Result<NoticeStream, StoreError> {
        let (tx, rx) = mpsc::unbounded();
        {
            let mut subscribers = self.shared.subscribers();
            subscribers.retain(|s| !s.is_closed());
            subscribers.push(tx);
        }
        self.start()?;
        let mut listening = self.shared.listening.subscribe();
        match tokio::time::timeout(LISTEN_WAIT, listening.wait_for(|on| *on)).await {
            Ok(Ok(_)) => Ok(Box::pin(rx)),
            Ok(Err(e)) => Err(StoreError::Unavailable { retryable: false, source: Some(Box::new(e)) }),
            Err(e) => Err(StoreError::unavailable(e)),
        }
    }

    /// Hands a notice to this store's subscribers only (no NOTIFY).
    pub(crate) fn deliver_locally(&self, notice: Notice) {
        self.shared.send(notice);
    }

    fn start(&self) -> Result<(), StoreError> {
        let mut task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if task.as_ref().is_none_or(JoinHandle::is_finished) {
            let runtime = tokio::runtime::Handle::try_current()
                .map_err(|e| StoreError::Unavailable { retryable: false, source: Some(Box::new(e)) })?;
            let (config, sql, shared) = (self.config.clone(), self.listen_sql.clone(), Arc::clone(&self.shared));
            *task = Some(runtime.spawn(run(config, self.transport.clone(), sql, shared)));
        }
        Ok(())
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(task) = self.task.get_mut().unwrap_or_else(PoisonError::into_inner).take() {
            task.abort();
        }
    }
}

/// Listens, and after every lost connection listens again, forever. Every
/// LISTEN after the first is announced to the subscribers with
/// [`Notice::Resync`]: whatever was published in between is lost.
async fn run(config: tokio_postgres::Config, transport: Transport, listen_sql: String, shared: Arc<Shared>) {
    let mut backoff = BACKOFF.0;
    let mut resync = false;
    loop {
        let listened = match &transport {
            Transport::Plain => listen_once(config.connect(NoTls).await, &listen_sql, &shared, resync).await,
            #[cfg(feature = "tls")]
            Transport::Tls(tls) => listen_once(config.connect(tls.clone()).await, &listen_sql, &shared, resync).await,
        };
        if listened {
            backoff = BACKOFF.0;
            resync = true;
        }
        shared.listening.send_replace(false);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

/// One connection's life, from its connect result: LISTEN, (with `resync`)
/// tell the subscribers that notices may have been lost, deliver until it
/// ends. Answers whether the LISTEN took effect.
async fn listen_once<S, T>(
    connected: Result<(Client, Connection<S, T>), tokio_postgres::Error>,
    listen_sql: &str,
    shared: &Shared,
    resync: bool,
) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Ok((client, mut connection)) = connected else { return false };
    // The connection is polled here, not spawned, to see its notifications.
    let mut messages = poll_fn(move |cx| connection.poll_message(cx));
    {
        let mut listen = std::pin::pin!(client.batch_execute(listen_sql));
        loop {
            tokio::select! {
                done = &mut listen => match done {
                    Ok(()) => break,
                    Err(_) => return false,
                },
                message = messages.next() => match message {
                    Some(Ok(AsyncMessage::Notification(n))) => shared.deliver(n.payload()),
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return false,
                },
            }
        }
    }
    if resync {
        shared.send(Notice::Resync);
    }
    shared.listening.send_replace(true);
    while let Some(Ok(message)) = messages.next().await {
        if let AsyncMessage::Notification(n) = message {
            shared.deliver(n.payload());
        }
    }
    drop(client);
    true
}
