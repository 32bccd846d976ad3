//! The parts of a Hugging Face `config.json` that the Llama forward pass needs.
//!
//! Unknown architectures fail at load with an error that names them; everything the forward
//! pass depends on is checked here, once, so that `llama.rs` can trust its shapes.

use serde::Deserialize;

use super::ModelError;

/// Architectures whose forward pass `llama.rs` implements.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["LlamaForCausalLM"];

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
    bos_token_id: Option<u32>,
    eos_token_id: Option<EosTokenIds>,
}

#[derive(Debug, Clone, Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
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
    pub tie_word_embeddings: bool,
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
        if raw.hidden_act != "silu" {
            return Err(ModelError::Unsupported(format!(
                "hidden_act `{}` (supported: silu)",
                raw.hidden_act
            )));
        }
        if raw.attention_bias || raw.mlp_bias {
            return Err(ModelError::Unsupported(
                "attention_bias / mlp_bias = true (supported: false)".into(),
            ));
        }
        let rope_type = raw.rope_parameters.as_ref().and_then(|p| p.rope_type.clone());
        let scaled = match &raw.rope_scaling {
            None | Some(serde_json::Value::Null) => false,
            Some(_) => true,
        };
        if scaled || rope_type.as_deref().is_some_and(|t| t != "default") {
            return Err(ModelError::Unsupported(format!(
                "rope scaling `{}` (supported: default)",
                rope_type.unwrap_or_else(|| "rope_scaling".into())
            )));
        }
        let rope_theta = raw
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(raw.rope_theta)
            .unwrap_or(10000.0);
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
            tie_word_embeddings: raw.tie_word_embeddings,
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
    fn rope_scaling_is_refused_not_ignored() {
        let text = BASE.replace(
            "\"rope_theta\"",
            "\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8.0},\"rope_theta\"",
        );
        assert!(LlamaConfig::from_json(&text).is_err());
    }
}
