//! The local toncenter (`infra/ton-local`, the real TVM through @ton/sandbox)
//! starts with a funded wallet v5r1, and its development endpoints work.

use tests::TonLocal;
use uuid::Uuid;

#[tokio::test]
async fn ton_local_starts_with_a_funded_wallet_and_dev_endpoints_work() {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(Uuid::now_v7().as_bytes());
    key[16..].copy_from_slice(Uuid::now_v7().as_bytes());
    let balance = 7_000_000_000;
    let ton = TonLocal::start(&key, balance).await;
    assert!(ton.url().starts_with("http://127.0.0.1:"), "{}", ton.url());
    assert!(ton.wallet_raw().starts_with("0:"), "{}", ton.wallet_raw());
    assert_eq!(ton.balance(ton.wallet()).await, balance);
    assert_eq!(ton.balance(ton.wallet_raw()).await, balance);

    // A fresh account: nothing, then funded (non-bounceable, so it stays).
    let fresh = format!("0:{}", Uuid::now_v7().simple().to_string().repeat(2));
    assert_eq!(ton.balance(&fresh).await, 0);
    ton.fund(&fresh, 1_500_000_000).await;
    assert_eq!(ton.balance(&fresh).await, 1_500_000_000);

    ton.set_balance(ton.wallet(), 123).await;
    assert_eq!(ton.balance(ton.wallet()).await, 123);

    // The wallet is deployed: seqno 0.
    let (status, seqno) = ton
        .request(
            "/api/v2/runGetMethod",
            Some(&serde_json::json!({ "address": ton.wallet(), "method": "seqno", "stack": [] })),
        )
        .await;
    assert_eq!(status, 200, "{seqno}");
    assert_eq!(seqno["result"]["exit_code"], 0, "{seqno}");
    assert_eq!(seqno["result"]["stack"][0][1], "0x0", "{seqno}");

    // Fault injection toggles; a malformed message is refused with 400.
    ton.set_drop_externals(true).await;
    ton.set_drop_externals(false).await;
    let (status, answer) = ton
        .request(
            "/api/v2/sendBocReturnHash",
            Some(&serde_json::json!({ "boc": "not base64!" })),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["ok"], false);
    // GET with a query string works too.
    let (status, answer) = ton
        .request(
            &format!("/api/v2/getTransactions?address={}&limit=5", ton.wallet()),
            None,
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["result"].as_array().map(Vec::len),
        Some(1),
        "the deployment: {answer}"
    );
}
