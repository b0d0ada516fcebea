//! Secret values and their one-way forms. Every secret lives in a type whose
//! `Debug` prints `[REDACTED]`; reading it takes an explicit `expose_secret`.

use std::fmt;
use std::sync::OnceLock;

use argon2::password_hash::{Output, ParamsString, PasswordHash, Salt, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use rand::distributions::{Alphanumeric, DistString};
pub use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::ValidationError;

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

    /// Whether `raw` has the shape of a key this server makes
    /// ([`API_KEY_PREFIX`] and 43 base62 characters); anything else is
    /// refused without a lookup.
    pub fn is_plausible(raw: &str) -> bool {
        raw.strip_prefix(API_KEY_PREFIX).is_some_and(|random| {
            random.len() == API_KEY_RANDOM_CHARS
                && random.bytes().all(|b| b.is_ascii_alphanumeric())
        })
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

/// A random bearer token stored only as its SHA-256 digest: `$prefix`
/// followed by `$len` base62 characters.
macro_rules! digest_token {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $len:literal) => {
        $(#[$doc])*
        pub struct $name(SecretString);

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "([REDACTED])"))
            }
        }

        impl $name {
            pub fn generate() -> Self {
                let random = Alphanumeric.sample_string(&mut rand::rngs::OsRng, $len);
                Self(SecretString::from(format!(concat!($prefix, "{}"), random)))
            }

            /// Wraps a token presented by a client (not validated: lookup decides).
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
    };
}

digest_token!(
    /// A login session's bearer token; stored as its SHA-256 digest.
    SessionToken,
    "llmgws_",
    48
);

digest_token!(
    /// An invitation's one-time token: `llmgwi_` followed by 43 base62 characters (> 256 bits).
    InvitationToken,
    "llmgwi_",
    43
);

/// SHA-256 of an arbitrary presented secret (for lookups by digest).
pub fn sha256(value: &str) -> [u8; 32] {
    digest(value)
}

/// Shortest password a new account may have, in characters.
pub const PASSWORD_MIN_CHARS: usize = 8;
/// Longest password a new account may have, in characters.
pub const PASSWORD_MAX_CHARS: usize = 1024;

/// A new account's password, wherever it is set (the API's signup, the
/// CLI's `llmgw user create`): [`PASSWORD_MIN_CHARS`] to
/// [`PASSWORD_MAX_CHARS`] characters, taken as given.
pub fn parse_new_password(raw: &str) -> Result<SecretString, ValidationError> {
    let n = raw.chars().count();
    if !(PASSWORD_MIN_CHARS..=PASSWORD_MAX_CHARS).contains(&n) {
        return Err(ValidationError::new(
            "password",
            format!("password must be {PASSWORD_MIN_CHARS} to {PASSWORD_MAX_CHARS} characters"),
        ));
    }
    Ok(SecretString::from(raw.to_owned()))
}

// OWASP: argon2id, m = 19 MiB, t = 2, p = 1.
const ARGON2_M_KIB: u32 = 19 * 1024;
const ARGON2_T: u32 = 2;
const ARGON2_P: u32 = 1;
const ARGON2_OUTPUT_LEN: usize = 32;

