//! `loadtest product`: the broker as an operator runs it.
//!
//! Starts the release `latchkey serve` binary (given by `--latchkey`) on a
//! sled or PostgreSQL store with the default configuration — request logging
//! on at `info`, written to a file — and `[limits]` raised out of the way;
//! logs in `--ids` times through the testkit's fake provider with the
//! browser's steps (confirmation page, `POST /login`, provider, callback);
//! then, `--repeats` times, runs the same wrk settings against a bare warp
//! server (`loadtest bare`, a process of its own) answering the broker's
//! exact `/refresh` bytes (body, content type, cache control) and against
//! the broker's cached `/refresh`, in alternating order, and prints the
//! ratios with their spread.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures_util::{StreamExt, TryStreamExt};
use latchkey_benches::{ProviderUrls, operator_config_text};
use latchkey_testkit::{FakeConfig, FakeProvider};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::{Args, Measured, Shape, StoreSpot, free_port, ms};

/// Logins in flight at once while the AuthIDs are made.
const LOGIN_CONCURRENCY: usize = 16;

fn no_redirects() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// The hidden fields of the form on `html` that posts to `action`.
fn form_fields(html: &str, action: &str) -> anyhow::Result<Vec<(String, String)>> {
    let start = html.find(&format!("action=\"{action}\"")).ok_or_else(|| anyhow!("no form to {action}"))?;
    let end = html[start..].find("</form>").ok_or_else(|| anyhow!("unterminated form"))?;
    Ok(html[start..start + end]
        .split("<input type=hidden name=")
        .skip(1)
        .filter_map(|field| {
            let (name, rest) = field.split_once(" value=\"")?;
            let value = rest.split('"').next()?;
            Some((name.to_owned(), value.replace("&amp;", "&").replace("&quot;", "\"").replace("&#39;", "'")))
        })
        .collect())
}

/// One whole login as a browser does it; answers the AuthID.
async fn login(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let page = http.get(format!("{base}/login?id=fake")).send().await?;
    let cookie = page
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.contains("latchkey-login="))
        .and_then(|v| v.split(';').next())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("the login page set no cookie"))?;
    let fields = form_fields(&page.text().await?, "/login")?;
    let go = http
        .post(format!("{base}/login"))
        .header(reqwest::header::COOKIE, &cookie)
        .header("Origin", base)
        .header("Sec-Fetch-Site", "same-origin")
        .form(&fields)
        .send()
        .await?;
    let mut response = go;
    for _ in 0..5 {
        let Some(next) = response.headers().get(reqwest::header::LOCATION) else { break };
        let next = next.to_str()?.to_owned();
        response = http.get(&next).header(reqwest::header::COOKIE, &cookie).send().await?;
    }
    let status = response.status();
    let html = response.text().await?;
    html.split("data-authid=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("the login ended with {status}, no AuthID"))
}

/// `loadtest bare --answer FILE`: a bare warp server answering every
/// request with FILE's body, content type and cache control; prints
/// `listening ADDR` and serves until killed. `product` runs it as a process
/// of its own, like the broker: `perf stat -p` counts the children a process
/// starts after it attached, so on `product`'s own process it would count
/// each run's wrk too.
pub(super) async fn bare(args: &Args) -> anyhow::Result<()> {
    use warp::Filter;
    let path = args.answer.as_ref().ok_or_else(|| anyhow!("bare needs --answer FILE\n{}", super::USAGE))?;
    let answer: Value = serde_json::from_slice(&std::fs::read(path)?)?;
    let field = |name: &str| answer[name].as_str().map(str::to_owned).ok_or_else(|| anyhow!("{name} missing"));
    let body = bytes::Bytes::from(field("body")?);
    let content_type = warp::http::HeaderValue::from_str(&field("content_type")?)?;
    let cache_control = warp::http::HeaderValue::from_str(&field("cache_control")?)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("listening {}", listener.local_addr()?);
    let route = warp::any().map(move || {
        let mut response = warp::reply::Response::new(body.clone().into());
        let headers = response.headers_mut();
        headers.insert(warp::http::header::CONTENT_TYPE, content_type.clone());
        headers.insert(warp::http::header::CACHE_CONTROL, cache_control.clone());
        response
    });
    warp::serve(route).incoming(listener).run().await;
    Ok(())
}

