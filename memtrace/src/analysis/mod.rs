//! The analyses that run on the [`crate::engine`]: each one names its hook groups, handles its
//! records and builds its report.
pub mod faults;
pub mod slab;
pub mod vma;

pub use faults::FaultsAnalysis;
pub use slab::{SlabAnalysis, SlabReportOptions};
pub use vma::VmaAnalysis;
