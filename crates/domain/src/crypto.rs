//! Envelope for provider tokens at rest: AES-256-GCM with a fresh random
//! 96-bit nonce per encryption and associated data that binds a ciphertext to
//! its organization, its row and the base URL it may be sent to, so a
//! ciphertext copied elsewhere, or left behind when the URL is changed (in
//! the API or in SQL), fails to open.
//!
//! # Associated-data versions, and why there is no downgrade
//!
//! - Version 1 (the first release): `"llmgw:pk" ‖ org id ‖ row id`. It did
//!   not name the URL, so whoever could change `base_url` (an admin through
//!   PATCH, or anyone with SQL access) could have the token sent elsewhere.
//! - Version 2: `"llmgw:pk:v2\0" ‖ org id ‖ row id ‖ u32 length ‖ base URL`,
//!   the URL exactly as stored (normalized by `BaseUrl::parse` when saved),
//!   which is the string the gateway and the connectivity test connect to.
//!
//! Version 2 seals three kinds of value, told apart by the first bytes of
//! their associated data so that none opens as another ([`Purpose`]):
//! a provider's own token (`"llmgw:pk:v2\0"`, above), the token of one of
//! its further endpoints (`"llmgw:pe:v2\0"`, bound the same way to the
//! endpoint's own row and URL) and a provider's static headers
//! (`"llmgw:ph:v2\0"`, bound to the org and the provider's row, with an
//! empty URL: they go to every endpoint of the provider).
//!
//! [`Keyring::open`] opens version 2 only. A row labelled version 1 is never
//! opened on a path that sends the token anywhere: the only opener of
//! version 1 is [`Keyring::open_legacy`], used by the re-seal that rewrites
//! such rows as version 2 (at start-up, right after migrating, and in
//! `llmgw keys rotate`). Relabelling a version-2 row as version 1 in SQL
//! gains nothing: its ciphertext was sealed with version-2 data, so the
//! version-1 opener fails to authenticate it and the re-seal skips it.
//! The versions' associated data differ from their first bytes on, so no
//! ciphertext authenticates under both.
//!
//! What no scheme keyed only by configuration can refuse is a genuine
//! version-1 ciphertext put back from a backup taken before the upgrade:
//! the re-seal cannot tell it from a row not yet upgraded. Rotating the
//! encryption key after the upgrade (`llmgw keys rotate`, then removing the
//! old key id from `LLMGW_ENCRYPTION_KEYS`) makes such copies unopenable.

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
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
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
    #[error(
        "token is sealed in the legacy format that does not bind its base URL; it is re-sealed at start-up or by `llmgw keys rotate`"
    )]
    LegacyFormat,
    #[error("token is sealed in an unknown associated-data format ({0})")]
    UnknownFormat(i16),
}

/// Associated-data format of the first release: org and row only.
pub const AAD_V1: i16 = 1;
/// Current associated-data format: org, row and base URL.
pub const AAD_V2: i16 = 2;

/// What kind of value is sealed; part of the associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A provider's own token (`provider_keys`).
    ProviderToken,
    /// The token of a provider's further endpoint (`provider_endpoints`).
    EndpointToken,
    /// A provider's static extra headers, names and values (`provider_keys`).
    ProviderHeaders,
}

impl Purpose {
    fn aad_prefix(self) -> &'static [u8; 12] {
        match self {
            Self::ProviderToken => b"llmgw:pk:v2\0",
            Self::EndpointToken => b"llmgw:pe:v2\0",
            Self::ProviderHeaders => b"llmgw:ph:v2\0",
        }
    }
}

/// What a sealed value is bound to: it opens only as this kind of value,
/// for this org, this row and this exact base URL.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    pub purpose: Purpose,
    pub org_id: Uuid,
    pub row_id: Uuid,
    pub base_url: &'a str,
}

impl<'a> Binding<'a> {
    /// A provider's own token, sent to the provider's base URL.
    pub fn provider_token(org_id: Uuid, row_id: Uuid, base_url: &'a str) -> Self {
        Self {
            purpose: Purpose::ProviderToken,
            org_id,
            row_id,
            base_url,
        }
    }

    /// A further endpoint's token, sent to that endpoint's base URL.
    pub fn endpoint_token(org_id: Uuid, row_id: Uuid, base_url: &'a str) -> Self {
        Self {
            purpose: Purpose::EndpointToken,
            org_id,
            row_id,
            base_url,
        }
    }

    /// A provider's static headers, sent to each of its endpoints.
    pub fn provider_headers(org_id: Uuid, row_id: Uuid) -> Self {
        Self {
            purpose: Purpose::ProviderHeaders,
            org_id,
            row_id,
            base_url: "",
        }
    }
}

