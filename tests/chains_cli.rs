//! `switchboard chains ...` against a running dispatcher: apply, list, show
//! (whose output applies again unchanged), history, restore and rm; and the
//! one-line, non-zero failures when something is wrong.

use serde_json::{Value, json};

use crate::util::{Dispatcher, switchboard};

/// A chain file that uses every part of the chain format, so that `show`
/// has something to round-trip.
const SHOP: &str = r#"
account_key = "shop"

[[chains]]
name = "orders"
description = "An order was placed."
conversation_type = "checkout"
event_type = "order_placed"
conversation_key = "store-1"

[[chains.steps]]
handler = "log"
name = "note"
config = { level = "debug", message = "order {{ event.event_data.order }}", fields = { total = "{{ event.event_data.total }}", currency = "ZAR" } }
on_error = "continue"
retry = { max_attempts = 4, initial = "250ms", max = "5s", multiplier = 1.5 }

[[chains.steps]]
handler = "emit"
config = { event_type = "order_logged", data = { order = "{{ event.event_data.order }}", tags = ["a", "b"], nested = { n = 1, ok = true } } }

[[chains]]
name = "refunds"
conversation_type = "*"
event_type = "refund"

[[chains.steps]]
handler = "log"

[[chains]]
name = "default"

[[chains.steps]]
handler = "log"
config = { level = "warn" }
"#;

/// The chains of `version` of the shop account, as the API stores them.
async fn chains_of(d: &Dispatcher, version: u64) -> Value {
    let (status, body) = d
        .get(&format!("/v1/accounts/shop/chain-versions/{version}"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], version);
    body["chains"].clone()
}

