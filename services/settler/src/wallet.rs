//! The pool's wallet (v5r1, built and signed with tonlib-core) and its key.
//!
//! The key is an Ed25519 seed: 64 hex characters, or a 24-word TON mnemonic, read from a file or an
//! environment variable. It is never logged: [`PoolKey`]'s `Debug` shows the public key only.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use num_bigint::BigUint;
use tonlib_core::TonAddress;
use tonlib_core::cell::{BagOfCells, CellBuilder};
use tonlib_core::message::{CommonMsgInfo, InternalMessage, TonMessage, TransferMessage};
use tonlib_core::tlb_types::block::message::Message;
use tonlib_core::tlb_types::tlb::TLB;
use tonlib_core::wallet::mnemonic::{KeyPair, Mnemonic};
use tonlib_core::wallet::ton_wallet::TonWallet;
use tonlib_core::wallet::wallet_version::WalletVersion;

use crate::ledger::MAX_PAYOUTS;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the pool key file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("the environment variable {0} is not set")]
    MissingEnv(String),
    /// Only the settler may read the key: a file others can read is refused, not used.
    #[error(
        "the pool key file {path} is readable by other users (mode {mode:04o}); run `chmod 600 {path}` and own it as the settler's user"
    )]
    Exposed { path: String, mode: u32 },
    #[error(
        "the pool key is neither 64 hex characters (an Ed25519 seed) nor a 24-word TON mnemonic: {0}"
    )]
    Format(String),
    #[error("cannot derive the pool wallet: {0}")]
    Wallet(String),
}

#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("a settlement carries 1 to {MAX_PAYOUTS} transfers, not {0}")]
    PayoutCount(usize),
    #[error("transfer {index}: {reason}")]
    Destination { index: usize, reason: String },
    #[error("cannot build the wallet message: {0}")]
    Build(String),
}

/// The pool's signing key.
#[derive(Clone)]
pub struct PoolKey {
    pair: KeyPair,
}

impl fmt::Debug for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolKey")
            .field("public_key", &hex(&self.pair.public_key))
            .finish_non_exhaustive()
    }
}

impl PoolKey {
    /// From a 32-byte Ed25519 seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let kp = nacl::sign::generate_keypair(seed);
        Self {
            pair: KeyPair {
                public_key: kp.pkey.to_vec(),
                secret_key: kp.skey.to_vec(),
            },
        }
    }

    /// From text: 64 hex characters (a seed) or a 24-word mnemonic. Surrounding whitespace is ignored.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut seed = [0u8; 32];
            for (i, byte) in seed.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
                    .map_err(|e| KeyError::Format(e.to_string()))?;
            }
            return Ok(Self::from_seed(&seed));
        }
        let words = text.split_whitespace().count();
        if words != 24 {
            return Err(KeyError::Format(format!(
                "found {} characters and {words} words",
                text.len()
            )));
        }
        let mnemonic =
            Mnemonic::from_str(text, &None).map_err(|e| KeyError::Format(e.to_string()))?;
        let pair = mnemonic
            .to_key_pair()
            .map_err(|e| KeyError::Format(e.to_string()))?;
        Ok(Self { pair })
    }

    /// Reads the key from a file that only its owner can read (mode 0600 or 0400).
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        use std::os::unix::fs::PermissionsExt as _;
        let read_error = |e: std::io::Error| KeyError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let mode = std::fs::metadata(path)
            .map_err(read_error)?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed {
                path: path.display().to_string(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        Self::parse(&text)
    }

    pub fn from_env(var: &str) -> Result<Self, KeyError> {
        let text = std::env::var(var).map_err(|_| KeyError::MissingEnv(var.to_owned()))?;
        Self::parse(&text)
    }

    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(&self.pair.public_key[..32]);
        out
    }
}

/// A signed external message, ready to send and to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedMessage {
    /// The bag of cells (with CRC32).
    pub boc: Vec<u8>,
    /// Hash of the message cell: how its transaction is found.
    pub hash: [u8; 32],
}

impl SignedMessage {
    pub fn hash_hex(&self) -> String {
        hex(&self.hash)
    }
}

/// The pool's wallet v5r1 on workchain 0, with tonlib-core's default wallet id (the same as @ton/ton's
/// mainnet default, so both derive the same address).
#[derive(Clone)]
pub struct PoolWallet {
    wallet: TonWallet,
}

impl fmt::Debug for PoolWallet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolWallet")
            .field("address", &self.address())
            .finish_non_exhaustive()
    }
}

impl PoolWallet {
    pub fn new(key: &PoolKey) -> Result<Self, KeyError> {
        let wallet = TonWallet::new(WalletVersion::V5R1, key.pair.clone())
            .map_err(|e| KeyError::Wallet(e.to_string()))?;
        Ok(Self { wallet })
    }

