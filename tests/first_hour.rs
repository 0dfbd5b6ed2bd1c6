//! What a new script author or operator meets in the first hour, through
//! the real binary: the shipped example chains, dry runs that can guard a
//! CI pipeline.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::peers::{HttpReceiver, WEBHOOK_SECRET};
use crate::util::{self, CmdOutput};

fn example(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(path)
}

fn text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A dispatcher on the embedded bus with the example config (its SMS
/// gateway and mail providers) and the example chains applied.
async fn with_example_chains() -> util::Dispatcher {
    let d = util::Dispatcher::with_config(None, &text(&example("switchboard.toml")));
    d.set_secret("acme", "gateway", WEBHOOK_SECRET).await;
    let acme = example("chains/acme.toml");
    d.cli(&["chains", "apply", acme.to_str().expect("a UTF-8 path")])
        .await
        .ok();
    d
}

async fn chains_test(d: &util::Dispatcher, json: bool) -> CmdOutput {
    let sample = example("events/poll_complete.json");
    let mut args = vec![
        "chains",
        "test",
        "acme",
        "--event",
        sample.to_str().expect("a UTF-8 path"),
    ];
    if json {
        args.push("--json");
    }
    d.cli(&args).await
}

/// The chain's step called `name` in a dry-run report.
fn step<'a>(report: &'a Value, chain: &str, name: &str) -> &'a Value {
    report["chains"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == chain)
        .and_then(|c| c["steps"].as_array())
        .into_iter()
        .flatten()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {chain}/{name} in {report:#}"))
}

/// The README's own chain passes its dry run: every built-in step is
/// simulated with the output it would give, so `{{ steps.create_contact.msisdn }}`
/// resolves in the steps after it, and the event it emits is followed into
/// the chain it would run. Nothing happens: no contact is stored.
#[tokio::test]
async fn the_example_chains_dry_run_passes_with_every_step_simulated() {
    let d = with_example_chains().await;
    d.set_secret(
        "acme",
        "gateway",
        "whsec_c2VjcmV0LXNpZ25pbmcta2V5LWZvci10ZXN0cw==",
    )
    .await;
    let report = chains_test(&d, true).await.json();

    let contact = step(&report, "poll-complete", "create_contact");
    assert_eq!(contact["outcome"], "ok", "{contact:#}");
    assert_eq!(contact["action"], "simulated");
    assert_eq!(contact["output"]["msisdn"], "+27820000001");
    assert_eq!(contact["output"]["created"], true);
    let key = contact["output"]["key"].as_str().expect("a contact key");
    assert!(key.starts_with("simulated-"), "{key}");

    let sms = step(&report, "poll-complete", "send_sms");
    assert_eq!(sms["outcome"], "ok", "{sms:#}");
    assert_eq!(sms["output"]["to"], "+27820000001");
    assert_eq!(sms["output"]["status"], "simulated");
    assert_eq!(
        sms["would_run"]["config"]["body"],
        "Thanks Thandi! You scored 4/5. Airtime is on its way."
    );

    let webhook = step(&report, "poll-complete", "payment_webhook");
    assert_eq!(webhook["outcome"], "ok", "{webhook:#}");
    assert_eq!(webhook["output"]["status"], "simulated");
    assert_eq!(
        webhook["would_run"]["config"]["body"]["msisdn"],
        "+27820000001"
    );

    // The emitted points_awarded event runs the points-awarded chain, whose
    // log line is rendered.
    let award = step(&report, "poll-complete", "award");
    assert_eq!(award["outcome"], "ok", "{award:#}");
    let child = &award["children"][0];
    assert_eq!(child["event"]["event_type"], "points_awarded");
    assert_eq!(child["event"]["depth"], 1);
    let log = step(child, "points-awarded", "log");
    assert_eq!(log["outcome"], "ok", "{log:#}");
    assert_eq!(
        log["logs"],
        json!([{"level": "info", "message": "40 points for +27820000001"}])
    );

    let email = step(&report, "poll-complete-email", "send_email");
    assert_eq!(email["outcome"], "ok", "{email:#}");
    assert_eq!(email["output"]["to"], "thandi@example.org");

    // In text, the same, and the exit status is 0.
    let out = chains_test(&d, false).await;
    let printed = out.ok();
    assert!(
        printed.contains("3. payment_webhook (payment_webhook): ok"),
        "{printed}"
    );
    assert!(
        printed.contains("log info: 40 points for +27820000001"),
        "{printed}"
    );

    // A dry run stores nothing.
    let (status, contacts) = d
        .request(
            reqwest::Method::GET,
            "/v1/accounts/acme/contacts",
            Some(d.admin_token()),
            None,
        )
        .await;
    assert_eq!(status, 200, "{contacts:#}");
    assert_eq!(contacts["contacts"], json!([]), "{contacts:#}");
}

