//! The PCCS client against a stand-in PCCS (`common/stand_in_pccs.rs`) serving Intel's sample collateral:
//! it assembles the collateral the file gives, field by field; chunked bodies parse; every failure is a
//! typed error naming its URL.

#[path = "common/stand_in_pccs.rs"]
mod stand_in_pccs;

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use attestor::{
    Binding, Collateral, CollateralSource, CollateralStore, PccsClient, PccsConfig, PccsError,
    Policy, Verifier,
};
use dcap_qvl::config::PckCa;
use stand_in_pccs::{
    PCK_CRL, QE_IDENTITY, ROOT_CRL, ROUTES, Reply, StandInPccs, TCB, replies_for,
    sample_collateral_path,
};

const FMSPC: [u8; 6] = [0xb0, 0xc0, 0x6f, 0, 0, 0];
/// 2025-07-01T00:00:00Z: inside the sample quote's collateral window.
const GOOD_TIME: u64 = 1_751_328_000;
const REPORT_DATA_OFFSET: usize = 48 + 584 - 64;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn file_collateral() -> Collateral {
    let path = sample_collateral_path();
    Collateral::from_json(&std::fs::read(&path).unwrap(), &path).unwrap()
}

fn client(url: &str) -> PccsClient {
    let mut config = PccsConfig::new(url);
    config.timeout = Duration::from_secs(5);
    PccsClient::new(&config).unwrap()
}

fn assert_same_collateral(fetched: &Collateral, file: &Collateral) {
    let (a, b) = (fetched.raw(), file.raw());
    assert_eq!(a.pck_crl_issuer_chain, b.pck_crl_issuer_chain);
    assert_eq!(a.root_ca_crl, b.root_ca_crl);
    assert_eq!(a.pck_crl, b.pck_crl);
    assert_eq!(a.tcb_info_issuer_chain, b.tcb_info_issuer_chain);
    assert_eq!(a.tcb_info, b.tcb_info);
    assert_eq!(a.tcb_info_signature, b.tcb_info_signature);
    assert_eq!(a.qe_identity_issuer_chain, b.qe_identity_issuer_chain);
    assert_eq!(a.qe_identity, b.qe_identity);
    assert_eq!(a.qe_identity_signature, b.qe_identity_signature);
    assert_eq!(a.pck_certificate_chain, None);
    assert_eq!(fetched.fmspc(), FMSPC);
    assert_eq!(fetched.dates(), file.dates());
    assert_eq!(fetched.expires_at(), file.expires_at());
}

#[tokio::test]
async fn the_fetched_collateral_is_the_files_and_verifies_the_sample_quote() {
    let pccs = StandInPccs::start().await;
    let fetched = client(&pccs.url())
        .fetch(&FMSPC, PckCa::Platform)
        .await
        .unwrap();
    assert_same_collateral(&fetched, &file_collateral());
    let mut asked = pccs.requests();
    asked.sort();
    let mut expected = ROUTES.map(str::to_owned).to_vec();
    expected.sort();
    assert_eq!(asked, expected);

    // The sample quote verifies against it, as against the file.
    let quote = std::fs::read(fixtures().join("tdx_quote")).unwrap();
    let policy = Policy::load(&fixtures().join("policy.json")).unwrap();
    let verifier = Verifier::new(policy, CollateralStore::default());
    verifier.add_collateral(fetched);
    let binding = Binding::Exact(
        quote[REPORT_DATA_OFFSET..REPORT_DATA_OFFSET + 64]
            .try_into()
            .unwrap(),
    );
    let verdict = verifier.verify(
        &quote,
        &binding,
        UNIX_EPOCH + Duration::from_secs(GOOD_TIME),
    );
    assert!(verdict.is_verified(), "{verdict:?}");

    // A base URL given with the v4 path and a trailing slash asks the same URLs.
    let again = client(&format!("{}/sgx/certification/v4/", pccs.url()))
        .fetch(&FMSPC, PckCa::Platform)
        .await
        .unwrap();
    assert_same_collateral(&again, &file_collateral());
}

#[tokio::test]
async fn chunked_bodies_parse() {
    for chunk in [1, 7, 4096] {
        let pccs =
            StandInPccs::start_with(replies_for(&sample_collateral_path(), Some(chunk))).await;
        let fetched = client(&pccs.url())
            .fetch(&FMSPC, PckCa::Platform)
            .await
            .unwrap();
        assert_same_collateral(&fetched, &file_collateral());
    }
}

