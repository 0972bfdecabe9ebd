//! The analyses that run on the [`crate::engine`]: each one names its hook groups, handles its
//! records and builds its report.
pub mod faults;

pub use faults::FaultsAnalysis;
