//! The probes: `GET /healthz` and `GET /readyz` (open, outside `/v1`).

use serde::{Deserialize, Serialize};

/// `GET /healthz`: the process answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// The replicas sharing the bus as one of them sees them: the live members
/// and the partitions each handles. Every replica divides the partitions
/// the same way among the members it sees live, so two views differ only
/// while a member joins or goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaView {
    /// The id of the replica whose view this is.
    pub me: String,
    /// The live members, this one included, by id.
    pub members: Vec<ReplicaShare>,
}

/// One live replica and its partitions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaShare {
    /// Its id.
    pub id: String,
    /// The partitions it handles.
    pub partitions: Vec<u16>,
}

/// `GET /readyz`: whether this dispatcher takes traffic, and why not. 200
/// when `ready`, 503 otherwise, with the same body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    /// Started, bus connected, store open and caught up.
    pub ready: bool,
    /// The bus's kind (`nats`, `embedded`).
    pub bus: String,
    /// The bus is connected.
    pub bus_connected: bool,
    /// The store answers reads.
    pub store_open: bool,
    /// Chain files applied and consuming.
    pub started: bool,
    /// The store is replicated between dispatchers.
    pub replicated: bool,
    /// This replica has caught up with the shared state.
    pub caught_up: bool,
    /// The bus partitions this replica consumes; null when replicas do not
    /// share the bus.
    pub partitions: Option<Vec<u16>>,
    /// The partitions whose state this replica writes (it holds a term on
    /// each: see RELIABILITY.md, "Partition-owned state"); null when the
    /// store is not replicated.
    #[serde(default)]
    pub state_partitions: Option<Vec<u16>>,
}
