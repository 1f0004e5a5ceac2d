//! latchkey's HTTP load harness.
//!
//! `loadtest [http]` measures, one after the other with the same load
//! generator (`wrk`), connections, threads and duration:
//!
//! * (a) a bare warp hello-world server,
//! * (b) `/refresh` answered from the engine's cache,
//! * (c) `/v1/token` answered from the cache,
//! * (d) `/refresh` with the cache disabled (`cache_ttl = 0`) and the stored
//!   access token valid: load handle, unwrap, open grant, decide, answer,
//! * (e) `/refresh` where every request needs a provider refresh (the fake
//!   provider issues tokens with `expires_in = 0`),
//! * (f) the fake provider's token endpoint called directly.
//!
//! The brokers run in this process on loopback on `MemoryStore`s.
//!
//! `loadtest scale --store sled|postgres --count N` fills a store with `N`
//! grants through the `Store` API, then starts `target/release/latchkey serve`
//! on it (start-up time, RSS) and measures (d) in-process on that store and on
//! a store with 1,000 grants.
//!
//! `loadtest product --store sled|postgres --ids N --latchkey PATH` measures
//! the release binary as an operator runs it against a bare warp server
//! answering the same bytes (see `product.rs`).
//!
//! `loadtest warm --store postgres --ids 1000` measures (d) on that store and
//! on a `MemoryStore` with as many grants, alternately, and prints the ratio.
//!
//! `loadtest bare --answer FILE` is `product`'s bare warp server, in a
//! process of its own (so that `perf stat` on it counts it alone).
//!
//! `loadtest serve --config FILE` does what `latchkey serve --config FILE`
//! does (open the configured store, `latchkey_server::start`, run until
//! SIGTERM); `scale` spawns it unless `--latchkey PATH` names the real binary.

#![allow(clippy::print_stdout, clippy::print_stderr)]

#[path = "loadtest/product.rs"]
mod product;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures_util::{StreamExt, TryStreamExt};
use latchkey_benches::{CLIENT_ID, CLIENT_SECRET, ProviderUrls, config_text, insert, keyring, mint, now, payload};
use latchkey_core::{MemoryStore, Store};
use latchkey_server::config::Config;
use latchkey_testkit::{FakeConfig, FakeProvider};
use serde_json::{Value, json};
use tokio::net::TcpListener;

