//! Envelope for provider tokens at rest: AES-256-GCM with a fresh random
//! 96-bit nonce per encryption and associated data that binds a ciphertext to
//! its organization and row, so a ciphertext copied elsewhere fails to open.

use std::collections::BTreeMap;
use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use uuid::Uuid;

/// Why a keyring could not be built from its configuration string.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyringError {
    #[error("no encryption key configured")]
    Empty,
    #[error("entry {0} is not `<id>:<base64 key>`")]
    Malformed(usize),
    #[error("entry {0}: key id must be a positive integer")]
    BadId(usize),
    #[error("entry {0}: key is not valid base64")]
    BadBase64(usize),
    #[error("entry {0}: key must be exactly 32 bytes, got {1}")]
    BadLength(usize, usize),
    #[error("key id {0} appears twice")]
    Duplicate(u32),
}

/// Why a sealed token could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error(
        "token was encrypted with key id {0}, which is not configured in LLMGW_ENCRYPTION_KEYS"
    )]
    UnknownKey(i32),
    #[error(
        "token ciphertext failed authentication (wrong key, tampered, or copied from another row)"
    )]
    Authentication,
    #[error("stored nonce has the wrong length")]
    BadNonce,
}

/// A ciphertext with everything needed to open it again.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: i32,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("key_id", &self.key_id)
            .field("len", &self.ciphertext.len())
            .finish()
    }
}

/// All configured data-encryption keys; the highest id encrypts, all decrypt.
#[derive(Clone)]
pub struct Keyring {
    keys: BTreeMap<u32, Aes256Gcm>,
    active: u32,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .field("active", &self.active)
            .finish()
    }
}

impl Keyring {
    /// Parses `1:<base64 32 bytes>,2:<…>`.
    pub fn parse(spec: &str) -> Result<Self, KeyringError> {
        let mut keys = BTreeMap::new();
        for (i, entry) in spec.split(',').map(str::trim).enumerate() {
            if entry.is_empty() {
                continue;
            }
            let n = i + 1;
            let (id, material) = entry.split_once(':').ok_or(KeyringError::Malformed(n))?;
            let id: u32 = id.trim().parse().map_err(|_| KeyringError::BadId(n))?;
            if id == 0 || id > i32::MAX as u32 {
                return Err(KeyringError::BadId(n));
            }
            let bytes = B64
                .decode(material.trim())
                .map_err(|_| KeyringError::BadBase64(n))?;
            if bytes.len() != 32 {
                return Err(KeyringError::BadLength(n, bytes.len()));
            }
            let cipher = Aes256Gcm::new_from_slice(&bytes)
                .map_err(|_| KeyringError::BadLength(n, bytes.len()))?;
            if keys.insert(id, cipher).is_some() {
                return Err(KeyringError::Duplicate(id));
            }
        }
        let active = *keys.keys().next_back().ok_or(KeyringError::Empty)?;
        Ok(Self { keys, active })
    }

    /// A new random key in the configuration format's base64.
    pub fn generate_key_material() -> String {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        B64.encode(key)
    }

    /// The id of the key used for new encryptions.
    pub fn active_id(&self) -> i32 {
        self.active as i32
    }

    fn aad(org_id: Uuid, row_id: Uuid) -> [u8; 40] {
        let mut aad = [0u8; 40];
        aad[..8].copy_from_slice(b"llmgw:pk");
        aad[8..24].copy_from_slice(org_id.as_bytes());
        aad[24..].copy_from_slice(row_id.as_bytes());
        aad
    }

    /// Encrypts `plaintext` for the row `row_id` of organization `org_id`.
    pub fn seal(&self, org_id: Uuid, row_id: Uuid, plaintext: &[u8]) -> Sealed {
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let cipher = &self.keys[&self.active];
        let aad = Self::aad(org_id, row_id);
        let ciphertext = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .expect("AES-GCM encryption of a bounded buffer cannot fail");
        Sealed {
            key_id: self.active as i32,
            nonce: nonce.to_vec(),
            ciphertext,
        }
    }

