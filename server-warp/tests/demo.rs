// `latchkey demo` as a newcomer meets it: the process started as the README
// says, and the steps it prints followed one by one — the login "in a
// browser" (plain HTTP, driving the pages as tests/support.rs does), every
// printed `curl` sent as printed with only `<AuthID>` and `<device_code>`
// filled in (what the steps tell the user to fill in), the device flow,
// /metrics, revoking at /revoke — and Ctrl-C stops it and deletes its data.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, COOKIE, HeaderMap, LOCATION};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::{authid_from_page, form_fields, login_cookie, post_form};

/// How long the demo may take to print its steps.
const START_BOUND: Duration = Duration::from_secs(60);
/// How long the whole walk through the steps may take.
const TEST_BOUND: Duration = Duration::from_secs(180);

/// A running `latchkey demo` and what it printed.
pub(crate) struct Demo {
    child: Child,
    /// Its standard output, up to the last line of its steps.
    pub(crate) printed: String,
    /// Its address, the first URL it printed (`http://127.0.0.1:<port>`).
    pub(crate) url: String,
    /// Its standard error (the log), for failure messages.
    log: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Demo {
    /// Starts `command` (a `latchkey demo`, perhaps through a shell that
    /// `exec`s it) and reads its standard output until the steps end.
    pub(crate) async fn start(mut command: Command) -> Demo {
        let log_dir = tempfile::tempdir().unwrap();
        let log = log_dir.path().join("demo.log");
        let stderr = std::fs::File::create(&log).unwrap();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("latchkey demo starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut printed = String::new();
        let read = async {
            while let Some(line) = lines.next_line().await.expect("the demo's output") {
                printed.push_str(&line);
                printed.push('\n');
                if line.starts_with("Press Ctrl-C") {
                    return true;
                }
            }
            false
        };
        let ended = tokio::time::timeout(START_BOUND, read).await;
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            ended == Ok(true),
            "the demo printed no complete steps within {START_BOUND:?} (output so far:\n{printed}\nlog:\n{log_text})"
        );
        // Keep reading, so the demo never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let url = urls(&printed).into_iter().next().unwrap_or_else(|| panic!("the demo printed no URL:\n{printed}"));
        Demo { child, printed, url, log, _log_dir: log_dir }
    }

    /// The demo's log so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Ctrl-C, as the steps say; answers how it exited. Bounded.
    pub(crate) async fn stop(mut self) -> ExitStatus {
        let pid = self.child.id().expect("the demo is still running").to_string();
        assert!(std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the demo stops within 30 s of Ctrl-C")
            .unwrap()
    }

    /// The demo's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id().expect("the demo is running")
    }
}

/// Every `http://` URL in `text`, in order, without the punctuation after it.
pub(crate) fn urls(text: &str) -> Vec<String> {
    text.split_whitespace()
        .filter(|w| w.starts_with("http://"))
        .map(|w| w.trim_end_matches([',', '.', ')', ';']).to_owned())
        .collect()
}

/// The words of a shell command line: whitespace separates, and single or
/// double quotes group (enough for the commands the demo and README print).
pub(crate) fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quote, mut in_word) = (Vec::new(), String::new(), None, false);
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    assert!(quote.is_none(), "an unclosed quote in {line:?}");
    if in_word {
        words.push(word);
    }
    words
}

/// A `curl` command as printed: the options the demo's steps use.
#[derive(Clone, Debug)]
pub(crate) struct Curl {
    /// The line it came from.
    pub(crate) line: String,
    method: Option<String>,
    headers: Vec<(String, String)>,
    data: Vec<String>,
    /// The URL it asks for.
    pub(crate) url: String,
}

impl Curl {
    /// Every `curl` command in `text`, one a line; words after one that
    /// begins with `(` are a remark to the reader, not part of the command.
    pub(crate) fn all_in(text: &str) -> Vec<Curl> {
        text.lines()
            .filter_map(|line| {
                let at = line.find("curl ")?;
                let command = &line[at..];
                let words: Vec<String> = shell_words(command).into_iter().take_while(|w| !w.starts_with('(')).collect();
                Some(Curl::parse(command, &words))
            })
            .collect()
    }

