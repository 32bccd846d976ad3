//! Everything about the model itself: its config, weights, tokenizer and forward pass.
//!
//! [`ModelFiles`] is what was read from disk (or from the binary, for the embedded tiny model);
//! [`Llama`] is the forward pass on a burn backend. Nothing here knows about requests.

pub mod chat;
pub mod config;
pub mod cpu_fused;
pub mod cpu_gemm;
pub mod cuda_attention;
pub mod cuda_fused;
pub mod cuda_gemm;
pub mod cuda_sample;
pub mod draw;
pub mod host_attention;
pub mod kernels;
pub mod llama;
pub mod output_blocks;
pub mod paged_cache;
pub mod serving_kernels;
pub mod shard;
pub mod step_indices;
pub mod weights;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use chat::{ChatMessage, ChatTemplate, ChatTemplateError};
pub use config::LlamaConfig;
pub use llama::{
    FedTokens, FusedOps, Llama, PagedAttention, PagedAttentionFn, ProjectFn, SequenceChunk, WeightLayout,
};
pub use paged_cache::{HostPages, KvStorage, PagedKvCache, SlotIndex, WriteSlots};
use tokenizers::Tokenizer;
pub use weights::{CheckpointBytes, WeightIndex};

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The message already holds the cause, so it is not chained as a `source` (one line).
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("invalid weights: {0}")]
    Weights(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl ModelError {
    /// Prefixes a config or support problem with the file it was found in.
    fn in_file(self, file: &Path) -> Self {
        match self {
            ModelError::Config(m) => ModelError::Config(format!("{}: {m}", file.display())),
            ModelError::Unsupported(m) => ModelError::Unsupported(format!("{}: {m}", file.display())),
            other => other,
        }
    }

    pub fn io(path: &Path, error: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

/// Name under which the embedded model is served.
pub const EMBEDDED_MODEL_NAME: &str = "inferflux-tiny-llama";

/// The tiny random-weight Llama from `tests/fixtures/tiny-llama`, compiled into the binary so that
/// a fresh machine can serve something with nothing downloaded.
mod embedded {
    pub const CONFIG: &str = include_str!("../../tests/fixtures/tiny-llama/config.json");
    pub const GENERATION_CONFIG: &str =
        include_str!("../../tests/fixtures/tiny-llama/generation_config.json");
    pub const TOKENIZER: &[u8] = include_bytes!("../../tests/fixtures/tiny-llama/tokenizer.json");
    pub const TOKENIZER_CONFIG: &str = include_str!("../../tests/fixtures/tiny-llama/tokenizer_config.json");
    pub const WEIGHTS: &[u8] = include_bytes!("../../tests/fixtures/tiny-llama/model.safetensors");
}

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// The tiny fixture compiled into the binary.
    Embedded,
    /// A Hugging Face model directory.
    Dir(PathBuf),
}

/// Token ids and strings the server needs from the tokenizer side of a checkpoint.
#[derive(Debug, Clone)]
pub struct SpecialTokens {
    pub bos_token_id: Option<u32>,
    /// From `generation_config.json`, else `config.json`; may hold several ids.
    pub eos_token_ids: Vec<u32>,
}

/// A checkpoint's files, read and validated, before any tensor is built.
pub struct ModelFiles {
    pub name: String,
    pub config: LlamaConfig,
    pub tokenizer: Arc<Tokenizer>,
    pub special: SpecialTokens,
    /// Context length: the smaller of `max_position_embeddings` and the tokenizer's limit.
    pub max_context: usize,
    pub checkpoint: CheckpointBytes,
    /// The chat template, when the checkpoint has one (`/v1/chat/completions` needs it).
    pub chat_template: Option<Arc<ChatTemplate>>,
}

impl ModelFiles {
    pub fn open(source: &ModelSource) -> Result<Self, ModelError> {
        match source {
            ModelSource::Embedded => Self::from_parts(
                EMBEDDED_MODEL_NAME.to_string(),
                embedded::CONFIG,
                Some(embedded::GENERATION_CONFIG.to_string()),
                Some(embedded::TOKENIZER_CONFIG.to_string()),
                None,
                Tokenizer::from_bytes(embedded::TOKENIZER)
                    .map_err(|e| ModelError::Tokenizer(e.to_string()))?,
                CheckpointBytes::Static(vec![("embedded:model.safetensors", embedded::WEIGHTS)]),
                Path::new("embedded:"),
            ),
            ModelSource::Dir(dir) => {
                let read = |name: &str| -> Result<String, ModelError> {
                    let path = dir.join(name);
                    std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))
                };
                let optional = |name: &str| dir.join(name).exists().then(|| read(name)).transpose();
                let tokenizer_path = dir.join("tokenizer.json");
                let tokenizer = Tokenizer::from_file(&tokenizer_path)
                    .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tokenizer_path.display())))?;
                let name = dir
                    .canonicalize()
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .unwrap_or_else(|| dir.display().to_string());
                Self::from_parts(
                    name,
                    &read("config.json")?,
                    optional("generation_config.json")?,
                    optional("tokenizer_config.json")?,
                    optional("chat_template.jinja")?,
                    tokenizer,
                    CheckpointBytes::open_dir(dir)?,
                    dir,
                )
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn from_parts(
        name: String,
        config_json: &str,
        generation_config: Option<String>,
        tokenizer_config: Option<String>,
        chat_template_jinja: Option<String>,
        tokenizer: Tokenizer,
        checkpoint: CheckpointBytes,
        origin: &Path,
    ) -> Result<Self, ModelError> {
        let config =
            LlamaConfig::from_json(config_json).map_err(|e| e.in_file(&origin.join("config.json")))?;
        let mut eos_token_ids = config.eos_token_ids.clone();
        let mut bos_token_id = config.bos_token_id;
        if let Some(text) = generation_config {
            let gen: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::Config(format!("generation_config.json: {e}")))?;
            if let Some(eos) = gen.get("eos_token_id") {
                if let Ok(ids) = serde_json::from_value::<config::EosTokenIds>(eos.clone()) {
                    eos_token_ids = ids.to_vec();
                }
            }
            if let Some(bos) = gen.get("bos_token_id").and_then(|b| b.as_u64()) {
                bos_token_id = Some(bos as u32);
            }
        }
        let mut max_context = config.max_position_embeddings;
        let tokenizer_config: Option<serde_json::Value> = tokenizer_config
            .map(|text| serde_json::from_str(&text))
            .transpose()
            .map_err(|e| ModelError::Config(format!("tokenizer_config.json: {e}")))?;
        if let Some(limit) = tokenizer_config
            .as_ref()
            .and_then(|tc| tc.get("model_max_length"))
            .and_then(|m| m.as_u64())
        {
            max_context = max_context.min(limit as usize);
        }
        let chat_template =
            ChatTemplate::from_checkpoint(tokenizer_config.as_ref(), chat_template_jinja.as_deref(), origin)?
                .map(Arc::new);
        if tokenizer.get_vocab_size(true) > config.vocab_size {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer has {} tokens but the model's vocab_size is {}",
                tokenizer.get_vocab_size(true),
                config.vocab_size
            )));
        }
        Ok(Self {
            name,
            config,
            tokenizer: Arc::new(tokenizer),
            special: SpecialTokens {
                bos_token_id,
                eos_token_ids,
            },
            max_context,
            checkpoint,
            chat_template,
        })
    }
}