/// Fetches with one route replaced, expecting an error.
async fn fetch_with(path: &str, reply: Reply) -> PccsError {
    let pccs = StandInPccs::start().await;
    pccs.set(path, reply);
    let mut config = PccsConfig::new(pccs.url());
    config.timeout = Duration::from_millis(500);
    PccsClient::new(&config)
        .unwrap()
        .fetch(&FMSPC, PckCa::Platform)
        .await
        .unwrap_err()
}

fn ok_with(headers: Vec<(&str, &str)>, body: &[u8]) -> Reply {
    Reply::Http {
        status: 200,
        headers: headers
            .into_iter()
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect(),
        body: body.to_vec(),
        chunked: None,
    }
}

#[tokio::test]
async fn http_failures_are_typed_errors_naming_the_url() {
    // An FMSPC the PCCS does not know: 404, not transient.
    let err = fetch_with(TCB, Reply::status(404)).await;
    assert!(
        matches!(&err, PccsError::Http { status: 404, url } if url.ends_with(TCB)),
        "{err:?}"
    );
    assert!(!err.is_transient());
    assert!(err.to_string().contains("HTTP 404"), "{err}");

    let err = fetch_with(QE_IDENTITY, Reply::status(500)).await;
    assert!(
        matches!(&err, PccsError::Http { status: 500, url } if url.ends_with(QE_IDENTITY)),
        "{err:?}"
    );
    assert!(err.is_transient());

    // A PCK CRL without its issuer chain.
    let err = fetch_with(PCK_CRL, ok_with(vec![], b"\x30\x00")).await;
    assert!(
        matches!(&err, PccsError::MissingHeader { header: "SGX-PCK-CRL-Issuer-Chain", url } if url.ends_with(PCK_CRL)),
        "{err:?}"
    );

    // Garbage where JSON belongs, a signature that is not hex, an issuer chain that is not UTF-8.
    let chain = ("TCB-Info-Issuer-Chain", "x");
    let err = fetch_with(TCB, ok_with(vec![chain], b"<html>")).await;
    assert!(
        matches!(&err, PccsError::Body { url, .. } if url.ends_with(TCB)),
        "{err:?}"
    );
    let err = fetch_with(
        TCB,
        ok_with(vec![chain], br#"{"tcbInfo":{},"signature":"zz"}"#),
    )
    .await;
    assert!(
        matches!(&err, PccsError::Body { reason, .. } if reason.contains("signature")),
        "{err:?}"
    );
    let err = fetch_with(
        QE_IDENTITY,
        ok_with(
            vec![("SGX-Enclave-Identity-Issuer-Chain", "%FF%FE")],
            br#"{"enclaveIdentity":{},"signature":""}"#,
        ),
    )
    .await;
    assert!(
        matches!(&err, PccsError::Body { reason, .. } if reason.contains("UTF-8")),
        "{err:?}"
    );
    // A TCB info that parses as JSON but is not a TCB info.
    let err = fetch_with(
        TCB,
        ok_with(vec![chain], br#"{"tcbInfo":{},"signature":""}"#),
    )
    .await;
    assert!(
        matches!(&err, PccsError::Collateral { url, .. } if url.ends_with(TCB)),
        "{err:?}"
    );
    // A root CA CRL that is neither hex nor DER.
    let err = fetch_with(ROOT_CRL, ok_with(vec![], b"not a crl")).await;
    assert!(
        matches!(&err, PccsError::Body { url, .. } if url.ends_with(ROOT_CRL)),
        "{err:?}"
    );

    // Not HTTP at all; a body cut short; a server that never answers.
    let err = fetch_with(PCK_CRL, Reply::Raw(b"\x00\x01garbage\r\n\r\n".to_vec())).await;
    assert!(matches!(&err, PccsError::Body { .. }), "{err:?}");
    let err = fetch_with(
        PCK_CRL,
        Reply::Raw(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort".to_vec()),
    )
    .await;
    assert!(
        matches!(&err, PccsError::Body { reason, .. } if reason.contains("5 of its 100")),
        "{err:?}"
    );
    let err = fetch_with(QE_IDENTITY, Reply::Hang).await;
    assert!(
        matches!(&err, PccsError::Timeout { url, .. } if url.ends_with(QE_IDENTITY)),
        "{err:?}"
    );
    assert!(err.is_transient());
}

#[tokio::test]
async fn collateral_for_another_platform_is_refused() {
    // The TCB info of the other sample (FMSPC 90c06f000000) served for B0C06F000000.
    let other = replies_for(
        &fixtures().join("collateral/tdx_quote_outdated_collateral.json"),
        None,
    );
    let err = fetch_with(TCB, other[TCB].clone()).await;
    assert!(
        matches!(&err, PccsError::Collateral { reason, .. } if reason.contains("90c06f000000")),
        "{err:?}"
    );
}

#[tokio::test]
async fn oversized_refused_and_unreachable_answers_are_typed_errors() {
    let pccs = StandInPccs::start().await;
    let mut config = PccsConfig::new(pccs.url());
    config.max_response = 1_000;
    let err = PccsClient::new(&config)
        .unwrap()
        .fetch(&FMSPC, PckCa::Platform)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PccsError::TooLarge { limit: 1_000, .. }),
        "{err:?}"
    );

    // Connection refused: a port nobody listens on any more.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let err = client(&url)
        .fetch(&FMSPC, PckCa::Platform)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PccsError::Connect { url: u, .. } if u.starts_with(&url)),
        "{err:?}"
    );
    assert!(err.is_transient());

    // https:// to a server that does not speak TLS.
    let https = pccs.url().replace("http://", "https://");
    let err = client(&https)
        .fetch(&FMSPC, PckCa::Platform)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PccsError::Tls { url, .. } if url.starts_with(&https)),
        "{err:?}"
    );

    // Bad configuration: an unusable URL, a CA file that is missing or holds no certificate.
    let err = PccsClient::new(&PccsConfig::new("ftp://pccs.example")).unwrap_err();
    assert!(matches!(err, PccsError::Invalid { .. }), "{err:?}");
    let mut config = PccsConfig::new("https://pccs.example");
    config.extra_ca = Some(fixtures().join("no-such-ca.pem"));
    let err = PccsClient::new(&config).unwrap_err();
    assert!(matches!(err, PccsError::Roots { .. }), "{err:?}");
    config.extra_ca = Some(fixtures().join("policy.json"));
    let err = PccsClient::new(&config).unwrap_err();
    assert!(
        err.to_string().contains("holds no PEM certificate"),
        "{err}"
    );
}

