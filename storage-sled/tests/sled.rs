//! latchkey-storage-sled's integration tests: one binary, one module per concern.

use latchkey_storage_sled::SledStore;
use tempfile::TempDir;

/// A store in its own temporary directory, removed after the store closes
/// (fields drop in order: the database closes before the directory goes).
type TempStore = latchkey_core::testing::Guarded<SledStore, TempDir>;

async fn fresh_store() -> TempStore {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).await.expect("open fresh store");
    TempStore::new(store, dir)
}

/// A small seeded xorshift64* generator: reproducible test inputs and kill timings.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// The shared Store conformance suite, every case on a fresh store in its own directory.
mod conformance {
    latchkey_core::store_conformance_tests!(async { super::fresh_store().await });
}

// The same operations on SledStore and MemoryStore give the same answers (listing edge cases above all).
mod differential {
    use latchkey_core::memory::MemoryStore;
    use latchkey_core::records::RecordKind;
    use latchkey_core::store::{ListQuery, Store, StoreError};

    use super::{XorShift, fresh_store};

    /// Errors compared by meaning; backend sources differ by design.
    fn outcome<T: std::fmt::Debug>(result: Result<T, StoreError>) -> String {
        match result {
            Ok(value) => format!("ok {value:?}"),
            Err(StoreError::NotFound) => "not found".into(),
            Err(StoreError::Conflict) => "conflict".into(),
            Err(e) => panic!("unexpected store error: {e:?}"),
        }
    }

    fn random_id(rng: &mut XorShift) -> Vec<u8> {
        // Short ids over bytes that sit at the edges of the key space, so ids
        // collide, prefix one another, and look like neighbouring kind codes.
        const ALPHABET: [u8; 5] = [0x00, 0x01, 0x02, 0x7f, 0xff];
        let len = rng.below(4) as usize;
        (0..len).map(|_| ALPHABET[rng.below(ALPHABET.len() as u64) as usize]).collect()
    }

    fn random_kind(rng: &mut XorShift) -> RecordKind {
        // Mostly two adjacent kinds, so their key ranges touch.
        match rng.below(5) {
            0 | 1 => RecordKind::Grant,
            2 | 3 => RecordKind::Handle,
            _ => RecordKind::DeviceGrant,
        }
    }