fn argon2() -> Argon2<'static> {
    let params = Params::new(ARGON2_M_KIB, ARGON2_T, ARGON2_P, Some(ARGON2_OUTPUT_LEN))
        .expect("static argon2 parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// The memory of one argon2id computation (19 MiB), mapped from the kernel
/// and unmapped on drop.
///
/// Not a `Vec`: glibc keeps freed buffers of this size in its arenas, so
/// allocating one per hash makes a burst of logins leave the process
/// gigabytes larger, and one kept per worker stays resident for good (two
/// workers: 38 MiB of a gateway at rest). A mapping goes back to the kernel
/// whole when dropped, whatever the allocator; the [`PasswordPool`] keeps one
/// per worker while logins are queued and drops it when the queue drains.
pub struct PasswordWorkspace {
    blocks: Blocks,
}

impl Default for PasswordWorkspace {
    fn default() -> Self {
        Self::new()
    }
}

impl PasswordWorkspace {
    /// Maps the workspace, its pages populated at once (one kernel call, not
    /// a fault per page while hashing). Panics only when the kernel refuses
    /// 19 MiB, as an allocation would abort.
    pub fn new() -> Self {
        Self {
            blocks: Blocks::map(argon2().params().block_count()),
        }
    }

    /// Hashes a password with argon2id into a PHC string (CPU-heavy: call from a blocking thread).
    pub fn hash(&mut self, password: &SecretString) -> String {
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        let mut salt_buf = [0u8; 64];
        let salt_bytes = salt
            .decode_b64(&mut salt_buf)
            .expect("a generated salt decodes");
        let a = argon2();
        let output = Output::init_with(ARGON2_OUTPUT_LEN, |out| {
            a.hash_password_into_with_memory(
                password.expose_secret().as_bytes(),
                salt_bytes,
                out,
                self.blocks.as_mut_slice(),
            )
            .map_err(Into::into)
        })
        .expect("argon2 hashing with valid parameters cannot fail");
        PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(a.params()).expect("static parameters encode"),
            salt: Some(salt.as_salt()),
            hash: Some(output),
        }
        .to_string()
    }

    /// Verifies a password; with no stored hash it still runs a full verification
    /// so an unknown account takes as long as a wrong password.
    pub fn verify(&mut self, stored: Option<&str>, password: &SecretString) -> bool {
        let (hash, known) = match stored {
            Some(h) => (h, true),
            None => (dummy_hash(), false),
        };
        let ok = self.recompute_matches(hash, password).unwrap_or(false);
        ok && known
    }

    /// Recomputes the hash with the stored salt and parameters into this
    /// workspace; `None` for a string that is not an argon2 hash this
    /// workspace can compute (a larger memory cost, say).
    fn recompute_matches(&mut self, phc: &str, password: &SecretString) -> Option<bool> {
        let parsed = PasswordHash::new(phc).ok()?;
        let algorithm = Algorithm::try_from(parsed.algorithm).ok()?;
        let version = match parsed.version {
            Some(v) => Version::try_from(v).ok()?,
            None => Version::default(),
        };
        let params = Params::try_from(&parsed).ok()?;
        let expected = parsed.hash?;
        let mut salt_buf = [0u8; 64];
        let salt = parsed.salt?.decode_b64(&mut salt_buf).ok()?;
        let a = Argon2::new(algorithm, version, params);
        let computed = Output::init_with(expected.len(), |out| {
            a.hash_password_into_with_memory(
                password.expose_secret().as_bytes(),
                salt,
                out,
                self.blocks.as_mut_slice(),
            )
            .map_err(Into::into)
        })
        .ok()?;
        // `Output`'s equality is constant-time.
        Some(computed == expected)
    }
}

/// A well-formed hash with our parameters that no password matches, verified
/// against when the account does not exist.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let a = argon2();
        PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(a.params()).expect("static parameters encode"),
            salt: Some(Salt::from_b64("bGxtZ3ctbm8tc3VjaC11c2Vy").expect("static salt")),
            hash: Some(Output::new(&[0u8; ARGON2_OUTPUT_LEN]).expect("static output")),
        }
        .to_string()
    })
}

/// Hashes a password with argon2id (CPU-heavy: call from a blocking thread).
/// Allocates a workspace for this one call: for the CLI and tests; servers use a [`PasswordPool`].
pub fn hash_password(password: &SecretString) -> String {
    PasswordWorkspace::new().hash(password)
}

/// [`PasswordWorkspace::verify`] with a workspace for this one call.
pub fn verify_password(stored: Option<&str>, password: &SecretString) -> bool {
    PasswordWorkspace::new().verify(stored, password)
}

/// The password pool cannot take another job now; the client should retry shortly.
#[derive(Debug, thiserror::Error)]
pub enum PasswordPoolError {
    #[error("every password worker is busy and the wait queue is full")]
    Busy,
    #[error("the password worker stopped before answering")]
    Stopped,
}