const USAGE: &str = "usage:
  loadtest [http] [--duration 10s] [--connections 64] [--threads 2] [--ids 256] [--svg FILE] [--json FILE]
  loadtest scale --store sled|postgres --count N [--concurrency 64] [--sample 10000] [--budget-secs S]
                 [--duration 10s] [--connections 64] [--threads 2] [--json FILE] [--latchkey PATH]
                 [--database-url URL]
  loadtest product --latchkey target/release/latchkey [--store sled,postgres] [--ids 1,10000] [--repeats 3]
                   [--duration 8s] [--connections 64] [--threads 2] [--json FILE] [--svg FILE] [--database-url URL]
                   [--perf FILE]   (records the first broker run with `perf record`)
                   [--broker-log LEVEL]   (LATCHKEY_LOG for the broker, to compare; default: unset)
                   [--perf-stat]   (CPU time per request of both servers, `perf stat -e task-clock`)
  loadtest product-chart --json FILE --svg FILE   (redraws a product run's chart)
  loadtest warm [--store sled|postgres] [--ids 1000] [--repeats 3] [--duration 8s] [--connections 64] [--json FILE]
  loadtest serve --config FILE   (what `latchkey serve --config FILE` does)
  loadtest bare --answer FILE   (product's bare warp server: prints its address, answers FILE's bytes)
  loadtest operator-config --listen ADDR --provider URL --data DIR
                   (prints the configuration `product` gives the broker, on sled in DIR,
                    with the provider's /authorize and /token under URL)";

#[derive(Debug, Clone)]
struct Args {
    mode: String,
    duration: String,
    connections: u32,
    threads: u32,
    ids: usize,
    svg: Option<PathBuf>,
    json: Option<PathBuf>,
    store: String,
    count: u64,
    concurrency: usize,
    sample: usize,
    budget_secs: Option<u64>,
    latchkey: Option<PathBuf>,
    database_url: String,
    config: Option<PathBuf>,
    repeats: u32,
    perf: Option<PathBuf>,
    perf_stat: bool,
    broker_log: Option<String>,
    product_ids: String,
    listen: Option<SocketAddr>,
    provider: Option<String>,
    data: Option<PathBuf>,
    answer: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        mode: "http".into(),
        duration: "10s".into(),
        connections: 64,
        threads: 2,
        ids: 256,
        svg: None,
        json: None,
        store: "sled".into(),
        count: 1_000_000,
        concurrency: 64,
        sample: 10_000,
        budget_secs: None,
        latchkey: None,
        database_url: std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
        config: None,
        repeats: 3,
        perf: None,
        perf_stat: false,
        broker_log: None,
        product_ids: "1".into(),
        listen: None,
        provider: None,
        data: None,
        answer: None,
    };
    let mut it = std::env::args().skip(1).peekable();
    if let Some(first) = it.peek() {
        if !first.starts_with("--") {
            args.mode = it.next().unwrap_or_default();
        }
    }
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--duration" => args.duration = value()?,
            "--connections" => args.connections = value()?.parse()?,
            "--threads" => args.threads = value()?.parse()?,
            "--ids" => {
                let ids = value()?;
                args.ids = ids.split(',').next().unwrap_or_default().trim().parse()?;
                args.product_ids = ids;
            }
            "--svg" => args.svg = Some(value()?.into()),
            "--json" => args.json = Some(value()?.into()),
            "--store" => args.store = value()?,
            "--count" => args.count = value()?.parse()?,
            "--concurrency" => args.concurrency = value()?.parse()?,
            "--sample" => args.sample = value()?.parse()?,
            "--budget-secs" => args.budget_secs = Some(value()?.parse()?),
            "--latchkey" => args.latchkey = Some(value()?.into()),
            "--database-url" => args.database_url = value()?,
            "--config" => args.config = Some(value()?.into()),
            "--repeats" => args.repeats = value()?.parse()?,
            "--perf" => args.perf = Some(value()?.into()),
            "--perf-stat" => args.perf_stat = true,
            "--broker-log" => args.broker_log = Some(value()?),
            "--listen" => args.listen = Some(value()?.parse()?),
            "--provider" => args.provider = Some(value()?),
            "--data" => args.data = Some(value()?.into()),
            "--answer" => args.answer = Some(value()?.into()),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    Ok(args)
}

/// `loadtest operator-config`: the broker configuration of `product`, for a
/// broker started by something else (`benches/scripts/callgrind-refresh.py`).
fn operator_config(args: &Args) -> anyhow::Result<()> {
    let need = |what: &str| anyhow!("operator-config needs {what}\n{USAGE}");
    let listen = args.listen.ok_or_else(|| need("--listen"))?;
    let provider = ProviderUrls::under(args.provider.as_deref().ok_or_else(|| need("--provider"))?);
    let data = args.data.as_ref().ok_or_else(|| need("--data"))?;
    let store = format!("[store]\npath = {:?}", data.display().to_string());
    print!("{}", latchkey_benches::operator_config_text(listen, &provider, &store));
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match args.mode.as_str() {
        "http" => runtime.block_on(http(&args)),
        "scale" => runtime.block_on(scale(&args)),
        "serve" => runtime.block_on(serve(&args)),
        "product" => runtime.block_on(product::product(&args)),
        "bare" => runtime.block_on(product::bare(&args)),
        "warm" => runtime.block_on(warm(&args)),
        "product-chart" => product::redraw(&args),
        "operator-config" => operator_config(&args),
        other => bail!("unknown mode {other}\n{USAGE}"),
    }
}

// ---------------------------------------------------------------------------
// wrk

/// How one path's requests are built in the wrk script.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Hello,
    Refresh,
    V1Token,
    ProviderToken,
}

/// One wrk run's numbers.
#[derive(Debug, Clone)]
struct Measured {
    requests: u64,
    seconds: f64,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    mean_us: f64,
    errors: String,
    non_2xx: u64,
    load: String,
}

fn lua_string(s: &str) -> String {
    format!("{s:?}")
}