/// A ciphertext with everything needed to open it again.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: i32,
    /// [`AAD_V1`] or [`AAD_V2`].
    pub aad_version: i16,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl Sealed {
    /// A sealed value as its four stored columns hold it.
    pub fn from_columns(key_id: i32, aad_version: i16, nonce: &[u8], ciphertext: &[u8]) -> Self {
        Self {
            key_id,
            aad_version,
            nonce: nonce.to_vec(),
            ciphertext: ciphertext.to_vec(),
        }
    }
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("key_id", &self.key_id)
            .field("aad_version", &self.aad_version)
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

    fn aad_v1(org_id: Uuid, row_id: Uuid) -> Vec<u8> {
        let mut aad = Vec::with_capacity(40);
        aad.extend_from_slice(b"llmgw:pk");
        aad.extend_from_slice(org_id.as_bytes());
        aad.extend_from_slice(row_id.as_bytes());
        aad
    }

    fn aad_v2(b: &Binding<'_>) -> Vec<u8> {
        // The length prefix keeps the encoding unambiguous should anything
        // ever follow the URL.
        let url = b.base_url.as_bytes();
        let mut aad = Vec::with_capacity(12 + 32 + 4 + url.len());
        aad.extend_from_slice(b.purpose.aad_prefix());
        aad.extend_from_slice(b.org_id.as_bytes());
        aad.extend_from_slice(b.row_id.as_bytes());
        aad.extend_from_slice(&(url.len() as u32).to_be_bytes());
        aad.extend_from_slice(url);
        aad
    }

    /// Encrypts `plaintext` for `binding`, in the current format.
    pub fn seal(&self, binding: &Binding<'_>, plaintext: &[u8]) -> Sealed {
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let cipher = &self.keys[&self.active];
        let aad = Self::aad_v2(binding);
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
            aad_version: AAD_V2,
            nonce: nonce.to_vec(),
            ciphertext,
        }
    }

    /// Decrypts a value sealed for `binding`. Only the current format opens:
    /// a legacy one is [`CryptoError::LegacyFormat`] (see the module docs).
    pub fn open(&self, binding: &Binding<'_>, sealed: &Sealed) -> Result<Vec<u8>, CryptoError> {
        match sealed.aad_version {
            AAD_V2 => self.decrypt(sealed, &Self::aad_v2(binding)),
            AAD_V1 => Err(CryptoError::LegacyFormat),
            v => Err(CryptoError::UnknownFormat(v)),
        }
    }

    /// Decrypts a version-1 value, for re-sealing it as version 2 and
    /// nothing else: version 1 does not bind the base URL. Its one caller
    /// is storage's re-seal, which writes the result back sealed as version 2.
    pub fn open_legacy(
        &self,
        org_id: Uuid,
        row_id: Uuid,
        sealed: &Sealed,
    ) -> Result<Vec<u8>, CryptoError> {
        match sealed.aad_version {
            AAD_V1 => self.decrypt(sealed, &Self::aad_v1(org_id, row_id)),
            v => Err(CryptoError::UnknownFormat(v)),
        }
    }

    fn decrypt(&self, sealed: &Sealed, aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let cipher = u32::try_from(sealed.key_id)
            .ok()
            .and_then(|id| self.keys.get(&id))
            .ok_or(CryptoError::UnknownKey(sealed.key_id))?;
        if sealed.nonce.len() != 12 {
            return Err(CryptoError::BadNonce);
        }
        cipher
            .decrypt(
                Nonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad,
                },
            )
            .map_err(|_| CryptoError::Authentication)
    }

    /// Seals in the legacy format, so tests can make the rows an upgraded
    /// database starts with.
    #[cfg(test)]
    fn seal_legacy(&self, org_id: Uuid, row_id: Uuid, plaintext: &[u8]) -> Sealed {
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ciphertext = self.keys[&self.active]
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &Self::aad_v1(org_id, row_id),
                },
            )
            .expect("AES-GCM encryption of a bounded buffer cannot fail");
        Sealed {
            key_id: self.active as i32,
            aad_version: AAD_V1,
            nonce: nonce.to_vec(),
            ciphertext,
        }
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

    const URL: &str = "https://llm.example.com";

    fn at(org: Uuid, row: Uuid, base_url: &str) -> Binding<'_> {
        Binding::provider_token(org, row, base_url)
    }

    #[test]
    fn round_trip_and_fresh_nonce() {
        let k = ring(&format!("1:{}", key()));
        let b = at(Uuid::new_v4(), Uuid::new_v4(), URL);
        let s1 = k.seal(&b, b"sk-secret");
        let s2 = k.seal(&b, b"sk-secret");
        assert_eq!(s1.aad_version, AAD_V2);
        assert_ne!(s1.nonce, s2.nonce);
        assert_ne!(s1.ciphertext, s2.ciphertext);
        assert_eq!(k.open(&b, &s1).unwrap(), b"sk-secret");
        assert_eq!(k.open(&b, &s2).unwrap(), b"sk-secret");
    }

    #[test]
    fn copied_ciphertext_and_flipped_bits_fail() {
        let k = ring(&format!("1:{}", key()));
        let (org, row) = (Uuid::new_v4(), Uuid::new_v4());
        let s = k.seal(&at(org, row, URL), b"sk-secret");
        for wrong in [at(org, Uuid::new_v4(), URL), at(Uuid::new_v4(), row, URL)] {
            assert_eq!(k.open(&wrong, &s), Err(CryptoError::Authentication));
        }
        for i in 0..s.ciphertext.len() {
            let mut t = s.clone();
            t.ciphertext[i] ^= 0x01;
            assert_eq!(
                k.open(&at(org, row, URL), &t),
                Err(CryptoError::Authentication)
            );
        }
        let mut t = s.clone();
        t.nonce[0] ^= 0x80;
        assert_eq!(
            k.open(&at(org, row, URL), &t),
            Err(CryptoError::Authentication)
        );
    }

    #[test]
    fn another_base_url_does_not_open_the_token() {
        let k = ring(&format!("1:{}", key()));
        let (org, row) = (Uuid::new_v4(), Uuid::new_v4());
        let s = k.seal(&at(org, row, URL), b"sk-secret");
        for other in [
            "https://attacker.example.net",
            "https://llm.example.com/proxy",
            "https://llm.example.co",
            "https://llm.example.com:8443",
            "http://llm.example.com",
            "",
        ] {
            assert_eq!(
                k.open(&at(org, row, other), &s),
                Err(CryptoError::Authentication),
                "{other}"
            );
        }
    }

    #[test]
    fn a_value_sealed_for_one_purpose_opens_for_no_other() {
        let k = ring(&format!("1:{}", key()));
        let (org, row) = (Uuid::new_v4(), Uuid::new_v4());
        let kinds = [
            Binding::provider_token(org, row, URL),
            Binding::endpoint_token(org, row, URL),
            Binding::provider_headers(org, row),
            Binding::provider_token(org, row, ""),
            Binding::endpoint_token(org, row, ""),
        ];
        for (i, sealed_for) in kinds.iter().enumerate() {
            let s = k.seal(sealed_for, b"secret");
            for (j, opened_as) in kinds.iter().enumerate() {
                let r = k.open(opened_as, &s);
                if i == j {
                    assert_eq!(r.unwrap(), b"secret");
                } else {
                    assert_eq!(r, Err(CryptoError::Authentication), "{i} as {j}");
                }
            }
        }
        // Headers are bound to their org and row like tokens.
        let s = k.seal(&Binding::provider_headers(org, row), b"{}");
        for wrong in [
            Binding::provider_headers(org, Uuid::new_v4()),
            Binding::provider_headers(Uuid::new_v4(), row),
        ] {
            assert_eq!(k.open(&wrong, &s), Err(CryptoError::Authentication));
        }
    }

    #[test]
    fn no_downgrade_to_the_format_without_the_url() {
        let k = ring(&format!("1:{}", key()));
        let (org, row) = (Uuid::new_v4(), Uuid::new_v4());
        // A current ciphertext relabelled as legacy opens nowhere.
        let mut relabelled = k.seal(&at(org, row, URL), b"sk-secret");
        relabelled.aad_version = AAD_V1;
        assert_eq!(
            k.open(&at(org, row, URL), &relabelled),
            Err(CryptoError::LegacyFormat)
        );
        assert_eq!(
            k.open_legacy(org, row, &relabelled),
            Err(CryptoError::Authentication)
        );
        // A genuine legacy ciphertext opens only through the re-seal path,
        // and not when labelled current.
        let legacy = k.seal_legacy(org, row, b"sk-secret");
        assert_eq!(k.open_legacy(org, row, &legacy).unwrap(), b"sk-secret");
        assert_eq!(
            k.open(&at(org, row, URL), &legacy),
            Err(CryptoError::LegacyFormat)
        );
        let mut promoted = legacy.clone();
        promoted.aad_version = AAD_V2;
        assert_eq!(
            k.open(&at(org, row, URL), &promoted),
            Err(CryptoError::Authentication)
        );
        assert_eq!(
            k.open_legacy(Uuid::new_v4(), row, &legacy),
            Err(CryptoError::Authentication)
        );
        let mut future = legacy;
        future.aad_version = 3;
        assert_eq!(
            k.open(&at(org, row, URL), &future),
            Err(CryptoError::UnknownFormat(3))
        );
        assert_eq!(
            k.open_legacy(org, row, &future),
            Err(CryptoError::UnknownFormat(3))
        );
    }

    #[test]
    fn highest_id_encrypts_and_retired_key_is_named() {
        let (k1, k2) = (key(), key());
        let both = ring(&format!("2:{k2},1:{k1}"));
        assert_eq!(both.active_id(), 2);
        let b = at(Uuid::new_v4(), Uuid::new_v4(), URL);
        let old = ring(&format!("1:{k1}")).seal(&b, b"t");
        assert_eq!(both.open(&b, &old).unwrap(), b"t");
        let only2 = ring(&format!("2:{k2}"));
        let err = only2.open(&b, &old).unwrap_err();
        assert_eq!(err, CryptoError::UnknownKey(1));
        assert!(err.to_string().contains("key id 1"));
        let wrong = ring(&format!("1:{}", key()));
        assert_eq!(wrong.open(&b, &old), Err(CryptoError::Authentication));
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
