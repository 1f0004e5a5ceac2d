// The hyper application that embeds the engine: a login through its own
// pages, then access tokens from its own API.

use std::sync::Arc;
use std::time::Duration;

use latchkey_examples::hyper_app::{self, App};
use latchkey_examples::{BTreeStore, standin};
use latchkey_testkit::FakeProvider;
use reqwest::StatusCode;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};

struct Running {
    url: String,
    cloud: FakeProvider,
    http: reqwest::Client,
    _server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// The app on `127.0.0.1:0`, on the custom store, against the fake cloud.
async fn start() -> Running {
    let cloud = standin::cloud().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let store = Arc::new(BTreeStore::default());
    let broker = hyper_app::engine(store, &standin::catalogue(&cloud), standin::keyring(), &url).await.unwrap();
    let app = Arc::new(App { broker, service: standin::SERVICE.into() });
    let server = tokio::spawn(hyper_app::serve(listener, app));
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    Running { url, cloud, http, _server: server }
}

fn location(response: &reqwest::Response) -> String {
    response.headers()[LOCATION].to_str().unwrap().to_owned()
}

impl Running {
    /// Clicks Connect: answers where the browser is sent and the cookie it got.
    async fn connect(&self) -> (String, String) {
        let go = self.http.post(format!("{}/connect", self.url)).header("sec-fetch-site", "same-origin").send().await;
        let go = go.unwrap();
        assert_eq!(go.status(), StatusCode::SEE_OTHER);
        let cookie = go.headers()[SET_COOKIE].to_str().unwrap().split(';').next().unwrap().to_owned();
        assert!(cookie.starts_with("app-login="), "{cookie}");
        (location(&go), cookie)
    }

    /// The fake cloud approves the login and sends the browser back: the callback URL.
    async fn approve(&self, authorize: &str) -> String {
        assert!(authorize.starts_with(&self.cloud.authorize_url()), "{authorize}");
        let back = self.http.get(authorize).send().await.unwrap();
        assert!(back.status().is_redirection(), "{}", back.status());
        let callback = location(&back);
        assert!(callback.starts_with(&format!("{}/logged-in?", self.url)), "{callback}");
        callback
    }

    async fn token(&self, authid: &str) -> reqwest::Response {
        self.http.get(format!("{}/api/token", self.url)).bearer_auth(authid).send().await.unwrap()
    }
}

#[tokio::test]
async fn a_login_through_the_apps_pages_gives_an_authid_its_api_trades_for_access_tokens() {
    let app = start().await;
    // Every access token the cloud issues is already expired: each request refreshes at the cloud.
    app.cloud.configure(|c| c.access_lifetime = Some(Duration::ZERO));

    let (authorize, cookie) = app.connect().await;
    let callback = app.approve(&authorize).await;
    let page = app.http.get(&callback).header(COOKIE, &cookie).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let text = page.text().await.unwrap();
    let authid = text.lines().nth(1).unwrap().trim().to_owned();
    assert!(authid.contains(':') && authid.len() > 40, "{text}");

    let mut generations = Vec::new();
    for _ in 0..2 {
        let answer = app.token(&authid).await;
        assert_eq!(answer.status(), StatusCode::OK);
        let body: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(body["service"], standin::SERVICE);
        let access = body["access_token"].as_str().unwrap();
        assert!(app.cloud.is_active(access), "the cloud accepts the token the app handed out");
        generations.push(app.cloud.lineage(access).unwrap());
    }
    // Two refreshes of one grant, each with the refresh token the previous one rotated in
    // (the cloud revokes a grant whose rotated-out token comes back).
    let grant = generations[0].0;
    assert_eq!(generations, vec![(grant, 2), (grant, 3)]);
    assert_eq!(app.cloud.refreshes(), 2);
    assert_eq!(app.cloud.reuse_attempts(), 0);
}

#[tokio::test]
async fn the_api_refuses_wrong_authids_and_the_login_stays_in_its_browser() {
    let app = start().await;
    let (authorize, cookie) = app.connect().await;
    let callback = app.approve(&authorize).await;

    // The provider's answer replayed without the browser's cookie completes nothing…
    let elsewhere = app.http.get(&callback).send().await.unwrap();
    assert_eq!(elsewhere.status(), StatusCode::BAD_REQUEST);
    assert!(elsewhere.text().await.unwrap().contains("another browser"));
    // …and the browser that began it still can.
    let page = app.http.get(&callback).header(COOKIE, &cookie).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let authid = page.text().await.unwrap().lines().nth(1).unwrap().trim().to_owned();

    let (keyid, secret) = authid.split_once(':').unwrap();
    let flipped = if secret.starts_with('A') { "B" } else { "A" };
    let wrong = format!("{keyid}:{flipped}{}", &secret[1..]);
    let answer = app.token(&wrong).await;
    assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(answer.json::<serde_json::Value>().await.unwrap()["error"], "authid_invalid");
    let answer = app.token("no colon here").await;
    assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(app.token(&authid).await.status(), StatusCode::OK);

    // A form posted from another site starts no login.
    let cross = app.http.post(format!("{}/connect", app.url)).header("sec-fetch-site", "cross-site").send().await;
    assert_eq!(cross.unwrap().status(), StatusCode::FORBIDDEN);
    // And a GET never does.
    assert_eq!(app.http.get(format!("{}/connect", app.url)).send().await.unwrap().status(), StatusCode::NOT_FOUND);
}