    /// The wallet's address, user-friendly (bounceable, URL-safe).
    pub fn address(&self) -> String {
        self.wallet.address.to_base64_url()
    }

    pub fn ton_address(&self) -> &TonAddress {
        &self.wallet.address
    }

    /// Builds and signs one message carrying `transfers` (destination, nanoton), each non-bounceable (so a
    /// fresh address keeps what it is sent) with an empty body. `with_state_init` deploys the wallet with
    /// its first message.
    pub fn sign_transfers(
        &self,
        seqno: u32,
        valid_until: u32,
        transfers: &[(&str, u64)],
        with_state_init: bool,
    ) -> Result<SignedMessage, MessageError> {
        if transfers.is_empty() || transfers.len() > MAX_PAYOUTS {
            return Err(MessageError::PayoutCount(transfers.len()));
        }
        let build = |e: &dyn fmt::Display| MessageError::Build(e.to_string());
        let empty = CellBuilder::new().build().map_err(|e| build(&e))?.to_arc();
        let mut messages = Vec::with_capacity(transfers.len());
        for (index, (destination, amount)) in transfers.iter().enumerate() {
            let dest =
                TonAddress::from_str(destination).map_err(|e| MessageError::Destination {
                    index,
                    reason: format!("{destination:?} is not a TON address: {e}"),
                })?;
            let info = CommonMsgInfo::InternalMessage(InternalMessage {
                ihr_disabled: true,
                bounce: false,
                bounced: false,
                src: TonAddress::NULL,
                dest,
                value: BigUint::from(*amount),
                ihr_fee: BigUint::ZERO,
                fwd_fee: BigUint::ZERO,
                created_lt: 0,
                created_at: 0,
            });
            let cell = TransferMessage::new(info, empty.clone())
                .build()
                .map_err(|e| build(&e))?;
            messages.push(cell.to_arc());
        }
        let message = self
            .wallet
            .create_external_msg(valid_until, seqno, with_state_init, messages)
            .map_err(|e| build(&e))?;
        let hash: [u8; 32] = message.cell_hash().into();
        let boc = BagOfCells::from_root(message)
            .serialize(true)
            .map_err(|e| build(&e))?;
        Ok(SignedMessage { boc, hash })
    }
}

/// The one root cell of a bag of cells given in base64, as the API gives account data and message bodies.
fn single_root(boc_base64: &str) -> Option<tonlib_core::cell::ArcCell> {
    BagOfCells::parse_base64(boc_base64)
        .ok()?
        .single_root()
        .ok()
}

/// The seqno in a wallet v5r1's data (a bag of cells, base64): `signature_allowed:bit seqno:u32 …`.
pub fn seqno_from_data(data_boc_base64: &str) -> Option<u32> {
    let root = single_root(data_boc_base64)?;
    let mut parser = root.parser();
    parser.load_bit().ok()?;
    parser.load_u32(32).ok()
}

/// The seqno and valid_until a wallet v5r1 external message's body names (`0x7369676e wallet_id:i32
/// valid_until:u32 seqno:u32 …`, base64 bag of cells); `None` for any other body.
pub fn signed_request_seqno(body_boc_base64: &str) -> Option<(u32, u32)> {
    let root = single_root(body_boc_base64)?;
    let mut parser = root.parser();
    if parser.load_u32(32).ok()? != 0x7369_676e {
        return None;
    }
    parser.load_i32(32).ok()?;
    let valid_until = parser.load_u32(32).ok()?;
    let seqno = parser.load_u32(32).ok()?;
    Some((seqno, valid_until))
}

/// The hash of the signed body of an external message (a bag of cells): what the wallet's signature covers.
/// Unlike the message's own hash it does not depend on how the message around the body is laid out: anyone
/// relaying the message may move the body inline or into a reference (or change the source or import fee),
/// which changes the message's hash but not what executes (TEP-467). `None` when the bytes are no message.
pub fn external_body_hash(message_boc: &[u8]) -> Option<[u8; 32]> {
    let message = Message::from_boc(message_boc).ok()?;
    Some(tonlib_core::cell::Cell::cell_hash(&message.body.value).into())
}

/// The hash of a message body given as a base64 bag of cells (the API's `msg_data.body`).
pub fn body_hash(body_boc_base64: &str) -> Option<[u8; 32]> {
    let root = single_root(body_boc_base64)?;
    Some(tonlib_core::cell::Cell::cell_hash(&root).into())
}