    fn parse(line: &str, words: &[String]) -> Curl {
        assert_eq!(words.first().map(String::as_str), Some("curl"), "{line}");
        let mut curl = Curl {
            line: line.trim().to_owned(),
            method: None,
            headers: Vec::new(),
            data: Vec::new(),
            url: String::new(),
        };
        let mut it = words[1..].iter();
        while let Some(word) = it.next() {
            let mut value = || it.next().unwrap_or_else(|| panic!("{word} without a value in {line}")).clone();
            match word.as_str() {
                "-X" => curl.method = Some(value()),
                "-H" => {
                    let header = value();
                    let (name, v) = header.split_once(':').unwrap_or_else(|| panic!("a header without ':' in {line}"));
                    curl.headers.push((name.trim().to_owned(), v.trim().to_owned()));
                }
                "-d" => curl.data.push(value()),
                option if option.starts_with('-') => panic!("this test does not know curl's {option} (in {line})"),
                url => {
                    assert!(curl.url.is_empty(), "two URLs in {line}");
                    curl.url = url.to_owned();
                }
            }
        }
        assert!(!curl.url.is_empty(), "no URL in {line}");
        curl
    }

    /// The URL's path.
    pub(crate) fn path(&self) -> String {
        reqwest::Url::parse(&self.url).unwrap_or_else(|e| panic!("{}: {e}", self.line)).path().to_owned()
    }

    /// Whether the command mentions `placeholder` (such as `<AuthID>`).
    pub(crate) fn mentions(&self, placeholder: &str) -> bool {
        self.line.contains(placeholder)
    }

    /// The command with `placeholder` replaced by `value` everywhere.
    pub(crate) fn with(&self, placeholder: &str, value: &str) -> Curl {
        let swap = |s: &String| s.replace(placeholder, value);
        Curl {
            line: self.line.replace(placeholder, value),
            method: self.method.clone(),
            headers: self.headers.iter().map(|(n, v)| (swap(n), swap(v))).collect(),
            data: self.data.iter().map(swap).collect(),
            url: swap(&self.url),
        }
    }

    /// Sends what curl would: `-d` makes it a form POST whose body is the
    /// `-d` values joined by `&`, as given; `-X` names the method.
    pub(crate) async fn send(&self, http: &reqwest::Client) -> (StatusCode, HeaderMap, String) {
        let parts = [self.url.as_str()]
            .into_iter()
            .chain(self.headers.iter().map(|(_, v)| v.as_str()))
            .chain(self.data.iter().map(String::as_str));
        for part in parts {
            assert!(
                !(part.contains('<') && part.contains('>')),
                "a placeholder the steps do not explain: {}",
                self.line
            );
        }
        let default = if self.data.is_empty() { "GET" } else { "POST" };
        let method = reqwest::Method::from_bytes(self.method.as_deref().unwrap_or(default).as_bytes()).unwrap();
        let mut request = http.request(method, &self.url);
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        if !self.data.is_empty() {
            request = request.header(CONTENT_TYPE, "application/x-www-form-urlencoded").body(self.data.join("&"));
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("{}: {e}", self.line));
        let (status, headers) = (response.status(), response.headers().clone());
        (status, headers, response.text().await.unwrap())
    }

    /// Sends it and answers its JSON, failing unless the answer is a 200.
    pub(crate) async fn ok_json(&self, http: &reqwest::Client) -> Value {
        let (status, headers, body) = self.send(http).await;
        assert_eq!(status, StatusCode::OK, "{} answered {status} {:?}: {body}", self.line, headers.get("x-reason"));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{} answered no JSON ({e}): {body}", self.line))
    }
}

pub(crate) fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Follows redirects by hand with the broker's login cookie, as a browser
/// does; answers the page where they end.
async fn follow(http: &reqwest::Client, mut location: String, cookie: &str) -> (StatusCode, String) {
    for _ in 0..10 {
        let response = http.get(&location).header(COOKIE, cookie).send().await.unwrap();
        match response.headers().get(LOCATION) {
            Some(next) if response.status().is_redirection() => {
                let next = next.to_str().unwrap();
                location = reqwest::Url::parse(&location).unwrap().join(next).unwrap().to_string();
            }
            _ => return (response.status(), response.text().await.unwrap()),
        }
    }
    panic!("more than ten redirects, the last to {location}");
}