/// A step that would fail makes the dry run exit with status 3, naming the
/// chain, the step and the fix, after the whole report.
#[tokio::test]
async fn a_dry_run_that_would_fail_exits_3_and_names_the_step() {
    let d = with_example_chains().await;
    // A secret that cannot sign: the webhook could not be sent.
    d.set_secret("acme", "gateway", "s3cret").await;
    let out = chains_test(&d, false).await;
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(
        out.stdout
            .contains("3. payment_webhook (payment_webhook): failed"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains(
            "chain poll-complete, step payment_webhook (payment_webhook): failed: secret \"gateway\" \
             is not a Standard Webhooks secret (whsec_ + base64 of the key)"
        ),
        "{}",
        out.stderr
    );
    // --json too, with the report on stdout.
    let out = chains_test(&d, true).await;
    assert_eq!(out.code, Some(3), "{out:?}");
    let report: Value = serde_json::from_str(&out.stdout).expect("the report as JSON");
    assert_eq!(
        step(&report, "poll-complete", "award")["outcome"],
        "skipped"
    );

    // A script whose outcome is failed: `scripts test` exits 3 as well.
    let script = d.file(
        "broken.rhai",
        "fn handle(event, steps, config) { throw \"no points today\"; }\n",
    );
    d.cli(&[
        "scripts",
        "put",
        "acme",
        "broken",
        script.to_str().expect("a UTF-8 path"),
    ])
    .await
    .ok();
    let sample = example("events/poll_complete.json");
    let out = d
        .cli(&[
            "scripts",
            "test",
            "acme",
            "broken",
            "--event",
            sample.to_str().expect("a UTF-8 path"),
        ])
        .await;
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(out.stdout.contains("outcome: failed"), "{}", out.stdout);
    assert!(
        out.stderr.contains("script broken: failed:") && out.stderr.contains("no points today"),
        "{}",
        out.stderr
    );
    // Any other error is 1: an unknown script.
    let out = d
        .cli(&[
            "scripts",
            "test",
            "acme",
            "missing",
            "--event",
            sample.to_str().expect("a UTF-8 path"),
        ])
        .await;
    assert_eq!(out.code, Some(1), "{out:?}");
}

/// `switchboard demo --once` runs from any directory (the example chains
/// are built in) and, piped, writes no terminal escape codes; serving, it
/// prints a link that signs into the console once; then `run
/// --demo-peers` with the README's command delivers the example chain to the
/// same peers. One test: both need the peers' fixed port.
#[tokio::test]
async fn the_demo_and_run_with_demo_peers_deliver_the_example_chain() {
    let empty = tempfile::tempdir().expect("a temporary directory");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["demo", "--once", "--listen", "127.0.0.1:0"])
            .current_dir(empty.path())
            .env_remove("NO_COLOR")
            .env_remove("RUST_LOG")
            .output()
            .expect("the demo runs")
    })
    .await
    .expect("the demo's thread");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("applied examples/chains/acme.toml (built in) → account acme"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "SMS gateway received for +27820000001: \"Thanks Thandi! You scored 4/5. Airtime is on its way.\""
        ),
        "{stdout}"
    );
    assert!(stderr.contains("40 points for +27820000001"), "{stderr}");
    assert!(
        !stdout.contains('\u{1b}') && !stderr.contains('\u{1b}'),
        "escape codes in piped output:\n{stdout:?}\n{stderr:?}"
    );

    // Serving, the demo prints a link that signs a browser into the
    // console once.
    let elsewhere = tempfile::tempdir().expect("a temporary directory");
    let mut demo = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["demo", "--listen", "127.0.0.1:0"])
        .current_dir(elsewhere.path())
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the demo starts");
    let link = first_line_after(demo.stdout.take().expect("piped stdout"), "The console: ")
        .await
        .and_then(|rest| rest.split(' ').next().map(str::to_string));
    let Some(link) = link else {
        let _ = demo.kill();
        panic!("the demo printed no console link");
    };
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("an HTTP client");
    let signed_in = browser.get(&link).send().await.expect("the link answers");
    assert_eq!(signed_in.status(), 303);
    let session = signed_in
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix("sb_session="))
        .and_then(|v| v.split(';').next())
        .expect("a session cookie")
        .to_string();
    let base = link.split("/console/").next().expect("the demo's address");
    let home = browser
        .get(format!("{base}/console"))
        .header(reqwest::header::COOKIE, format!("sb_session={session}"))
        .send()
        .await
        .expect("the console answers");
    assert_eq!(home.status(), 200);
    assert!(
        home.text()
            .await
            .expect("a page")
            .contains("href=\"/console/accounts/acme\""),
        "the admin's console lists the demo's account"
    );
    assert_eq!(
        browser.get(&link).send().await.unwrap().status(),
        401,
        "used once"
    );
    std::process::Command::new("kill")
        .args(["-INT", &demo.id().to_string()])
        .status()
        .expect("kill runs");
    demo.wait().expect("the demo stops");

    // The README's `run` with the example config and chains, and the demo's
    // peers: a poll_complete is texted, paid out (signature verified) and
    // e-mailed.
    let data = tempfile::tempdir().expect("a temporary directory");
    let log = data.path().join("run.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["run", "--demo-peers", "--listen", "127.0.0.1:0", "--config"])
        .arg(example("switchboard.toml"))
        .arg("--chains")
        .arg(example("chains"))
        .arg("--data")
        .arg(data.path().join("data"))
        .env("SWITCHBOARD_ADMIN_TOKEN", util::ADMIN_TOKEN)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("a log file"))
        .spawn()
        .expect("switchboard run starts");
    let url = first_line_after(child.stdout.take().expect("piped stdout"), "listening on ").await;
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let Some(url) = url else {
        let _ = child.kill();
        panic!("run did not start:\n{}", read_log());
    };
    let sample: Value = serde_json::from_str(&text(&example("events/poll_complete.json")))
        .expect("the sample is JSON");
    let answer = util::http_client(Some(util::ADMIN_TOKEN))
        .post(format!("{url}/v1/events"))
        .json(&sample)
        .send()
        .await
        .expect("posting the sample");
    assert!(answer.status().is_success(), "{:?}", answer.text().await);
    let delivered = |log: &str| {
        log.contains("SMS gateway received for +27820000001")
            && log.contains("(signature verified)")
            && log.contains("SMTP sink received for thandi@example.org")
    };
    let deadline = std::time::Instant::now() + util::TIMEOUT;
    while !delivered(&read_log()) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let log = read_log();
    assert!(
        delivered(&log) && log.contains("demo peers on http://127.0.0.1:8090"),
        "{log}"
    );
}