/// Starts `loadtest bare` answering `answer` (`body`, `content_type`,
/// `cache_control`); the process and its address.
async fn spawn_bare(work: &Path, answer: &Value) -> anyhow::Result<(tokio::process::Child, SocketAddr)> {
    use tokio::io::AsyncBufReadExt as _;
    let path = work.join("bare-answer.json");
    std::fs::write(&path, serde_json::to_vec(answer)?)?;
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["bare", "--answer"])
        .arg(&path)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start loadtest bare")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("loadtest bare has no stdout"))?;
    let mut line = String::new();
    tokio::io::BufReader::new(stdout).read_line(&mut line).await?;
    let addr = line.trim().strip_prefix("listening ").ok_or_else(|| anyhow!("loadtest bare said {line:?}"))?;
    Ok((child, addr.parse()?))
}

fn interrupt(child: &tokio::process::Child) {
    if let Some(id) = child.id() {
        let _ = std::process::Command::new("kill").args(["-INT", &id.to_string()]).status();
    }
}

/// What `perf stat` counts, on the servers and (with `--perf-stat`) on wrk.
pub(super) const PERF_EVENTS: &str = "task-clock,raw_syscalls:sys_enter,context-switches";

/// `perf stat` on a process for the length of one wrk run: the CPU time it
/// spent, user and kernel (`task-clock`), its system calls and its context
/// switches (hardware counters such as instructions are not available on
/// the project's VMs).
struct Counter {
    perf: Option<(tokio::process::Child, std::path::PathBuf)>,
}

