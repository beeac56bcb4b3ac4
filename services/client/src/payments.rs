//! Payments status from the read model: what each worker's accruals add up to by state (the `worker_payments`
//! view), the same sums over all workers, the settlements by status, the settlements still open and the latest
//! closed ones.
//!
//! An accrual is in exactly one state (the view's migration, `0011_payment_status.sql`, defines them): paid, in
//! flight (carried by a settlement that is prepared or submitted), parked (held back by the settler, e.g. for an
//! invalid payout address) or pending. So accrued = pending + parked + in flight + paid, per worker and in total.
//! Like every read-model query this trails the log by the projector's lag.

use std::collections::BTreeMap;

use events::{Nanoton, SettlementId, Timestamp, WorkerId};

use crate::read_model::{ReadModel, ReadModelError, micros, unsigned, worker_id};

/// Where a settlement (one TON transaction from the pool wallet) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SettlementStatus {
    /// Built and signed, recorded before it is sent.
    Prepared,
    /// Sent (possibly more than once, the identical message).
    Submitted,
    /// Executed on chain (some transfers may have failed: see [`SettlementView::failed_transfers`]).
    Confirmed,
    /// Can no longer be accepted and was not executed; its accruals are pending again.
    Expired,
    /// Could not be built or sent for a permanent reason; its accruals are pending again.
    Failed,
}

impl SettlementStatus {
    pub const ALL: [SettlementStatus; 5] = [
        SettlementStatus::Prepared,
        SettlementStatus::Submitted,
        SettlementStatus::Confirmed,
        SettlementStatus::Expired,
        SettlementStatus::Failed,
    ];

    /// The spelling in the `settlements.status` column.
    pub const fn as_str(self) -> &'static str {
        match self {
            SettlementStatus::Prepared => "prepared",
            SettlementStatus::Submitted => "submitted",
            SettlementStatus::Confirmed => "confirmed",
            SettlementStatus::Expired => "expired",
            SettlementStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<SettlementStatus> {
        SettlementStatus::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Prepared or submitted: the message may still execute.
    pub const fn is_open(self) -> bool {
        matches!(
            self,
            SettlementStatus::Prepared | SettlementStatus::Submitted
        )
    }
}

impl std::fmt::Display for SettlementStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Accruals by state, for one worker or summed over all of them.
/// `accrued == pending + parked + in_flight + paid` always holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PaymentSums {
    /// How many accruals (one per completed task).
    pub accruals: u64,
    pub accrued: Nanoton,
    /// Waiting for a settlement: never settled, or their settlement expired or failed, or their transfer failed.
    pub pending: Nanoton,
    /// Held back by the settler until the worker can be paid (e.g. registers a valid address).
    pub parked: Nanoton,
    /// Carried by a prepared or submitted settlement.
    pub in_flight: Nanoton,
    /// Transferred by a confirmed settlement.
    pub paid: Nanoton,
    /// Payouts that a confirmed settlement did not carry out.
    pub failed_transfers: u64,
}

impl PaymentSums {
    /// Adds `other`; `None` if a sum leaves `u64` (it cannot with real amounts: TON's supply is below 2^63
    /// nanoton).
    pub fn checked_add(&self, other: &PaymentSums) -> Option<PaymentSums> {
        Some(PaymentSums {
            accruals: self.accruals.checked_add(other.accruals)?,
            accrued: self.accrued.checked_add(other.accrued)?,
            pending: self.pending.checked_add(other.pending)?,
            parked: self.parked.checked_add(other.parked)?,
            in_flight: self.in_flight.checked_add(other.in_flight)?,
            paid: self.paid.checked_add(other.paid)?,
            failed_transfers: self.failed_transfers.checked_add(other.failed_transfers)?,
        })
    }
}

/// One worker's payments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerPayments {
    pub worker_id: WorkerId,
    pub sums: PaymentSums,
    /// When the latest settlement that paid the worker was confirmed.
    pub last_paid_at: Option<Timestamp>,
}

/// Sums over every worker, and how many settlements are in each status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentTotals {
    /// Workers with an accrual or a payout.
    pub workers: u64,
    pub sums: PaymentSums,
    /// Every status, in [`SettlementStatus::ALL`] order, zeros included.
    pub settlements: Vec<(SettlementStatus, u64)>,
}

impl PaymentTotals {
    /// How many settlements the read model holds.
    pub fn settlement_count(&self) -> u64 {
        self.settlements.iter().map(|(_, n)| n).sum()
    }
}