/// What follows `prefix` on the first line of `stdout` that starts with
/// it (`None` if the output ends first); the output is read to its end
/// ([`util::lines_after`]).
async fn first_line_after(
    stdout: std::process::ChildStdout,
    prefix: &'static str,
) -> Option<String> {
    let lines = util::lines_after(stdout, prefix);
    tokio::task::spawn_blocking(move || lines.recv().ok())
        .await
        .expect("reading the output")
}

/// The names of the account's current chains.
async fn chain_names(d: &util::Dispatcher, account: &str) -> Vec<String> {
    let (_, current) = d.get(&format!("/v1/accounts/{account}/chains")).await;
    current["chains"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["name"].as_str().expect("a chain name").to_string())
        .collect()
}

const VIP: &str = r#"account_key = "acme"

[[chains]]
name = "vip"
conversation_type = "vip"
event_type = "joined"
steps = [{ handler = "log", config = { message = "a VIP joined" } }]
"#;

/// `chains apply` says what it adds, changes and removes; a file replaces
/// the account's chains unless `--merge`, which keeps those it does not name.
#[tokio::test]
async fn chains_apply_says_what_it_changes_and_merge_keeps_the_rest() {
    let d = util::Dispatcher::with_config(None, &text(&example("switchboard.toml")));
    d.set_secret("acme", "gateway", WEBHOOK_SECRET).await;
    let acme = example("chains/acme.toml");
    let acme = acme.to_str().expect("a UTF-8 path");
    let out = d.cli(&["chains", "apply", acme]).await;
    assert!(
        out.ok().contains(
            "now at chain version 1 (4 chains): added poll-complete, points-awarded, default, poll-complete-email"
        ),
        "{}",
        out.stdout
    );

    // A file with one other chain replaces them all, and says so.
    let vip = d.file("vip.toml", VIP);
    let vip = vip.to_str().expect("a UTF-8 path");
    let out = d.cli(&["chains", "apply", vip]).await;
    let printed = out.ok();
    assert!(
        printed.contains(
            "now at chain version 2 (1 chains): added vip; removed poll-complete, points-awarded, default, poll-complete-email"
        ) && printed.contains("`chains apply --merge` keeps those it does not name"),
        "{printed}"
    );
    assert_eq!(chain_names(&d, "acme").await, ["vip"]);

    // --merge keeps vip and adds the example's chains back.
    let out = d.cli(&["chains", "apply", "--merge", acme]).await;
    assert!(
        out.ok().contains(
            "now at chain version 3 (5 chains): added poll-complete, points-awarded, default, poll-complete-email"
        ),
        "{}",
        out.stdout
    );
    assert_eq!(
        chain_names(&d, "acme").await,
        [
            "vip",
            "poll-complete",
            "points-awarded",
            "default",
            "poll-complete-email"
        ]
    );

    // A merge of a changed chain changes only that one; the JSON answer
    // lists each kind.
    let changed = d.file("vip2.toml", &VIP.replace("a VIP joined", "a VIP is here"));
    let answer = d
        .cli(&[
            "chains",
            "apply",
            "--merge",
            changed.to_str().expect("a UTF-8 path"),
            "--json",
        ])
        .await
        .json();
    assert_eq!(answer[0]["version"], 4);
    assert_eq!(answer[0]["changed"], json!(["vip"]));
    assert_eq!(answer[0]["added"], json!([]));
    assert_eq!(answer[0]["removed"], json!([]));
    assert_eq!(
        answer[0]["unchanged"],
        json!([
            "poll-complete",
            "points-awarded",
            "default",
            "poll-complete-email"
        ])
    );
    // Applying the same again changes nothing, and says so.
    let out = d
        .cli(&[
            "chains",
            "apply",
            "--merge",
            changed.to_str().expect("a UTF-8 path"),
        ])
        .await;
    assert!(
        out.ok()
            .contains("now at chain version 5 (5 chains): no chain changed"),
        "{}",
        out.stdout
    );
}

