//! The backend factory: from the `[bus]` and `[store]` config to the bus,
//! the port commands to workers go out on, and the store under both.
//!
//! Adding a bus backend touches its own files in `switchboard-bus` and the
//! match in [`open`], no more: everything after this (executor, API, consume
//! loop) takes the [`Backend`] as it is.

use std::sync::Arc;
use std::time::Duration;

use switchboard_api::health::ReplicaView;
use switchboard_bus::commands::{NatsCommands, NoCommands};
use switchboard_bus::files::NatsFiles;
use switchboard_bus::partitions::Membership;
use switchboard_bus::vumi_inbound::VumiInbound;
use switchboard_bus::{EmbeddedBus, NatsBus};
use switchboard_engine::bus::{Bus, BusError};
use switchboard_handlers::ports::CommandPort;
use switchboard_handlers::records::Files;
use switchboard_state::StoredFiles;
use switchboard_store::{Copies, Replication, Store};
use tokio::sync::watch;

use crate::config::Config;
use crate::runtime::StartError;

/// What the dispatcher runs on.
#[derive(Debug)]
pub struct Backend {
    /// The store.
    pub store: Store,
    /// The bus.
    pub bus: Arc<dyn Bus>,
    /// Where `send_sms` commands to transport workers go.
    pub commands: Arc<dyn CommandPort>,
    /// The files accounts attach to their e-mails.
    pub files: Arc<dyn Files>,
    /// Replies transport workers publish (NATS only).
    pub vumi_inbound: Option<VumiInbound>,
    /// Set when replicas share the bus: the partitions this one owns.
    pub replicas: Option<Replicas>,
}

/// This replica's share of a bus partitioned among replicas: which
/// partitions it owns, once it has joined the others.
#[derive(Debug)]
pub struct Replicas {
    standbys: Option<u16>,
    owned_tx: watch::Sender<Vec<u16>>,
    owned: watch::Receiver<Vec<u16>>,
    viewed_tx: watch::Sender<ReplicaView>,
    viewed: watch::Receiver<ReplicaView>,
}

impl Replicas {
    fn new(standbys: Option<u16>) -> Self {
        let (owned_tx, owned) = watch::channel(Vec::new());
        let (viewed_tx, viewed) = watch::channel(ReplicaView::default());
        Self {
            standbys,
            owned_tx,
            owned,
            viewed_tx,
            viewed,
        }
    }

    /// The partitions this replica owns, as they change.
    pub fn owned(&self) -> watch::Receiver<Vec<u16>> {
        self.owned.clone()
    }

    /// The live members and their partitions as this replica sees them.
    pub fn viewed(&self) -> watch::Receiver<ReplicaView> {
        self.viewed.clone()
    }

    /// Joins the other replicas (a heartbeat in `store`): from now on the
    /// partitions are divided among the members.
    pub fn join(self, store: Store) -> Result<Membership, StartError> {
        Ok(Membership::join(
            store,
            self.standbys,
            self.owned_tx,
            self.viewed_tx,
        )?)
    }
}

/// Opens the backend `config` names: NATS JetStream when `bus.nats_url` is
/// set (with the shared, partitioned state when `bus.replicated`), the
/// embedded bus otherwise.
pub async fn open(config: &Config) -> Result<Backend, StartError> {
    match &config.bus.nats_url {
        Some(url) => nats(config, url).await,
        None => embedded(config),
    }
}

/// The embedded bus, in the store: one process, no commands to workers.
fn embedded(config: &Config) -> Result<Backend, StartError> {
    let store = config.store.open()?;
    let bus = EmbeddedBus::open(store.clone(), &config.bus.subject_prefix)?;
    Ok(Backend {
        files: Arc::new(StoredFiles::new(store.clone())),
        vumi_inbound: None,
        store,
        bus: Arc::new(bus),
        commands: Arc::new(NoCommands),
        replicas: None,
    })
}

/// NATS JetStream: the events stream and its consumer (partitioned, and the
/// state in a shared bucket, when replicas share them), and the outbound
/// commands stream.
async fn nats(config: &Config, url: &str) -> Result<Backend, StartError> {
    let prefix = &config.bus.subject_prefix;
    let bus = NatsBus::connect(
        url,
        prefix,
        config.limits.max_event_bytes,
        // Unacked messages out at once: those being handled and those
        // waiting on the server for a retry (nakked with a delay), the
        // later events of a conversation held behind one among them.
        // Generous, so that one conversation's failing receiver does not
        // hold up the others; what this process buffers is bounded by the
        // pull batch instead.
        config
            .bus
            .max_ack_pending
            .max(config.limits.concurrency * 4),
        Duration::from_secs(config.bus.ack_wait_secs),
        config.bus.stream_replicas,
        config.bus.replicated,
    )
    .await?
    .publishing_cloudevents(config.bus.publish_cloudevents);
    let commands = NatsCommands::new(bus.client().clone(), prefix, config.bus.stream_replicas)
        .await
        .map_err(|e| StartError::Bus(BusError::Unavailable(e)))?;
    let files = Arc::new(
        NatsFiles::open(bus.client().clone(), config.bus.stream_replicas)
            .await
            .map_err(|e| StartError::Bus(BusError::Unavailable(e)))?,
    );
    let vumi_inbound = Some(
        VumiInbound::open(bus.client().clone(), prefix, config.bus.stream_replicas)
            .await
            .map_err(|e| StartError::Bus(BusError::Unavailable(e)))?,
    );
    if !config.bus.replicated {
        let store = config.store.open()?;
        return Ok(Backend {
            bus: Arc::new(bus.with_marks(store.clone())),
            store,
            commands: Arc::new(commands),
            files,
            vumi_inbound,
            replicas: None,
        });
    }
    let replicas = Replicas::new(config.bus.standbys);
    let (options, servers) = switchboard_sdk::nats::connect_options(url);
    let store = Store::replicated(
        &config.store.data_dir.join("replica"),
        options.name("switchboard-dispatcher-state"),
        servers.urls().to_vec(),
        Replication::new(
            config.bus.stream_replicas,
            switchboard_bus::partitions::PARTITIONS,
            // Which to keep a copy of comes with the first heartbeat.
            if config.bus.standbys.is_some() {
                Copies::Assigned
            } else {
                Copies::Every
            },
        ),
    )
    .await?;
    let bus = bus.with_partitions(replicas.owned(), store.clone());
    Ok(Backend {
        store,
        bus: Arc::new(bus),
        commands: Arc::new(commands),
        files,
        vumi_inbound,
        replicas: Some(replicas),
    })
}
