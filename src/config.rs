//! Layered configuration: built-in defaults < TOML file < `INFERFLUX__SECTION__KEY` env vars <
//! command-line flags. Every key is documented in docs/AdminGuide.md.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why the configuration could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Invalid(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {message}")]
    BadValue { key: &'static str, message: String },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerConfig,
    pub model: ModelConfig,
    pub kv: KvConfig,
    pub scheduler: SchedulerConfig,
    pub limits: LimitsConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to bind; loopback by default.
    pub host: String,
    pub port: u16,
    /// Largest accepted request body in bytes (413 above it).
    pub max_body_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            max_body_bytes: 1 << 20,
        }
    }
}

/// Which compute device serves the model.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// CUDA when a GPU answers, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Hugging Face model directory; empty serves the embedded tiny model.
    pub path: Option<PathBuf>,
    /// Name clients pass as `model`; defaults to the directory name.
    pub served_name: Option<String>,
    pub device: DeviceKind,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KvConfig {
    /// Tokens per KV page.
    pub page_size: usize,
    /// Pages in the pool (shared by all sequences); 0 sizes the pool from `memory_fraction`.
    pub num_pages: usize,
    /// With `num_pages = 0`: the share of the device memory left free after loading the weights
    /// that the pool takes.
    pub memory_fraction: f64,
    /// Reuse the K/V of full pages shared by prompts (automatic prefix caching).
    pub enable_prefix_caching: bool,
    /// Host memory for the K/V of sequences preempted with `scheduler.preemption = "swap"`.
    pub swap_space_mib: usize,
}

impl Default for KvConfig {
    fn default() -> Self {
        Self {
            page_size: 16,
            num_pages: 1024,
            memory_fraction: 0.5,
            enable_prefix_caching: true,
            swap_space_mib: 4096,
        }
    }
}

/// What a sequence preempted for KV pages does with its K/V.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PreemptionMode {
    /// Drop them and compute them again on resumption (a prefix-cache hit makes that cheap).
    #[default]
    Recompute,
    /// Copy them to host memory (within `kv.swap_space_mib`) and back on resumption; falls back
    /// to recompute when the swap space is full.
    Swap,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Token budget of one step (decode tokens + prompt chunk tokens).
    pub max_batched_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Most requests waiting for admission; more get 429.
    pub max_waiting: usize,
    /// `recompute` or `swap`.
    pub preemption: PreemptionMode,
    /// Weighted fair share per client identity (`key-<8 hex>` for an API key, else the `user`
    /// field, else `anonymous`); unlisted clients weigh 1.0.
    pub client_weights: HashMap<String, f64>,
    /// Half-life, in steps, of the recent served tokens behind Jain's fairness index; a client
    /// counts as active while it has work or such tokens left.
    pub fairness_half_life_steps: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batched_tokens: 512,
            max_running: 64,
            max_waiting: 1024,
            preemption: PreemptionMode::Recompute,
            client_weights: HashMap::new(),
            fairness_half_life_steps: 64,
        }
    }
}

/// Per-request limits that intake enforces (400 naming the field beyond them).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most `stop` strings in one request (OpenAI allows 4). The detector's work per token grows
    /// with it.
    pub max_stop_strings: usize,
    /// Longest `stop` string, in UTF-8 bytes; text up to this long may be held back per sequence.
    pub max_stop_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_stop_strings: 4,
            max_stop_bytes: 256,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `inferflux=debug`; `RUST_LOG` wins when set.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// Values from the command line, the top layer.
#[derive(Debug, Clone, Default)]
pub struct CliOverrides {
    pub model: Option<PathBuf>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub device: Option<DeviceKind>,
}

