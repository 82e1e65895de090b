//! What the store reports. It says what is the case in the data (a conflict, a missing row, a
//! machine that cannot be picked and why); what a user should do about it is for the HTTP layer
//! (`crate::error`), which turns these into messages.

pub use crate::policy::Ineligible;
use metal_types::{AllocationId, MachineId};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    #[error(transparent)]
    Conflict(#[from] Conflict),
    /// A registration the rules of machine identity refuse.
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    NoMachine(#[from] NoMachine),
    #[error("database error")]
    Db(#[from] sqlx::Error),
    #[error("stored {what} is not valid JSON")]
    Corrupt { what: &'static str, source: serde_json::Error },
    /// The database URL or another setting the store was opened with is unusable.
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    pub fn not_found(kind: &'static str, id: impl std::fmt::Display) -> StoreError {
        StoreError::NotFound { kind, id: id.to_string() }
    }

    /// Whether this error is a unique-constraint violation from the database.
    pub fn is_unique_violation(&self) -> bool {
        matches!(self, StoreError::Db(sqlx::Error::Database(e)) if e.is_unique_violation())
    }
}

/// The data as it is does not allow the change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    #[error("{kind} {id} exists with different content")]
    Exists { kind: &'static str, id: String },
    #[error("project {id} has {active} active allocations")]
    ProjectInUse { id: String, active: i64 },
    #[error("token {id} is the last admin token")]
    LastAdminToken { id: String },
    #[error("machine {machine} is running the installed OS of allocation {allocation}")]
    InstalledOs { machine: MachineId, allocation: String, since_ms: i64 },
    #[error("NIC {mac} belongs to machine {owner}, not {machine}")]
    MacTaken { mac: String, owner: String, machine: MachineId },
    #[error("machine {machine} is not allocated")]
    NotAllocated { machine: MachineId },
    #[error("allocation {allocation} is not the machine's current allocation")]
    NotCurrentAllocation { allocation: AllocationId },
    #[error("{attempts} attempts lost to concurrent allocations")]
    Contended { attempts: usize },
}

/// Machine identity: what a registration may not do (`api/README.md`, "Machine identity").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("machine {machine} is not registered with NIC {mac}")]
    UnknownNic { machine: MachineId, mac: String },
}

/// Why no machine was picked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoMachine {
    #[error("machine {machine} is not in partition {partition}")]
    NotInPartition { machine: MachineId, partition: String },
    #[error("machine {machine} cannot be allocated: {why}")]
    Ineligible { machine: MachineId, why: Ineligible },
    #[error("no machine of size {size} is waiting in partition {partition}")]
    PoolEmpty { size: String, partition: String },
}
