//! A client for the toncenter v2 HTTP API: the four calls the settler needs (sendBocReturnHash,
//! getTransactions, runGetMethod `seqno`, getAddressBalance) and getAddressInformation for the wallet's state.
//! The API key travels in the `X-API-Key` header and is never logged.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use httpc::{HttpClient, HttpError, HttpResponse};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum TonError {
    #[error(transparent)]
    Transport(#[from] HttpError),
    /// The API answered with an error (`ok: false` or an HTTP error status).
    #[error("{method}: the API answered {status}: {error}")]
    Api {
        method: &'static str,
        status: u16,
        error: String,
    },
    #[error("{method}: unexpected answer: {reason}")]
    Body {
        method: &'static str,
        reason: String,
    },
}

impl TonError {
    /// Whether trying again later may succeed: the network, a timeout, rate limits, 5xx. A rejected
    /// external message is an HTTP 500 too, which is why [`Toncenter::send_boc`] tells it apart.
    pub fn is_transient(&self) -> bool {
        match self {
            TonError::Transport(e) => e.is_transient(),
            TonError::Api { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            TonError::Body { .. } => false,
        }
    }
}

/// The result of sending an external message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// Accepted for delivery; the hash the API computed (base64).
    Accepted { hash: String },
    /// Refused: the contract would not accept it now (an old seqno, expired, already executed).
    Refused { reason: String },
}

/// One outgoing message of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutMessage {
    pub destination: String,
    pub value: u64,
}

/// A wallet transaction, as far as settling needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub lt: u64,
    /// Base64, as the API gives it.
    pub hash: String,
    pub utime: u64,
    /// Total fees, nanoton.
    pub fee: u64,
    /// Hash (base64) of the inbound message.
    pub in_msg_hash: Option<String>,
    /// Whether the inbound message is external (no source): a wallet's signed request.
    pub in_msg_external: bool,
    /// The inbound message's body, a bag of cells (base64), when given.
    pub in_msg_body: Option<String>,
    pub out_msgs: Vec<OutMessage>,
    /// Extra detail some servers give (the local TON server does): the compute and action phases.
    pub aborted: Option<bool>,
    pub action_result_code: Option<i64>,
    pub skipped_actions: Option<u64>,
}

impl Transaction {
    /// The transaction's hash in hex (how settlements record it).
    pub fn hash_hex(&self) -> String {
        B64.decode(&self.hash)
            .map(|b| crate::wallet::hex(&b))
            .unwrap_or_else(|_| self.hash.clone())
    }
}

/// The state of an account, as one node saw it at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountInfo {
    pub balance: u64,
    /// `active`, `uninitialized` or `frozen`.
    pub state: String,
    /// The contract's data, a bag of cells (base64); empty unless active.
    pub data: String,
    /// The chain's time (Unix seconds) of the state this answer describes.
    pub sync_utime: Option<u64>,
}

#[derive(Clone)]
pub struct Toncenter {
    base: String,
    api_key: Option<String>,
    http: HttpClient,
}

impl fmt::Debug for Toncenter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Toncenter")
            .field("base", &self.base)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Envelope {
    ok: bool,
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    error: Option<String>,
}

