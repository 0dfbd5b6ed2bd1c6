//! Replicas: 1, 2 and 3 dispatchers with `--replicated` sharing one NATS
//! server, draining the same backlog through `create_contact` → `log`; and
//! one dispatcher with its own store, for the cost of keeping the state in
//! the key-value bucket. The CPU per event is summed over the replicas.

use async_nats::jetstream;

use crate::common::{self, Dispatcher, NatsServer, Spec};
use crate::compare::{Build, PerBuild};
use crate::drain::{self, Drained, Sample};
use crate::effects::{ACCOUNTS, contact_log_chain, event, write_chains};
use crate::report::{Report, Value};

pub async fn run(options: &crate::Options, report: &mut Report) -> anyhow::Result<()> {
    let n = options.scaled(20_000);
    println!(
        "\n## replicas: `create_contact` → `log`, {n} events over {ACCOUNTS} accounts, one \
         nats-server"
    );
    let mut one: Option<PerBuild<f64>> = None;
    for (replicas, replicated) in [(1, false), (1, true), (2, true), (3, true)] {
        let what = if replicated {
            format!("{replicas} replica(s), shared state")
        } else {
            "1 dispatcher, own store".to_string()
        };
        println!("{what}:");
        let drains = PerBuild::measure(&options.builds, async |build| {
            drain_with(options, build, n, replicas, replicated).await
        })
        .await?;
        let rates = drains.map(Drained::rate);
        drain::print_ratios(&drains);
        let mut value = Value::drain(&drains);
        if replicated {
            match &one {
                None => one = Some(rates),
                Some(base) => {
                    let scaling = rates.zip_with(base, |r, one| r / one);
                    value =
                        Value::join([value, Value::of(&scaling, |x| format!("×{x:.2} of one"))]);
                }
            }
        }
        report.note_pauses("replicas", &what, &drains);
        report.figure("replicas", what, value);
    }
    Ok(())
}

/// Starts `replicas` dispatchers of `build` (replicated or not) on a fresh
/// server and publishes the backlog; the drain runs from the first publish
/// until the consumers have acked everything.
async fn drain_with(
    options: &crate::Options,
    build: &Build,
    n: u64,
    replicas: usize,
    replicated: bool,
) -> anyhow::Result<Drained> {
    let server = NatsServer::start()?;
    let root = tempfile::tempdir()?;
    let chains = write_chains(root.path(), contact_log_chain)?;
    let config = root.path().join("switchboard.toml");
    std::fs::write(&config, format!("[bus]\nreplicated = {replicated}\n"))?;
    let mut dispatchers = Vec::new();
    for i in 0..replicas {
        dispatchers.push(
            Dispatcher::start(Spec {
                binary: Some(&build.binary),
                data: &root.path().join(format!("data-{i}")),
                // The first applies the files; the others share them.
                chains: (i == 0).then_some(chains.as_path()),
                nats: Some(server.url()),
                concurrency: options.concurrency,
                config: Some(&config),
            })
            .await?,
        );
    }
    let client = async_nats::connect(server.url()).await?;
    let js = jetstream::new(client);
    let since = Sample::now(&dispatchers)?;
    common::fill_nats(&js, "vumi", n, event).await?;
    let drained = drain::nats_by(&mut dispatchers, &js, n, since).await?;
    for d in dispatchers {
        d.stop().await;
    }
    println!("{}{}", build.tag(), drained.describe());
    Ok(drained)
}