    fn random_group(rng: &mut XorShift) -> Option<Vec<u8>> {
        match rng.below(3) {
            0 => None,
            1 => Some(b"g1".to_vec()),
            _ => Some(b"g2".to_vec()),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sled_answers_like_the_memory_store() {
        let sled = fresh_store().await;
        let memory = MemoryStore::new();
        let mut rng = XorShift(0x5EED_1234_ABCD_0001);
        for step in 0..400 {
            let kind = random_kind(&mut rng);
            let id = random_id(&mut rng);
            let group = random_group(&mut rng);
            let body = format!("body-{step}").into_bytes();
            let (a, b) = match rng.below(8) {
                0..=2 => (
                    outcome(sled.insert(kind, &id, group.as_deref(), &body).await),
                    outcome(memory.insert(kind, &id, group.as_deref(), &body).await),
                ),
                3 | 4 => {
                    let expected = 1 + rng.below(3);
                    (
                        outcome(sled.compare_and_swap(kind, &id, expected, group.as_deref(), &body).await),
                        outcome(memory.compare_and_swap(kind, &id, expected, group.as_deref(), &body).await),
                    )
                }
                5 => {
                    let expected = [None, Some(1), Some(2)][rng.below(3) as usize];
                    (outcome(sled.delete(kind, &id, expected).await), outcome(memory.delete(kind, &id, expected).await))
                }
                6 => (outcome(sled.get(kind, &id).await), outcome(memory.get(kind, &id).await)),
                _ => {
                    let after = if rng.below(3) == 0 { None } else { Some(random_id(&mut rng)) };
                    let limit = rng.below(5) as usize; // includes 0, which means 1
                    let query = ListQuery { kind, group, after, limit };
                    (outcome(sled.list(&query).await), outcome(memory.list(&query).await))
                }
            };
            assert_eq!(a, b, "step {step}: sled and memory disagree");
        }
        // Full listings of every kind and group agree too, paging to the end.
        for kind in RecordKind::ALL {
            for group in [None, Some(b"g1".to_vec()), Some(b"g2".to_vec())] {
                let mut query = ListQuery { kind, group, after: None, limit: 2 };
                loop {
                    let (a, b) =
                        (sled.list(&query).await.expect("sled list"), memory.list(&query).await.expect("list"));
                    assert_eq!(a, b, "{query:?}");
                    match a.next {
                        Some(next) => query.after = Some(next),
                        None => break,
                    }
                }
            }
        }
    }
}

// The on-disk value layout is pinned, and corrupt values answer Corrupt instead of panicking.
mod layout {
    use latchkey_core::records::RecordKind;
    use latchkey_core::store::{ListQuery, Store, StoreError};
    use latchkey_storage_sled::SledStore;

    fn raw_tree(dir: &std::path::Path) -> (sled::Db, sled::Tree) {
        // No background flusher (as the adapter opens it): its thread would
        // hold the directory's lock for a moment after the Db is dropped, and
        // the adapter's open that follows would find it taken.
        let db = sled::Config::new().path(dir).flush_every_ms(None).open().expect("open raw sled");
        let tree = db.open_tree("records").expect("records tree");
        (db, tree)
    }

    fn is_corrupt<T: std::fmt::Debug>(result: &Result<T, StoreError>) -> bool {
        matches!(result, Err(StoreError::Corrupt { .. }))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn values_are_stored_in_the_documented_layout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).await.expect("open");
        store.insert(RecordKind::Handle, b"id", Some(b"grp"), b"first").await.expect("insert");
        store.compare_and_swap(RecordKind::Handle, b"id", 1, Some(b"g2"), b"body").await.expect("cas");
        store.insert(RecordKind::Lease, b"", None, b"x").await.expect("insert");
        drop(store);

        let (_db, tree) = raw_tree(dir.path());
        let handle = tree.get([2, b'i', b'd']).expect("get").expect("key = kind code ++ id");
        let mut expected = vec![1, 0, 0, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 2, b'g', b'2'];
        expected.extend_from_slice(b"body");
        assert_eq!(&handle[..], &expected[..]);
        let lease = tree.get([5]).expect("get").expect("empty id is the bare kind code");
        assert_eq!(&lease[..], &[1, 0, 0, 0, 0, 0, 0, 0, 1, 0, b'x']);
        assert_eq!(tree.len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_values_answer_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A valid value with a group: format, version 7, tag 1, length 3, "grp", body "body".
        let mut valid = vec![1, 0, 0, 0, 0, 0, 0, 0, 7, 1, 0, 0, 0, 3];
        valid.extend_from_slice(b"grpbody");
        let header = 14 + 3;
        let bad: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("unknown format", vec![2, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
            ("bad group tag", vec![1, 0, 0, 0, 0, 0, 0, 0, 1, 2]),
            ("group length past the end", vec![1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0xff, 0xff, 0xff, 0xff, b'g']),
        ];
        {
            // Written straight into sled under Grant keys, bypassing the adapter's encoder.
            let (db, tree) = raw_tree(dir.path());
            let grant_key = |id: &[u8]| [&[RecordKind::Grant as u8][..], id].concat();
            for (name, value) in &bad {
                tree.insert(grant_key(name.as_bytes()), value.clone()).expect("raw insert");
            }
            // Every truncation of the valid value.
            for len in 0..=valid.len() {
                tree.insert(grant_key(format!("cut-{len:02}").as_bytes()), &valid[..len]).expect("raw insert");
            }
            db.flush().expect("flush");
        }

        let store = SledStore::open(dir.path()).await.expect("open");
        for (name, _) in &bad {
            let id = name.as_bytes();
            let got = store.get(RecordKind::Grant, id).await;
            assert!(is_corrupt(&got), "{name}: get answered {got:?}");
            let cas = store.compare_and_swap(RecordKind::Grant, id, 1, None, b"x").await;
            assert!(is_corrupt(&cas), "{name}: cas answered {cas:?}");
            let delete = store.delete(RecordKind::Grant, id, Some(1)).await;
            assert!(is_corrupt(&delete), "{name}: versioned delete answered {delete:?}");
        }
        for len in 0..=valid.len() {
            let got = store.get(RecordKind::Grant, format!("cut-{len:02}").as_bytes()).await;
            if len < header {
                assert!(is_corrupt(&got), "cut at {len}: {got:?}");
            } else {
                // The body is the rest of the value, so a cut inside it is still a record.
                let record = got.expect("decodes").expect("present");
                assert_eq!((record.version, record.group.as_deref()), (7, Some(&b"grp"[..])));
                assert_eq!(record.body, &valid[header..len]);
            }
        }
        let listed = store.list(&ListQuery::all(RecordKind::Grant, 100)).await;
        assert!(is_corrupt(&listed), "list answered {listed:?}");

        // An operator can still clear a corrupt record with an unconditional delete.
        for (name, _) in &bad {
            store.delete(RecordKind::Grant, name.as_bytes(), None).await.expect("unconditional delete");
            assert!(store.get(RecordKind::Grant, name.as_bytes()).await.expect("get").is_none());
        }
    }
}

// Records survive a clean close and reopen; an unusable directory is a clear error; no runtime is needed.
mod durability {
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use latchkey_core::records::RecordKind;
    use latchkey_core::store::{ListQuery, Store, StoreError};
    use latchkey_storage_sled::SledStore;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_survive_close_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = SledStore::open(dir.path()).await.expect("open");
            for i in 0..50u8 {
                store.insert(RecordKind::Handle, &[i], Some(&[i % 3]), &[i, i]).await.expect("insert");
            }
            store.compare_and_swap(RecordKind::Handle, &[7], 1, None, b"changed").await.expect("cas");
            store.delete(RecordKind::Handle, &[8], Some(1)).await.expect("delete");
            store.insert(RecordKind::Grant, b"g", None, b"grant").await.expect("insert");
        }
        let store = SledStore::open(dir.path()).await.expect("reopen");
        let page = store.list(&ListQuery::all(RecordKind::Handle, 100)).await.expect("list");
        assert_eq!(page.items.len(), 49);
        for (id, record) in &page.items {
            let i = id[0];
            if i == 7 {
                assert_eq!((record.version, record.group.as_deref(), &record.body[..]), (2, None, &b"changed"[..]));
            } else {
                assert_eq!(
                    (record.version, record.group.as_deref(), &record.body[..]),
                    (1, Some(&[i % 3][..]), &[i, i][..])
                );
            }
        }
        assert!(store.get(RecordKind::Handle, &[8]).await.expect("get").is_none());
        assert_eq!(store.get(RecordKind::Grant, b"g").await.expect("get").expect("present").body, b"grant");
        // Versions continue from what was stored.
        assert_eq!(store.compare_and_swap(RecordKind::Handle, &[7], 2, None, b"again").await.expect("cas"), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_directory_already_open_is_unavailable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = SledStore::open(dir.path()).await.expect("open");
        let second = SledStore::open(dir.path()).await;
        assert!(
            matches!(second, Err(StoreError::Unavailable { retryable: true, source: Some(_) })),
            "second open answered {second:?}"
        );
        // Its source says so, for the CLI to tell the operator to stop the broker.
        let Err(e) = second else { unreachable!() };
        assert!(std::error::Error::source(&e).is_some_and(|s| s.is::<latchkey_storage_sled::Locked>()), "{e:?}");
        // The first store is unaffected, and once it is closed the directory opens again.
        first.insert(RecordKind::Grant, b"a", None, b"x").await.expect("insert");
        drop(first);
        let again = SledStore::open(dir.path()).await.expect("reopen after close");
        assert!(again.get(RecordKind::Grant, b"a").await.expect("get").is_some());
    }

    /// Polls a future to completion on this thread, with no runtime at all.
    fn poll_without_runtime<F: Future>(future: F) -> F::Output {
        let mut future = pin!(future);
        let mut cx = Context::from_waker(Waker::noop());
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(output) => output,
            Poll::Pending => panic!("outside a runtime the store must answer on the first poll"),
        }
    }

    #[test]
    fn outside_a_runtime_operations_run_inline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = poll_without_runtime(SledStore::open(dir.path())).expect("open");
        poll_without_runtime(store.insert(RecordKind::Grant, b"a", None, b"x")).expect("insert");
        let got = poll_without_runtime(store.get(RecordKind::Grant, b"a")).expect("get").expect("present");
        assert_eq!((got.version, got.body), (1, b"x".to_vec()));
        poll_without_runtime(store.flush()).expect("flush");
    }
}