enum Task {
    Hash(SecretString),
    Verify(Option<String>, SecretString),
}

enum Outcome {
    Hashed(String),
    Verified(bool),
}

struct Job {
    task: Task,
    reply: tokio::sync::oneshot::Sender<Outcome>,
    // Held until the work is done, so admission counts running jobs too.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// `len` argon2 blocks in an anonymous private mapping.
struct Blocks {
    ptr: std::ptr::NonNull<Block>,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone, like a `Vec`'s buffer.
unsafe impl Send for Blocks {}

impl Blocks {
    fn bytes(len: usize) -> usize {
        len * std::mem::size_of::<Block>()
    }

    fn map(len: usize) -> Self {
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::bytes(len),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            std::alloc::handle_alloc_error(
                std::alloc::Layout::array::<Block>(len).expect("the argon2 workspace size fits"),
            );
        }
        Self {
            ptr: std::ptr::NonNull::new(ptr.cast()).expect("mmap never maps address 0 here"),
            len,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [Block] {
        // SAFETY: the mapping is page-aligned (more than `Block`'s 64 bytes),
        // `len` blocks long, zero-filled (an all-zero `Block` is valid), and
        // borrowed mutably through `self` only.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Blocks {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, used no more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), Self::bytes(self.len)) };
    }
}

/// A few dedicated threads, each with its own [`PasswordWorkspace`], and a
/// short wait queue: hashing work and its memory are bounded whatever the
/// number of concurrent logins; past the queue callers get [`PasswordPoolError::Busy`].
pub struct PasswordPool {
    jobs: std::sync::mpsc::SyncSender<Job>,
    admission: std::sync::Arc<tokio::sync::Semaphore>,
}

impl PasswordPool {
    /// Starts `workers` threads (each mapping 19 MiB while it has work) and admits at most
    /// `workers + queue` jobs at once.
    pub fn new(workers: usize, queue: usize) -> std::io::Result<Self> {
        let workers = workers.max(1);
        let capacity = workers + queue;
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(capacity);
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        for i in 0..workers {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("llmgw-argon2-{i}"))
                .spawn(move || work(&rx))?;
        }
        Ok(Self {
            jobs,
            admission: std::sync::Arc::new(tokio::sync::Semaphore::new(capacity)),
        })
    }

    /// Takes a place in the pool now, or answers `Busy` at once. Reserve
    /// before any other work (a database lookup) so a refused request costs nothing.
    pub fn reserve(&self) -> Result<PasswordSlot<'_>, PasswordPoolError> {
        let permit = self
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| PasswordPoolError::Busy)?;
        Ok(PasswordSlot { pool: self, permit })
    }
}

/// A reserved place in the [`PasswordPool`]; dropping it unused gives it back.
pub struct PasswordSlot<'a> {
    pool: &'a PasswordPool,
    permit: tokio::sync::OwnedSemaphorePermit,
}

impl PasswordSlot<'_> {
    async fn run(self, task: Task) -> Result<Outcome, PasswordPoolError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job {
            task,
            reply,
            _permit: self.permit,
        };
        // The channel holds as many jobs as there are permits: never full here.
        self.pool.jobs.try_send(job).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(_) => PasswordPoolError::Busy,
            std::sync::mpsc::TrySendError::Disconnected(_) => PasswordPoolError::Stopped,
        })?;
        answer.await.map_err(|_| PasswordPoolError::Stopped)
    }

    /// [`PasswordWorkspace::hash`] on a pool thread.
    pub async fn hash(self, password: SecretString) -> Result<String, PasswordPoolError> {
        match self.run(Task::Hash(password)).await? {
            Outcome::Hashed(h) => Ok(h),
            Outcome::Verified(_) => Err(PasswordPoolError::Stopped),
        }
    }

    /// [`PasswordWorkspace::verify`] on a pool thread.
    pub async fn verify(
        self,
        stored: Option<String>,
        password: SecretString,
    ) -> Result<bool, PasswordPoolError> {
        match self.run(Task::Verify(stored, password)).await? {
            Outcome::Verified(ok) => Ok(ok),
            Outcome::Hashed(_) => Err(PasswordPoolError::Stopped),
        }
    }
}