impl Counter {
    fn start(on: bool, pid: u32, work: &Path, name: &str) -> anyhow::Result<Counter> {
        if !on {
            return Ok(Counter { perf: None });
        }
        let out = work.join(format!("{name}.stat"));
        let child = tokio::process::Command::new("perf")
            .args(["stat", "-x", ",", "-e", PERF_EVENTS, "-o"])
            .arg(&out)
            .args(["-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run perf stat")?;
        Ok(Counter { perf: Some((child, out)) })
    }

    async fn stop(self) -> Option<Stat> {
        let (mut child, out) = self.perf?;
        interrupt(&child);
        let _ = child.wait().await;
        Stat::read(&out)
    }
}

/// What `perf stat` counted for one process over one run.
struct Stat {
    cpu_ms: f64,
    syscalls: f64,
    switches: f64,
}

impl Stat {
    /// What `perf stat -x , -e PERF_EVENTS -o out` wrote.
    fn read(out: &Path) -> Option<Stat> {
        let text = std::fs::read_to_string(out).ok()?;
        // CSV: each event's value comes first (task-clock in milliseconds).
        let value = |event: &str| -> Option<f64> {
            text.lines().find(|l| l.contains(event))?.split(',').next()?.trim().parse().ok()
        };
        Some(Stat {
            cpu_ms: value("task-clock")?,
            syscalls: value("raw_syscalls:sys_enter").unwrap_or(f64::NAN),
            switches: value("context-switches").unwrap_or(f64::NAN),
        })
    }
}

/// A [`Stat`] divided by the requests of its run.
#[derive(Clone, Copy)]
struct PerRequest {
    cpu_us: f64,
    syscalls: f64,
    switches: f64,
}

impl Stat {
    fn per_request(&self, requests: u64) -> PerRequest {
        let n = requests.max(1) as f64;
        PerRequest { cpu_us: 1000.0 * self.cpu_ms / n, syscalls: self.syscalls / n, switches: self.switches / n }
    }
}

/// One wrk run against one server, with what was counted around it.
struct Run {
    measured: Measured,
    /// `perf stat` on the server per request, with `--perf-stat`.
    server: Option<PerRequest>,
    /// `perf stat` on wrk per request, with `--perf-stat`.
    client: Option<PerRequest>,
    /// CPU time the hypervisor gave to other guests during the run
    /// (`steal` in `/proc/stat`), over all CPUs.
    stolen_ms: f64,
    /// CPU time the machine spent idle during the run, over all CPUs.
    idle_ms: f64,
    /// TCP segments the machine sent per request, both ends counted
    /// (`OutSegs` in `/proc/net/snmp`).
    segments: f64,
}

/// Runs wrk against `url`, counting the server `pid` (and recording it with
/// `perf record` into `profile`, when given).
async fn measure(
    args: &Args,
    url: &str,
    ids: &[String],
    pid: u32,
    work: &Path,
    name: String,
    profile: Option<&Path>,
) -> anyhow::Result<Run> {
    let profiler = match profile {
        Some(out) => Some(
            tokio::process::Command::new("perf")
                .args(["record", "-F", "499", "--call-graph", "dwarf,16384", "-o"])
                .arg(out)
                .args(["-p", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot run perf")?,
        ),
        None => None,
    };
    let counter = Counter::start(args.perf_stat, pid, work, &name)?;
    let client_out = work.join(format!("{name}-wrk.stat"));
    let counted = args.perf_stat.then_some(client_out.as_path());
    let (before, segments_before) = (CpuTimes::now(), out_segments());
    let measured = super::wrk_counted(args, url, Shape::Refresh, ids, &name, counted).await?;
    let after = CpuTimes::now();
    let (stolen_ms, idle_ms) = (after.stolen_ms - before.stolen_ms, after.idle_ms - before.idle_ms);
    let segments = (out_segments() - segments_before) / measured.requests.max(1) as f64;
    let stat = counter.stop().await;
    if let Some(mut perf) = profiler {
        interrupt(&perf);
        let _ = perf.wait().await;
    }
    let per_request = |stat: Stat| stat.per_request(measured.requests);
    let (server, client) = (stat.map(per_request), counted.and_then(Stat::read).map(per_request));
    Ok(Run { measured, server, client, stolen_ms, idle_ms, segments })
}

/// TCP segments sent since boot (`OutSegs` of `/proc/net/snmp`); NaN where
/// it cannot be read.
fn out_segments() -> f64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:")).map(|l| l.split_whitespace());
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else { return f64::NAN };
    names.zip(values).find(|(n, _)| *n == "OutSegs").and_then(|(_, v)| v.parse().ok()).unwrap_or(f64::NAN)
}

/// The machine's idle and stolen CPU time so far, in milliseconds over all
/// CPUs: the fourth and eighth figures of `/proc/stat`'s `cpu` line, in
/// USER_HZ ticks (100 a second on Linux); NaN where they cannot be read.
struct CpuTimes {
    idle_ms: f64,
    stolen_ms: f64,
}

impl CpuTimes {
    fn now() -> CpuTimes {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let cpu: Vec<&str> = stat.lines().next().unwrap_or_default().split_whitespace().collect();
        let ms = |i: usize| cpu.get(i).and_then(|t| t.parse::<f64>().ok()).map_or(f64::NAN, |t| t * 10.0);
        CpuTimes { idle_ms: ms(4), stolen_ms: ms(8) }
    }
}

/// A counter's value in a Prometheus text page (0 when absent).
fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Minimum, median (the mean of the two middle values for an even count)
/// and maximum.
fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 0 { (v[n / 2 - 1] + v[n / 2]) / 2.0 } else { v[n / 2] };
    (v[0], median, v[n - 1])
}

/// Every combination of `--store` and `--ids` (each a comma-separated
/// list), one after the other; one JSON document and one chart for all.
pub(super) async fn product(args: &Args) -> anyhow::Result<()> {
    let binary = args.latchkey.clone().ok_or_else(|| anyhow!("product needs --latchkey target/release/latchkey"))?;
    let fake = FakeProvider::start(FakeConfig::default()).await?;
    let mut docs = Vec::new();
    for store in args.store.split(',') {
        for ids in args.product_ids.split(',') {
            let mut one = args.clone();
            one.store = store.trim().to_owned();
            one.ids = ids.trim().parse().with_context(|| format!("--ids {ids}"))?;
            let work = tempfile::Builder::new().prefix("latchkey-product-").tempdir()?;
            let spot = StoreSpot::new(&one)?;
            let result = run(&one, &binary, &fake, &spot, work.path()).await;
            spot.drop_schema().await;
            docs.push(result?);
        }
    }
    let docs = Value::Array(docs);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&docs)?)?;
    }
    if let Some(svg) = &args.svg {
        std::fs::write(svg, chart(&docs)?)?;
        println!("chart written to {}", svg.display());
    }
    Ok(())
}

/// `loadtest product-chart --json FILE --svg FILE`: the chart of a
/// product run's JSON, redrawn.
pub(super) fn redraw(args: &Args) -> anyhow::Result<()> {
    let (Some(json), Some(svg)) = (&args.json, &args.svg) else { bail!("product-chart needs --json and --svg") };
    let docs: Value = serde_json::from_str(&std::fs::read_to_string(json)?)?;
    std::fs::write(svg, chart(&docs)?)?;
    Ok(())
}

