//! The verifier against Intel's real sample quotes (copied from the `dcap-qvl` crate package; see
//! `fixtures/README.md`), at fixed times inside and outside their collateral's validity window.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use attestor::policy::Register;
use attestor::{
    Binding, CollateralSource, CollateralStore, Policy, PoolError, RejectReason, Verdict, Verifier,
    verify_blocking,
};
use dcap_qvl::TcbStatus;
use events::Timestamp;
use tokio::sync::Semaphore;

/// 2025-07-01T00:00:00Z: inside `tdx_quote`'s collateral window.
const GOOD_TIME: u64 = 1_751_328_000;
/// 2025-07-19T10:00:35Z: the PCK CRL's nextUpdate, the first expiry in `tdx_quote`'s collateral.
const GOOD_COLLATERAL_EXPIRY: u64 = 1_752_919_235;
/// The sample's MRTD and RTMR2, as in `fixtures/policy.json`.
const SAMPLE_MRTD: &str = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7";
const SAMPLE_RTMR2: &str = "d833feef2cd945148aa38ead2c53e9b7f138190aaaebfc551dccd829fc207aa3ba80b70870d7330733642e01d48c3132";
/// 2026-03-01T00:00:00Z: inside `tdx_quote_outdated`'s collateral window.
const OUTDATED_TIME: u64 = 1_772_323_200;

/// Offset of TDATTRIBUTES in a v4 TDX quote: the 48-byte header, then TEE_TCB_SVN (16), MRSEAM (48),
/// MRSIGNERSEAM (48), SEAMATTRIBUTES (8).
const TD_ATTRIBUTES_OFFSET: usize = 48 + 16 + 48 + 48 + 8;
/// Offset of MRTD: after TDATTRIBUTES (8) and XFAM (8).
const MRTD_OFFSET: usize = TD_ATTRIBUTES_OFFSET + 16;
/// Offset of REPORTDATA, the last 64 bytes of the 584-byte TD 1.0 report.
const REPORT_DATA_OFFSET: usize = 48 + 584 - 64;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(name)).unwrap()
}

fn good_quote() -> Vec<u8> {
    read("tdx_quote")
}

/// The report data the good sample actually carries.
fn good_report_data() -> [u8; 64] {
    good_quote()[REPORT_DATA_OFFSET..REPORT_DATA_OFFSET + 64]
        .try_into()
        .unwrap()
}

fn sample_policy() -> Policy {
    Policy::load(&fixtures().join("policy.json")).unwrap()
}

fn store() -> CollateralStore {
    CollateralStore::load(&CollateralSource::Files(fixtures().join("collateral"))).unwrap()
}

fn verifier(policy: Policy) -> Verifier {
    Verifier::new(policy, store())
}

fn reason(verdict: &Verdict) -> &RejectReason {
    verdict
        .reason()
        .unwrap_or_else(|| panic!("expected a rejection, got {verdict:?}"))
}

#[test]
fn the_good_sample_verifies_with_its_own_report_data() {
    let quote = good_quote();
    let verdict = verifier(sample_policy()).verify(
        &quote,
        &Binding::Exact(good_report_data()),
        at(GOOD_TIME),
    );
    let Verdict::Verified {
        quote_hash,
        tcb_status,
        measurements,
        valid_until,
    } = verdict
    else {
        panic!("expected Verified, got {verdict:?}")
    };
    assert_eq!(
        quote_hash,
        "c42f9164325024bca2757bc8819b11879a0a369132ea4e2b7c85df4805ea72db"
    );
    assert_eq!(tcb_status, "UpToDate");
    assert_eq!(measurements.mrtd, SAMPLE_MRTD);
    assert_eq!(measurements.rtmr2, SAMPLE_RTMR2);
    assert_eq!(measurements.rtmr3, "0".repeat(96));
    // The policy caps validity at a day, well before the collateral expires.
    let now = Timestamp::from_system_time(at(GOOD_TIME));
    assert_eq!(valid_until, now.saturating_add(Duration::from_secs(86_400)));
    assert!(valid_until <= Timestamp::from_system_time(at(GOOD_COLLATERAL_EXPIRY)));
}

