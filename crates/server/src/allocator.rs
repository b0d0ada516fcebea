//! The process's allocator: jemalloc, set to give freed pages back to the
//! kernel within about a second.
//!
//! Thousands of streams opening at once allocate far more (handler futures,
//! pending upstream requests, TLS handshakes) than they keep once open.
//! glibc's malloc keeps what the burst freed, because it lies between the
//! open streams' allocations: 10,000 slow streams over HTTP/2 held about
//! 180 MiB with it, and hold about 95 MiB with this (BENCHMARKS.md). jemalloc
//! groups allocations by size, so a burst's memory frees whole pages, and its
//! background thread returns them (`dirty_decay_ms`) without waiting for the
//! next allocation. `muzzy_decay_ms:0` skips the lazy `MADV_FREE` step,
//! whose pages would still count as resident until the kernel wanted them.
//!
//! `_RJEM_MALLOC_CONF` in the environment overrides these settings.

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Read by jemalloc when it starts (its `malloc_conf`, under the prefix of
/// the Rust build).
#[cfg(target_os = "linux")]
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: &[u8; 60] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";