// A writer process SIGKILLed at random moments never loses a write it acknowledged.
mod crash {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::process::ExitStatusExt;
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use latchkey_core::records::RecordKind;
    use latchkey_core::store::{Store, StoreError, StoredRecord};
    use latchkey_storage_sled::SledStore;

    use super::XorShift;

    /// Set in the child: the store directory it writes to.
    const CHILD_ENV: &str = "LATCHKEY_SLED_CRASH_CHILD";
    /// Overrides the kill-timing seed, to replay a failure.
    const SEED_ENV: &str = "LATCHKEY_SLED_CRASH_SEED";
    const ROUNDS: u32 = 24;
    const KIND: RecordKind = RecordKind::Grant;
    const ID: &[u8] = b"crash-record";
    /// How long a child may take to acknowledge its first write before the test fails.
    const PROGRESS_BOUND: Duration = Duration::from_secs(20);
    /// The whole test must finish well inside this.
    const TOTAL_BOUND: Duration = Duration::from_secs(45);

    #[test]
    fn sigkill_never_loses_an_acknowledged_write() {
        match std::env::var_os(CHILD_ENV) {
            Some(dir) => child(Path::new(&dir)),
            None => parent(),
        }
    }

    /// This test's name as the test harness knows it (module path without the crate).
    fn test_name() -> String {
        let module = module_path!().split_once("::").map_or("", |(_, rest)| rest);
        format!("{module}::sigkill_never_loses_an_acknowledged_write")
    }