impl Toncenter {
    /// `base` is the API's root, e.g. `https://toncenter.com/api/v2` (a trailing `/` is ignored; without
    /// `/api/v2` it is added).
    pub fn new(base: &str, api_key: Option<String>, http: HttpClient) -> Self {
        let mut base = base.trim_end_matches('/').to_owned();
        if !base.ends_with("/api/v2") {
            base.push_str("/api/v2");
        }
        Self {
            base,
            api_key: api_key.filter(|k| !k.is_empty()),
            http,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn headers(&self) -> Vec<(&str, &str)> {
        let mut headers = vec![("Accept", "application/json")];
        if let Some(key) = &self.api_key {
            headers.push(("X-API-Key", key.as_str()));
        }
        headers
    }

    async fn call_get(&self, method: &'static str, query: &str) -> Result<Value, TonError> {
        let url = format!("{}/{method}?{query}", self.base);
        let response = self.http.get(&url, &self.headers()).await?;
        unwrap_envelope(method, &response)
    }

    async fn call_post(&self, method: &'static str, body: &Value) -> Result<Value, TonError> {
        let url = format!("{}/{method}", self.base);
        let body = serde_json::to_vec(body).map_err(|e| TonError::Body {
            method,
            reason: e.to_string(),
        })?;
        let response = self
            .http
            .post(&url, &self.headers(), "application/json", &body)
            .await?;
        unwrap_envelope(method, &response)
    }

    /// Sends a signed external message (`sendBocReturnHash`).
    pub async fn send_boc(&self, boc: &[u8]) -> Result<SendOutcome, TonError> {
        let body = serde_json::json!({ "boc": B64.encode(boc) });
        match self.call_post("sendBocReturnHash", &body).await {
            Ok(result) => {
                let hash = result
                    .get("hash")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                Ok(SendOutcome::Accepted { hash })
            }
            // toncenter's answer when the contract refuses the message in its check before acceptance.
            Err(TonError::Api { error, .. })
                if error.contains("cannot apply external message")
                    || error.contains("not accepted") =>
            {
                Ok(SendOutcome::Refused { reason: error })
            }
            Err(e) => Err(e),
        }
    }

    /// The wallet's seqno, or `None` when the account is not active (no code to run).
    pub async fn seqno(&self, address: &str) -> Result<Option<u32>, TonError> {
        let body = serde_json::json!({ "address": address, "method": "seqno", "stack": [] });
        let result = self.call_post("runGetMethod", &body).await?;
        let exit_code = result.get("exit_code").and_then(Value::as_i64).unwrap_or(0);
        if exit_code != 0 {
            return Ok(None);
        }
        let bad = |reason: String| TonError::Body {
            method: "runGetMethod",
            reason,
        };
        let value = result
            .get("stack")
            .and_then(Value::as_array)
            .and_then(|s| s.first())
            .and_then(Value::as_array)
            .and_then(|entry| entry.get(1))
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("no number on the stack: {result}")))?;
        let digits = value.trim_start_matches("0x");
        let seqno =
            u64::from_str_radix(digits, 16).map_err(|e| bad(format!("seqno {value:?}: {e}")))?;
        u32::try_from(seqno)
            .map(Some)
            .map_err(|_| bad(format!("seqno {seqno} out of range")))
    }

    pub async fn balance(&self, address: &str) -> Result<u64, TonError> {
        let result = self
            .call_get("getAddressBalance", &format!("address={}", encode(address)))
            .await?;
        number("getAddressBalance", &result)
    }