/// Two addresses name the same account (whatever their flags or form).
pub fn same_account(a: &str, b: &str) -> bool {
    match (TonAddress::from_str(a), TonAddress::from_str(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_HEX: &str = "0101010101010101010101010101010101010101010101010101010101010101";

    #[test]
    fn keys_parse_from_hex_or_mnemonic_and_never_show_the_secret() {
        let key = PoolKey::parse(&format!("  {SEED_HEX}\n")).unwrap();
        assert_eq!(key.public_key(), PoolKey::from_seed(&[1; 32]).public_key());
        let shown = format!("{key:?}");
        assert!(!shown.contains(SEED_HEX), "{shown}");
        assert!(shown.contains(&hex(&key.public_key())));
        // tonlib-core's own v5r1 test vector: this mnemonic's wallet.
        let words = "section garden tomato dinner season dice renew length useful spin trade intact use universe what post spike keen mandate behind concert egg doll rug";
        let wallet = PoolWallet::new(&PoolKey::parse(words).unwrap()).unwrap();
        assert!(same_account(
            &wallet.address(),
            "UQDv2YSmlrlLH3hLNOVxC8FcQf4F9eGNs4vb2zKma4txo6i3"
        ));
        for bad in ["", "abc", &SEED_HEX[..62], "one two three"] {
            assert!(
                matches!(PoolKey::parse(bad), Err(KeyError::Format(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            PoolKey::from_env("COCOON_TEST_SURELY_UNSET_KEY"),
            Err(KeyError::MissingEnv(_))
        ));
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("cocoon-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pool.key");
        std::fs::write(&path, "11".repeat(32)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = PoolKey::from_file(&path);
        assert!(
            matches!(refused, Err(KeyError::Exposed { mode: 0o644, .. })),
            "{:?}",
            refused.err()
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(PoolKey::from_file(&path).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_message_laid_out_anew_keeps_its_body_hash_but_not_its_hash() {
        use tonlib_core::tlb_types::primitives::either::EitherRefLayout;
        let wallet = PoolWallet::new(&PoolKey::from_seed(&[3; 32])).unwrap();
        let to = wallet.address();
        for with_state_init in [false, true] {
            let signed = wallet
                .sign_transfers(7, 1_900_000_000, &[(&to, 5)], with_state_init)
                .unwrap();
            let mut relaid = Message::from_boc(&signed.boc).unwrap();
            // Ours carries the body inline; a relay may move it into a reference.
            assert_eq!(relaid.body.layout, EitherRefLayout::ToCell);
            relaid.body.layout = EitherRefLayout::ToRef;
            let relaid_boc = relaid.to_boc(true).unwrap();
            let relaid_hash: [u8; 32] = relaid.to_cell().unwrap().cell_hash().into();
            assert_ne!(
                relaid_hash, signed.hash,
                "another layout, another message hash"
            );
            let body = external_body_hash(&signed.boc).unwrap();
            assert_eq!(external_body_hash(&relaid_boc), Some(body));
            let body_boc = BagOfCells::from_root(
                Message::from_boc(&signed.boc)
                    .unwrap()
                    .body
                    .value
                    .as_ref()
                    .clone(),
            )
            .serialize(true)
            .unwrap();
            use base64::Engine as _;
            let body_b64 = base64::engine::general_purpose::STANDARD.encode(body_boc);
            assert_eq!(body_hash(&body_b64), Some(body));
            assert_eq!(signed_request_seqno(&body_b64).map(|s| s.0), Some(7));
        }
        assert_eq!(external_body_hash(b"not a message"), None);
    }

    #[test]
    fn messages_carry_1_to_255_transfers_to_valid_addresses() {
        let wallet = PoolWallet::new(&PoolKey::from_seed(&[2; 32])).unwrap();
        let to = wallet.address();
        let one = wallet
            .sign_transfers(0, 1_900_000_000, &[(&to, 5)], false)
            .unwrap();
        assert_eq!(&one.boc[..4], &[0xb5, 0xee, 0x9c, 0x72], "a bag of cells");
        let again = wallet
            .sign_transfers(0, 1_900_000_000, &[(&to, 5)], false)
            .unwrap();
        assert_eq!(
            one, again,
            "signing is deterministic: a resend is the identical message"
        );
        let full: Vec<(&str, u64)> = (0..255).map(|i| (to.as_str(), i + 1)).collect();
        assert!(
            wallet
                .sign_transfers(1, 1_900_000_000, &full, false)
                .is_ok()
        );
        let too_many: Vec<(&str, u64)> = (0..256).map(|i| (to.as_str(), i + 1)).collect();
        assert!(matches!(
            wallet.sign_transfers(1, 1, &too_many, false),
            Err(MessageError::PayoutCount(256))
        ));
        assert!(matches!(
            wallet.sign_transfers(1, 1, &[], false),
            Err(MessageError::PayoutCount(0))
        ));
        assert!(matches!(
            wallet.sign_transfers(1, 1, &[(&to, 1), ("nope", 2)], false),
            Err(MessageError::Destination { index: 1, .. })
        ));
    }
}