/// `run --chains DIR` applies a file only when it differs from what was
/// last applied from it: chains changed through the API since are kept
/// across restarts, and a changed file is applied at the next start.
#[tokio::test]
async fn run_with_chains_keeps_api_changes_until_the_file_changes() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("acme.toml");
    std::fs::write(&file, VIP).expect("writing the chain file");
    let mut d = util::Dispatcher::embedded_with_chains(dir.path());
    assert_eq!(chain_names(&d, "acme").await, ["vip"]);

    // Through the API, another chain is merged in.
    let extra = d.file(
        "extra.toml",
        &VIP.replace("\"vip\"", "\"extra\"")
            .replace("joined", "left"),
    );
    d.cli(&[
        "chains",
        "apply",
        "--merge",
        extra.to_str().expect("a UTF-8 path"),
    ])
    .await
    .ok();
    assert_eq!(chain_names(&d, "acme").await, ["vip", "extra"]);

    // A restart with the file unchanged keeps it.
    d.restart();
    assert_eq!(chain_names(&d, "acme").await, ["vip", "extra"]);
    assert!(
        d.log()
            .contains("the file is unchanged since it was last applied"),
        "{}",
        d.log()
    );

    // A changed file is applied at the next start, as the account's chains.
    std::fs::write(&file, VIP.replace("a VIP joined", "welcome, VIP")).expect("rewriting");
    d.restart();
    assert_eq!(chain_names(&d, "acme").await, ["vip"]);
    let (_, current) = d.get("/v1/accounts/acme/chains").await;
    assert_eq!(current["change"], "apply file acme.toml");
    assert_eq!(
        current["chains"][0]["steps"][0]["config"]["message"],
        "welcome, VIP"
    );
}

