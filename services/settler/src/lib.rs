//! The settler: pays workers in TON for the tasks they completed.
//!
//! - [`ledger`]: the books folded from PAYMENTS, and batching (pure).
//! - [`wallet`]: the pool's key and wallet v5r1 messages (tonlib-core).
//! - [`toncenter`]: the toncenter v2 API client.
//! - [`service`]: the run loop (accrual, batching, sending, confirming, expiring).

pub mod ledger;
pub mod service;
pub mod toncenter;
pub mod wallet;

pub use ledger::{BatchPolicy, DEFAULT_ACCRUAL_WINDOW, Ledger};
pub use service::{FaultPoint, RunReport, SettlerConfig, SettlerError, run};
pub use toncenter::Toncenter;
pub use wallet::{PoolKey, PoolWallet};
