//! The streaming benchmark (`bench/stream.sh`): an upstream that streams like a model
//! (`stream-upstream`) and a load generator that holds thousands of streams open through
//! a proxy and measures what the proxy adds to each chunk (`stream-load`).
//!
//! The two share one clock, the machine's wall clock in microseconds: the upstream stamps
//! every chunk with the time it sent it, so the load generator can tell the time the
//! proxy added to each gap between chunks from the time the model took.

pub mod chunk;
pub mod proc;
pub mod sse;
pub mod stats;