/// At the fake provider: clicks "Allow" on its login page at `location`,
/// then follows the browser back to the broker; answers the page shown there.
async fn allow_at_provider(http: &reqwest::Client, location: &str, cookie: &str) -> String {
    let page = http.get(location).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK, "the provider's login page at {location}");
    let html = page.text().await.unwrap();
    let form = &html[html.find("<form").unwrap_or_else(|| panic!("a form at the provider: {html}"))..];
    let action = attribute(form, "action");
    let login = attribute(&form[form.find("name=login").expect("the provider's login field")..], "value");
    let allow = &form[..form.find(">Allow</button>").unwrap_or_else(|| panic!("an Allow button: {html}"))];
    let button = &allow[allow.rfind("<button").unwrap()..];
    let fields = [("login".to_owned(), login), (attribute(button, "name"), attribute(button, "value"))];
    let target = reqwest::Url::parse(location).unwrap().join(&action).unwrap();
    let decided = http.post(target).form(&fields).send().await.unwrap();
    assert!(decided.status().is_redirection(), "Allow sends the browser back: {}", decided.status());
    let back = decided.headers()[LOCATION].to_str().unwrap().to_owned();
    let (status, page) = follow(http, back, cookie).await;
    assert_eq!(status, StatusCode::OK, "the broker's page after the login: {page}");
    page
}

/// An HTML attribute's value in `tag` (quoted or not).
fn attribute(tag: &str, name: &str) -> String {
    let at = tag.find(&format!("{name}=")).unwrap_or_else(|| panic!("no {name} in {tag}")) + name.len() + 1;
    let rest = &tag[at..];
    match rest.strip_prefix('"') {
        Some(quoted) => quoted[..quoted.find('"').unwrap()].to_owned(),
        None => rest[..rest.find([' ', '>']).unwrap()].to_owned(),
    }
}

/// Step 1 and 2 of the demo: opens `page` (the `?type=demo` link), clicks the
/// demo service, "Allow" at the fake provider; answers the AuthID shown.
pub(crate) async fn login_in_a_browser(http: &reqwest::Client, base: &str, page: &str) -> String {
    let response = http.get(page).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{page}");
    let cookie = login_cookie(&response).unwrap_or_else(|| panic!("{page} sets the login cookie"));
    let html = response.text().await.unwrap();
    let item = html
        .split("<li>")
        .find(|item| item.contains(">Demo storage"))
        .unwrap_or_else(|| panic!("the demo service to click at {page}: {html}"));
    let go = post_form(http, base, "/login", &form_fields(item, "/login"), &cookie).await;
    assert_eq!(go.status(), StatusCode::SEE_OTHER, "the click goes to the provider");
    let location = go.headers()[LOCATION].to_str().unwrap().to_owned();
    authid_from_page(&allow_at_provider(http, &location, &cookie).await)
}

/// Opens a device flow's `verification_uri_complete`, continues with the
/// code it shows, and clicks "Allow" at the provider; answers the last page.
async fn approve_device(http: &reqwest::Client, base: &str, uri: &str) -> String {
    let response = http.get(uri).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{uri}");
    let cookie = login_cookie(&response).unwrap_or_else(|| panic!("{uri} sets the login cookie"));
    let html = response.text().await.unwrap();
    let mut fields = form_fields(&html, "/device");
    let code_field = &html[html.find("name=user_code").unwrap_or_else(|| panic!("a code field: {html}"))..];
    fields.push(("user_code".to_owned(), attribute(code_field, "value")));
    let confirm = post_form(http, base, "/device", &fields, &cookie).await;
    assert_eq!(confirm.status(), StatusCode::OK);
    let confirm = confirm.text().await.unwrap();
    let go = post_form(http, base, "/login", &form_fields(&confirm, "/login"), &cookie).await;
    assert_eq!(go.status(), StatusCode::SEE_OTHER, "continuing goes to the provider: {confirm}");
    allow_at_provider(http, go.headers()[LOCATION].to_str().unwrap(), &cookie).await
}