fn script(shape: Shape, values: &[String], threads: u32) -> String {
    let list: Vec<String> = values.iter().map(|v| lua_string(v)).collect();
    let build = match shape {
        Shape::Hello => r#"return wrk.format("GET", "/")"#.to_owned(),
        Shape::Refresh => r#"return wrk.format("GET", "/refresh", {["X-AuthID"] = v})"#.to_owned(),
        Shape::V1Token => r#"return wrk.format("POST", "/v1/token", {["Authorization"] = "Bearer " .. v, ["Content-Type"] = "application/x-www-form-urlencoded"}, "")"#.to_owned(),
        Shape::ProviderToken => r#"return wrk.format("POST", "/token", {["Content-Type"] = "application/x-www-form-urlencoded"}, v)"#.to_owned(),
    };
    format!(
        r#"-- generated by latchkey-benches loadtest
local values = {{ {values} }}
local nthreads = {threads}
local thread_count = 0
function setup(thread)
  thread:set("tid", thread_count)
  thread_count = thread_count + 1
end
local function build(v)
  {build}
end
local reqs = {{}}
function init(args)
  -- Each wrk thread cycles through its own slice of the values, so two
  -- threads never send the same AuthID at the same time.
  for i = 1, #values do
    if (i - 1) % nthreads == (tid or 0) then
      table.insert(reqs, build(values[i]))
    end
  end
  if #reqs == 0 then reqs = {{ build(values[1]) }} end
end
local k = 0
function request()
  k = k % #reqs + 1
  return reqs[k]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("LKRESULT %d %d %.0f %.0f %.0f %d %d %d %d %d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"#,
        values = list.join(", "),
    )
}

/// The machine's load right now: `/proc/loadavg` and the busiest processes.
fn load_now() -> String {
    let avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let avg: Vec<&str> = avg.split_whitespace().take(3).collect();
    let top = std::process::Command::new("ps")
        .args(["-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().take(4).map(|l| l.trim().to_owned()).collect::<Vec<_>>())
        .unwrap_or_default();
    let fuzzing = fuzzer_running();
    format!(
        "loadavg {} | fuzzer {} | top: {}",
        avg.join(" "),
        if fuzzing { "RUNNING" } else { "not running" },
        top.join(", ")
    )
}

/// Whether a process that looks like the project's fuzzer runs.
fn fuzzer_running() -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else { return false };
    dir.flatten().any(|entry| {
        let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        (cmd.contains("fuzz/target") || cmd.contains("cargo-fuzz") || cmd.contains("cargo fuzz"))
            && !cmd.contains("rustc")
    })
}

async fn wrk(args: &Args, url: &str, shape: Shape, values: &[String], name: &str) -> anyhow::Result<Measured> {
    wrk_counted(args, url, shape, values, name, None).await
}

/// [`wrk`], run under `perf stat -o counted` when `counted` is given (the
/// client's CPU time, in `product --perf-stat`).
async fn wrk_counted(
    args: &Args,
    url: &str,
    shape: Shape,
    values: &[String],
    name: &str,
    counted: Option<&Path>,
) -> anyhow::Result<Measured> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(format!("{name}.lua"));
    std::fs::write(&path, script(shape, values, args.threads))?;
    let load = load_now();
    eprintln!("[{name}] {load}");
    let mut command = match counted {
        Some(out) => {
            let mut perf = tokio::process::Command::new("perf");
            perf.args(["stat", "-x", ",", "-e", product::PERF_EVENTS, "-o"]).arg(out).args(["--", "wrk"]);
            perf
        }
        None => tokio::process::Command::new("wrk"),
    };
    let output = command
        .arg(format!("-t{}", args.threads))
        .arg(format!("-c{}", args.connections))
        .arg(format!("-d{}", args.duration))
        .arg("--timeout")
        .arg("10s")
        .arg("--latency")
        .arg("-s")
        .arg(&path)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .await
        .context("cannot run wrk (apt-get install -y wrk)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("LKRESULT"))
        .ok_or_else(|| anyhow!("wrk printed no result: {text}\n{}", String::from_utf8_lossy(&output.stderr)))?;
    let n: Vec<f64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0.0)).collect();
    if n.len() < 10 {
        bail!("cannot read wrk's result line: {line}");
    }
    let requests = n[0] as u64;
    let seconds = n[1] / 1e6;
    let non_2xx = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let measured = Measured {
        requests,
        seconds,
        rps: requests as f64 / seconds,
        p50_us: n[2],
        p99_us: n[3],
        mean_us: n[4],
        errors: format!("connect {} read {} write {} status {} timeout {}", n[5], n[6], n[7], n[8], n[9]),
        non_2xx,
        load,
    };
    eprintln!(
        "[{name}] {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, non-2xx {}, {}",
        measured.rps,
        measured.p50_us / 1000.0,
        measured.p99_us / 1000.0,
        measured.non_2xx,
        measured.errors
    );
    Ok(measured)
}

// ---------------------------------------------------------------------------
// helpers

fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?)
}

/// Checks a path answers 200 with an access token before measuring it.
async fn check_refresh(url: &str, authid: &str) -> anyhow::Result<()> {
    let response = client()?.get(format!("{url}/refresh")).header("X-AuthID", authid).send().await?;
    let status = response.status();
    let body = response.text().await?;
    if status != 200 || !body.contains("access_token") {
        bail!("{url}/refresh answered {status}: {body}");
    }
    Ok(())
}

async fn broker_on(
    store: Arc<dyn Store>,
    provider: &ProviderUrls,
    tune: impl FnOnce(&mut latchkey_core::EngineConfig),
) -> anyhow::Result<latchkey_server::Running> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let config = Config::parse(&config_text(listener.local_addr()?, provider, ""))?;
    latchkey_server::serve(&config, store, listener, tune).await
}

async fn hello_server() -> anyhow::Result<SocketAddr> {
    use warp::Filter;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let hello = warp::any().map(|| "Hello, world!");
    tokio::spawn(warp::serve(hello).incoming(listener).run());
    Ok(addr)
}

fn form_encode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            let enc = |s: &str| {
                s.bytes()
                    .map(|b| match b {
                        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                        _ => format!("%{b:02X}"),
                    })
                    .collect::<String>()
            };
            format!("{}={}", enc(k), enc(v))
        })
        .collect::<Vec<_>>()
        .join("&")
}

