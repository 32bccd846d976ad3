//! InferFlux: an LLM inference server with a paged KV cache and unified batching.
pub mod model;