/// A chain naming a webhook secret that is not set: applied at start with
/// a warning (the secret can only be set once the dispatcher runs), and
/// its runs fail saying how to set it; refused through `chains apply`
/// with the fix. A secret a chain uses is not removed.
#[tokio::test]
async fn secrets_that_chains_name_are_checked_at_apply_and_kept_while_used() {
    let receiver = HttpReceiver::start(std::time::Duration::from_secs(3));
    let pay = format!(
        r#"account_key = "acme"

[[chains]]
name = "pay"
event_type = "paid"
steps = [{{ handler = "payment_webhook", config = {{ url = "{}/hook/200", secret = "gateway" }} }}]
"#,
        receiver.url()
    );
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join("acme.toml"), &pay).expect("writing the chain file");
    let d = util::Dispatcher::embedded_with_chains(dir.path());
    let log = d.log();
    assert!(
        log.contains(
            "chain \"pay\", step 1 (payment_webhook), field config.secret: account acme has no \
             secret named \"gateway\"; set it first with `switchboard secrets set acme gateway`"
        ) && log.contains("until it is set, runs of this step fail"),
        "{log}"
    );
    let paid = |order: &'static str| {
        let d = &d;
        async move {
            let e = util::event("acme", "shop", "paid", order, json!({"order": order}));
            let id = d.post_event(&serde_json::to_value(&e).unwrap()).await;
            d.wait_for_trace("acme", &id, std::time::Duration::from_secs(20))
                .await
        }
    };
    let trace = paid("A-1").await;
    assert_eq!(trace["status"], "dead", "{trace:#}");
    let error = trace["chains"][0]["steps"][0]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        error.contains("secret \"gateway\" of account acme is not set; set it with `switchboard secrets set acme gateway`"),
        "{trace:#}"
    );

    // Merging another chain in is not held up by it.
    let vip = d.file("vip.toml", VIP);
    let merged = d
        .cli(&[
            "chains",
            "apply",
            "--merge",
            vip.to_str().expect("a UTF-8 path"),
        ])
        .await;
    assert!(merged.ok().contains("added vip"), "{}", merged.stdout);

    // Through the API the same chain is refused, saying how to fix it.
    let file = d.file("pay.toml", &pay.replace("/hook/200", "/hook/201"));
    let file = file.to_str().expect("a UTF-8 path");
    let refused = d.cli(&["chains", "apply", file]).await;
    assert!(
        refused.fails().contains(
            "account acme has no secret named \"gateway\"; set it first with `switchboard \
             secrets set acme gateway` (the value on stdin), then apply again"
        ),
        "{}",
        refused.stderr
    );
    d.set_secret("acme", "gateway", WEBHOOK_SECRET).await;
    d.cli(&["chains", "apply", file]).await.ok();
    let trace = paid("A-2").await;
    assert_eq!(trace["status"], "done", "{trace:#}");
    let hooks = receiver.requests_to("/hook/201").await;
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0]["verified"], true);

    // A secret a chain names stays until no chain does.
    let kept = d.cli(&["secrets", "rm", "acme", "gateway"]).await;
    assert!(
        kept.fails().contains(
            "secret \"gateway\" of account acme is used by chain pay step payment_webhook; \
             change or remove them first"
        ),
        "{}",
        kept.stderr
    );
    let vip = d.file("vip.toml", VIP);
    d.cli(&["chains", "apply", vip.to_str().expect("a UTF-8 path")])
        .await
        .ok();
    // An inbound webhook checking signatures with it keeps it too.
    d.cli(&[
        "inbound", "create", "acme", "webhook", "--secret", "gateway",
    ])
    .await
    .ok();
    let kept = d.cli(&["secrets", "rm", "acme", "gateway"]).await;
    assert!(
        kept.fails()
            .contains("is used by the inbound webhook URL (`switchboard inbound revoke acme webhook`); change or remove them first"),
        "{}",
        kept.stderr
    );
    d.cli(&["inbound", "revoke", "acme", "webhook"]).await.ok();
    d.cli(&["secrets", "rm", "acme", "gateway"]).await.ok();
    let listed = d.cli(&["secrets", "list", "acme", "--json"]).await.json();
    assert_eq!(listed["secrets"], json!([]));
}

