//! The NOTIFY listener: evicts cached keys and providers when another
//! replica (or the settings API) changes them. The connection, its backoff
//! and the reading of notifications are storage's ([`storage::Db::cache_notices`]);
//! this applies what they say to the caches.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use futures_util::StreamExt;
use storage::CacheNotice;
use tokio::sync::watch;

use crate::state::State;

/// Applies cache notices until shutdown; flushes the caches whenever the
/// listener reconnects (notifications were missed) and signals `ready`
/// once it first listens.
pub(crate) async fn listen(
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let notices = state.db.cache_notices();
    let mut notices = std::pin::pin!(notices);
    loop {
        let notice = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            n = notices.next() => n,
        };
        let Some(notice) = notice else {
            return;
        };
        match notice {
            CacheNotice::Connected => {
                state.metrics.listener_connected.store(1, Relaxed);
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
            }
            CacheNotice::Reconnected => {
                tracing::warn!("cache listener reconnected; flushing caches");
                state.flush_caches();
                state.metrics.listener_connected.store(1, Relaxed);
            }
            CacheNotice::Disconnected => state.metrics.listener_connected.store(0, Relaxed),
            CacheNotice::ApiKey { id, .. } => state.keys.evict(id),
            CacheNotice::Provider { org_id, .. } => {
                state.providers.evict_org(org_id);
                state.models.evict(org_id);
            }
            // Org limits are rare edits: dropping the key cache is enough.
            CacheNotice::Org { .. } => state.keys.flush(),
            CacheNotice::Unknown => {
                tracing::warn!("unexpected cache notification; flushing caches");
                state.flush_caches();
            }
        }
    }
}