fn names(chains: &Value) -> Vec<&str> {
    chains
        .as_array()
        .expect("a list of chains")
        .iter()
        .map(|c| c["name"].as_str().expect("a chain name"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_apply_list_show_history_restore_and_rm() {
    let d = Dispatcher::embedded();
    let file = d.file("shop.toml", SHOP);
    let path = file.to_str().expect("a UTF-8 path");

    // apply
    let out = d.cli(&["chains", "apply", path]).await;
    assert_eq!(
        out.ok().trim(),
        format!(
            "applied {path}: account shop now at chain version 1 (3 chains): added orders, refunds, default"
        )
    );
    let v1 = chains_of(&d, 1).await;
    assert_eq!(names(&v1), ["orders", "refunds", "default"]);

    // list: one line per chain with its match and steps; JSON is the API's.
    let out = d.cli(&["chains", "list", "shop"]).await;
    let lines: Vec<&str> = out.ok().lines().collect();
    assert_eq!(lines[0], "account shop, chain version 1", "{}", out.stdout);
    assert_eq!(lines.len(), 4, "{}", out.stdout);
    let words = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(
        words(lines[1]),
        [
            "orders",
            "checkout/order_placed",
            "in",
            "store-1",
            "log",
            "→",
            "emit"
        ]
    );
    assert_eq!(words(lines[2]), ["refunds", "*/refund", "log"]);
    assert_eq!(words(lines[3]), ["default", "*/*", "log"]);
    let listed = d.cli(&["chains", "list", "shop", "--json"]).await.json();
    let (_, current) = d.get("/v1/accounts/shop/chains").await;
    assert_eq!(listed, current);
    assert_eq!(listed["chains"], v1);

    // show prints a chain file that applies back to the same chains.
    let shown = d.cli(&["chains", "show", "shop"]).await;
    assert!(
        shown.ok().starts_with("# chain version 1\n"),
        "{}",
        shown.stdout
    );
    let again = d.file("shown.toml", shown.ok());
    let out = d.cli(&["chains", "apply", again.to_str().unwrap()]).await;
    assert!(
        out.ok().contains("now at chain version 2 (3 chains)"),
        "{}",
        out.stdout
    );
    assert_eq!(
        chains_of(&d, 2).await,
        v1,
        "`chains show` must round-trip:\n{}",
        shown.stdout
    );

    // ...and as JSON too.
    let shown = d.cli(&["chains", "show", "shop", "--json"]).await.json();
    assert_eq!(shown["account_key"], "shop");
    let again = d.file("shown.json", &shown.to_string());
    let out = d.cli(&["chains", "apply", again.to_str().unwrap()]).await;
    assert!(
        out.ok().contains("now at chain version 3 (3 chains)"),
        "{}",
        out.stdout
    );
    assert_eq!(chains_of(&d, 3).await, v1);

    // show one chain: a file with just that chain.
    let one = d.cli(&["chains", "show", "shop", "refunds"]).await;
    let one_file = d.file("refunds.toml", one.ok());
    let out = d
        .cli(&["chains", "apply", one_file.to_str().unwrap(), "--json"])
        .await
        .json();
    assert_eq!(out[0]["version"], 4);
    assert_eq!(out[0]["chains"], json!([v1[1]]));

    // rm one chain, then every chain: each a new version.
    d.apply_chains("shop-again.toml", SHOP).await; // version 5
    let out = d.cli(&["chains", "rm", "shop", "refunds"]).await;
    assert_eq!(
        out.ok().trim(),
        r#"removed chain "refunds" of account shop; now at version 6"#
    );
    assert_eq!(names(&chains_of(&d, 6).await), ["orders", "default"]);
    let out = d.cli(&["chains", "rm", "shop", "--all"]).await;
    assert_eq!(
        out.ok().trim(),
        "removed every chain of account shop; now at version 7"
    );
    let out = d.cli(&["chains", "list", "shop"]).await;
    assert_eq!(
        out.ok().trim(),
        "account shop, chain version 7\n(no chains)"
    );

    // restore makes an old version current again, as a new version.
    let out = d.cli(&["chains", "restore", "shop", "1"]).await;
    assert_eq!(
        out.ok().trim(),
        "restored version 1 of account shop as version 8"
    );
    assert_eq!(chains_of(&d, 8).await, v1);
    let (_, current) = d.get("/v1/accounts/shop/chains").await;
    assert_eq!(current["version"], 8);
    assert_eq!(current["chains"], v1);

    // history lists every version, oldest first, with what made it.
    let history = d.cli(&["chains", "history", "shop", "--json"]).await.json();
    let changes: Vec<(u64, &str)> = history["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| {
            (
                v["version"].as_u64().unwrap(),
                v["change"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        changes,
        [
            (1, "apply"),
            (2, "apply"),
            (3, "apply"),
            (4, "apply"),
            (5, "apply"),
            (6, "remove chain refunds"),
            (7, "remove all"),
            (8, "restore 1"),
        ]
    );
    assert_eq!(history["versions"][6]["chains"], json!([]));
    let text = d.cli(&["chains", "history", "shop"]).await;
    let lines: Vec<Vec<&str>> = text
        .ok()
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 9, "{}", text.stdout);
    assert_eq!(lines[0], ["version", "applied", "at", "change", "chains"]);
    assert_eq!(lines[6][0], "6");
    assert_eq!(
        lines[6][2..],
        ["remove", "chain", "refunds", "orders,", "default"]
    );
    assert_eq!(lines[7][2..], ["remove", "all", "(none)"]);
    assert_eq!(
        lines[8][2..],
        ["restore", "1", "orders,", "refunds,", "default"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_history_columns_line_up() {
    let d = Dispatcher::embedded();
    d.apply_chains("shop.toml", SHOP).await;
    let text = d.cli(&["chains", "history", "shop"]).await;
    let lines: Vec<&str> = text.ok().lines().collect();
    // The header names the columns; each row starts its columns under them.
    let at = lines[0].find("applied at").expect("an `applied at` column");
    let change = lines[0].find("change").expect("a `change` column");
    assert_eq!(lines[1].find("20"), Some(at), "{}", text.stdout);
    assert_eq!(lines[1].find("apply"), Some(change), "{}", text.stdout);
}

/// The example chains apply to a dispatcher run with the example config, as
/// the README says to run them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_chains_apply_with_the_example_config() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let config = crate::util::read(&root.join("switchboard.toml"));
    let d = Dispatcher::with_config(None, &config);
    // The payment webhook of the example signs with the account's `gateway`.
    d.set_secret("acme", "gateway", crate::peers::WEBHOOK_SECRET)
        .await;
    let mut files: Vec<String> = std::fs::read_dir(root.join("chains"))
        .expect("examples/chains")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("toml" | "json")
            )
        })
        .map(|p| p.to_str().expect("a UTF-8 path").to_string())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no chain files in examples/chains");
    let mut args = vec!["chains", "apply"];
    args.extend(files.iter().map(String::as_str));
    let out = d.cli(&args).await;
    assert_eq!(out.ok().lines().count(), files.len(), "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_commands_fail_with_one_line_saying_what_and_where() {
    let d = Dispatcher::embedded();
    d.apply_chains("shop.toml", SHOP).await;
    let broken = d.file(
        "broken.toml",
        "account_key = \"shop\"\n\n[[chains]]\nname = \"x\"\nsteps = 3\n",
    );
    let broken = broken.to_str().unwrap();
    let missing = d.file("placeholder", "").with_file_name("missing.toml");
    let missing = missing.to_str().unwrap();

    let cases: &[(&[&str], &[&str])] = &[
        (
            &["chains", "rm", "shop", "nope"],
            &[r#"account shop has no chain named "nope""#],
        ),
        (
            &["chains", "rm", "ghost", "--all"],
            &["account ghost has no chains"],
        ),
        (
            &["chains", "restore", "shop", "99"],
            &["account shop has no chain version 99"],
        ),
        (
            &["chains", "show", "shop", "nope"],
            &[r#"account shop has no chain named "nope""#],
        ),
        (
            &["chains", "history", "ghost"],
            &["account ghost has no chains"],
        ),
        (
            &["chains", "list", "bad.account"],
            &["account_key", "bad.account"],
        ),
        (&["chains", "apply", broken], &[broken, "line 5"]),
        (&["chains", "apply", missing], &[missing]),
        (&["trace", "shop", "not-a-uuid"], &["not-a-uuid", "UUID"]),
    ];
    for (args, expected) in cases {
        let out = d.cli(args).await;
        let line = out.fails();
        for part in *expected {
            assert!(
                line.contains(part),
                "`switchboard {}`: expected {part:?} in: {line}",
                args.join(" ")
            );
        }
    }

    // No dispatcher there: say so, and where.
    let out = switchboard(&["chains", "list", "shop", "--server", "http://127.0.0.1:9"]).await;
    let line = out.fails();
    assert!(
        line.contains("cannot reach the dispatcher at http://127.0.0.1:9"),
        "{line}"
    );

    // None of the failures changed anything.
    let (_, current) = d.get("/v1/accounts/shop/chains").await;
    assert_eq!(current["version"], 1);
}

/// An account with no chains is an account with nothing configured yet, as
/// its empty contact list says: `GET .../chains` answers 200 with version 0
/// and no chains, to the admin and to the account's own token; the CLI says
/// so and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_without_chains_has_version_zero_not_a_404() {
    let d = Dispatcher::embedded();
    let (status, body) = d.get("/v1/accounts/ghost/chains").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"account_key": "ghost", "version": 0, "chains": []})
    );
    let created = d.cli(&["tokens", "create", "ghost", "--json"]).await.json();
    let token = created["token"].as_str().expect("a token");
    let own = crate::util::http_client(Some(token))
        .get(format!("{}/v1/accounts/ghost/chains", d.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);
    let body: Value = own.json().await.unwrap();
    assert_eq!(body["version"], 0, "{body}");
    let (contacts_status, _) = d.get("/v1/accounts/ghost/contacts").await;
    assert_eq!(contacts_status, status, "chains and contacts agree");
    let out = d.cli(&["chains", "list", "ghost"]).await;
    assert_eq!(out.ok().trim(), "account ghost has no chains");
}