/// The one printed command whose URL path is `path`.
fn printed(curls: &[Curl], path: &str) -> Curl {
    let found: Vec<&Curl> = curls.iter().filter(|c| c.path() == path).collect();
    assert_eq!(found.len(), 1, "the demo prints one curl for {path}: {curls:#?}");
    found[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_does_what_it_prints() {
    let mut command = Command::new(env!("CARGO_BIN_EXE_latchkey"));
    // The README's command, on any free port.
    command.args(["demo", "--listen", "127.0.0.1:0"]);
    let demo = Demo::start(command).await;
    let (url, steps) = (demo.url.clone(), demo.printed.clone());
    let walk = async move {
        let http = http();
        let curls = Curl::all_in(&steps);
        let pages = urls(&steps);
        let page = |path: &str| {
            let wanted = format!("{url}{path}");
            assert!(pages.contains(&wanted), "the steps name {wanted}:\n{steps}");
            wanted
        };

        // 1. and 2.: log in "in a browser", copy the AuthID.
        let authid = login_in_a_browser(&http, &url, &page("/?type=demo")).await;

        // 2.: the three kinds of client, each command as printed.
        let token_commands: Vec<&Curl> = curls.iter().filter(|c| c.mentions("<AuthID>")).collect();
        let mut paths: Vec<String> = token_commands.iter().map(|c| c.path()).collect();
        paths.sort();
        assert_eq!(paths, ["/oauth2/token", "/refresh", "/v1/token"], "the three token routes:\n{steps}");
        for command in &token_commands {
            let answer = command.with("<AuthID>", &authid).ok_json(&http).await;
            assert!(answer["access_token"].as_str().is_some_and(|t| !t.is_empty()), "{}: {answer}", command.line);
            if command.path() == "/oauth2/token" {
                assert_eq!(answer["refresh_token"], authid.as_str(), "the AuthID is the refresh token");
            }
        }

        // 3.: the device flow, without a browser on the device.
        let start = printed(&curls, "/v1/device/code").ok_json(&http).await;
        let complete = start["verification_uri_complete"].as_str().unwrap_or_else(|| panic!("{start}"));
        let done = approve_device(&http, &url, complete).await;
        let device_authid = authid_from_page(&done);
        let poll = printed(&curls, "/v1/device/token").with("<device_code>", start["device_code"].as_str().unwrap());
        let mut interval = Duration::from_secs(start["interval"].as_u64().unwrap_or(5));
        let give_up = Instant::now() + Duration::from_secs(60);
        let answer = loop {
            tokio::time::sleep(interval).await;
            let (status, _, body) = poll.send(&http).await;
            let body: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{}: {e}: {body}", poll.line));
            match (status, body["error"].as_str()) {
                (StatusCode::OK, _) => break body,
                (_, Some("authorization_pending")) => {}
                (_, Some("slow_down")) => interval += Duration::from_secs(5),
                _ => panic!("{} answered {status}: {body}", poll.line),
            }
            assert!(Instant::now() < give_up, "the device got no AuthID within a minute");
        };
        assert_eq!(answer["authid"], device_authid.as_str(), "the device receives the AuthID the page showed");
        let refresh = printed(&curls, "/refresh");
        refresh.with("<AuthID>", &device_authid).ok_json(&http).await;

        // 4.: /metrics counted all of it.
        let metrics = http.get(page("/metrics")).send().await.unwrap();
        assert_eq!(metrics.status(), StatusCode::OK);
        let metrics = metrics.text().await.unwrap();
        for route in ["/refresh", "/v1/token", "/oauth2/token", "/v1/device/code", "/v1/device/token"] {
            let line = format!("latchkey_http_requests_total{{route=\"{route}\",status=\"200\"}}");
            assert!(metrics.contains(&line), "{line} in\n{metrics}");
        }

        // 4.: revoke the first AuthID at /revoke, as its form does.
        let form = http.get(page("/revoke")).send().await.unwrap();
        assert_eq!(form.status(), StatusCode::OK);
        let form = form.text().await.unwrap();
        let field = &form[form.find("action=\"/revoked\"").unwrap_or_else(|| panic!("the revoke form: {form}"))..];
        let name = attribute(&field[field.find("<input type=text").expect("the AuthID field")..], "name");
        let revoked = post_form(&http, &url, "/revoked", &[(name, authid.clone())], "").await;
        assert_eq!(revoked.status(), StatusCode::OK);
        assert!(revoked.text().await.unwrap().contains("The AuthID no longer works"));
        let (status, headers, _) = refresh.with("<AuthID>", &authid).send(&http).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "a revoked AuthID is refused");
        assert_eq!(headers["x-reason"], "this AuthID has been revoked");
        refresh.with("<AuthID>", &device_authid).ok_json(&http).await;
    };
    match tokio::time::timeout(TEST_BOUND, tokio::spawn(walk)).await {
        Ok(Ok(())) => {}
        Ok(Err(failed)) => {
            let payload = failed.into_panic();
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            panic!("{message}\n\nthe demo printed:\n{}\nits log:\n{}", demo.printed, demo.log());
        }
        Err(_) => panic!("the walk through the demo's steps took over {TEST_BOUND:?}; log:\n{}", demo.log()),
    }

    // "Press Ctrl-C to stop; the demo's data is deleted."
    let data = std::env::temp_dir().join(format!("latchkey-demo-{}", demo.pid()));
    assert!(data.exists(), "the demo keeps its data in {}", data.display());
    let status = demo.stop().await;
    assert!(status.success(), "Ctrl-C stops the demo cleanly: {status:?}");
    assert!(!data.exists(), "the demo's data is deleted: {}", data.display());
}