async fn password_login(token_url: &str) -> anyhow::Result<String> {
    let body = form_encode(&[
        ("grant_type", "password"),
        ("username", "bench"),
        ("password", "bench-password"),
        ("scope", "files"),
        ("client_id", CLIENT_ID),
        ("client_secret", CLIENT_SECRET),
    ]);
    let response: Value = client()?
        .post(token_url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await?
        .json()
        .await?;
    response["refresh_token"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("no refresh token: {response}"))
}

fn ms(us: f64) -> f64 {
    us / 1000.0
}

// ---------------------------------------------------------------------------
// http mode

struct PathResult {
    key: &'static str,
    label: &'static str,
    m: Measured,
}

async fn http(args: &Args) -> anyhow::Result<()> {
    let ring = keyring();
    let t = now();

    // (a)
    let hello = hello_server().await?;

    // (b), (c), (d): grants whose stored access token is valid for an hour.
    let warm_store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let mut warm_ids = Vec::new();
    for _ in 0..args.ids {
        let minted = mint(&ring, &payload("unused-refresh", t.saturating_add(Duration::from_secs(3600)), t), t);
        insert(warm_store.as_ref(), &minted).await?;
        warm_ids.push(minted.authid);
    }
    let nowhere = ProviderUrls::under("http://127.0.0.1:9");
    let cached = broker_on(Arc::clone(&warm_store), &nowhere, |_| {}).await?;
    let uncached = broker_on(Arc::clone(&warm_store), &nowhere, |c| c.cache_ttl = Duration::ZERO).await?;

    // (e), (f): a fake provider whose access tokens expire at once.
    let fake = FakeProvider::start(FakeConfig {
        rotate: false,
        access_lifetime: Some(Duration::ZERO),
        latency: Duration::ZERO,
        password_logins: vec![("bench".into(), "bench-password".into())],
        ..FakeConfig::default()
    })
    .await?;
    let fake_urls = ProviderUrls { authorize: fake.authorize_url(), token: fake.token_url() };
    let cold_store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let (mut cold_ids, mut provider_bodies) = (Vec::new(), Vec::new());
    for _ in 0..args.ids {
        let refresh = password_login(&fake.token_url()).await?;
        let minted = mint(&ring, &payload(&refresh, t, t), t);
        insert(cold_store.as_ref(), &minted).await?;
        cold_ids.push(minted.authid);
        provider_bodies.push(form_encode(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ]));
    }
    let cold = broker_on(Arc::clone(&cold_store), &fake_urls, |_| {}).await?;

    // Every broker path answers 200 before it is measured; this also fills (b)'s cache.
    for id in &warm_ids {
        check_refresh(&cached.url(), id).await?;
    }
    check_refresh(&uncached.url(), &warm_ids[0]).await?;
    check_refresh(&cold.url(), &cold_ids[0]).await?;

    let hello_url = format!("http://{hello}");
    let mut results = Vec::new();
    let hits_before = cached.broker.metrics();
    results.push(PathResult {
        key: "a",
        label: "bare warp hello",
        m: wrk(args, &hello_url, Shape::Hello, &["-".into()], "a").await?,
    });
    results.push(PathResult {
        key: "b",
        label: "/refresh, cache hit",
        m: wrk(args, &cached.url(), Shape::Refresh, &warm_ids, "b").await?,
    });
    results.push(PathResult {
        key: "c",
        label: "/v1/token, cache hit",
        m: wrk(args, &cached.url(), Shape::V1Token, &warm_ids, "c").await?,
    });
    results.push(PathResult {
        key: "d",
        label: "/refresh, warm (no cache, token valid)",
        m: wrk(args, &uncached.url(), Shape::Refresh, &warm_ids, "d").await?,
    });
    let refreshes_before = fake.refreshes();
    let e = wrk(args, &cold.url(), Shape::Refresh, &cold_ids, "e").await?;
    let cold_refreshes = fake.refreshes() - refreshes_before;
    results.push(PathResult { key: "e", label: "/refresh, cold (provider refresh each)", m: e });
    let f = wrk(args, &fake.base_url(), Shape::ProviderToken, &provider_bodies, "f").await?;
    results.push(PathResult { key: "f", label: "fake provider /token direct", m: f });
    let hits_after = cached.broker.metrics();

    let a_rps = results[0].m.rps;
    let get = |k: &str| results.iter().find(|r| r.key == k).map(|r| r.m.clone());
    let (b, e, f) = (
        get("b").unwrap_or_else(|| unreachable!()),
        get("e").unwrap_or_else(|| unreachable!()),
        get("f").unwrap_or_else(|| unreachable!()),
    );

    let mut table = String::new();
    let _ = writeln!(
        table,
        "| path | what | requests | req/s | × (a) | p50 ms | p99 ms | mean ms | non-2xx | socket errors |"
    );
    let _ = writeln!(table, "|---|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in &results {
        let _ = writeln!(
            table,
            "| ({}) | {} | {} | {:.0} | {:.2} | {:.3} | {:.3} | {:.3} | {} | {} |",
            r.key,
            r.label,
            r.m.requests,
            r.m.rps,
            r.m.rps / a_rps,
            ms(r.m.p50_us),
            ms(r.m.p99_us),
            ms(r.m.mean_us),
            r.m.non_2xx,
            r.m.errors
        );
    }
    let e_minus_f = ms(e.p50_us - f.p50_us);
    let mut summary = String::new();
    let _ = writeln!(
        summary,
        "wrk -t{} -c{} -d{} --latency; brokers in-process on MemoryStore, loopback; {} AuthIDs per broker path",
        args.threads, args.connections, args.duration, args.ids
    );
    let _ = writeln!(summary, "(e) p50 - (f) p50 = {e_minus_f:.3} ms (target <= 1 ms: {})", verdict(e_minus_f <= 1.0));
    let _ = writeln!(
        summary,
        "(b) throughput = {:.1}% of (a) (target >= 50%: {})",
        100.0 * b.rps / a_rps,
        verdict(b.rps >= 0.5 * a_rps)
    );
    let _ = writeln!(
        summary,
        "(b) p99 = {:.3} ms at {} connections (target <= 5 ms: {})",
        ms(b.p99_us),
        args.connections,
        verdict(ms(b.p99_us) <= 5.0)
    );
    let _ = writeln!(
        summary,
        "(e) provider refreshes during the run: {cold_refreshes} for {} broker requests ({:.3} per request)",
        e.requests,
        cold_refreshes as f64 / e.requests.max(1) as f64
    );
    let _ = writeln!(
        summary,
        "cache hits during (a)-(f) on the cached broker: {}",
        hits_after.cache_hits.saturating_sub(hits_before.cache_hits)
    );
    let cold_metrics = cold.broker.metrics();
    let _ = writeln!(
        summary,
        "(e) broker: single-flight joins {}, cache hits {}, cache misses {}",
        cold_metrics.single_flight_joins, cold_metrics.cache_hits, cold_metrics.cache_misses
    );
    println!("\n{table}\n{summary}");
    for r in &results {
        println!("load during ({}): {}", r.key, r.m.load);
    }

    if let Some(svg) = &args.svg {
        std::fs::write(svg, chart(&results))?;
        println!("chart written to {}", svg.display());
    }
    if let Some(path) = &args.json {
        let rows: Vec<Value> = results
            .iter()
            .map(|r| {
                json!({"path": r.key, "label": r.label, "requests": r.m.requests, "seconds": r.m.seconds,
                       "rps": r.m.rps, "p50_ms": ms(r.m.p50_us), "p99_ms": ms(r.m.p99_us), "mean_ms": ms(r.m.mean_us),
                       "non_2xx": r.m.non_2xx, "errors": r.m.errors, "load": r.m.load})
            })
            .collect();
        let doc = json!({"rows": rows, "e_minus_f_p50_ms": e_minus_f, "cold_refreshes": cold_refreshes,
                          "threads": args.threads, "connections": args.connections, "duration": args.duration});
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    }
    cached.stop().await;
    uncached.stop().await;
    cold.stop().await;
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "MET" } else { "MISSED" }
}