/// Bars for each configuration's median repeat (by throughput ratio): bare
/// warp (`a`) and the broker (`b`), numbered in run order.
fn chart(docs: &Value) -> anyhow::Result<String> {
    let measured = |rps: &Value, p50: &Value, p99: &Value| Measured {
        requests: 0,
        seconds: 0.0,
        rps: rps.as_f64().unwrap_or(0.0),
        p50_us: p50.as_f64().unwrap_or(0.0) * 1000.0,
        p99_us: p99.as_f64().unwrap_or(0.0) * 1000.0,
        mean_us: 0.0,
        errors: String::new(),
        non_2xx: 0,
        load: String::new(),
    };
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let mut bars = Vec::new();
    for (i, doc) in docs.as_array().ok_or_else(|| anyhow!("not a product run's JSON"))?.iter().enumerate() {
        let mut runs: Vec<&Value> = doc["runs"].as_array().map(|r| r.iter().collect()).unwrap_or_default();
        runs.sort_by(|x, y| x["ratio"].as_f64().unwrap_or(0.0).total_cmp(&y["ratio"].as_f64().unwrap_or(0.0)));
        let Some(median) = runs.get(runs.len() / 2) else { continue };
        let what = format!("{}, {} AuthID(s)", doc["store"].as_str().unwrap_or("?"), doc["authids"]);
        bars.push(super::PathResult {
            key: leak(format!("{}a", i + 1)),
            label: leak(format!("bare warp, same bytes ({what})")),
            m: measured(&median["bare_rps"], &median["bare_p50_ms"], &median["bare_p99_ms"]),
        });
        bars.push(super::PathResult {
            key: leak(format!("{}b", i + 1)),
            label: leak(format!("latchkey serve, {what}")),
            m: measured(&median["latchkey_rps"], &median["latchkey_p50_ms"], &median["latchkey_p99_ms"]),
        });
    }
    Ok(super::chart(&bars))
}