#[test]
fn validity_never_outlasts_the_collateral() {
    // With a 60-day cap, the collateral's first expiry (the PCK CRL's nextUpdate) bounds the verdict.
    let policy = Policy::builder(hex48(SAMPLE_MRTD))
        .max_validity(Duration::from_secs(60 * 86_400))
        .build();
    let verdict = verifier(policy).verify(
        &good_quote(),
        &Binding::Exact(good_report_data()),
        at(GOOD_TIME),
    );
    let Verdict::Verified { valid_until, .. } = verdict else {
        panic!("{verdict:?}")
    };
    assert_eq!(
        valid_until,
        Timestamp::from_system_time(at(GOOD_COLLATERAL_EXPIRY))
    );
}

fn hex48(s: &str) -> [u8; 48] {
    let mut out = [0; 48];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}

/// The binding is checked after, and independently of, the chain of trust: the same genuine quote that
/// verifies with its own report data is rejected *for the binding* when the caller expects
/// SHA-512(key || nonce) of a key it does not bind. Binding is the last check, so reaching it means the
/// quote's cryptographic verification, TCB status and measurements all passed.
#[test]
fn the_genuine_sample_does_not_bind_our_key() {
    let v = verifier(sample_policy());
    let quote = good_quote();
    assert!(
        v.verify(&quote, &Binding::Exact(good_report_data()), at(GOOD_TIME))
            .is_verified()
    );

    let binding = Binding::Sha512 {
        worker_id: "w".into(),
        public_key: vec![7; 32],
        nonce: vec![9; 32],
    };
    let verdict = v.verify(&quote, &binding, at(GOOD_TIME));
    let RejectReason::Binding(err) = reason(&verdict) else {
        panic!("{verdict:?}")
    };
    assert_eq!(*err.actual, good_report_data());
    assert_eq!(
        *err.expected,
        attestor::report_data_for("w", &[7; 32], &[9; 32])
    );
    assert!(
        verdict
            .reason()
            .unwrap()
            .to_string()
            .starts_with("quote does not bind the submitted key")
    );
}

#[test]
fn a_tampered_body_fails_the_signature() {
    let mut quote = good_quote();
    quote[MRTD_OFFSET] ^= 0x01;
    let verdict = verifier(sample_policy()).verify(
        &quote,
        &Binding::Exact(good_report_data()),
        at(GOOD_TIME),
    );
    let RejectReason::Cryptographic { detail } = reason(&verdict) else {
        panic!("{verdict:?}")
    };
    assert!(detail.contains("signature is invalid"), "{detail}");

    // Tampering with the report data is caught by the signature too, before the binding is looked at.
    let mut quote = good_quote();
    quote[REPORT_DATA_OFFSET] ^= 0x80;
    let mut expected = good_report_data();
    expected[0] ^= 0x80;
    let verdict =
        verifier(sample_policy()).verify(&quote, &Binding::Exact(expected), at(GOOD_TIME));
    assert_eq!(reason(&verdict).kind(), "cryptographic");
}

/// Flipping any single bit of the signed header and body never yields `Verified`, and no flip anywhere in
/// the quote panics the verifier.
#[test]
fn no_single_byte_corruption_verifies() {
    let v = verifier(sample_policy());
    let original = good_quote();
    let signed_len = 48 + 584;
    for offset in (0..original.len()).step_by(7).chain(0..signed_len) {
        let mut quote = original.clone();
        quote[offset] ^= 1 << (offset % 8);
        let verdict = v.verify(&quote, &Binding::Exact(good_report_data()), at(GOOD_TIME));
        if offset < signed_len {
            assert!(!verdict.is_verified(), "flip at {offset} verified");
        }
    }
}

