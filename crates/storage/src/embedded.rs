//! The embedded default: a private PostgreSQL cluster run from the machine's
//! own `initdb`/`pg_ctl`, listening only on a Unix socket. Nothing is downloaded.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sqlx::postgres::PgConnectOptions;

/// Why the embedded cluster could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("no PostgreSQL binaries (initdb, pg_ctl) found in PATH or /usr/lib/postgresql/*/bin: install PostgreSQL or set DATABASE_URL")]
    NoBinaries,
    #[error("running as root and no `postgres` system user exists to own the embedded cluster: create one or set DATABASE_URL")]
    NoUnprivilegedUser,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EmbeddedError + '_ {
    move |source| EmbeddedError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Directory holding `initdb` and `pg_ctl`: PATH first, then the newest
/// `/usr/lib/postgresql/*/bin`.
pub fn find_binaries() -> Option<PathBuf> {
    let has_both = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(d) = std::env::split_paths(&path).find(|d| has_both(d)) {
            return Some(d);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has_both(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d)
}

/// A user id and group id to run the cluster as when we are root.
fn unprivileged_user() -> Result<Option<(u32, u32)>, EmbeddedError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = c"postgres";
    // SAFETY: getpwnam gets a NUL-terminated name; the returned record is read
    // at once, before any other call that could overwrite it.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(EmbeddedError::NoUnprivilegedUser);
    }
    // SAFETY: non-null pointer from getpwnam.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(Some((uid, gid)))
}

/// A running (or startable) private cluster.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    bin: PathBuf,
    pgdata: PathBuf,
    socket_dir: PathBuf,
    log_file: PathBuf,
    run_as: Option<(u32, u32)>,
}

const PORT: u16 = 5432;

impl EmbeddedPostgres {
    /// Prepares (and on first use initializes) the cluster under `base`.
    pub fn init(base: &Path) -> Result<Self, EmbeddedError> {
        let bin = find_binaries().ok_or(EmbeddedError::NoBinaries)?;
        let run_as = unprivileged_user()?;
        fs::create_dir_all(base).map_err(io_err(base))?;
        let base = base.canonicalize().map_err(io_err(base))?;
        let pgdata = base.join("pgdata");
        // Unix socket paths are limited to ~107 bytes.
        let mut socket_dir = base.join("run");
        if socket_dir.as_os_str().len() > 80 {
            socket_dir = std::env::temp_dir().join(format!(
                "llmgw-pg-{:x}",
                fxhash(base.as_os_str().as_encoded_bytes())
            ));
        }
        fs::create_dir_all(&socket_dir).map_err(io_err(&socket_dir))?;
        // Trust auth is safe only because nobody else can reach the socket.
        for p in [&base, &socket_dir] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o700)).map_err(io_err(p))?;
        }
        let me = Self {
            bin,
            log_file: base.join("postgres.log"),
            pgdata,
            socket_dir,
            run_as,
        };
        if let Some((uid, gid)) = run_as {
            for p in [&base, &me.socket_dir] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(io_err(p))?;
            }
            if me.log_file.exists() {
                std::os::unix::fs::chown(&me.log_file, Some(uid), Some(gid))
                    .map_err(io_err(&me.log_file))?;
            }
        }
        if !me.pgdata.join("PG_VERSION").exists() {
            me.run(
                "initdb",
                &[
                    "-D".as_ref(),
                    me.pgdata.as_os_str(),
                    "-U".as_ref(),
                    "postgres".as_ref(),
                    "--auth=trust".as_ref(),
                    "-E".as_ref(),
                    "UTF8".as_ref(),
                    "--no-locale".as_ref(),
                    "--no-sync".as_ref(),
                ],
            )?;
        }
        Ok(me)
    }

    fn run(&self, tool: &str, args: &[&std::ffi::OsStr]) -> Result<Output, EmbeddedError> {
        let mut cmd = Command::new(self.bin.join(tool));
        cmd.args(args)
            .env_remove("PGDATA")
            .current_dir(&self.socket_dir);
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().map_err(io_err(&self.bin.join(tool)))?;
        if !out.status.success() {
            let detail = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            return Err(EmbeddedError::Command {
                what: tool.to_owned(),
                detail: if detail.is_empty() {
                    format!("exit status {}", out.status)
                } else {
                    detail
                },
            });
        }
        Ok(out)
    }

    fn running(&self) -> bool {
        self.run(
            "pg_ctl",
            &["status".as_ref(), "-D".as_ref(), self.pgdata.as_os_str()],
        )
        .is_ok()
    }

    /// Starts the server unless it already runs; waits until it accepts connections.
    pub fn start(&self) -> Result<(), EmbeddedError> {
        if self.running() {
            return Ok(());
        }
        let opts = format!(
            "-c listen_addresses='' -k {} -p {PORT} -c unix_socket_permissions=0700",
            self.socket_dir.display()
        );
        self.run(
            "pg_ctl",
            &[
                "start".as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "-D".as_ref(),
                self.pgdata.as_os_str(),
                "-l".as_ref(),
                self.log_file.as_os_str(),
                "-o".as_ref(),
                opts.as_ref(),
            ],
        )?;
        Ok(())
    }

    /// Stops the server (fast shutdown: open sessions are ended cleanly).
    pub fn stop(&self) -> Result<(), EmbeddedError> {
        if !self.running() {
            return Ok(());
        }
        self.run(
            "pg_ctl",
            &[
                "stop".as_ref(),
                "-w".as_ref(),
                "-m".as_ref(),
                "fast".as_ref(),
                "-D".as_ref(),
                self.pgdata.as_os_str(),
            ],
        )?;
        Ok(())
    }

    /// Options to connect as the superuser to database `db`.
    pub fn connect_options(&self, db: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .socket(&self.socket_dir)
            .port(PORT)
            .username("postgres")
            .database(db)
    }

    /// The data directory of the cluster.
    pub fn pgdata(&self) -> &Path {
        &self.pgdata
    }
}

fn fxhash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// Reads `path` as an encryption-key spec, creating it (mode 0600) with a
/// fresh key when absent. Returns the spec and whether it was created.
pub fn load_or_create_key_file(path: &Path) -> Result<(String, bool), EmbeddedError> {
    match fs::read_to_string(path) {
        Ok(s) => {
            let mode = fs::metadata(path)
                .map_err(io_err(path))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                fs::set_permissions(path, fs::Permissions::from_mode(0o600))
                    .map_err(io_err(path))?;
            }
            Ok((s.trim().to_owned(), false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(io_err(dir))?;
            }
            let spec = format!("1:{}", crate::crypto::Keyring::generate_key_material());
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io_err(path))?;
            f.write_all(format!("{spec}\n").as_bytes())
                .map_err(io_err(path))?;
            Ok((spec, true))
        }
        Err(e) => Err(EmbeddedError::Io {
            path: path.to_owned(),
            source: e,
        }),
    }
}