/// One store and number of AuthIDs: the JSON document of its runs.
async fn run(args: &Args, binary: &Path, fake: &FakeProvider, spot: &StoreSpot, work: &Path) -> anyhow::Result<Value> {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let config_path = work.join("latchkey.toml");
    let provider = ProviderUrls { authorize: fake.authorize_url(), token: fake.token_url() };
    std::fs::write(&config_path, operator_config_text(listen, &provider, &spot.toml()))?;
    let log_path = work.join("latchkey.log");
    let mut command = tokio::process::Command::new(binary);
    match &args.broker_log {
        // For comparisons only: the product's default is `info`.
        Some(level) => command.env("LATCHKEY_LOG", level),
        None => command.env_remove("LATCHKEY_LOG"),
    };
    let mut child = command
        .args(["serve", "--config"])
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let base = format!("http://{listen}");
    let http = no_redirects()?;
    let started = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{base}/healthz")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("latchkey exited: {status}; see {}", log_path.display());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("latchkey did not answer /healthz in 60 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let logins = Instant::now();
    let ids: Vec<String> = futures_util::stream::iter(0..args.ids)
        .map(|_| login(&http, &base))
        .buffer_unordered(LOGIN_CONCURRENCY)
        .try_collect()
        .await?;
    eprintln!("[product] {} logins in {:.1} s", ids.len(), logins.elapsed().as_secs_f64());
    // One request per AuthID fills the cache (and writes each handle's hourly last-use).
    let first: Vec<reqwest::Response> = futures_util::stream::iter(&ids)
        .map(|id| http.get(format!("{base}/refresh")).header("X-AuthID", id).send())
        .buffer_unordered(32)
        .try_collect()
        .await?;
    if let Some(bad) = first.iter().find(|r| r.status() != 200) {
        bail!("/refresh answered {} before the runs", bad.status());
    }
    let sample = http.get(format!("{base}/refresh")).header("X-AuthID", &ids[0]).send().await?;
    let header = |name: reqwest::header::HeaderName| {
        sample.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
    };
    let (content_type, cache_control) = (header(reqwest::header::CONTENT_TYPE), header(reqwest::header::CACHE_CONTROL));
    let body = sample.bytes().await?;
    if !body.starts_with(b"{\"access_token\"") {
        bail!("unexpected /refresh answer: {}", String::from_utf8_lossy(&body));
    }
    let body = String::from_utf8(body.to_vec())?;
    let answer = json!({"body": body, "content_type": content_type, "cache_control": cache_control});
    let (bare_process, bare) = spawn_bare(work, &answer).await?;
    let bare_pid = bare_process.id().ok_or_else(|| anyhow!("loadtest bare has no pid"))?;
    let bare_url = format!("http://{bare}");

    // Per repeat: bare warp's run and the broker's.
    let mut pairs: Vec<(Run, Run)> = Vec::new();
    let broker_pid = child.id().ok_or_else(|| anyhow!("latchkey has no pid"))?;
    for repeat in 1..=args.repeats {
        // Odd repeats run bare warp first, even ones the broker: a machine
        // slowing down or speeding up over a pair of runs favours neither.
        let bare_run = || measure(args, &bare_url, &ids, bare_pid, work, format!("bare-{repeat}"), None);
        // The broker's first run under `perf record`, when asked.
        let profile = args.perf.as_deref().filter(|_| repeat == 1);
        let broker_run =
            || measure(args, &base, &ids, broker_pid, work, format!("latchkey-{}-{repeat}", spot.kind), profile);
        let (a, b) = if repeat % 2 == 1 {
            let a = bare_run().await?;
            (a, broker_run().await?)
        } else {
            let b = broker_run().await?;
            (bare_run().await?, b)
        };
        if b.measured.non_2xx > 0 {
            bail!(
                "the broker answered {} requests with a non-2xx status; see {}",
                b.measured.non_2xx,
                log_path.display()
            );
        }
        eprintln!(
            "[machine] CPU time idle (both CPUs): bare {:.0} ms, latchkey {:.0} ms; stolen: bare {:.0} ms, latchkey \
             {:.0} ms; TCP segments per request: bare {:.2}, latchkey {:.2}",
            a.idle_ms, b.idle_ms, a.stolen_ms, b.stolen_ms, a.segments, b.segments
        );
        if let (Some(x), Some(y)) = (a.server, b.server) {
            eprintln!(
                "[per request] CPU µs bare {:.2}, latchkey {:.2} ({:.2}x); system calls bare {:.2}, latchkey {:.2}; \
                 context switches bare {:.3}, latchkey {:.3}",
                x.cpu_us,
                y.cpu_us,
                y.cpu_us / x.cpu_us,
                x.syscalls,
                y.syscalls,
                x.switches,
                y.switches
            );
        }
        if let (Some(x), Some(y)) = (a.client, b.client) {
            eprintln!(
                "[wrk per request] CPU µs against bare {:.2}, against latchkey {:.2}; system calls {:.2} and {:.2}",
                x.cpu_us, y.cpu_us, x.syscalls, y.syscalls
            );
        }
        pairs.push((a, b));
    }
    drop(bare_process);
    let runs: Vec<(&Measured, &Measured)> = pairs.iter().map(|(a, b)| (&a.measured, &b.measured)).collect();
    let both = |f: fn(&Run) -> Option<PerRequest>| -> Vec<(PerRequest, PerRequest)> {
        pairs.iter().filter_map(|(a, b)| Some((f(a)?, f(b)?))).collect()
    };
    let (counted, clients) = (both(|r| r.server), both(|r| r.client));
    let metrics = http.get(format!("{base}/metrics")).send().await?.text().await?;
    let dropped = metric(&metrics, "latchkey_log_lines_dropped_total");
    let hits = metric(&metrics, "latchkey_cache_hits_total");
    let misses = metric(&metrics, "latchkey_cache_misses_total");
    child.start_kill()?;
    let _ = child.wait().await;
    let log_lines = std::fs::read_to_string(&log_path).map(|t| t.lines().count()).unwrap_or(0);

    let throughput: Vec<f64> = runs.iter().map(|(a, b)| b.rps / a.rps).collect();
    let p99: Vec<f64> = runs.iter().map(|(a, b)| b.p99_us / a.p99_us).collect();
    let (t_min, t_med, t_max) = spread(&throughput);
    let (p_min, p_med, p_max) = spread(&p99);
    println!(
        "\nlatchkey serve ({}) on {}, {} AuthID(s), default logging to a file; wrk -t{} -c{} -d{}",
        binary.display(),
        spot.kind,
        ids.len(),
        args.threads,
        args.connections,
        args.duration
    );
    println!("| repeat | bare warp req/s | latchkey req/s | ratio | bare p99 ms | latchkey p99 ms | p99 ratio |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for (i, (a, b)) in runs.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.0} | {:.1} % | {:.3} | {:.3} | {:.2} |",
            i + 1,
            a.rps,
            b.rps,
            100.0 * b.rps / a.rps,
            ms(a.p99_us),
            ms(b.p99_us),
            b.p99_us / a.p99_us
        );
    }
    println!(
        "throughput ratio: median {:.1} % (min {:.1}, max {:.1}; target >= 80 %); p99 ratio: median {:.2} (min {:.2}, \
         max {:.2}; target <= 1.25)",
        100.0 * t_med,
        100.0 * t_min,
        100.0 * t_max,
        p_med,
        p_min,
        p_max
    );
    if !counted.is_empty() {
        let ratios: Vec<f64> = counted.iter().map(|(a, b)| b.cpu_us / a.cpu_us).collect();
        let (lo, mid, hi) = spread(&ratios);
        let mean = |f: fn(&(PerRequest, PerRequest)) -> f64| counted.iter().map(f).sum::<f64>() / counted.len() as f64;
        println!(
            "server CPU per request (perf stat task-clock, user + kernel): bare {:.2} µs, latchkey {:.2} µs; ratio \
             median {mid:.2} (min {lo:.2}, max {hi:.2}); system calls per request bare {:.2}, latchkey {:.2}; \
             context switches per request bare {:.3}, latchkey {:.3} (means)",
            mean(|c| c.0.cpu_us),
            mean(|c| c.1.cpu_us),
            mean(|c| c.0.syscalls),
            mean(|c| c.1.syscalls),
            mean(|c| c.0.switches),
            mean(|c| c.1.switches)
        );
    }
    if !clients.is_empty() {
        let mean = |f: fn(&(PerRequest, PerRequest)) -> f64| clients.iter().map(f).sum::<f64>() / clients.len() as f64;
        println!(
            "wrk's CPU per request: against bare {:.2} µs, against latchkey {:.2} µs; system calls {:.2} and {:.2} \
             (means)",
            mean(|c| c.0.cpu_us),
            mean(|c| c.1.cpu_us),
            mean(|c| c.0.syscalls),
            mean(|c| c.1.syscalls)
        );
    }
    println!(
        "cache hits {hits}, misses {misses}; log lines written {log_lines}, dropped {dropped} \
         (latchkey_log_lines_dropped_total)"
    );
    let rows: Vec<Value> = pairs
        .iter()
        .enumerate()
        .map(|(i, (a_run, b_run))| {
            let (a, b) = (&a_run.measured, &b_run.measured);
            let per_request = a_run.server.zip(b_run.server).map(|(x, y)| {
                json!({"bare_cpu_us": x.cpu_us, "bare_syscalls": x.syscalls, "bare_context_switches": x.switches,
                       "latchkey_cpu_us": y.cpu_us, "latchkey_syscalls": y.syscalls,
                       "latchkey_context_switches": y.switches})
            });
            let wrk_per_request = a_run.client.zip(b_run.client).map(|(x, y)| {
                json!({"against_bare_cpu_us": x.cpu_us, "against_bare_syscalls": x.syscalls,
                       "against_latchkey_cpu_us": y.cpu_us, "against_latchkey_syscalls": y.syscalls})
            });
            json!({"bare_rps": a.rps, "latchkey_rps": b.rps, "ratio": b.rps / a.rps,
                   "bare_p50_ms": ms(a.p50_us), "latchkey_p50_ms": ms(b.p50_us),
                   "bare_p99_ms": ms(a.p99_us), "latchkey_p99_ms": ms(b.p99_us), "p99_ratio": b.p99_us / a.p99_us,
                   "latchkey_requests": b.requests, "latchkey_errors": b.errors,
                   "load_before_bare": a.load, "load_before_latchkey": b.load,
                   "bare_first": i % 2 == 0,
                   "idle_ms": {"bare": a_run.idle_ms, "latchkey": b_run.idle_ms},
                   "stolen_ms": {"bare": a_run.stolen_ms, "latchkey": b_run.stolen_ms},
                   "per_request": per_request, "wrk_per_request": wrk_per_request})
        })
        .collect();
    let doc = json!({"store": spot.kind, "authids": ids.len(), "binary": binary.display().to_string(),
                     "threads": args.threads, "connections": args.connections, "duration": args.duration,
                     "runs": rows, "throughput_ratio": {"min": t_min, "median": t_med, "max": t_max},
                     "p99_ratio": {"min": p_min, "median": p_med, "max": p_max},
                     "cache_hits": hits, "cache_misses": misses,
                     "log_lines": log_lines, "log_lines_dropped": dropped});
    Ok(doc)
}