#[test]
fn a_measurement_outside_the_policy_is_refused() {
    let mut policy = Policy::builder(hex48(SAMPLE_MRTD)).allow(Register::Rtmr2, [0xab; 48]);
    let verdict = verifier(policy.clone().build()).verify(
        &good_quote(),
        &Binding::Exact(good_report_data()),
        at(GOOD_TIME),
    );
    assert_eq!(
        reason(&verdict),
        &RejectReason::MeasurementNotAllowed {
            which: Register::Rtmr2,
            value: SAMPLE_RTMR2.into(),
        }
    );

    // An MRTD not listed is refused the same way.
    let verdict = verifier(Policy::builder([0x11; 48]).build()).verify(
        &good_quote(),
        &Binding::Exact(good_report_data()),
        at(GOOD_TIME),
    );
    let RejectReason::MeasurementNotAllowed { which, .. } = reason(&verdict) else {
        panic!("{verdict:?}")
    };
    assert_eq!(*which, Register::Mrtd);

    // Allowing the real RTMR2 as well admits the quote.
    policy = policy.allow(Register::Rtmr2, hex48(SAMPLE_RTMR2));
    assert!(
        verifier(policy.build())
            .verify(
                &good_quote(),
                &Binding::Exact(good_report_data()),
                at(GOOD_TIME)
            )
            .is_verified()
    );
}

/// What this exercises: the verifier's own debug check, which reads TDATTRIBUTES from the parsed body and
/// runs before the signature check. Setting DEBUG in a genuine quote necessarily breaks its signature (no
/// genuine debug-TD sample exists), so this quote would also fail `dcap-qvl` (which refuses debug TDs
/// too); the reason being `DebugTd`, not `Cryptographic`, shows the attestor's check fired first and
/// independently. The bit arithmetic itself is unit-tested in `policy::tests::any_tud_bit_is_a_debug_td`.
#[test]
fn a_debug_td_is_refused() {
    let mut quote = good_quote();
    assert_eq!(
        quote[TD_ATTRIBUTES_OFFSET] & 1,
        0,
        "the sample is not a debug TD"
    );
    quote[TD_ATTRIBUTES_OFFSET] |= 1;
    let verdict = verifier(sample_policy()).verify(
        &quote,
        &Binding::Exact(good_report_data()),
        at(GOOD_TIME),
    );
    assert_eq!(
        reason(&verdict),
        &RejectReason::DebugTd {
            td_attributes: 0x1000_0001
        }
    );
    assert!(reason(&verdict).to_string().starts_with("debug TD refused"));
}

#[test]
fn collateral_outside_its_window_is_refused_as_expired() {
    let v = verifier(sample_policy());
    let binding = Binding::Exact(good_report_data());
    // The last second of the window still verifies; its end is exclusive.
    assert!(
        v.verify(&good_quote(), &binding, at(GOOD_COLLATERAL_EXPIRY - 1))
            .is_verified()
    );

    let verdict = v.verify(&good_quote(), &binding, at(GOOD_COLLATERAL_EXPIRY));
    let RejectReason::CollateralExpired { detail } = reason(&verdict) else {
        panic!("{verdict:?}")
    };
    assert!(
        detail.starts_with("PCK CRL expired at 2025-07-19T10:00:35"),
        "{detail}"
    );

    // Before the collateral was issued (2025-06-01) is outside the window too.
    let verdict = v.verify(&good_quote(), &binding, at(1_748_736_000));
    let RejectReason::CollateralExpired { detail } = reason(&verdict) else {
        panic!("{verdict:?}")
    };
    assert!(detail.contains("after verification time"), "{detail}");
}

/// The sample is a 4936-byte quote followed by 70 bytes of zero padding (as quote buffers come).
const GOOD_QUOTE_LEN: usize = 4936;

