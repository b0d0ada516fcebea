//! Test support shared by every crate's tests: a fresh migrated database per
//! test, real HTTPS upstreams on 127.0.0.1 with certificates made here, and
//! Redis servers (single or Cluster) started by the test.

pub mod blackhole;
pub mod db;
pub mod otlp;
pub mod raw;
pub mod redis;
pub mod tls;
pub mod upstream;

pub use blackhole::Blackhole;
pub use db::TestDb;
pub use raw::{RawAnswer, RawClient};
pub use redis::{RedisCluster, RedisServer};
pub use tls::TestCa;
pub use upstream::{MockUpstream, SeenRequest};

/// For tests that check rows directly, in crates that reach the database
/// only through `storage` and so do not depend on sqlx themselves.
pub use sqlx;

/// Starts an actix-web server on 127.0.0.1:0 (with `TCP_NODELAY` on accepted
/// connections, as production does) and returns its base URL and handle.
pub fn spawn_http<F>(configure: F) -> (String, actix_web::dev::ServerHandle)
where
    F: Fn(&mut actix_web::web::ServiceConfig) + Clone + Send + 'static,
{
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind test server");
    spawn_http_on(listener, configure)
}

/// [`spawn_http`] on a listener bound beforehand, for a server that must
/// know its own URL when it is configured.
pub fn spawn_http_on<F>(
    listener: std::net::TcpListener,
    configure: F,
) -> (String, actix_web::dev::ServerHandle)
where
    F: Fn(&mut actix_web::web::ServiceConfig) + Clone + Send + 'static,
{
    let server =
        actix_web::HttpServer::new(move || actix_web::App::new().configure(configure.clone()))
            .workers(2)
            .disable_signals()
            .shutdown_timeout(5)
            .on_connect(|conn, _| {
                if let Some(tcp) = conn.downcast_ref::<tokio::net::TcpStream>() {
                    let _ = tcp.set_nodelay(true);
                }
            })
            .listen(listener)
            .expect("listen on the test server's socket");
    let port = server.addrs()[0].port();
    let server = server.run();
    let handle = server.handle();
    tokio::spawn(server);
    (format!("http://127.0.0.1:{port}"), handle)
}

/// A test's prerequisite is missing: with `CI=true` the test fails (CI
/// never skips silently); elsewhere it is skipped with a note. `missing`
/// says what is missing and how to install it. Returns only outside CI,
/// and the caller then returns early.
pub fn skip_unless_ci(missing: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    assert!(!ci, "CI=true but a prerequisite is missing: {missing}");
    eprintln!("skipped: {missing} (with CI=true this fails)");
}
