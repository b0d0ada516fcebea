//! `llmgw`: the gateway and settings API in one binary.

#[cfg(not(target_env = "msvc"))]
mod allocator;
mod config;
mod conn_cap;
mod database;
mod serve;

use std::io::BufRead;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use storage::domain::{parse_label, Email};
use storage::secrets::parse_new_password;
use storage::Keyring;

use crate::config::{Config, LogFormat};

#[derive(Parser)]
#[command(
    name = "llmgw",
    version,
    about = "Multi-tenant gateway for OpenAI-compatible models",
    after_help = "Settings are environment variables, also read from ./.env (the environment wins); `llmgw serve --help` lists them all."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway and settings API listeners (migrations run first).
    #[command(after_help = config::help_text())]
    Serve {
        /// Run only one listener, to scale the gateway separately.
        #[arg(long, value_enum)]
        only: Option<Listener>,
    },
    /// Apply database migrations and exit.
    #[command(after_help = DATABASE_SETTINGS)]
    Migrate,
    /// Manage the encryption keys of provider tokens.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage user accounts.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum Listener {
    /// The OpenAI-compatible gateway (LLMGW_GATEWAY_ADDR).
    Gateway,
    /// The settings API (LLMGW_API_ADDR).
    Api,
}

const DATABASE_SETTINGS: &str = "Reads DATABASE_URL, LLMGW_ENCRYPTION_KEYS and LLMGW_DATA_DIR from the environment or ./.env (the environment wins); `llmgw serve --help` describes them.";

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a new random 32-byte key (base64).
    Generate,
    /// Re-encrypt every stored token with the active (highest-id) key.
    #[command(after_help = DATABASE_SETTINGS)]
    Rotate,
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create an account; the password is read from the first line of stdin.
    #[command(after_help = DATABASE_SETTINGS)]
    Create {
        /// Email address the user signs in with.
        #[arg(long)]
        email: String,
        /// Read the password (8 to 1024 characters) from the first line of stdin.
        #[arg(long, required = true)]
        password_stdin: bool,
        /// Also create an organization owned by the new user.
        #[arg(long)]
        org: Option<String>,
    },
}

/// actix-http reports a client's malformed or oversized request head at
/// error level from inside its HTTP/1 decoder and dispatcher, before any of
/// our code runs; it is the client's mistake, not the server's, so those
/// lines are not shown unless `RUST_LOG` names `actix_http` itself (the
/// gateway logs its own relay failures).
const QUIET_CLIENT_ERRORS: [&str; 2] = [
    "actix_http::h1::decoder=off",
    "actix_http::h1::dispatcher=off",
];

fn init_tracing(format: LogFormat) {
    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    let mut filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .ok()
        .filter(|_| !spec.trim().is_empty())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    if !spec.contains("actix_http") {
        for quiet in QUIET_CLIENT_ERRORS {
            if let Ok(d) = quiet.parse() {
                filter = filter.add_directive(d);
            }
        }
    }
    // Colour only a terminal: escapes in a log file or a collector are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Pretty => builder.init(),
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("llmgw: {msg}");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any thread starts: this sets process environment variables.
    let dotenv = match dotenvy::from_path(".env") {
        Ok(()) => true,
        Err(e) if e.not_found() => false,
        Err(e) => return fail(format!(".env: {e}")),
    };
    if let Command::Keys {
        command: KeysCommand::Generate,
    } = cli.command
    {
        println!("{}", Keyring::generate_key_material());
        eprintln!("add it to LLMGW_ENCRYPTION_KEYS as <id>:<key> with an id above the current ones, then run `llmgw keys rotate`");
        return ExitCode::SUCCESS;
    }
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    init_tracing(cfg.log_format);
    if dotenv {
        tracing::info!("settings read from ./.env (the environment wins)");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start runtime: {e}")),
    };
    let result = rt.block_on(run(cli.command, cfg));
    // Every phase of a shutdown is bounded; a task still running now (a
    // blocking call that never returns) must not keep the process alive.
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

async fn run(command: Command, cfg: Config) -> Result<(), String> {
    match command {
        Command::Serve { only } => serve::serve(cfg, only).await,
        Command::Migrate => {
            let opened = database::open(&cfg).await?;
            println!("migrations applied");
            opened.close().await;
            Ok(())
        }
        Command::Keys {
            command: KeysCommand::Rotate,
        } => {
            let opened = database::open(&cfg).await?;
            let report = opened
                .db
                .rotate_tokens()
                .await
                .map_err(|e| format!("rotation failed: {}", database::error_chain(&e)));
            let active = opened.db.keyring().active_id();
            opened.close().await;
            let report = report?;
            println!(
                "re-encrypted {} token(s) under key id {active}",
                report.rewritten
            );
            // Ids and reasons only: a reason never carries the token.
            for s in &report.skipped {
                eprintln!(
                    "skipped {} {} (org {}): {}",
                    s.secret, s.id, s.org_id, s.reason
                );
            }
            if report.pending > 0 {
                eprintln!(
                    "{} token(s) were locked by another process throughout; run again",
                    report.pending
                );
            }
            if report.is_complete() {
                Ok(())
            } else {
                Err(format!(
                    "rotation incomplete: {} token(s) skipped, {} pending; the skipped providers stay unusable until their token is saved again (or the key that sealed them is configured)",
                    report.skipped.len(),
                    report.pending
                ))
            }
        }
        Command::Keys {
            command: KeysCommand::Generate,
        } => unreachable!("handled before configuration is read"),
        Command::User {
            command: UserCommand::Create { email, org, .. },
        } => {
            let email = Email::parse(&email).map_err(|e| e.message)?;
            let org = org
                .map(|o| parse_label("org", &o))
                .transpose()
                .map_err(|e| e.message)?;
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| format!("cannot read password from stdin: {e}"))?;
            let password =
                parse_new_password(line.trim_end_matches(['\n', '\r'])).map_err(|e| e.message)?;
            let hash =
                tokio::task::spawn_blocking(move || storage::secrets::hash_password(&password))
                    .await
                    .map_err(|e| e.to_string())?;
            let opened = database::open(&cfg).await?;
            // User and org in one transaction: a failure leaves neither behind.
            let created = match org {
                Some(name) => opened
                    .db
                    .create_user_with_org(&email, &hash, &name)
                    .await
                    .map(|(u, o)| (u, Some(o))),
                None => opened
                    .db
                    .create_user(&email, &hash)
                    .await
                    .map(|u| (u, None)),
            };
            let (user, org) = created.map_err(|e| e.to_string())?;
            let mut out = serde_json::json!({"user": {"id": user.id, "email": user.email}});
            if let Some(o) = org {
                out["org"] = serde_json::json!({"id": o.id, "name": o.name, "role": o.role});
            }
            opened.close().await;
            println!("{out}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn serve_help_lists_every_setting() {
        let mut cli = Cli::command();
        let help = cli
            .find_subcommand_mut("serve")
            .unwrap()
            .render_long_help()
            .to_string();
        for st in config::SETTINGS {
            assert!(
                help.contains(st.name),
                "{} missing from serve --help",
                st.name
            );
        }
    }

    #[test]
    fn every_subcommand_and_flag_has_a_description() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                if arg.get_help().is_none() && !arg.is_positional() {
                    missing.push(format!("{path} --{}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                let p = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(p.clone());
                }
                walk(sub, &p, missing);
            }
        }
        let mut cli = Cli::command();
        cli.build();
        let mut missing = Vec::new();
        walk(&cli, "llmgw", &mut missing);
        assert!(missing.is_empty(), "no description: {missing:?}");
    }
}
