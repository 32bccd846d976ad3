//! The parts of a Hugging Face `config.json` that the decoder forward pass needs.
//!
//! Llama, Mistral, Qwen2 and Qwen3 are one decoder with a few switches (attention biases, q/k
//! norms, a sliding window, Llama 3 RoPE scaling). Unknown architectures and settings the forward
//! pass does not implement fail at load with an error that names them; everything the forward
//! pass depends on is checked here, once, so that `llama.rs` can trust its shapes.

use serde::Deserialize;

use super::ModelError;

/// Architectures whose forward pass `llama.rs` implements.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
];

/// RoPE frequency schemes implemented (`rope_type`).
pub const SUPPORTED_ROPE_TYPES: &[&str] = &["default", "llama3"];

/// `config.json` as written by `transformers` (4.x puts `rope_theta` at the top level, 5.x inside
/// `rope_parameters`).
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_max_positions")]
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    /// Mistral: attend to at most this many latest positions (`null`: no window).
    sliding_window: Option<usize>,
    /// Qwen2/Qwen3: whether `sliding_window` applies at all.
    use_sliding_window: Option<bool>,
    quantization_config: Option<serde_json::Value>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<EosTokenIds>,
}

/// `rope_parameters` (transformers 5) or `rope_scaling` (4.x, with `type` as an older spelling).
#[derive(Debug, Clone, Default, Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

/// How RoPE frequencies are derived from `rope_theta`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `theta^(-2i/d)`.
    Default,
    /// Llama 3.1+: low frequencies divided by `factor`, high ones kept, smooth in between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// `eos_token_id` may be one id or a list of ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EosTokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl EosTokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            EosTokenIds::One(id) => vec![*id],
            EosTokenIds::Many(ids) => ids.clone(),
        }
    }
}

fn default_max_positions() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}