/// `--event` takes a file, `-` for stdin or the JSON itself; a `log` step's
/// rendered line is in the trace, in text too.
#[tokio::test]
async fn samples_come_from_stdin_or_inline_and_traces_show_log_lines() {
    let d = util::Dispatcher::embedded();
    let vip = d.file("vip.toml", VIP);
    d.cli(&["chains", "apply", vip.to_str().expect("a UTF-8 path")])
        .await
        .ok();
    let sample = r#"{"conversation_type": "vip", "conversation_key": "c1", "event_type": "joined", "event_data": {}}"#;

    let inline = d.cli(&["chains", "test", "acme", "--event", sample]).await;
    assert!(
        inline.ok().contains("log info: a VIP joined"),
        "{}",
        inline.stdout
    );

    let (url, token) = (d.url().to_string(), d.admin_token().to_string());
    let piped = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["chains", "test", "acme", "--event", "-", "--server", &url])
            .env("SWITCHBOARD_TOKEN", token)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the CLI runs");
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(sample.as_bytes())
            .expect("writing the sample");
        child.wait_with_output().expect("the CLI ends")
    })
    .await
    .expect("the CLI's thread");
    let stdout = String::from_utf8_lossy(&piped.stdout);
    assert!(
        piped.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&piped.stderr)
    );
    assert!(stdout.contains("log info: a VIP joined"), "{stdout}");

    let missing = d
        .cli(&["chains", "test", "acme", "--event", "no-such-sample.json"])
        .await;
    assert_eq!(missing.code, Some(1));
    assert!(
        missing
            .stderr
            .contains("--event takes a JSON file, `-` for stdin, or the JSON itself"),
        "{}",
        missing.stderr
    );

    // The event, handled: its trace shows the log step's line.
    let event: Value = serde_json::from_str(sample).expect("the sample is JSON");
    let mut event = event;
    event["account_key"] = json!("acme");
    let id = d.post_event(&event).await;
    d.wait_for_trace("acme", &id, util::TIMEOUT).await;
    let trace = d.cli(&["trace", "acme", &id]).await;
    assert!(
        trace.ok().contains("log info: a VIP joined"),
        "{}",
        trace.stdout
    );
}