/// One settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettlementView {
    pub settlement_id: SettlementId,
    pub status: SettlementStatus,
    pub wallet_seqno: u32,
    /// Transfers in the message (1 to 255).
    pub payouts: u32,
    pub total: Nanoton,
    /// After this the message can no longer be accepted.
    pub valid_until: Timestamp,
    pub prepared_at: Timestamp,
    /// The first send.
    pub submitted_at: Option<Timestamp>,
    /// How many times the message was sent (0: not yet).
    pub sends: u32,
    pub confirmed_at: Option<Timestamp>,
    pub tx_hash: Option<String>,
    /// Why it expired or failed.
    pub failure_reason: Option<String>,
    /// Transfers of a confirmed settlement that did not go out.
    pub failed_transfers: u32,
}

/// What [`ReadModel::payments`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentsQuery {
    /// Only this worker's row (the totals still cover every worker).
    pub worker: Option<WorkerId>,
    /// How many closed (confirmed, expired, failed) settlements, newest first.
    pub recent: u32,
}

impl Default for PaymentsQuery {
    fn default() -> Self {
        Self {
            worker: None,
            recent: 10,
        }
    }
}

/// The payments status of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentsStatus {
    pub totals: PaymentTotals,
    /// By worker id: every worker, or the one asked for (none if it has no accrual or payout).
    pub workers: Vec<WorkerPayments>,
    /// Prepared or submitted settlements, oldest first.
    pub open: Vec<SettlementView>,
    /// The latest closed settlements, newest first.
    pub recent: Vec<SettlementView>,
}

impl PaymentsStatus {
    /// Nothing accrued and nothing settled yet.
    pub fn is_empty(&self) -> bool {
        self.totals.workers == 0 && self.totals.settlement_count() == 0
    }
}

const WORKER_PAYMENTS_SELECT: &str = concat!(
    "SELECT worker_id, accruals, accrued_nanoton, pending_nanoton, parked_nanoton, in_flight_nanoton, ",
    "paid_nanoton, failed_transfers, ",
    micros!("last_paid_at"),
    " FROM worker_payments ORDER BY worker_id"
);

const SETTLEMENT_SELECT: &str = concat!(
    "SELECT s.settlement_id, s.status, s.wallet_seqno, s.payout_count, s.total_nanoton, ",
    micros!("s.valid_until"),
    ", ",
    micros!("s.prepared_at"),
    ", ",
    micros!("s.submitted_at"),
    ", s.sends, ",
    micros!("s.confirmed_at"),
    ", s.tx_hash, s.failure_reason, ",
    "(SELECT count(*) FROM settlement_payouts p WHERE p.settlement_id = s.settlement_id AND p.status = 'failed') ",
    "FROM settlements s"
);

impl ReadModel {
    /// The payments status: totals over every worker, the workers' rows (or one worker's), the open settlements
    /// and the latest `query.recent` closed ones.
    pub async fn payments(&self, query: &PaymentsQuery) -> Result<PaymentsStatus, ReadModelError> {
        // Every worker's row is read once: the totals are their sums, so they always agree with the rows.
        let rows = self.client.query(WORKER_PAYMENTS_SELECT, &[]).await?;
        let mut workers = rows
            .iter()
            .map(worker_payments)
            .collect::<Result<Vec<_>, _>>()?;
        let mut sums = PaymentSums::default();
        for w in &workers {
            sums = sums
                .checked_add(&w.sums)
                .ok_or(ReadModelError::Unexpected {
                    column: "worker_payments (sum over workers)",
                    value: "beyond u64".into(),
                })?;
        }
        let total_workers = workers.len() as u64;
        if let Some(only) = &query.worker {
            workers.retain(|w| &w.worker_id == only);
        }

        let mut by_status: BTreeMap<SettlementStatus, u64> = BTreeMap::new();
        for r in self
            .client
            .query(
                "SELECT status, count(*) FROM settlements GROUP BY status",
                &[],
            )
            .await?
        {
            let status: String = r.try_get(0)?;
            let status = SettlementStatus::parse(&status).ok_or(ReadModelError::Unexpected {
                column: "settlements.status",
                value: status,
            })?;
            by_status.insert(status, unsigned(r.try_get::<_, i64>(1)?, "count")?);
        }
        let settlements = SettlementStatus::ALL
            .into_iter()
            .map(|s| (s, by_status.get(&s).copied().unwrap_or(0)))
            .collect();

        let open_sql = format!(
            "{SETTLEMENT_SELECT} WHERE s.status IN ('prepared', 'submitted') ORDER BY s.prepared_at, s.settlement_id"
        );
        let open = self
            .client
            .query(&open_sql, &[])
            .await?
            .iter()
            .map(settlement_view)
            .collect::<Result<Vec<_>, _>>()?;
        let recent_sql = format!(
            "{SETTLEMENT_SELECT} WHERE s.status IN ('confirmed', 'expired', 'failed')
             ORDER BY s.prepared_at DESC, s.settlement_id DESC LIMIT $1"
        );
        let recent = self
            .client
            .query(&recent_sql, &[&i64::from(query.recent)])
            .await?
            .iter()
            .map(settlement_view)
            .collect::<Result<Vec<_>, _>>()?;

        Ok(PaymentsStatus {
            totals: PaymentTotals {
                workers: total_workers,
                sums,
                settlements,
            },
            workers,
            open,
            recent,
        })
    }
}

