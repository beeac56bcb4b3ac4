//! PAYMENTS stream payloads: accruals and the life of a settlement batch. Accruals keyed by worker id,
//! settlement events by settlement id.

use serde::{Deserialize, Serialize};

use crate::ids::{SettlementId, TaskId, WorkerId};
use crate::money::{GpuMillis, Nanoton};
use crate::time::Timestamp;

/// A completed task earned its worker `amount` (= usage × price, rounded down).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentAccrued {
    pub task_id: TaskId,
    pub worker_id: WorkerId,
    /// The attempt whose completion earned it (a task accrues once, for the attempt that completed).
    pub attempt: u32,
    pub gpu_millis: GpuMillis,
    pub price_per_gpu_second: Nanoton,
    pub amount: Nanoton,
}

/// One transfer of a settlement: a worker's summed accruals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payout {
    pub worker_id: WorkerId,
    pub destination: String,
    pub amount: Nanoton,
    /// The accruals this transfer pays.
    pub task_ids: Vec<TaskId>,
}

/// A batch was built and signed; recorded before it is sent so a crash can resend the same message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementPrepared {
    pub settlement_id: SettlementId,
    pub wallet_seqno: u32,
    pub valid_until: Timestamp,
    pub payouts: Vec<Payout>,
    /// The signed external message (bag of cells).
    #[serde(with = "serde_bytes")]
    pub signed_message: Vec<u8>,
    /// Hash of the external message, hex; how the transaction is found on chain.
    pub message_hash: String,
}

/// The message was handed to the network (possibly again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementSubmitted {
    pub settlement_id: SettlementId,
    pub message_hash: String,
    /// 1 for the first send, then counts resends of the identical message.
    pub send_attempt: u32,
}

/// A transfer that the transaction did not carry out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedTransfer {
    pub worker_id: WorkerId,
    pub reason: String,
}

/// The wallet transaction executed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementConfirmed {
    pub settlement_id: SettlementId,
    pub tx_hash: String,
    pub logical_time: u64,
    /// Transfers that did not go out (e.g. insufficient balance); their accruals are not paid.
    pub failed_transfers: Vec<FailedTransfer>,
}

/// The message can no longer be accepted and was not executed; its accruals go to a new batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementExpired {
    pub settlement_id: SettlementId,
    pub valid_until: Timestamp,
}

/// The batch could not be built or sent for a permanent reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementFailed {
    pub settlement_id: SettlementId,
    pub reason: String,
}

/// A worker's pending accruals cannot be paid as things stand (for example its payout address is not a valid
/// TON address): they are held back with the reason, and the rest of the batch goes on without them. They
/// become payable again when the worker registers a payable address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayoutParked {
    pub worker_id: WorkerId,
    pub destination: String,
    pub amount: Nanoton,
    pub task_ids: Vec<TaskId>,
    pub reason: String,
}