/// An e-mail sender that cannot be sent from is refused when the chain is
/// applied, or, when it comes from a template, found by the dry run.
#[tokio::test]
async fn e_mail_senders_are_checked_before_anything_is_sent() {
    let d = util::Dispatcher::with_config(None, &text(&example("switchboard.toml")));
    let chain = |from: &str| {
        format!(
            r#"account_key = "acme"

[[chains]]
name = "mail"
event_type = "mail"
steps = [{{ handler = "send_email", config = {{ to = "a@example.org", subject = "s", text = "t", from = "{from}" }} }}]
"#
        )
    };
    let file = d.file("mail.toml", &chain("Switchboard noreply"));
    let refused = d
        .cli(&["chains", "apply", file.to_str().expect("a UTF-8 path")])
        .await;
    assert!(
        refused.fails().contains(
            "field config.from: sender \"Switchboard noreply\" is not `Name <address>` or an address"
        ),
        "{}",
        refused.stderr
    );
    let file = d.file("mail.toml", &chain("{{ event.event_data.sender }}"));
    d.cli(&["chains", "apply", file.to_str().expect("a UTF-8 path")])
        .await
        .ok();
    let sample = r#"{"account_key": "acme", "conversation_type": "c", "conversation_key": "k",
        "event_type": "mail", "event_data": {"sender": "nobody"}}"#;
    let out = d.cli(&["chains", "test", "acme", "--event", sample]).await;
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(
        out.stderr
            .contains("failed: sender \"nobody\" is not `Name <address>` or an address"),
        "{}",
        out.stderr
    );
}

/// A dry run checks what a step emits as the dispatcher would (an event
/// too large to publish fails the step), and follows at most a bounded
/// number of emitted events, however wide a chain fans out.
#[tokio::test]
async fn dry_runs_check_emitted_events_and_stay_bounded() {
    let d = util::Dispatcher::with_config(None, "[limits]\nmax_event_bytes = 1024\n");
    let script = d.file(
        "fan.rhai",
        "fn handle(event, steps, config) {\n  let pad = \"x\";\n  pad.pad(event.event_data.size, \"x\");\n  for i in 0..event.event_data.n {\n    emit(\"fan\", #{ n: event.event_data.n, size: event.event_data.size });\n  }\n  if pad.len() > 1 { emit(\"padded\", #{ pad: pad }); }\n  #{}\n}\n",
    );
    d.cli(&[
        "scripts",
        "put",
        "acme",
        "fan",
        script.to_str().expect("a UTF-8 path"),
    ])
    .await
    .ok();
    let chains = d.file(
        "fan.toml",
        "account_key = \"acme\"\n\n[[chains]]\nname = \"fan\"\nevent_type = \"fan\"\nsteps = [{ handler = \"script:fan\" }]\n",
    );
    d.cli(&["chains", "apply", chains.to_str().expect("a UTF-8 path")])
        .await
        .ok();
    let sample = |n: u32, size: u32| {
        format!(
            r#"{{"account_key": "acme", "conversation_type": "c", "conversation_key": "k",
                "event_type": "fan", "event_data": {{"n": {n}, "size": {size}}}}}"#
        )
    };

    // An event of 2,000 bytes: the step fails as it would when run.
    let out = d
        .cli(&[
            "chains",
            "test",
            "acme",
            "--event",
            &sample(1, 2000),
            "--json",
        ])
        .await;
    assert_eq!(out.code, Some(3), "{out:?}");
    let report: Value = serde_json::from_str(&out.stdout).expect("the report as JSON");
    let fan = step(&report, "fan", "fan");
    assert_eq!(fan["outcome"], "failed", "{report:#}");
    assert!(
        fan["error"]
            .as_str()
            .unwrap_or_default()
            .contains("emitted event 2 (padded): "),
        "{report:#}"
    );

    // Each event emits four more, to the depth limit: 4 + 16 + ... would
    // be tens of thousands; the dry run follows a thousand and counts the rest.
    let out = d
        .cli(&["chains", "test", "acme", "--event", &sample(4, 1), "--json"])
        .await;
    let report: Value = serde_json::from_str(&out.stdout).expect("the report as JSON");
    let text = report.to_string();
    assert!(
        text.contains("\"reason\":\"a dry run follows at most 1000 emitted events\"")
            && text.contains("\"not_followed\":"),
        "{}",
        &text[..2000.min(text.len())]
    );
    assert_eq!(text.matches("\"runs\":true").count(), 1 + 1000);
}
