//! `memtrace vma`: mmap, munmap, mremap and brk by callsite, and what each callsite still
//! holds mapped.
pub mod ledger;
pub mod report;

pub use ledger::{Ledger, SiteKey, SiteStats};
pub use report::{render, VmaReport};