fn work(rx: &std::sync::Mutex<std::sync::mpsc::Receiver<Job>>) {
    // An idle worker waits for the next job holding the lock; the guard is
    // dropped once it has one, so other workers take jobs while it hashes.
    let next = || rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
    // A job already queued, if any. The lock held means another worker is
    // waiting in `next`, so the queue is empty: never wait for it here.
    let queued = || match rx.try_lock() {
        Ok(rx) => rx.try_recv().ok(),
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner().try_recv().ok(),
        Err(std::sync::TryLockError::WouldBlock) => None,
    };
    while let Ok(first) = next() {
        // A workspace for this burst of jobs, unmapped once the queue is empty.
        let mut workspace = PasswordWorkspace::new();
        let mut job = Some(first);
        while let Some(j) = job {
            run(&mut workspace, j);
            job = queued();
        }
    }
    // The pool was dropped.
}

fn run(workspace: &mut PasswordWorkspace, job: Job) {
    if job.reply.is_closed() {
        return; // the client went away while queued
    }
    // A panic must not cost the pool a worker; the caller sees `Stopped`.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &job.task {
        Task::Hash(pw) => Outcome::Hashed(workspace.hash(pw)),
        Task::Verify(stored, pw) => Outcome::Verified(workspace.verify(stored.as_deref(), pw)),
    }));
    if let Ok(outcome) = outcome {
        let _ = job.reply.send(outcome);
    }
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
        assert!(ApiKeySecret::is_plausible(a.expose_secret()));
        let random = &a.expose_secret()[6..];
        for bad in [
            String::new(),
            "llmgw_".into(),
            format!("llmgw_{}", &random[1..]),
            format!("llmgw_{random}x"),
            format!("llmgw_{}-", &random[1..]),
            format!("LLMGW_{random}"),
            format!("llmgws_{}", &random[1..]),
            random.into(),
        ] {
            assert!(!ApiKeySecret::is_plausible(&bad), "{bad:?}");
        }
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
    fn new_passwords_are_8_to_1024_characters() {
        for ok in [
            "12345678",
            "\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}",
            &"x".repeat(1024),
        ] {
            assert_eq!(parse_new_password(ok).unwrap().expose_secret(), ok);
        }
        for bad in ["", "1234567", &"x".repeat(1025)] {
            let e = parse_new_password(bad).unwrap_err();
            assert_eq!(e.field, "password");
            assert_eq!(e.message, "password must be 8 to 1024 characters");
        }
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

    #[test]
    fn hashes_made_by_the_argon2_crate_still_verify() {
        use argon2::password_hash::PasswordHasher;
        let pw = SecretString::from("correct horse battery".to_owned());
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        let old = argon2()
            .hash_password(pw.expose_secret().as_bytes(), &salt)
            .unwrap()
            .to_string();
        let mut ws = PasswordWorkspace::new();
        assert!(ws.verify(Some(&old), &pw));
        assert!(!ws.verify(Some(&old), &SecretString::from("wrong".to_owned())));
        // A cost above the workspace's memory is refused, not allocated.
        let big = old.replace("m=19456", "m=65536");
        assert!(!ws.verify(Some(&big), &pw));
        assert!(dummy_hash().starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
    }

    #[tokio::test]
    async fn pool_refuses_past_its_capacity_and_keeps_working() {
        let pool = PasswordPool::new(1, 1).unwrap();
        let a = pool.reserve().unwrap();
        let b = pool.reserve().unwrap();
        assert!(matches!(pool.reserve(), Err(PasswordPoolError::Busy)));
        let pw = SecretString::from("correct horse battery".to_owned());
        let hash = a.hash(pw.clone()).await.unwrap();
        assert!(b.verify(Some(hash.clone()), pw.clone()).await.unwrap());
        let c = pool.reserve().unwrap();
        assert!(!c.verify(None, pw).await.unwrap());
    }
}