    pub async fn account(&self, address: &str) -> Result<AccountInfo, TonError> {
        let result = self
            .call_get(
                "getAddressInformation",
                &format!("address={}", encode(address)),
            )
            .await?;
        let balance = result
            .get("balance")
            .map(|b| number("getAddressInformation", b))
            .transpose()?
            .unwrap_or(0);
        let text = |k: &str| {
            result
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let state = match text("state") {
            s if s.is_empty() => "uninitialized".to_owned(),
            s => s,
        };
        Ok(AccountInfo {
            balance,
            state,
            data: text("data"),
            sync_utime: result.get("sync_utime").and_then(Value::as_u64),
        })
    }

    /// Up to `limit` transactions of `address`, newest first, starting at `from` (lt, base64 hash)
    /// inclusive when given.
    pub async fn transactions(
        &self,
        address: &str,
        limit: u32,
        from: Option<(u64, &str)>,
    ) -> Result<Vec<Transaction>, TonError> {
        let mut query = format!("address={}&limit={limit}&archival=true", encode(address));
        if let Some((lt, hash)) = from {
            query.push_str(&format!("&lt={lt}&hash={}", encode(hash)));
        }
        let result = self.call_get("getTransactions", &query).await?;
        let items: Vec<RawTransaction> = parse("getTransactions", result)?;
        items.into_iter().map(RawTransaction::into_tx).collect()
    }
}

fn unwrap_envelope(method: &'static str, response: &HttpResponse) -> Result<Value, TonError> {
    let envelope: Result<Envelope, _> = serde_json::from_slice(&response.body);
    match envelope {
        Ok(Envelope {
            ok: true,
            result: Some(result),
            ..
        }) if (200..300).contains(&response.status) => Ok(result),
        Ok(e) => Err(TonError::Api {
            method,
            status: response.status,
            error: e
                .error
                .unwrap_or_else(|| "no result and no error given".to_owned()),
        }),
        Err(_) if !(200..300).contains(&response.status) => Err(TonError::Api {
            method,
            status: response.status,
            error: String::from_utf8_lossy(&response.body)
                .chars()
                .take(300)
                .collect(),
        }),
        Err(e) => Err(TonError::Body {
            method,
            reason: format!("not a toncenter answer: {e}"),
        }),
    }
}

fn parse<T: DeserializeOwned>(method: &'static str, value: Value) -> Result<T, TonError> {
    serde_json::from_value(value).map_err(|e| TonError::Body {
        method,
        reason: e.to_string(),
    })
}

/// toncenter gives nanoton as decimal strings (sometimes as numbers).
fn number(method: &'static str, value: &Value) -> Result<u64, TonError> {
    match value {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
    .ok_or_else(|| TonError::Body {
        method,
        reason: format!("{value} is not an amount"),
    })
}

/// Percent-encodes a query value (addresses carry `+`, `/`, `=` in base64 forms).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Deserialize)]
struct RawTransactionId {
    lt: Value,
    hash: String,
}

#[derive(Deserialize)]
struct RawMessageData {
    #[serde(default)]
    body: Option<String>,
}

#[derive(Deserialize)]
struct RawMessage {
    #[serde(default)]
    hash: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    msg_data: Option<RawMessageData>,
    #[serde(default)]
    destination: Option<String>,
    #[serde(default)]
    value: Option<Value>,
}

#[derive(Deserialize, Default)]
struct RawDescription {
    #[serde(default)]
    aborted: Option<bool>,
    #[serde(default)]
    action_result_code: Option<i64>,
    #[serde(default)]
    skipped_actions: Option<u64>,
}

#[derive(Deserialize)]
struct RawTransaction {
    transaction_id: RawTransactionId,
    #[serde(default)]
    utime: u64,
    #[serde(default)]
    fee: Option<Value>,
    #[serde(default)]
    in_msg: Option<RawMessage>,
    #[serde(default)]
    out_msgs: Vec<RawMessage>,
    #[serde(default)]
    description: Option<RawDescription>,
}

impl RawTransaction {
    fn into_tx(self) -> Result<Transaction, TonError> {
        const M: &str = "getTransactions";
        let description = self.description.unwrap_or_default();
        let out_msgs = self
            .out_msgs
            .into_iter()
            .map(|m| {
                Ok(OutMessage {
                    destination: m.destination.unwrap_or_default(),
                    value: m
                        .value
                        .as_ref()
                        .map(|v| number(M, v))
                        .transpose()?
                        .unwrap_or(0),
                })
            })
            .collect::<Result<_, TonError>>()?;
        Ok(Transaction {
            lt: number(M, &self.transaction_id.lt)?,
            hash: self.transaction_id.hash,
            utime: self.utime,
            fee: self
                .fee
                .as_ref()
                .map(|f| number(M, f))
                .transpose()?
                .unwrap_or(0),
            in_msg_external: self
                .in_msg
                .as_ref()
                .is_some_and(|m| m.source.as_deref().unwrap_or_default().is_empty()),
            in_msg_body: self
                .in_msg
                .as_ref()
                .and_then(|m| m.msg_data.as_ref())
                .and_then(|d| d.body.clone()),
            in_msg_hash: self.in_msg.and_then(|m| m.hash),
            out_msgs,
            aborted: description.aborted,
            action_result_code: description.action_result_code,
            skipped_actions: description.skipped_actions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transactions_parse_toncenter_shapes() {
        let raw = serde_json::json!([{
            "@type": "raw.transaction", "utime": 1_700_000_000u64,
            "transaction_id": {"@type": "internal.transactionId", "lt": "47000000000001", "hash": "q83vEjRWeJA="},
            "fee": "3100000",
            "in_msg": {"hash": "abc=", "source": "", "destination": "EQ..", "value": "0"},
            "out_msgs": [{"destination": "UQBvW8Z5huBkMJYdnfAEM5JqTNkuWX3diqYENkWsIL0XggGG", "value": "18517"}]
        }]);
        let items: Vec<RawTransaction> = parse("getTransactions", raw).unwrap();
        let tx = items.into_iter().next().unwrap().into_tx().unwrap();
        assert_eq!(tx.lt, 47_000_000_000_001);
        assert_eq!(tx.fee, 3_100_000);
        assert_eq!(tx.in_msg_hash.as_deref(), Some("abc="));
        assert_eq!(tx.out_msgs[0].value, 18_517);
        assert_eq!(tx.hash_hex(), "abcdef1234567890");
        assert_eq!(tx.aborted, None);
    }

    #[test]
    fn error_answers_are_typed() {
        let refused = HttpResponse {
            status: 500,
            headers: vec![],
            body: br#"{"ok":false,"error":"LITE_SERVER_UNKNOWN: cannot apply external message to current state","code":500}"#.to_vec(),
        };
        match unwrap_envelope("sendBocReturnHash", &refused) {
            Err(TonError::Api {
                status: 500, error, ..
            }) => {
                assert!(error.contains("cannot apply external message"))
            }
            other => panic!("{other:?}"),
        }
        let html = HttpResponse {
            status: 502,
            headers: vec![],
            body: b"<html>bad gateway</html>".to_vec(),
        };
        let e = unwrap_envelope("getTransactions", &html).unwrap_err();
        assert!(e.is_transient(), "{e}");
        let garbage = HttpResponse {
            status: 200,
            headers: vec![],
            body: b"nope".to_vec(),
        };
        let e = unwrap_envelope("getTransactions", &garbage).unwrap_err();
        assert!(!e.is_transient(), "{e}");
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("EQ+a/b="), "EQ%2Ba%2Fb%3D");
        assert_eq!(encode("0:ab"), "0:ab");
    }
}
