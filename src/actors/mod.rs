//! The actors of the serving pipeline, one per file, each with its messages beside it.
//!
//! ```text
//! HTTP -> RequestIntake -> DpRouter -> Scheduler <-> KvPageManager     (one of each per
//!                                        |  ExecuteStep (batch plan)    data-parallel replica)
//!                                        v
//!                                      ModelExecutor -> (tokens) -> StopSequenceDetector -> client stream
//! ```
//! Each actor is a thin shell over a plain struct (`SchedulerCore`, `PagePool`, `Llama`,
//! `StopDetector`) that tests drive synchronously.

pub mod dp_router;
pub mod executor;
pub mod fault;
pub mod intake;
pub mod kv_pages;
pub mod scheduler;
pub mod step_output;
pub mod stop_detector;
pub mod tp_ranks;