    /// The writer: compare-and-swap version v to v + 1 with body "v + 1", and
    /// report each acknowledged version on its own line. Never returns.
    fn child(dir: &Path) -> ! {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build();
        let runtime = runtime.expect("child runtime");
        let result: Result<std::convert::Infallible, StoreError> = runtime.block_on(async {
            let store = SledStore::open(dir).await?;
            let mut version = match store.get(KIND, ID).await? {
                Some(record) => record.version,
                None => {
                    store.insert(KIND, ID, None, b"1").await?;
                    acknowledge(1);
                    1
                }
            };
            loop {
                let body = (version + 1).to_string();
                version = store.compare_and_swap(KIND, ID, version, None, body.as_bytes()).await?;
                acknowledge(version);
            }
        });
        let _ = writeln!(std::io::stderr(), "crash child failed: {result:?}");
        std::process::exit(3)
    }

    fn acknowledge(version: u64) {
        let mut out = std::io::stdout().lock();
        if writeln!(out, "ack {version}").and_then(|()| out.flush()).is_err() {
            std::process::exit(4);
        }
    }

    struct Round {
        acks: Vec<u64>,
        waited_for_first_ack: bool,
        delay: Duration,
    }

    /// Starts a writer, SIGKILLs it at a random moment, and collects every acknowledgement it sent.
    fn run_child(dir: &Path, rng: &mut XorShift) -> Round {
        let mut child = Command::new(std::env::current_exe().expect("current exe"))
            .args([test_name().as_str(), "--exact", "--nocapture"])
            .env(CHILD_ENV, dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn writer");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // The harness prints its own lines too; only ours start with "ack ".
                if let Some(version) = line.strip_prefix("ack ") {
                    tx.send(version.parse::<u64>().expect("ack carries a number")).expect("parent listening");
                }
            }
        });

        let mut acks = Vec::new();
        // One round in four kills during start-up (sled's recovery); the rest while writing.
        let waited_for_first_ack = rng.below(4) != 0;
        let delay = if waited_for_first_ack {
            let first = rx.recv_timeout(PROGRESS_BOUND).unwrap_or_else(|e| {
                let _ = child.kill();
                panic!("writer acknowledged nothing ({e}); exit status {:?}", child.wait())
            });
            acks.push(first);
            Duration::from_micros(rng.below(40_000))
        } else {
            Duration::from_micros(rng.below(15_000))
        };
        // Fault injection: the random kill moment is the one use of real time.
        std::thread::sleep(delay);
        child.kill().expect("SIGKILL the writer");
        let status = child.wait().expect("reap writer");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "the writer must die by our SIGKILL, not exit: {status:?}");
        reader.join().expect("reader thread");
        acks.extend(rx.try_iter());
        Round { acks, waited_for_first_ack, delay }
    }

    fn read_back(runtime: &tokio::runtime::Runtime, dir: &Path) -> Option<StoredRecord> {
        runtime.block_on(async {
            let store = SledStore::open(dir).await.expect("store reopens cleanly after SIGKILL");
            store.get(KIND, ID).await.expect("record decodes after SIGKILL")
        })
    }

    fn parent() {
        let seed = std::env::var(SEED_ENV).ok().and_then(|s| s.parse().ok()).unwrap_or(0x0DDB_1A5E_5BAD_5EED_u64);
        let mut rng = XorShift(seed);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let started = Instant::now();
        // The version found on disk after the previous kill (0: nothing yet).
        let mut on_disk = 0u64;
        let mut total_acks = 0usize;
        let mut rounds_killed_while_writing = 0;
        let mut unacknowledged_survivors = 0;
        for round in 0..ROUNDS {
            assert!(started.elapsed() < TOTAL_BOUND, "crash test exceeded its time bound at round {round}");
            let Round { acks, waited_for_first_ack, delay } = run_child(dir.path(), &mut rng);
            let context =
                format!("seed {seed}, round {round}, kill after {delay:?}, acks {:?}", (acks.first(), acks.last()));

            // The writer resumed from the stored state and acknowledged consecutive versions.
            for (i, version) in acks.iter().enumerate() {
                assert_eq!(*version, on_disk + 1 + i as u64, "{context}: acknowledgements out of sequence");
            }
            let acknowledged = acks.last().copied().unwrap_or(on_disk);
            let stored = read_back(&runtime, dir.path());
            let version = stored.as_ref().map_or(0, |r| r.version);
            assert!(version >= acknowledged, "{context}: acknowledged version {acknowledged} lost, found {version}");
            // At most the one write in flight at the kill can be there unacknowledged.
            assert!(version <= acknowledged + 1, "{context}: found {version}, beyond anything written");
            if let Some(record) = &stored {
                assert_eq!(record.body, record.version.to_string().into_bytes(), "{context}: body not the one written");
                assert_eq!(record.group, None, "{context}");
            }
            unacknowledged_survivors += usize::from(version == acknowledged + 1);
            total_acks += acks.len();
            rounds_killed_while_writing += usize::from(waited_for_first_ack);
            on_disk = version;
        }
        assert!(rounds_killed_while_writing >= ROUNDS as usize / 2, "too few kills landed during writes");
        assert!(total_acks >= rounds_killed_while_writing, "every round that waited saw at least one write");
        let _ = writeln!(
            std::io::stderr(),
            "crash test: seed {seed}, {ROUNDS} kills ({rounds_killed_while_writing} while writing), \
             {total_acks} acknowledged writes, final version {on_disk}, \
             {unacknowledged_survivors} in-flight writes survived, {:?}",
            started.elapsed()
        );
    }
}