impl Settings {
    /// Builds the settings from every layer. `file` is `--config`; without it
    /// `config/inferflux.toml` is read when it exists.
    pub fn load(file: Option<&Path>, cli: &CliOverrides) -> Result<Self, ConfigError> {
        Self::load_with_env(file, cli, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given (tests pass their own).
    pub fn load_with_env(
        file: Option<&Path>,
        cli: &CliOverrides,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut builder =
            config::Config::builder().add_source(config::Config::try_from(&Settings::default())?);
        match file {
            Some(path) => builder = builder.add_source(config::File::from(path).required(true)),
            None => {
                builder = builder.add_source(config::File::with_name("config/inferflux.toml").required(false))
            }
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("INFERFLUX__"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("INFERFLUX")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
        if let Some(model) = &cli.model {
            builder = builder.set_override("model.path", model.display().to_string())?;
        }
        if let Some(host) = &cli.host {
            builder = builder.set_override("server.host", host.clone())?;
        }
        if let Some(port) = cli.port {
            builder = builder.set_override("server.port", port as i64)?;
        }
        if let Some(device) = cli.device {
            let name = match device {
                DeviceKind::Auto => "auto",
                DeviceKind::Cpu => "cpu",
                DeviceKind::Cuda => "cuda",
            };
            builder = builder.set_override("model.device", name)?;
        }
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = |key: &'static str, v: usize| {
            if v == 0 {
                Err(ConfigError::BadValue {
                    key,
                    message: "must be greater than 0".into(),
                })
            } else {
                Ok(())
            }
        };
        positive("kv.page_size", self.kv.page_size)?;
        if !(self.kv.memory_fraction > 0.0 && self.kv.memory_fraction <= 1.0) {
            return Err(ConfigError::BadValue {
                key: "kv.memory_fraction",
                message: "must be in (0, 1]".into(),
            });
        }
        positive("scheduler.max_batched_tokens", self.scheduler.max_batched_tokens)?;
        positive("scheduler.max_running", self.scheduler.max_running)?;
        positive("scheduler.max_waiting", self.scheduler.max_waiting)?;
        positive(
            "scheduler.fairness_half_life_steps",
            self.scheduler.fairness_half_life_steps,
        )?;
        if let Some((client, w)) = self
            .scheduler
            .client_weights
            .iter()
            .find(|(_, w)| !(w.is_finite() && **w > 0.0))
        {
            return Err(ConfigError::BadValue {
                key: "scheduler.client_weights",
                message: format!("the weight of `{client}` must be a positive number, got {w}"),
            });
        }
        positive("server.max_body_bytes", self.server.max_body_bytes)?;
        positive("limits.max_stop_bytes", self.limits.max_stop_bytes)?;
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(ConfigError::BadValue {
                key: "log.format",
                message: "must be `text` or `json`".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn shipped_config_file_lists_the_defaults() {
        let text = include_str!("../config/inferflux.toml");
        let from_file: Settings = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        assert_eq!(
            from_file,
            Settings::default(),
            "config/inferflux.toml drifted from the defaults"
        );
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = std::env::temp_dir().join(format!("inferflux-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "[server]\nport = 9000\nhost = \"0.0.0.0\"\n[kv]\npage_size = 32\n",
        )
        .unwrap();
        let vars = env(&[
            ("INFERFLUX__SERVER__PORT", "9100"),
            ("INFERFLUX__KV__NUM_PAGES", "77"),
        ]);
        let s = Settings::load_with_env(Some(&file), &CliOverrides::default(), vars.clone()).unwrap();
        assert_eq!((s.server.port, s.server.host.as_str()), (9100, "0.0.0.0"));
        assert_eq!((s.kv.page_size, s.kv.num_pages), (32, 77));
        let cli = CliOverrides {
            port: Some(9200),
            device: Some(DeviceKind::Cpu),
            ..Default::default()
        };
        let s = Settings::load_with_env(Some(&file), &cli, vars).unwrap();
        assert_eq!(s.server.port, 9200);
        assert_eq!(s.model.device, DeviceKind::Cpu);
        assert_eq!(s.scheduler, SchedulerConfig::default());
    }

    #[test]
    fn stop_sequences_limits_come_from_file_and_env() {
        let s = Settings::load_with_env(None, &CliOverrides::default(), env(&[])).unwrap();
        assert_eq!(s.limits, LimitsConfig::default());
        assert_eq!(s.limits.max_stop_strings, 4, "OpenAI's limit by default");
        let vars = env(&[
            ("INFERFLUX__LIMITS__MAX_STOP_STRINGS", "8"),
            ("INFERFLUX__LIMITS__MAX_STOP_BYTES", "32"),
        ]);
        let s = Settings::load_with_env(None, &CliOverrides::default(), vars).unwrap();
        assert_eq!((s.limits.max_stop_strings, s.limits.max_stop_bytes), (8, 32));
        let err = Settings::load_with_env(
            None,
            &CliOverrides::default(),
            env(&[("INFERFLUX__LIMITS__MAX_STOP_BYTES", "0")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("limits.max_stop_bytes"), "{err}");
    }

    #[test]
    fn unified_batch_client_weights_from_file_and_env() {
        let dir = std::env::temp_dir().join(format!("inferflux-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("w.toml");
        std::fs::write(
            &file,
            "[scheduler]\nclient_weights = { \"alice\" = 2.0, \"key-0a1b2c3d\" = 0.5 }\n",
        )
        .unwrap();
        let vars = env(&[("INFERFLUX__SCHEDULER__CLIENT_WEIGHTS__BOB", "3")]);
        let s = Settings::load_with_env(Some(&file), &CliOverrides::default(), vars).unwrap();
        let w = &s.scheduler.client_weights;
        assert_eq!(
            (w.get("alice"), w.get("key-0a1b2c3d"), w.get("bob")),
            (Some(&2.0), Some(&0.5), Some(&3.0)),
            "{w:?}"
        );
        let err = Settings::load_with_env(
            None,
            &CliOverrides::default(),
            env(&[("INFERFLUX__SCHEDULER__CLIENT_WEIGHTS__BOB", "0")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("scheduler.client_weights"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = Settings::load_with_env(
            None,
            &CliOverrides::default(),
            env(&[("INFERFLUX__KV__PAGE_SIZE", "0")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("kv.page_size"), "{err}");
        let err = Settings::load_with_env(
            None,
            &CliOverrides::default(),
            env(&[("INFERFLUX__KV__BOGUS", "1")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}