#[test]
fn every_truncation_is_malformed() {
    let v = verifier(sample_policy());
    let quote = good_quote();
    assert_eq!(quote.len(), GOOD_QUOTE_LEN + 70);
    let binding = Binding::Exact(good_report_data());
    for len in 0..GOOD_QUOTE_LEN {
        let verdict = v.verify(&quote[..len], &binding, at(GOOD_TIME));
        assert_eq!(
            reason(&verdict).kind(),
            "malformed",
            "prefix of {len} bytes: {verdict:?}"
        );
    }
    // Dropping padding changes nothing but the hash.
    for len in [GOOD_QUOTE_LEN, GOOD_QUOTE_LEN + 1, quote.len()] {
        assert!(
            v.verify(&quote[..len], &binding, at(GOOD_TIME))
                .is_verified(),
            "{len}"
        );
    }
    // Non-zero bytes after the quote are not padding.
    let mut longer = quote.clone();
    longer.push(1);
    let verdict = v.verify(&longer, &binding, at(GOOD_TIME));
    assert_eq!(
        reason(&verdict),
        &RejectReason::Malformed {
            detail: "71 bytes after the quote's 4936 are not zero padding".into()
        }
    );
}

#[test]
fn random_bytes_are_malformed() {
    let v = verifier(sample_policy());
    let binding = Binding::Exact([0; 64]);
    // xorshift64: deterministic, no dependency.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let header = &good_quote()[..48];
    for round in 0..500 {
        let len = usize::try_from(next() % 6000).unwrap();
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let verdict = v.verify(&bytes, &binding, at(GOOD_TIME));
        assert_eq!(
            reason(&verdict).kind(),
            "malformed",
            "round {round}: {verdict:?}"
        );
        // With a genuine header in front, parsing gets further; still no panic and no verdict but rejection.
        if bytes.len() > 48 {
            bytes[..48].copy_from_slice(header);
            assert!(!v.verify(&bytes, &binding, at(GOOD_TIME)).is_verified());
        }
    }
}

#[test]
fn an_sgx_quote_is_not_tdx() {
    let verdict = verifier(sample_policy()).verify(
        &read("sgx_quote"),
        &Binding::Exact([0; 64]),
        at(GOOD_TIME),
    );
    assert_eq!(reason(&verdict), &RejectReason::NotTdx { tee_type: 0 });
}

#[test]
fn a_platform_without_collateral_is_refused() {
    let only_outdated = CollateralStore::load(&CollateralSource::Files(
        fixtures().join("collateral/tdx_quote_outdated_collateral.json"),
    ))
    .unwrap();
    let verdict = Verifier::new(sample_policy(), only_outdated).verify(
        &good_quote(),
        &Binding::Exact(good_report_data()),
        at(GOOD_TIME),
    );
    assert_eq!(
        reason(&verdict),
        &RejectReason::NoCollateral {
            fmspc: "b0c06f000000".into(),
            fetch_error: None,
        }
    );
}

#[test]
fn a_status_the_policy_does_not_accept_is_refused() {
    let policy = Policy::builder(hex48(SAMPLE_MRTD))
        .accepted_tcb_statuses(&[TcbStatus::SWHardeningNeeded])
        .build();
    let verdict = verifier(policy).verify(
        &good_quote(),
        &Binding::Exact(good_report_data()),
        at(GOOD_TIME),
    );
    assert_eq!(
        reason(&verdict),
        &RejectReason::TcbStatus {
            status: "UpToDate".into(),
            advisory_ids: vec![],
        }
    );
}

/// `tdx_quote_outdated` comes from a platform older than every TCB level its collateral lists, so it has
/// no status to accept or refuse: `dcap-qvl` cannot appraise it, and the verdict says so.
#[test]
fn an_outdated_platform_cannot_be_appraised() {
    let quote = read("tdx_quote_outdated");
    let any_status = Policy::builder([0; 48])
        .accepted_tcb_statuses(&[
            TcbStatus::UpToDate,
            TcbStatus::OutOfDate,
            TcbStatus::SWHardeningNeeded,
        ])
        .build();
    let verdict = verifier(any_status).verify(&quote, &Binding::Exact([0; 64]), at(OUTDATED_TIME));
    let RejectReason::TcbUnappraisable { detail } = reason(&verdict) else {
        panic!("{verdict:?}")
    };
    assert!(detail.contains("No matching TCB level"), "{detail}");
}

