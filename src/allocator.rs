//! The process allocator and how it hands memory back.

// glibc's malloc returns each freed large buffer to the kernel and faults it
// in again on the next query; mimalloc keeps freed pages for reuse.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc asks for transparent huge pages, which the kernel zeroes 2 MiB at
/// a time on first touch: the first flame graph after a start paid ~40 ms of
/// page clearing for a few hundred KiB it used.
pub fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments and touches no
    // memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// `mi_option_purge_delay` in mimalloc.h (v2 and v3); libmimalloc-sys does
/// not name it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long mimalloc keeps freed pages before it returns them to the kernel.
fn keep_freed_pages_for(ms: std::os::raw::c_long) {
    // SAFETY: sets one of the allocator's options, touching no memory of
    // ours; mimalloc reads the option at every purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ms) }
}

/// mimalloc returns freed pages to the kernel 10 ms after the fact by
/// default; under a compaction job's churn those pages pile up (a job
/// budgeted at 256 MiB peaked at 424 MiB of RSS, 240 MiB with no delay).
/// Only for a process that runs no queries: they would fault their pages in
/// again on every run (warm flame graph 4.5 -> 5.9 ms).
pub fn return_freed_memory_at_once() {
    keep_freed_pages_for(0);
}

/// For the process that ingests, queries and compacts: its work comes in
/// bursts (a flush every 500 ms per shard, a level-0 job every few
/// seconds, a dashboard's queries) further apart than mimalloc's 10 ms,
/// so each burst faulted in again the pages the last one had freed (12 %
/// of a level-0 job's time). Kept for a second, they are reused: level-0
/// jobs took 68 ms instead of 79 ms, and compaction read 574 k samples
/// per CPU-second instead of 407 k. The memory held is at most what the
/// last second's work freed, and goes back after it.
pub fn reuse_freed_memory_for_a_second() {
    keep_freed_pages_for(1000);
}