/// One group of bars: label, then (value, colour, text) per bar.
type Bar = (String, Vec<(f64, &'static str, String)>);

/// Two bar charts side by side: requests/s, and p50/p99 latency, per path.
fn chart(results: &[PathResult]) -> String {
    let (w, h) = (960.0_f64, 380.0_f64);
    let (top, bottom) = (50.0, 300.0);
    let panel = |x0: f64, title: &str, max: f64, bars: &[Bar]| -> String {
        let mut s = String::new();
        let width = 420.0;
        let _ = write!(s, r#"<text x="{}" y="30" font-size="15" font-weight="bold">{title}</text>"#, x0);
        let _ = write!(s, r##"<line x1="{x0}" y1="{bottom}" x2="{}" y2="{bottom}" stroke="#333"/>"##, x0 + width);
        let group = width / bars.len() as f64;
        for (i, (label, values)) in bars.iter().enumerate() {
            let gx = x0 + i as f64 * group;
            let bw = (group - 12.0) / values.len() as f64;
            for (j, (v, color, text)) in values.iter().enumerate() {
                let bh = if max > 0.0 { (bottom - top) * v / max } else { 0.0 };
                let x = gx + 6.0 + j as f64 * bw;
                let _ = write!(
                    s,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}" font-size="9" text-anchor="middle">{text}</text>"#,
                    bottom - bh,
                    bw - 2.0,
                    x + bw / 2.0,
                    bottom - bh - 3.0
                );
            }
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{}" font-size="12" text-anchor="middle">({label})</text>"#,
                gx + group / 2.0,
                bottom + 16.0
            );
        }
        s
    };
    let rps: Vec<Bar> =
        results.iter().map(|r| (r.key.to_owned(), vec![(r.m.rps, "#4a7bd0", format!("{:.0}", r.m.rps))])).collect();
    let max_rps = results.iter().map(|r| r.m.rps).fold(0.0, f64::max) * 1.1;
    let lat: Vec<Bar> = results
        .iter()
        .map(|r| {
            (
                r.key.to_owned(),
                vec![
                    (ms(r.m.p50_us), "#58a55c", format!("{:.2}", ms(r.m.p50_us))),
                    (ms(r.m.p99_us), "#d0674a", format!("{:.2}", ms(r.m.p99_us))),
                ],
            )
        })
        .collect();
    let max_lat = results.iter().map(|r| ms(r.m.p99_us)).fold(0.0, f64::max) * 1.1;
    // Lay the legend out in three columns.
    let mut legend = String::new();
    for (i, r) in results.iter().enumerate() {
        let (col, row) = (i % 3, i / 3);
        let _ = write!(
            legend,
            r#"<text x="{}" y="{}" font-size="11">({}) {}</text>"#,
            20.0 + 310.0 * col as f64,
            330.0 + 14.0 * row as f64,
            r.key,
            r.label
        );
    }
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
{}
{}
<rect x="720" y="16" width="10" height="10" fill="#58a55c"/><text x="734" y="25" font-size="11">p50 ms</text>
<rect x="790" y="16" width="10" height="10" fill="#d0674a"/><text x="804" y="25" font-size="11">p99 ms</text>
{legend}
</svg>
"##,
        panel(20.0, "Throughput (requests/s)", max_rps, &rps),
        panel(500.0, "Latency (ms)", max_lat, &lat),
    )
}

// ---------------------------------------------------------------------------
// scale mode

fn random_suffix() -> String {
    let mut bytes = [0u8; 6];
    latchkey_core::Random::fill(&latchkey_core::OsRandom, &mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One store of the kind under test.
struct StoreSpot {
    kind: String,
    dir: Option<tempfile::TempDir>,
    schema: Option<String>,
    database_url: String,
}

impl StoreSpot {
    fn new(args: &Args) -> anyhow::Result<Self> {
        Ok(match args.store.as_str() {
            "sled" => StoreSpot {
                kind: "sled".into(),
                dir: Some(tempfile::Builder::new().prefix("latchkey-bench-").tempdir_in(std::env::temp_dir())?),
                schema: None,
                database_url: String::new(),
            },
            "postgres" => StoreSpot {
                kind: "postgres".into(),
                dir: None,
                schema: Some(format!("latchkey_bench_{}", random_suffix())),
                database_url: args.database_url.clone(),
            },
            other => bail!("unknown store {other}"),
        })
    }

    async fn open(&self) -> anyhow::Result<Arc<dyn Store>> {
        match (&self.dir, &self.schema) {
            (Some(dir), _) => {
                // The previous owner may still be letting go of sled's lock.
                let mut tries = 0;
                loop {
                    match latchkey_storage_sled::SledStore::open(dir.path()).await {
                        Ok(store) => return Ok(Arc::new(store)),
                        Err(e) if tries < 50 => {
                            tries += 1;
                            eprintln!("sled open retry: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            (None, Some(schema)) => {
                Ok(Arc::new(latchkey_storage_postgres::PostgresStore::connect(&self.database_url, schema).await?))
            }
            _ => bail!("no store"),
        }
    }

    fn toml(&self) -> String {
        match (&self.dir, &self.schema) {
            (Some(dir), _) => format!("[store]\npath = {:?}", dir.path().display().to_string()),
            (_, Some(schema)) => {
                format!("[store]\nkind = \"postgres\"\nurl = \"{}\"\nschema = \"{schema}\"", self.database_url)
            }
            _ => String::new(),
        }
    }

    fn size(&self) -> String {
        match &self.dir {
            Some(dir) => {
                let out = std::process::Command::new("du").arg("-sh").arg(dir.path()).output();
                out.map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap_or("?").to_owned())
                    .unwrap_or_else(|_| "?".into())
            }
            None => "(see pg_total_relation_size)".into(),
        }
    }

    /// PostgreSQL: `VACUUM ANALYZE` the table and `CHECKPOINT`, as the
    /// server's own background work would soon after a bulk write.
    async fn settle(&self) {
        let Some(schema) = &self.schema else { return };
        let Ok((client, connection)) = tokio_postgres::connect(&self.database_url, tokio_postgres::NoTls).await else {
            return;
        };
        tokio::spawn(connection);
        let started = Instant::now();
        // Two statements: VACUUM cannot run in the implicit transaction of a multi-statement query.
        let vacuum = format!("VACUUM ANALYZE \"{schema}\".records");
        let settled = async {
            client.batch_execute(&vacuum).await?;
            client.batch_execute("CHECKPOINT").await
        };
        match settled.await {
            Ok(()) => eprintln!("[{schema}] vacuum analyze + checkpoint in {:.1} s", started.elapsed().as_secs_f64()),
            Err(e) => eprintln!("[{schema}] settle failed: {e}"),
        }
    }

    async fn drop_schema(&self) {
        if let Some(schema) = &self.schema {
            if let Ok((client, connection)) = tokio_postgres::connect(&self.database_url, tokio_postgres::NoTls).await {
                tokio::spawn(connection);
                let size = client
                    .query_one(
                        &format!("SELECT pg_size_pretty(sum(pg_total_relation_size(c.oid))::bigint) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = '{schema}'"),
                        &[],
                    )
                    .await
                    .ok()
                    .and_then(|row| row.try_get::<_, String>(0).ok());
                eprintln!("schema {schema} size: {}", size.unwrap_or_else(|| "?".into()));
                let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE")).await;
                eprintln!("dropped schema {schema}");
            }
        }
        let _ = self.kind.len();
    }
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn latchkey_binary(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.latchkey {
        return Ok(path.clone());
    }
    Ok(std::env::current_exe()?)
}

/// Spawns `latchkey serve`, waits for `/healthz` 200, and measures.
async fn process_run(args: &Args, spot: &StoreSpot, sample: &[String], work: &Path) -> anyhow::Result<Value> {
    let port = free_port()?;
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let config = work.join(format!("broker-{}.toml", spot.kind));
    std::fs::write(&config, config_text(listen, &ProviderUrls::under("http://127.0.0.1:9"), &spot.toml()))?;
    let log = std::fs::File::create(work.join(format!("broker-{}.log", spot.kind)))?;
    let binary = latchkey_binary(args)?;
    let http = client()?;
    let started = Instant::now();
    let mut command = tokio::process::Command::new(&binary);
    if args.latchkey.is_none() {
        eprintln!("[{}] broker process: {} serve (same calls as `latchkey serve`)", spot.kind, binary.display());
    }
    let mut child = command
        .args(["serve", "--config"])
        .arg(&config)
        .env("LATCHKEY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let pid = child.id().ok_or_else(|| anyhow!("no pid"))?;
    let url = format!("http://{listen}");
    loop {
        if let Ok(r) = http.get(format!("{url}/healthz")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("broker did not become healthy in 120 s");
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("broker exited: {status}; see {}", work.display());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let startup = started.elapsed();
    let (rss_start, _) = rss_kib(pid);
    eprintln!("[{}] start-up {:.3} s, RSS {} KiB", spot.kind, startup.as_secs_f64(), rss_start);
    check_refresh(&url, &sample[0]).await?;
    let load = wrk(args, &url, Shape::Refresh, sample, &format!("process-{}", spot.kind)).await?;
    let (rss_after, hwm) = rss_kib(pid);
    eprintln!("[{}] RSS after load {} KiB (peak {} KiB)", spot.kind, rss_after, hwm);
    child.start_kill()?;
    let _ = child.wait().await;
    Ok(json!({
        "startup_s": startup.as_secs_f64(),
        "rss_start_kib": rss_start,
        "rss_after_load_kib": rss_after,
        "rss_peak_kib": hwm,
        "load_rps": load.rps, "load_p50_ms": ms(load.p50_us), "load_p99_ms": ms(load.p99_us),
        "load_requests": load.requests, "load_non_2xx": load.non_2xx, "load_distinct_authids": sample.len(),
        "load": load.load,
    }))
}

/// (d) in-process on `store`, cache disabled, over `sample`.
async fn warm_in_process(
    args: &Args,
    store: Arc<dyn Store>,
    sample: &[String],
    name: &str,
) -> anyhow::Result<Measured> {
    let broker = broker_on(store, &ProviderUrls::under("http://127.0.0.1:9"), |c| c.cache_ttl = Duration::ZERO).await?;
    // One request per AuthID first: its handle's hourly `last_used_at` write
    // (and, on sled, that write's fsync) then falls outside the measurement,
    // whatever the number of distinct AuthIDs.
    let url = broker.url();
    futures_util::stream::iter(sample)
        .map(|id| check_refresh(&url, id))
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    let m = wrk(args, &url, Shape::Refresh, sample, name).await?;
    broker.stop().await;
    Ok(m)
}

async fn scale(args: &Args) -> anyhow::Result<()> {
    let work = tempfile::Builder::new().prefix("latchkey-scale-").tempdir()?;
    let budget = args.budget_secs.map(|s| Instant::now() + Duration::from_secs(s));

    // Baseline: 1,000 grants in a store of the same kind.
    let small = StoreSpot::new(args)?;
    let store = small.open().await?;
    let filled = latchkey_benches::populate(Arc::clone(&store), 1000, args.concurrency, 1000, None, |_, _| {}).await?;
    let small_sample = filled.sample.clone();
    let first_base =
        warm_in_process(args, Arc::clone(&store), &small_sample, &format!("d-{}-1000-before", args.store)).await?;
    let small_store = store;

    // The big store.
    let big = StoreSpot::new(args)?;
    let store = big.open().await?;
    eprintln!("[{}] filling {} grants ...", args.store, args.count);
    let filled =
        latchkey_benches::populate(Arc::clone(&store), args.count, args.concurrency, args.sample, budget, |n, t| {
            eprintln!("  {n} grants in {:.0} s ({:.0}/s)", t.as_secs_f64(), n as f64 / t.as_secs_f64().max(1e-9));
        })
        .await?;
    eprintln!(
        "[{}] filled {} grants in {:.1} s ({:.0} grants/s); sealing took {:.1} s of CPU",
        args.store,
        filled.count,
        filled.wall.as_secs_f64(),
        filled.count as f64 / filled.wall.as_secs_f64(),
        filled.mint_cpu.as_secs_f64()
    );
    // Both stores as a deployment's would be some time after writing: the
    // database has vacuumed and checkpointed (sled flushes every write).
    // Then (d) on the small store again and on the big one, back to back, so
    // the ratio compares the two under the same machine conditions (the
    // first baseline ran before the fill's aftermath: checkpoints, autovacuum).
    small.settle().await;
    big.settle().await;
    let base =
        warm_in_process(args, Arc::clone(&small_store), &small_sample, &format!("d-{}-1000", args.store)).await?;
    drop(small_store);
    // Big store (d), in-process, before the process run (which would fill its
    // cache with the sample): first over 1,000 AuthIDs spread evenly over the
    // sample, the same load shape as the baseline, so the ratio shows the
    // effect of the number *stored*; then over the whole sample.
    let step = (filled.sample.len() / 1000).max(1);
    let thousand: Vec<String> = filled.sample.iter().step_by(step).take(1000).cloned().collect();
    let big_d_1000 =
        warm_in_process(args, Arc::clone(&store), &thousand, &format!("d-{}-{}-1000-ids", args.store, filled.count))
            .await?;
    let big_d =
        warm_in_process(args, Arc::clone(&store), &filled.sample, &format!("d-{}-{}", args.store, filled.count))
            .await?;
    drop(store);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let size = big.size();
    let process = process_run(args, &big, &filled.sample, work.path()).await;

    small.drop_schema().await;
    big.drop_schema().await;
    let process = process?;
    let ratio = big_d_1000.p50_us / base.p50_us;
    let report = json!({
        "store": args.store,
        "grants": filled.count,
        "requested": args.count,
        "fill_wall_s": filled.wall.as_secs_f64(),
        "fill_rate_per_s": filled.count as f64 / filled.wall.as_secs_f64(),
        "seal_cpu_s": filled.mint_cpu.as_secs_f64(),
        "store_size": size,
        "d_1000_before_fill": {"rps": first_base.rps, "p50_ms": ms(first_base.p50_us), "p99_ms": ms(first_base.p99_us), "non_2xx": first_base.non_2xx, "load": first_base.load},
        "d_1000": {"rps": base.rps, "p50_ms": ms(base.p50_us), "p99_ms": ms(base.p99_us), "non_2xx": base.non_2xx, "load": base.load},
        "d_big": {"rps": big_d.rps, "p50_ms": ms(big_d.p50_us), "p99_ms": ms(big_d.p99_us), "non_2xx": big_d.non_2xx, "distinct_authids": filled.sample.len(), "load": big_d.load},
        "d_big_1000_ids": {"rps": big_d_1000.rps, "p50_ms": ms(big_d_1000.p50_us), "p99_ms": ms(big_d_1000.p99_us), "non_2xx": big_d_1000.non_2xx, "distinct_authids": thousand.len(), "load": big_d_1000.load},
        "d_p50_ratio": ratio,
        "d_p50_ratio_whole_sample": big_d.p50_us / base.p50_us,
        "process": process,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// warm mode

/// (d), the warm path (cache off, stored token valid), on `--store` and on a
/// `MemoryStore` holding the same number of grants, alternately, in one run.
async fn warm(args: &Args) -> anyhow::Result<()> {
    let spot = StoreSpot::new(args)?;
    let store = spot.open().await?;
    let count = args.ids as u64;
    let filled = latchkey_benches::populate(Arc::clone(&store), count, 32, args.ids, None, |_, _| {}).await?;
    let memory: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let in_memory = latchkey_benches::populate(Arc::clone(&memory), count, 32, args.ids, None, |_, _| {}).await?;
    spot.settle().await;
    let mut runs = Vec::new();
    for repeat in 1..=args.repeats {
        let m = warm_in_process(args, Arc::clone(&memory), &in_memory.sample, &format!("d-memory-{repeat}")).await?;
        let s = warm_in_process(args, Arc::clone(&store), &filled.sample, &format!("d-{}-{repeat}", spot.kind)).await?;
        runs.push((m, s));
    }
    drop(store);
    spot.drop_schema().await;
    println!(
        "\nwarm path (d): cache off, stored token valid; {} grants in each store, every AuthID in turn; wrk -t{} -c{} -d{}",
        count, args.threads, args.connections, args.duration
    );
    println!(
        "| repeat | MemoryStore req/s | {} req/s | ratio | MemoryStore p99 ms | {} p99 ms |",
        spot.kind, spot.kind
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut ratios = Vec::new();
    for (i, (m, s)) in runs.iter().enumerate() {
        ratios.push(s.rps / m.rps);
        println!(
            "| {} | {:.0} | {:.0} | {:.1} % | {:.3} | {:.3} |",
            i + 1,
            m.rps,
            s.rps,
            100.0 * s.rps / m.rps,
            ms(m.p99_us),
            ms(s.p99_us)
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "ratio: median {:.1} % (min {:.1}, max {:.1}; target >= 50 %)",
        100.0 * ratios[ratios.len() / 2],
        100.0 * ratios[0],
        100.0 * ratios[ratios.len() - 1]
    );
    if let Some(path) = &args.json {
        let rows: Vec<Value> = runs
            .iter()
            .map(|(m, s)| {
                json!({"memory_rps": m.rps, "store_rps": s.rps, "ratio": s.rps / m.rps,
                       "memory_p50_ms": ms(m.p50_us), "store_p50_ms": ms(s.p50_us),
                       "memory_p99_ms": ms(m.p99_us), "store_p99_ms": ms(s.p99_us),
                       "store_non_2xx": s.non_2xx, "load_before_store": s.load})
            })
            .collect();
        let doc = json!({"store": spot.kind, "grants": count, "threads": args.threads,
                         "connections": args.connections, "duration": args.duration, "runs": rows});
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// serve mode

/// `latchkey serve`, minus log set-up: the same calls as its `main.rs`.
async fn serve(args: &Args) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref(), std::env::vars())?;
    let store = latchkey_server::setup::open_store(&config).await?;
    let running = latchkey_server::start(&config, store, |_| {}).await?;
    running.until(latchkey_server::shutdown_signal()).await;
    Ok(())
}
