//! `payments status`: the pool's payments from the read model. Totals over every worker (accrued = pending +
//! parked + in flight + paid), a table per worker, the settlements still open and the latest closed ones. Amounts
//! are TON with all nine decimals, so no rounding ever hides a nanoton.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context as _;
use client::{PaymentsQuery, PaymentsStatus, SettlementView, WorkerPayments};
use events::{Timestamp, WorkerId};

use crate::cli::{Connection, PaymentsCommand};

pub async fn run(
    conn: &Connection,
    command: PaymentsCommand,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    match command {
        PaymentsCommand::Status(args) => {
            let worker = args
                .worker_id
                .as_deref()
                .map(|w| WorkerId::new(w).with_context(|| format!("invalid worker id {w:?}")))
                .transpose()?;
            let query = PaymentsQuery {
                worker,
                recent: args.limit,
            };
            let model = crate::tasks::read_model(conn).await?;
            let status = model
                .payments(&query)
                .await
                .context("reading payments (is the database migrated? `cocoon migrate`)")?;
            write_status(out, &status, &query, Timestamp::now())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The whole report: totals, workers, open settlements, recent settlements; one line when there is nothing yet.
pub fn write_status(
    out: &mut dyn Write,
    status: &PaymentsStatus,
    query: &PaymentsQuery,
    now: Timestamp,
) -> std::io::Result<()> {
    if status.is_empty() {
        return writeln!(
            out,
            "no payments yet: the read model holds no accruals and no settlements \
             (accruals appear as tasks complete, once the projector has applied them)"
        );
    }
    let t = &status.totals;
    writeln!(
        out,
        "TOTALS  {} workers, {} accruals",
        t.workers, t.sums.accruals
    )?;
    for (label, amount) in [
        ("accrued", t.sums.accrued),
        ("pending", t.sums.pending),
        ("parked", t.sums.parked),
        ("in flight", t.sums.in_flight),
        ("paid", t.sums.paid),
    ] {
        writeln!(out, "  {label:<18}{:>22}", amount.to_string())?;
    }
    writeln!(
        out,
        "  {:<18}{:>22}",
        "failed transfers", t.sums.failed_transfers
    )?;
    let by_status: Vec<String> = t
        .settlements
        .iter()
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    writeln!(out, "  {:<18}{}", "settlements", by_status.join(", "))?;

    writeln!(out)?;
    write_workers(out, &status.workers, query.worker.as_ref())?;
    writeln!(out)?;
    writeln!(out, "OPEN SETTLEMENTS")?;
    write_open(out, &status.open, now)?;
    writeln!(out)?;
    writeln!(out, "RECENT SETTLEMENTS (latest {})", query.recent)?;
    write_recent(out, &status.recent)
}

fn when(t: Option<Timestamp>) -> String {
    t.map_or_else(|| "-".to_owned(), |t| t.to_string())
}

/// One row per worker: its amounts by state, failed transfers, when it was last paid.
pub fn write_workers(
    out: &mut dyn Write,
    workers: &[WorkerPayments],
    only: Option<&WorkerId>,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<20}  {:>8}  {:>20}  {:>20}  {:>20}  {:>20}  {:>20}  {:>6}  LAST PAID",
        "WORKER", "ACCRUALS", "ACCRUED", "PENDING", "PARKED", "IN FLIGHT", "PAID", "FAILED"
    )?;
    for w in workers {
        let s = &w.sums;
        writeln!(
            out,
            "{:<20}  {:>8}  {:>20}  {:>20}  {:>20}  {:>20}  {:>20}  {:>6}  {}",
            w.worker_id.as_str(),
            s.accruals,
            s.accrued.to_string(),
            s.pending.to_string(),
            s.parked.to_string(),
            s.in_flight.to_string(),
            s.paid.to_string(),
            s.failed_transfers,
            when(w.last_paid_at),
        )?;
    }
    if workers.is_empty() {
        match only {
            Some(w) => writeln!(out, "(no accruals or payouts for worker {w})")?,
            None => writeln!(out, "(no workers)")?,
        }
    }
    Ok(())
}

/// Prepared and submitted settlements: what the settler is still sending or waiting on.
pub fn write_open(
    out: &mut dyn Write,
    open: &[SettlementView],
    now: Timestamp,
) -> std::io::Result<()> {
    if open.is_empty() {
        return writeln!(out, "(none)");
    }
    writeln!(
        out,
        "{:<36}  {:<9}  {:>6}  {:>7}  {:>20}  {:>5}  VALID UNTIL",
        "SETTLEMENT", "STATUS", "SEQNO", "PAYOUTS", "TOTAL", "SENDS"
    )?;
    for s in open {
        let passed = if s.valid_until < now { " (passed)" } else { "" };
        writeln!(
            out,
            "{:<36}  {:<9}  {:>6}  {:>7}  {:>20}  {:>5}  {}{passed}",
            s.settlement_id.to_string(),
            s.status.as_str(),
            s.wallet_seqno,
            s.payouts,
            s.total.to_string(),
            s.sends,
            s.valid_until,
        )?;
    }
    Ok(())
}

/// Closed settlements, newest first, with their outcome: the transaction, or why they expired or failed.
pub fn write_recent(out: &mut dyn Write, recent: &[SettlementView]) -> std::io::Result<()> {
    if recent.is_empty() {
        return writeln!(out, "(none)");
    }
    writeln!(
        out,
        "{:<36}  {:<9}  {:>6}  {:>7}  {:>20}  {:>6}  {:<27}  OUTCOME",
        "SETTLEMENT", "STATUS", "SEQNO", "PAYOUTS", "TOTAL", "FAILED", "PREPARED"
    )?;
    for s in recent {
        let outcome = match (&s.tx_hash, &s.failure_reason) {
            (Some(tx), _) => format!("tx {tx}"),
            (None, Some(reason)) => reason.clone(),
            (None, None) => "-".to_owned(),
        };
        writeln!(
            out,
            "{:<36}  {:<9}  {:>6}  {:>7}  {:>20}  {:>6}  {:<27}  {outcome}",
            s.settlement_id.to_string(),
            s.status.as_str(),
            s.wallet_seqno,
            s.payouts,
            s.total.to_string(),
            s.failed_transfers,
            s.prepared_at.to_string(),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use client::{PaymentSums, PaymentTotals, SettlementStatus};
    use events::{Nanoton, SettlementId};

    fn text(status: &PaymentsStatus, query: &PaymentsQuery) -> String {
        let mut out = Vec::new();
        write_status(&mut out, status, query, Timestamp::from_micros(2_000_000)).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn settlement(status: SettlementStatus) -> SettlementView {
        SettlementView {
            settlement_id: SettlementId::new(),
            status,
            wallet_seqno: 7,
            payouts: 2,
            total: Nanoton(3_000_000_008),
            valid_until: Timestamp::from_micros(1_000_000),
            prepared_at: Timestamp::from_micros(0),
            submitted_at: None,
            sends: 2,
            confirmed_at: None,
            tx_hash: None,
            failure_reason: Some("valid until 1970-01-01T00:00:01Z passed unexecuted".into()),
            failed_transfers: 0,
        }
    }

    #[test]
    fn nothing_yet_is_said_in_one_line() {
        let empty = PaymentsStatus {
            totals: PaymentTotals {
                workers: 0,
                sums: PaymentSums::default(),
                settlements: SettlementStatus::ALL.map(|s| (s, 0)).to_vec(),
            },
            workers: vec![],
            open: vec![],
            recent: vec![],
        };
        let out = text(&empty, &PaymentsQuery::default());
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.starts_with("no payments yet"), "{out}");
    }

    #[test]
    fn amounts_keep_every_nanoton_and_sections_say_when_they_are_empty() {
        let sums = PaymentSums {
            accruals: 3,
            accrued: Nanoton(2_000_000_100),
            pending: Nanoton(99),
            parked: Nanoton(0),
            in_flight: Nanoton(0),
            paid: Nanoton(2_000_000_001),
            failed_transfers: 1,
        };
        let status = PaymentsStatus {
            totals: PaymentTotals {
                workers: 1,
                sums,
                settlements: vec![
                    (SettlementStatus::Prepared, 1),
                    (SettlementStatus::Expired, 1),
                ],
            },
            workers: vec![WorkerPayments {
                worker_id: WorkerId::new("alice").unwrap(),
                sums,
                last_paid_at: None,
            }],
            open: vec![settlement(SettlementStatus::Prepared)],
            recent: vec![settlement(SettlementStatus::Expired)],
        };
        let out = text(&status, &PaymentsQuery::default());
        assert!(out.contains("2.000000100 TON"), "{out}");
        assert!(out.contains("0.000000099 TON"), "{out}");
        assert!(out.contains("1 prepared, 1 expired"), "{out}");
        let alice = out.lines().find(|l| l.starts_with("alice")).unwrap();
        assert!(alice.contains("2.000000001 TON"), "{alice}");
        assert!(alice.trim_end().ends_with('-'), "never paid: {alice}");
        assert!(
            out.contains("(passed)"),
            "an open message past its validity: {out}"
        );
        assert!(out.contains("passed unexecuted"), "{out}");

        let only_bob = PaymentsQuery {
            worker: Some(WorkerId::new("bob").unwrap()),
            recent: 5,
        };
        let none = PaymentsStatus {
            workers: vec![],
            open: vec![],
            recent: vec![],
            ..status
        };
        let out = text(&none, &only_bob);
        assert!(
            out.contains("(no accruals or payouts for worker bob)"),
            "{out}"
        );
        assert!(out.contains("RECENT SETTLEMENTS (latest 5)"), "{out}");
        assert_eq!(out.matches("(none)").count(), 2, "{out}");
    }
}