    /// Decrypts a sealed value of row `row_id` in organization `org_id`.
    pub fn open(
        &self,
        org_id: Uuid,
        row_id: Uuid,
        sealed: &Sealed,
    ) -> Result<Vec<u8>, CryptoError> {
        let cipher = u32::try_from(sealed.key_id)
            .ok()
            .and_then(|id| self.keys.get(&id))
            .ok_or(CryptoError::UnknownKey(sealed.key_id))?;
        if sealed.nonce.len() != 12 {
            return Err(CryptoError::BadNonce);
        }
        let aad = Self::aad(org_id, row_id);
        cipher
            .decrypt(
                Nonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::Authentication)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(spec: &str) -> Keyring {
        Keyring::parse(spec).unwrap()
    }

    fn key() -> String {
        Keyring::generate_key_material()
    }

    #[test]
    fn round_trip_and_fresh_nonce() {
        let k = ring(&format!("1:{}", key()));
        let (org, row) = (Uuid::new_v4(), Uuid::new_v4());
        let a = k.seal(org, row, b"sk-secret");
        let b = k.seal(org, row, b"sk-secret");
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
        assert_eq!(k.open(org, row, &a).unwrap(), b"sk-secret");
        assert_eq!(k.open(org, row, &b).unwrap(), b"sk-secret");
    }

    #[test]
    fn copied_ciphertext_and_flipped_bits_fail() {
        let k = ring(&format!("1:{}", key()));
        let (org, row) = (Uuid::new_v4(), Uuid::new_v4());
        let s = k.seal(org, row, b"sk-secret");
        assert_eq!(
            k.open(org, Uuid::new_v4(), &s),
            Err(CryptoError::Authentication)
        );
        assert_eq!(
            k.open(Uuid::new_v4(), row, &s),
            Err(CryptoError::Authentication)
        );
        for i in 0..s.ciphertext.len() {
            let mut t = s.clone();
            t.ciphertext[i] ^= 0x01;
            assert_eq!(k.open(org, row, &t), Err(CryptoError::Authentication));
        }
        let mut t = s.clone();
        t.nonce[0] ^= 0x80;
        assert_eq!(k.open(org, row, &t), Err(CryptoError::Authentication));
    }

    #[test]
    fn highest_id_encrypts_and_retired_key_is_named() {
        let (k1, k2) = (key(), key());
        let both = ring(&format!("2:{k2},1:{k1}"));
        assert_eq!(both.active_id(), 2);
        let (org, row) = (Uuid::new_v4(), Uuid::new_v4());
        let old = ring(&format!("1:{k1}")).seal(org, row, b"t");
        assert_eq!(both.open(org, row, &old).unwrap(), b"t");
        let only2 = ring(&format!("2:{k2}"));
        let err = only2.open(org, row, &old).unwrap_err();
        assert_eq!(err, CryptoError::UnknownKey(1));
        assert!(err.to_string().contains("key id 1"));
        let wrong = ring(&format!("1:{}", key()));
        assert_eq!(wrong.open(org, row, &old), Err(CryptoError::Authentication));
    }

    #[test]
    fn bad_specs_are_refused_clearly() {
        assert_eq!(Keyring::parse("").unwrap_err(), KeyringError::Empty);
        assert_eq!(
            Keyring::parse("abc").unwrap_err(),
            KeyringError::Malformed(1)
        );
        assert_eq!(
            Keyring::parse("x:AAAA").unwrap_err(),
            KeyringError::BadId(1)
        );
        assert_eq!(
            Keyring::parse("0:AAAA").unwrap_err(),
            KeyringError::BadId(1)
        );
        assert_eq!(
            Keyring::parse("1:!!!").unwrap_err(),
            KeyringError::BadBase64(1)
        );
        assert_eq!(
            Keyring::parse("1:AAAA").unwrap_err(),
            KeyringError::BadLength(1, 3)
        );
        let k = key();
        assert_eq!(
            Keyring::parse(&format!("1:{k},1:{k}")).unwrap_err(),
            KeyringError::Duplicate(1)
        );
        assert!(!format!("{:?}", ring(&format!("1:{k}"))).contains(&k));
    }
}