/// The validated shape of a Llama model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections (Qwen2; Llama and Qwen3 with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama and Qwen3 with `attention_bias`).
    pub o_bias: bool,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Each position attends to itself and the `w - 1` before it (Mistral).
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    /// Parses and validates `config.json` text.
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        let architecture = raw
            .architectures
            .first()
            .cloned()
            .unwrap_or_else(|| "LlamaForCausalLM".to_string());
        if !SUPPORTED_ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(ModelError::Unsupported(format!(
                "architecture `{architecture}` (supported: {})",
                SUPPORTED_ARCHITECTURES.join(", ")
            )));
        }
        let unsupported = |what: String| Err(ModelError::Unsupported(what));
        if raw.hidden_act != "silu" {
            return unsupported(format!("hidden_act `{}` (supported: silu)", raw.hidden_act));
        }
        if raw.mlp_bias {
            return unsupported("mlp_bias = true (supported: false)".into());
        }
        if raw.quantization_config.is_some() {
            return unsupported(
                "quantization_config (quantized checkpoints; supported: f32, f16, bf16 weights)".into(),
            );
        }
        let (qkv_bias, o_bias, qk_norm) = match architecture.as_str() {
            "Qwen2ForCausalLM" => (true, false, false),
            "Qwen3ForCausalLM" => (raw.attention_bias, raw.attention_bias, true),
            "MistralForCausalLM" => (false, false, false),
            _ => (raw.attention_bias, raw.attention_bias, false),
        };
        let sliding_window = match architecture.as_str() {
            "MistralForCausalLM" => raw.sliding_window,
            _ if raw.use_sliding_window == Some(true) => {
                return unsupported(format!(
                    "use_sliding_window = true for {architecture} (per-layer windows; supported: false)"
                ));
            }
            _ => None,
        };
        if sliding_window == Some(0) {
            return Err(ModelError::Config("sliding_window must be > 0".into()));
        }
        let rope = raw.rope_parameters.clone().or_else(|| {
            raw.rope_scaling
                .as_ref()
                .and_then(|v| serde_json::from_value::<RopeParameters>(v.clone()).ok())
        });
        if raw.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) && rope.is_none() {
            return Err(ModelError::Config("rope_scaling is not an object".into()));
        }
        let rope = rope.unwrap_or_default();
        let rope_type = rope
            .rope_type
            .clone()
            .or(rope.legacy_type.clone())
            .unwrap_or_else(|| "default".into());
        let rope_scaling = match rope_type.as_str() {
            "default" => RopeScaling::Default,
            "llama3" => {
                let need = |v: Option<f64>, name: &str| {
                    v.ok_or_else(|| ModelError::Config(format!("rope type llama3 needs `{name}`")))
                };
                RopeScaling::Llama3 {
                    factor: need(rope.factor, "factor")?,
                    low_freq_factor: need(rope.low_freq_factor, "low_freq_factor")?,
                    high_freq_factor: need(rope.high_freq_factor, "high_freq_factor")?,
                    original_max_position_embeddings: rope.original_max_position_embeddings.ok_or_else(
                        || {
                            ModelError::Config(
                                "rope type llama3 needs `original_max_position_embeddings`".into(),
                            )
                        },
                    )?,
                }
            }
            other => {
                return unsupported(format!(
                    "rope type `{other}` (supported: {})",
                    SUPPORTED_ROPE_TYPES.join(", ")
                ))
            }
        };
        let rope_theta = rope.rope_theta.or(raw.rope_theta).unwrap_or(10000.0);
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1));
        let config = LlamaConfig {
            architecture,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: raw.vocab_size,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings,
            qkv_bias,
            o_bias,
            qk_norm,
            sliding_window,
            bos_token_id: raw.bos_token_id,
            eos_token_ids: raw.eos_token_id.map(|e| e.to_vec()).unwrap_or_default(),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ModelError> {
        let bad = |msg: String| Err(ModelError::Config(msg));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_layers == 0 {
            return bad("num_attention_heads, num_key_value_heads and num_hidden_layers must be > 0".into());
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim ({}) must be even for RoPE", self.head_dim));
        }
        Ok(())
    }

    /// Query heads served by each KV head (grouped-query attention).
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100,
        "rope_theta":500000.0,"eos_token_id":[2,3]}"#;

    #[test]
    fn parses_top_level_rope_theta_and_eos_list() {
        let c = LlamaConfig::from_json(BASE).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert_eq!(c.group_size(), 2);
    }

    #[test]
    fn unknown_architecture_is_named() {
        let text = BASE.replace("LlamaForCausalLM", "GPT2LMHeadModel");
        let err = LlamaConfig::from_json(&text).unwrap_err().to_string();
        assert!(
            err.contains("GPT2LMHeadModel") && err.contains("LlamaForCausalLM"),
            "{err}"
        );
    }

    #[test]
    fn unsupported_rope_scaling_is_refused_not_ignored() {
        let text = BASE.replace(
            "\"rope_theta\"",
            "\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":4.0},\"rope_theta\"",
        );
        let err = LlamaConfig::from_json(&text).unwrap_err().to_string();
        assert!(err.contains("yarn") && err.contains("llama3"), "{err}");
        let partial = BASE.replace(
            "\"rope_theta\"",
            "\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8.0},\"rope_theta\"",
        );
        let err = LlamaConfig::from_json(&partial).unwrap_err().to_string();
        assert!(err.contains("low_freq_factor"), "{err}");
    }

    #[test]
    fn architecture_switches() {
        let qwen2 = LlamaConfig::from_json(&BASE.replace("LlamaForCausalLM", "Qwen2ForCausalLM")).unwrap();
        assert!(qwen2.qkv_bias && !qwen2.o_bias && !qwen2.qk_norm);
        let qwen3 = LlamaConfig::from_json(&BASE.replace("LlamaForCausalLM", "Qwen3ForCausalLM")).unwrap();
        assert!(qwen3.qk_norm && !qwen3.qkv_bias);
        let mistral = BASE
            .replace("LlamaForCausalLM", "MistralForCausalLM")
            .replace("\"vocab_size\"", "\"sliding_window\":8,\"vocab_size\"");
        assert_eq!(LlamaConfig::from_json(&mistral).unwrap().sliding_window, Some(8));
        let windowed_qwen = BASE
            .replace("LlamaForCausalLM", "Qwen2ForCausalLM")
            .replace("\"vocab_size\"", "\"use_sliding_window\":true,\"vocab_size\"");
        let err = LlamaConfig::from_json(&windowed_qwen).unwrap_err().to_string();
        assert!(err.contains("use_sliding_window"), "{err}");
        let llama3 = BASE.replace(
            "\"rope_theta\":500000.0",
            "\"rope_parameters\":{\"rope_type\":\"llama3\",\"rope_theta\":500000.0,\"factor\":8.0,\
             \"low_freq_factor\":1.0,\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192}",
        );
        let c = LlamaConfig::from_json(&llama3).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }
}