/// https with a PCCS's own CA (`--pccs-ca`): the same collateral; without that CA, a TLS error.
#[tokio::test]
async fn https_with_the_pccs_ca() {
    let pccs = StandInPccs::start_tls().await;
    assert!(pccs.url().starts_with("https://127.0.0.1:"));
    let mut config = PccsConfig::new(pccs.url());
    config.extra_ca = Some(StandInPccs::ca_path());
    let fetched = PccsClient::new(&config)
        .unwrap()
        .fetch(&FMSPC, PckCa::Platform)
        .await
        .unwrap();
    assert_same_collateral(&fetched, &file_collateral());
    assert_eq!(pccs.requests().len(), 4);

    config.extra_ca = None;
    match PccsClient::new(&config) {
        // No system roots at all on this machine: said at construction.
        Err(err) => assert!(
            matches!(err, PccsError::Roots { path: None, .. }),
            "{err:?}"
        ),
        Ok(client) => {
            let err = client.fetch(&FMSPC, PckCa::Platform).await.unwrap_err();
            assert!(
                matches!(&err, PccsError::Tls { reason, .. } if reason.contains("certificate")),
                "{err:?}"
            );
            assert!(!err.is_transient());
        }
    }
}

/// Without a root CA CRL from the PCCS, the client falls back to the distribution point in Intel's root
/// certificate, as `dcap-qvl` does. This machine has no route there, so the fallback shows as an error
/// naming that URL (and, where there is a route, as success).
#[tokio::test]
async fn a_missing_root_crl_falls_back_to_the_distribution_point() {
    let pccs = StandInPccs::start().await;
    pccs.set(ROOT_CRL, Reply::status(404));
    let mut config = PccsConfig::new(pccs.url());
    config.timeout = Duration::from_secs(3);
    match PccsClient::new(&config)
        .unwrap()
        .fetch(&FMSPC, PckCa::Platform)
        .await
    {
        Ok(collateral) => assert_eq!(
            collateral.raw().root_ca_crl,
            file_collateral().raw().root_ca_crl
        ),
        Err(err) => assert!(
            err.to_string()
                .contains("https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"),
            "{err}"
        ),
    }
    assert_eq!(pccs.count(ROOT_CRL), 1);
}

#[test]
fn a_pccs_source_is_an_empty_store() {
    let store = CollateralStore::load(&CollateralSource::Url("http://127.0.0.1:1".into())).unwrap();
    assert!(store.is_empty());
}