fn nanoton(
    r: &tokio_postgres::Row,
    i: usize,
    column: &'static str,
) -> Result<Nanoton, ReadModelError> {
    Ok(Nanoton(unsigned(r.try_get::<_, i64>(i)?, column)?))
}

fn worker_payments(r: &tokio_postgres::Row) -> Result<WorkerPayments, ReadModelError> {
    Ok(WorkerPayments {
        worker_id: worker_id(r.try_get(0)?, "worker_payments.worker_id")?,
        sums: PaymentSums {
            accruals: unsigned(r.try_get::<_, i64>(1)?, "worker_payments.accruals")?,
            accrued: nanoton(r, 2, "worker_payments.accrued_nanoton")?,
            pending: nanoton(r, 3, "worker_payments.pending_nanoton")?,
            parked: nanoton(r, 4, "worker_payments.parked_nanoton")?,
            in_flight: nanoton(r, 5, "worker_payments.in_flight_nanoton")?,
            paid: nanoton(r, 6, "worker_payments.paid_nanoton")?,
            failed_transfers: unsigned(
                r.try_get::<_, i64>(7)?,
                "worker_payments.failed_transfers",
            )?,
        },
        last_paid_at: r.try_get::<_, Option<i64>>(8)?.map(Timestamp),
    })
}

fn settlement_view(r: &tokio_postgres::Row) -> Result<SettlementView, ReadModelError> {
    let status: String = r.try_get(1)?;
    Ok(SettlementView {
        settlement_id: SettlementId(r.try_get(0)?),
        status: SettlementStatus::parse(&status).ok_or(ReadModelError::Unexpected {
            column: "settlements.status",
            value: status,
        })?,
        wallet_seqno: unsigned(r.try_get::<_, i64>(2)?, "settlements.wallet_seqno")?,
        payouts: unsigned(r.try_get::<_, i32>(3)?, "settlements.payout_count")?,
        total: nanoton(r, 4, "settlements.total_nanoton")?,
        valid_until: Timestamp(r.try_get(5)?),
        prepared_at: Timestamp(r.try_get(6)?),
        submitted_at: r.try_get::<_, Option<i64>>(7)?.map(Timestamp),
        sends: unsigned(r.try_get::<_, i32>(8)?, "settlements.sends")?,
        confirmed_at: r.try_get::<_, Option<i64>>(9)?.map(Timestamp),
        tx_hash: r.try_get(10)?,
        failure_reason: r.try_get(11)?,
        failed_transfers: unsigned(r.try_get::<_, i64>(12)?, "settlement_payouts (failed)")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_and_only_prepared_and_submitted_are_open() {
        for s in SettlementStatus::ALL {
            assert_eq!(SettlementStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(SettlementStatus::parse("paid"), None);
        let open: Vec<_> = SettlementStatus::ALL
            .into_iter()
            .filter(|s| s.is_open())
            .collect();
        assert_eq!(
            open,
            vec![SettlementStatus::Prepared, SettlementStatus::Submitted]
        );
    }

    #[test]
    fn sums_add_field_by_field_and_refuse_to_wrap() {
        let a = PaymentSums {
            accruals: 2,
            accrued: Nanoton(10),
            pending: Nanoton(1),
            parked: Nanoton(2),
            in_flight: Nanoton(3),
            paid: Nanoton(4),
            failed_transfers: 1,
        };
        let b = a.checked_add(&a).unwrap();
        assert_eq!(b.accrued, Nanoton(20));
        assert_eq!(b.paid, Nanoton(8));
        assert_eq!(b.failed_transfers, 2);
        let huge = PaymentSums {
            paid: Nanoton(u64::MAX),
            ..a
        };
        assert_eq!(huge.checked_add(&a), None);
    }
}