#[test]
fn collateral_loads_from_a_directory_or_a_file_and_names_what_is_wrong() {
    assert_eq!(store().len(), 2);
    let missing =
        CollateralStore::load(&CollateralSource::Files(fixtures().join("nope.json"))).unwrap_err();
    assert!(missing.to_string().contains("nope.json"), "{missing}");
    // The fixtures directory holds a policy, which is not collateral.
    let err = CollateralStore::load(&CollateralSource::Files(fixtures().join("policy.json")))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("policy.json is not a dcap-qvl QuoteCollateralV3 JSON"),
        "{err}"
    );
    let dup = CollateralStore::from_collaterals([1, 2].map(|_| {
        attestor::Collateral::from_json(
            &read("collateral/tdx_quote_collateral.json"),
            Path::new("c.json"),
        )
        .unwrap()
    }))
    .unwrap_err();
    assert!(dup.to_string().contains("b0c06f000000"), "{dup}");
    // A PCCS source starts empty: the service fetches collateral as quotes need it, and adds it.
    let from_pccs = Verifier::from_source(
        sample_policy(),
        &CollateralSource::Url("https://pccs.example/".into()),
    )
    .unwrap();
    assert_eq!(from_pccs.collateral_platforms(), 0);
    let quote = good_quote();
    let binding = Binding::Exact(good_report_data());
    assert_eq!(
        reason(&from_pccs.verify(&quote, &binding, at(GOOD_TIME))).kind(),
        "no_collateral"
    );
    let collateral = attestor::Collateral::from_json(
        &read("collateral/tdx_quote_collateral.json"),
        Path::new("c.json"),
    )
    .unwrap();
    assert!(from_pccs.add_collateral(collateral.clone()).is_none());
    assert!(
        from_pccs
            .verify(&quote, &binding, at(GOOD_TIME))
            .is_verified()
    );
    // Adding it again replaces it.
    assert!(from_pccs.add_collateral(collateral).is_some());
    assert_eq!(from_pccs.collateral_platforms(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_runs_off_the_runtime_with_bounded_concurrency() {
    let v = Arc::new(verifier(sample_policy()));
    let semaphore = Arc::new(Semaphore::new(2));
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (v, semaphore) = (v.clone(), semaphore.clone());
            tokio::spawn(async move {
                verify_blocking(
                    v,
                    &semaphore,
                    good_quote(),
                    Binding::Exact(good_report_data()),
                    at(GOOD_TIME),
                )
                .await
            })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap().unwrap().is_verified());
    }
    assert_eq!(semaphore.available_permits(), 2, "permits are returned");

    semaphore.close();
    let closed = verify_blocking(
        v,
        &semaphore,
        good_quote(),
        Binding::Exact([0; 64]),
        at(GOOD_TIME),
    )
    .await;
    assert!(matches!(closed, Err(PoolError::Closed)));
}

#[test]
fn a_verdict_becomes_its_event() {
    let verdict =
        verifier(sample_policy()).verify(&good_quote(), &Binding::Exact([0; 64]), at(GOOD_TIME));
    let worker = events::WorkerId::new("w-1").unwrap();
    match verdict.clone().into_event(worker.clone()) {
        events::Event::AttestationRejected(e) => {
            assert_eq!(e.worker_id, worker);
            assert_eq!(e.quote_hash, verdict.quote_hash());
            assert_eq!(e.reason, verdict.reason().unwrap().to_string());
        }
        other => panic!("{other:?}"),
    }
}
