//! The NOTIFY listener: evicts cached keys and providers when another
//! replica (or the settings API) changes them.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::watch;

use crate::cache::{self, Invalidation};
use crate::state::State;

/// Listens for cache notifications until shutdown; reconnects with backoff
/// and flushes the caches after every reconnect (notifications were missed).
pub(crate) async fn listen(
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        let connect = async {
            let mut l = PgListener::connect_with(state.db.pool()).await?;
            l.listen(storage::CACHE_CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let connected = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            r = connect => r,
        };
        let mut listener = match connected {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cache listener cannot connect; retrying in {backoff:?}");
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        if !first {
            state.flush_caches();
        }
        first = false;
        state.metrics.listener_connected.store(1, Relaxed);
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
        loop {
            let next = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(n)) => match cache::parse_event(n.payload()) {
                    Invalidation::Key(id) => state.keys.evict(id),
                    Invalidation::Org(org) => {
                        state.providers.evict_org(org);
                        state.models.evict(org);
                    }
                    Invalidation::All => state.flush_caches(),
                },
                // The connection dropped and sqlx reconnected: we may have missed changes.
                Ok(None) => {
                    tracing::warn!("cache listener reconnected; flushing caches");
                    state.flush_caches();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cache listener lost its connection");
                    state.metrics.listener_connected.store(0, Relaxed);
                    break;
                }
            }
        }
    }
}
