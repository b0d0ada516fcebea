//! Secret values and their one-way forms. Every secret lives in a type whose
//! `Debug` prints `[REDACTED]`; reading it takes an explicit `expose_secret`.

use std::fmt;
use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rand::distributions::{Alphanumeric, DistString};
pub use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::domain::ValidationError;

/// Longest provider token, in bytes (ASCII, so characters too).
pub const MAX_TOKEN_LEN: usize = 4096;
/// What [`ProviderToken::parse`] accepts, for the OpenAPI document: printable
/// ASCII without leading or trailing spaces.
pub const TOKEN_PATTERN: &str = "^[!-~]([ -~]*[!-~])?$";

/// An upstream provider's API token: non-empty, header-safe, never printed.
#[derive(Clone)]
pub struct ProviderToken(SecretString);

impl fmt::Debug for ProviderToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProviderToken([REDACTED])")
    }
}

impl ProviderToken {
    /// Accepts visible ASCII (and inner spaces) only, so it is always a valid header value.
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        if raw.is_empty() {
            return Err(ValidationError::new("token", "token must not be empty"));
        }
        if raw.len() > MAX_TOKEN_LEN {
            return Err(ValidationError::new(
                "token",
                format!("token must be at most {MAX_TOKEN_LEN} characters"),
            ));
        }
        if raw.trim() != raw || !raw.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(ValidationError::new(
                "token",
                "token must be printable ASCII without leading or trailing spaces (it is sent as an HTTP header)",
            ));
        }
        Ok(Self(SecretString::from(raw.to_owned())))
    }

    /// Wraps bytes that came out of decryption; they were validated when stored.
    pub fn from_decrypted(bytes: Vec<u8>) -> Option<Self> {
        String::from_utf8(bytes)
            .ok()
            .map(|s| Self(SecretString::from(s)))
    }

    pub fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }

    /// The last four characters, shown so admins can tell tokens apart; empty
    /// for tokens shorter than 12 characters, where four would give too much away.
    pub fn hint(&self) -> String {
        let s = self.0.expose_secret();
        if s.len() < 12 {
            return String::new();
        }
        s[s.len() - 4..].to_owned()
    }
}

fn digest(value: &str) -> [u8; 32] {
    Sha256::digest(value.as_bytes()).into()
}

/// A gateway API key: `llmgw_` followed by 43 base62 characters (> 256 bits).
pub struct ApiKeySecret(SecretString);

impl fmt::Debug for ApiKeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKeySecret([REDACTED])")
    }
}

/// Where every gateway API key starts.
pub const API_KEY_PREFIX: &str = "llmgw_";
const API_KEY_RANDOM_CHARS: usize = 43;

impl ApiKeySecret {
    pub fn generate() -> Self {
        let random = Alphanumeric.sample_string(&mut rand::rngs::OsRng, API_KEY_RANDOM_CHARS);
        Self(SecretString::from(format!("{API_KEY_PREFIX}{random}")))
    }

    /// Wraps a key presented by a client (not validated: lookup decides).
    pub fn from_presented(raw: &str) -> Self {
        Self(SecretString::from(raw.to_owned()))
    }

    pub fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }

    /// SHA-256 of the whole key: what the database stores and looks up.
    pub fn digest(&self) -> [u8; 32] {
        digest(self.0.expose_secret())
    }

    /// A short, non-secret prefix for display (`llmgw_AbCd1234`).
    pub fn display_prefix(&self) -> String {
        self.0
            .expose_secret()
            .chars()
            .take(API_KEY_PREFIX.len() + 8)
            .collect()
    }
}

/// A login session's bearer token; stored as its SHA-256 digest.
pub struct SessionToken(SecretString);

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionToken([REDACTED])")
    }
}

impl SessionToken {
    pub fn generate() -> Self {
        let random = Alphanumeric.sample_string(&mut rand::rngs::OsRng, 48);
        Self(SecretString::from(format!("llmgws_{random}")))
    }

    pub fn from_presented(raw: &str) -> Self {
        Self(SecretString::from(raw.to_owned()))
    }

    pub fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }

    pub fn digest(&self) -> [u8; 32] {
        digest(self.0.expose_secret())
    }
}

/// SHA-256 of an arbitrary presented secret (for lookups by digest).
pub fn sha256(value: &str) -> [u8; 32] {
    digest(value)
}

fn argon2() -> Argon2<'static> {
    // OWASP: argon2id, m = 19 MiB, t = 2, p = 1.
    let params = Params::new(19 * 1024, 2, 1, None).expect("static argon2 parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes a password with argon2id (CPU-heavy: call from a blocking thread).
pub fn hash_password(password: &SecretString) -> String {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    argon2()
        .hash_password(password.expose_secret().as_bytes(), &salt)
        .expect("argon2 hashing with valid parameters cannot fail")
        .to_string()
}

fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash_password(&SecretString::from("llmgw-dummy-password".to_owned())))
}

/// Verifies a password; with no stored hash it still runs a full verification
/// so an unknown account takes as long as a wrong password.
pub fn verify_password(stored: Option<&str>, password: &SecretString) -> bool {
    let (hash, known) = match stored {
        Some(h) => (h, true),
        None => (dummy_hash(), false),
    };
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let ok = argon2()
        .verify_password(password.expose_secret().as_bytes(), &parsed)
        .is_ok();
    ok && known
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_are_long_random_and_redacted() {
        let a = ApiKeySecret::generate();
        let b = ApiKeySecret::generate();
        assert!(a.expose_secret().starts_with("llmgw_"));
        assert_eq!(a.expose_secret().len(), 6 + 43);
        assert!(a.expose_secret()[6..]
            .bytes()
            .all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_ne!(a.digest(), b.digest());
        assert_eq!(
            a.digest(),
            ApiKeySecret::from_presented(a.expose_secret()).digest()
        );
        assert!(a.expose_secret().starts_with(&a.display_prefix()));
        let dbg = format!("{a:?}");
        assert!(!dbg.contains(a.expose_secret()) && dbg.contains("REDACTED"));
    }

    #[test]
    fn provider_token_rules_and_hint() {
        let t = ProviderToken::parse("sk-abcdefgh1234").unwrap();
        assert_eq!(t.hint(), "1234");
        assert!(!format!("{t:?}").contains("abcdefgh"));
        assert_eq!(ProviderToken::parse("test").unwrap().hint(), "");
        assert_eq!(ProviderToken::parse("sk-12345678").unwrap().hint(), "");
        for bad in ["", " sk", "sk ", "sk\nx", "sk\r\nX-Evil: 1", "tok\u{e9}n"] {
            assert!(ProviderToken::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(ProviderToken::parse(&"a".repeat(4097)).is_err());
    }

    #[test]
    fn argon2_accepts_right_password_only() {
        let pw = SecretString::from("correct horse battery".to_owned());
        let hash = hash_password(&pw);
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(verify_password(Some(&hash), &pw));
        assert!(!verify_password(
            Some(&hash),
            &SecretString::from("wrong".to_owned())
        ));
        assert!(!verify_password(None, &pw));
        assert!(!verify_password(Some("not a hash"), &pw));
    }
}
