//! InferFlux: an LLM inference server with a paged KV cache, unified batching and an
//! OpenAI-compatible API. See docs/DeveloperGuide.md for the layout.

pub mod actors;
pub mod config;
pub mod heap;
pub mod http;
pub mod kv;
pub mod model;
pub mod parallel;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod shutdown;
pub mod stop;
pub mod telemetry;
