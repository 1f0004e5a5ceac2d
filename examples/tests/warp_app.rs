// The warp application with the broker mounted under /oauth/: the app's own
// routes answer beside it, and a login under the prefix goes all the way.

use std::sync::Arc;

use latchkey_core::MemoryStore;
use latchkey_examples::{standin, warp_app};
use latchkey_server::config::Config;
use latchkey_testkit::FakeProvider;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use serde_json::Value;

struct Running {
    url: String,
    cloud: FakeProvider,
    http: reqwest::Client,
    app: warp_app::WarpApp,
}

async fn start() -> Running {
    let cloud = standin::cloud().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = Config::parse(&format!(
        "public_url = \"{url}/oauth\"\n[keys]\nmaster_keys = [\"k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"]\n{}",
        standin::catalogue(&cloud)
    ))
    .unwrap();
    let app = warp_app::start(&config, Arc::new(MemoryStore::new()), listener).await.unwrap();
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    Running { url, cloud, http, app }
}

impl Running {
    async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(format!("{}{path}", self.url)).send().await.unwrap()
    }
}

/// The hidden fields of the form on a page that posts to `action`.
fn form_fields(html: &str, action: &str) -> Vec<(String, String)> {
    let start = html.find(&format!("action=\"{action}\"")).unwrap_or_else(|| panic!("a form to {action}: {html}"));
    let form = &html[start..start + html[start..].find("</form>").unwrap()];
    form.split("<input type=hidden name=")
        .skip(1)
        .map(|field| {
            let (name, rest) = field.split_once(" value=\"").unwrap();
            (name.to_owned(), rest.split('"').next().unwrap().to_owned())
        })
        .collect()
}

fn location(response: &reqwest::Response) -> String {
    response.headers()[LOCATION].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn the_apps_own_routes_answer_beside_the_mounted_broker() {
    let app = start().await;
    let home = app.get("/").await;
    assert_eq!(home.status(), StatusCode::OK);
    assert!(home.text().await.unwrap().contains("<h1>My app</h1>"));
    let services: Value = app.get("/api/services").await.json().await.unwrap();
    let ids = services["services"].as_array().unwrap();
    assert!(ids.contains(&Value::from(standin::SERVICE)), "the app reads the broker's catalogue: {services}");
    // Outside /oauth/ the app answers what it does not know; inside, the broker does, in its own words.
    let elsewhere = app.get("/refresh").await;
    assert_eq!(elsewhere.status(), StatusCode::NOT_FOUND);
    assert_eq!(elsewhere.text().await.unwrap(), "not found here");
    let unknown = app.get("/oauth/nope").await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert!(unknown.json::<Value>().await.unwrap()["error"].is_string(), "the broker's JSON error");
    let wrong_method = app.http.delete(format!("{}/oauth/refresh", app.url)).send().await.unwrap();
    assert_eq!(wrong_method.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(app.get("/oauth/healthz").await.status(), StatusCode::OK);
    let css = app.get("/oauth/static/style.css").await;
    assert_eq!(css.status(), StatusCode::OK);
    assert!(css.headers()[CONTENT_TYPE].to_str().unwrap().starts_with("text/css"));
    // The broker's own listing names its login links under the prefix.
    let listed: Value = app.get("/oauth/v1/services").await.json().await.unwrap();
    let ours = listed["services"].as_array().unwrap().iter().find(|s| s["id"] == standin::SERVICE).unwrap();
    assert_eq!(ours["login_url"], format!("{}/oauth/?type={}", app.url, standin::SERVICE));
    let _ = app.app.stop.send(true);
}

#[tokio::test]
async fn a_login_under_the_prefix_redirects_within_it_and_its_authid_refreshes() {
    let app = start().await;
    // Duplicati's popup opens /refresh?type=…: sent to the picker, under the prefix.
    let popup = app.get(&format!("/oauth/refresh?type={}", standin::SERVICE)).await;
    assert!(popup.status().is_redirection(), "{}", popup.status());
    assert_eq!(location(&popup), format!("/oauth/?type={}", standin::SERVICE));

    let picker = app.get(&location(&popup)).await;
    assert_eq!(picker.status(), StatusCode::OK);
    let cookie = picker.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    assert!(cookie.starts_with("latchkey-login=") && cookie.contains("Path=/;"), "{cookie}");
    let cookie = cookie.split(';').next().unwrap().to_owned();
    let html = picker.text().await.unwrap();
    assert!(html.contains("href=\"/oauth/static/style.css\""), "{html}");
    assert!(html.contains("href=\"/oauth/device\""), "{html}");
    assert!(!html.contains("action=\"/login\""), "no form leaves the prefix: {html}");

    let go = app
        .http
        .post(format!("{}/oauth/login", app.url))
        .header(COOKIE, &cookie)
        .header("Origin", &app.url)
        .header("Sec-Fetch-Site", "same-origin")
        .form(&form_fields(&html, "/oauth/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(go.status(), StatusCode::SEE_OTHER);
    let authorize = location(&go);
    assert!(authorize.starts_with(&app.cloud.authorize_url()), "{authorize}");
    let authorize_url = url::Url::parse(&authorize).unwrap();
    let redirect_uri = authorize_url.query_pairs().find(|(k, _)| k == "redirect_uri").unwrap().1;
    assert_eq!(redirect_uri, format!("{}/oauth/logged-in", app.url));

    let back = app.http.get(&authorize).send().await.unwrap();
    let callback = location(&back);
    assert!(callback.starts_with(&format!("{}/oauth/logged-in?", app.url)), "{callback}");
    let page = app.http.get(&callback).header(COOKIE, &cookie).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let page = page.text().await.unwrap();
    assert!(page.contains("src=\"/oauth/static/authid.js\""), "{page}");
    let authid = page.split("data-authid=\"").nth(1).and_then(|s| s.split('"').next()).unwrap().to_owned();

    let refresh = app.http.get(format!("{}/oauth/refresh", app.url)).header("X-AuthID", &authid).send().await;
    let refresh = refresh.unwrap();
    assert_eq!(refresh.status(), StatusCode::OK);
    let body: Value = refresh.json().await.unwrap();
    let access = body["access_token"].as_str().unwrap();
    assert!(app.cloud.is_active(access), "a token the cloud issued for this login");
    // The app's own code reaches the same engine.
    let authid = latchkey_core::AuthId::parse(&authid).unwrap();
    let direct = app.app.mounted.broker.token(&authid, None).await.unwrap();
    assert_eq!(secrecy::ExposeSecret::expose_secret(&direct.access_token), access);
    let _ = app.app.stop.send(true);
}
