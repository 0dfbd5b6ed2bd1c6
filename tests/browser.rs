//! A real browser for the tests of pages: Debian's chromium, headless,
//! driven through chromedriver over WebDriver (both installed by
//! `scripts/test`).

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::util::wait_until;

/// chromedriver on a free loopback port, and a headless chromium session
/// through it; both stopped when dropped (the whole process group, so
/// that the browser chromedriver started goes with it).
pub(crate) struct Browser {
    driver: Child,
    pub(crate) client: Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub(crate) async fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            // A group of its own: killing chromedriver alone would leave
            // the browser it started running after the tests. (A run
            // interrupted from the terminal drops nothing, and the
            // terminal's Ctrl-C does not reach this group: `pkill
            // chromedriver; pkill chromium` ends what such a run left.)
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts (./scripts/test installs Debian's chromium-driver)");
        let profile = tempfile::tempdir().expect("a profile directory");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let client = wait_until("chromedriver", Duration::from_secs(20), || {
            let (url, caps) = (url.clone(), caps.clone());
            async move {
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps)
                    .connect(&url)
                    .await
                    .ok()
            }
        })
        .await;
        Self {
            driver,
            client,
            _profile: profile,
        }
    }

    /// Fills in the sign-in form the browser shows, and sends it.
    pub(crate) async fn sign_in(&self, token: &str) {
        self.type_into(Locator::Id("token"), token).await;
        self.click(Locator::Id("sign-in")).await;
    }

    /// Clicks the element `locator` finds.
    pub(crate) async fn click(&self, locator: Locator<'_>) {
        self.client
            .find(locator)
            .await
            .unwrap_or_else(|e| panic!("nothing to click for {locator:?}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("clicking {locator:?}: {e}"));
    }

    /// Replaces the text of the field `locator` finds with `text`.
    pub(crate) async fn type_into(&self, locator: Locator<'_>, text: &str) {
        let field = self
            .client
            .find(locator)
            .await
            .unwrap_or_else(|e| panic!("no field for {locator:?}: {e}"));
        field
            .clear()
            .await
            .unwrap_or_else(|e| panic!("clearing {locator:?}: {e}"));
        field
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("typing into {locator:?}: {e}"));
    }

    /// Saves a screenshot as `target/console-screenshots/{name}.png`.
    pub(crate) async fn screenshot(&self, name: &str) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
        std::fs::create_dir_all(&dir).expect("the screenshot directory");
        let png = self.client.screenshot().await.expect("a screenshot");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("writing a screenshot");
    }

    /// The text of the element `css` finds, waiting for it to appear: a
    /// click that submits a form can return before the next page loads.
    pub(crate) async fn text(&self, css: &str) -> String {
        self.client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
            .text()
            .await
            .expect("its text")
    }

    /// In a 390-pixel-wide window (a phone), nothing of the page is cut
    /// off: it is no wider than the window. Saves a screenshot of it.
    pub(crate) async fn fits_narrow(&self, name: &str) {
        let c = &self.client;
        c.set_window_size(390, 844).await.unwrap();
        let (scroll_width, inner_width): (Value, Value) = (
            c.execute("return document.documentElement.scrollWidth", vec![])
                .await
                .unwrap(),
            c.execute("return window.innerWidth", vec![]).await.unwrap(),
        );
        self.screenshot(&format!("{name}-narrow")).await;
        c.set_window_size(1280, 900).await.unwrap();
        assert!(
            scroll_width.as_u64() <= inner_width.as_u64(),
            "{name} is {scroll_width} pixels wide in a {inner_width}-pixel window"
        );
    }

    /// Waits (a click may return before its page loads) until the browser
    /// is at `path`.
    pub(crate) async fn on_page(&self, path: &str) {
        let client = &self.client;
        wait_until(
            &format!("the browser at {path}"),
            Duration::from_secs(10),
            || async move { (client.current_url().await.ok()?.path() == path).then_some(()) },
        )
        .await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = format!("-{}", self.driver.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
