//! Layered configuration: built-in defaults < TOML file < `INFERFLUX__SECTION__KEY` env vars <
//! command-line flags. Every key is documented in docs/AdminGuide.md.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::cuda_attention::AttentionKernel;
use crate::model::cuda_gemm::{GemmChoice, GemmKernel};
use crate::model::kernels::skinny_gemm::SkinnyTuning;
use crate::model::WeightLayout;

/// Why the configuration could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Invalid(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {message}")]
    BadValue { key: &'static str, message: String },
    /// The file itself is wrong (unknown key, wrong type, bad TOML): named with the key.
    #[error("configuration file {}: {message}", file.display())]
    File { file: PathBuf, message: String },
}

/// The file's own error, if `file` alone does not give valid settings: what went wrong, with
/// the full dotted key (`config` reports an unknown field under its section only).
fn file_error(file: &Path) -> Option<ConfigError> {
    let alone = config::Config::builder()
        .add_source(config::File::from(file).required(false))
        .build()
        .and_then(|c| c.try_deserialize::<Settings>());
    let err = alone.err()?;
    let message = match &err {
        config::ConfigError::At { error, key, .. } => {
            let inner = error.to_string();
            match (inner.strip_prefix("unknown field `"), key) {
                (Some(rest), Some(section)) => {
                    let (field, expected) = rest.split_once('`').unwrap_or((rest, ""));
                    format!("unknown key `{section}.{field}`{expected}")
                }
                _ => err.to_string(),
            }
        }
        _ => err.to_string(),
    };
    Some(ConfigError::File {
        file: file.to_path_buf(),
        message,
    })
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
    pub auth: AuthConfig,
    pub parallel: ParallelConfig,
    pub cuda: CudaConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to bind; loopback by default.
    pub host: String,
    pub port: u16,
    /// Largest accepted request body in bytes (413 above it).
    pub max_body_bytes: usize,
    /// On SIGTERM/SIGINT, how long running requests may take to finish before they are
    /// cancelled with an error and the process exits.
    pub shutdown_grace_seconds: u64,
    /// Most open client connections, all workers together; more wait in the listen backlog.
    pub max_connections: usize,
    /// A client must send its whole request head within this (slow-loris); 408 and close after.
    pub client_request_timeout_ms: u64,
    /// An idle keep-alive connection is closed after this; 0 disables keep-alive.
    pub keep_alive_seconds: u64,
    /// Time a client gets to acknowledge the connection's shutdown before it is dropped.
    pub client_disconnect_timeout_ms: u64,
    /// An SSE stream whose client stops reading (the server has an event it cannot hand on) for
    /// this long is cancelled and its KV pages freed; 0 never.
    pub stream_idle_timeout_seconds: u64,
    /// Serve `/admin/*`; false removes those routes (404).
    pub enable_admin: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            max_body_bytes: 1 << 20,
            shutdown_grace_seconds: 30,
            max_connections: 1024,
            client_request_timeout_ms: 5000,
            keep_alive_seconds: 5,
            client_disconnect_timeout_ms: 1000,
            stream_idle_timeout_seconds: 60,
            enable_admin: true,
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
    /// Plan the next step while the executor runs the current one (vLLM's async scheduling):
    /// each decode's input is the token the running step samples, which the executor feeds back.
    /// The executor then waits for no scheduling, page bookkeeping or streaming between steps.
    /// A sequence that a stop string ends computes at most one token more, which is dropped.
    pub async_scheduling: bool,
    /// With async scheduling: queue step N+1 on the device before reading step N back, taking
    /// N+1's decode inputs from N's sampled ids on the device, so that the device never waits
    /// for the host between steps. `auto`: on for CUDA (one rank), off on the CPU, whose steps
    /// run while they are queued. Off by default until a GPU run has measured it.
    pub overlap_steps: OverlapSteps,
}

/// `scheduler.overlap_steps`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OverlapSteps {
    Auto,
    On,
    #[default]
    Off,
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
            async_scheduling: true,
            overlap_steps: OverlapSteps::Off,
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
    /// Most prompt tokens per request; 0 leaves only the model's context as the bound.
    pub max_prompt_tokens: usize,
    /// Most `max_tokens` per request; 0 leaves only the model's context as the bound.
    pub max_output_tokens: usize,
    /// Requests per second each client may sustain on the API routes (token bucket); 0 is off.
    pub rate_limit_rps: f64,
    /// Requests a client may send at once above the rate; 0 takes `ceil(rate_limit_rps)`.
    pub rate_limit_burst: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_stop_strings: 4,
            max_stop_bytes: 256,
            max_prompt_tokens: 0,
            max_output_tokens: 0,
            rate_limit_rps: 0.0,
            rate_limit_burst: 0,
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

/// How many ranks serve the model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ParallelConfig {
    /// Ranks one model is split over (heads, MLP and vocabulary); 1 runs it whole.
    pub tensor_parallel_size: usize,
    /// Engine replicas (scheduler, KV pool of the configured size, executor with its tensor-parallel
    /// ranks) behind one intake; a request goes to the one holding its longest cached prefix.
    pub data_parallel_size: usize,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self {
            tensor_parallel_size: 1,
            data_parallel_size: 1,
        }
    }
}

/// How the CUDA backend runs the step's projections (see docs/Performance.md for what each
/// kernel measured). Ignored on the CPU.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CudaConfig {
    /// Kernel for projections of more than `gemv_max_rows` rows (prompt chunks, large batches).
    pub gemm: GemmKernel,
    /// Kernel for projections of at most `gemv_max_rows` rows (decode at small batches).
    pub gemv: GemmKernel,
    pub gemv_max_rows: usize,
    /// Projection weights as `[in, out]` (transposed at load) or the checkpoint's `[out, in]`.
    pub weight_layout: WeightLayout,
    /// Attention of decodes and short prompt chunks: burn's gather, or our paged kernel.
    pub attention: AttentionKernel,
    /// RMSNorm, the MLP's `silu(gate) · up` and the embedding's gather by our one-launch kernels
    /// instead of burn's ops.
    pub fused_ops: bool,
    /// With `fused_ops`, q, k and v as one projection, then the RoPE of q and k and the K/V write
    /// into the pages in one launch (checked against transformers on the H100, 2026-11-27).
    pub fused_kv_write: bool,
    /// With `fused_ops`, the merged gate/up GEMV and `silu(gate) · up` in one launch at the
    /// batches the GEMV serves (bit for bit the two launches; not yet run on a GPU).
    pub fused_gate_up: bool,
    /// With `fused_ops`, the RMSNorm before the attention and before the MLP (with its residual
    /// add) inside the q/k/v and gate/up GEMVs, at the batches the GEMV serves, and with
    /// `fused_kv_write` the RoPE and K/V write in the q/k/v GEMV too: 48 launches fewer per
    /// decode step of a 16-layer model. Off until measured on a GPU.
    pub fused_norm_gemv: bool,
    /// With `attention = "paged"`, a decode batch too small to fill the GPU splits contexts of
    /// more than 512 keys into partitions attended by cubes of their own, then put together
    /// (flash-decoding's split-K; one launch more per layer where it splits).
    pub split_attention: bool,
    /// Greedy rows' argmax by our one-cube-per-row kernel instead of burn's `argmax`, which
    /// (without autotune) walks each 128k-logit row with one thread.
    pub device_argmax: bool,
    /// Every row's token chosen on the device: temperature rows drawn by the Gumbel-max trick
    /// among the tokens top-k/top-p/min-p keep, rows with bias, penalties or `min_tokens` from
    /// copies edited there, and the raw logprobs of the rows that ask for them computed there, so
    /// that only token ids (and logprobs) come back. Off until measured on a GPU.
    pub device_sampling: bool,
    /// Our kernels' outputs of up to 1 MiB as views of 8 MiB blocks (`model::output_blocks`)
    /// rather than an allocation each: one task fewer per launch for cubecl's two threads.
    pub carve_outputs: bool,
    /// The plan knobs of `gemm = "skinny"`, our tensor-core GEMM (`[cuda.skinny]`).
    pub skinny: SkinnyTuning,
}

impl Default for CudaConfig {
    fn default() -> Self {
        Self {
            // The fastest measured on the H100 (docs/Performance.md, 2026-11-27): our GEMV up
            // to 8 rows on the checkpoint's [out, in] weights, cuBLAS above, our paged
            // attention and fused operations.
            gemm: GemmKernel::Cublas,
            gemv: GemmKernel::Gemv,
            gemv_max_rows: 8,
            weight_layout: WeightLayout::OutIn,
            attention: AttentionKernel::Paged,
            fused_ops: true,
            fused_kv_write: true,
            fused_gate_up: true,
            fused_norm_gemv: false,
            split_attention: true,
            device_argmax: true,
            device_sampling: false,
            carve_outputs: true,
            skinny: SkinnyTuning::DEFAULT,
        }
    }
}

impl CudaConfig {
    pub fn gemm_choice(&self) -> GemmChoice {
        GemmChoice {
            small: self.gemv,
            large: self.gemm,
            small_max_rows: self.gemv_max_rows,
        }
    }
}

/// Who may call what. Empty lists and tokens leave the routes open, as before auth existed.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer keys for `/v1/*`, `/tokenize` and `/detokenize`; empty leaves them open.
    pub api_keys: Vec<String>,
    /// Bearer token for `/admin/*`; empty leaves them open. Opens nothing else.
    pub admin_token: String,
    /// `/metrics` needs an API key or the admin token.
    pub protect_metrics: bool,
}

/// Redacts the secrets so that no `{:?}` of the settings can leak them.
impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("api_keys", &format_args!("<{} redacted>", self.api_keys.len()))
            .field(
                "admin_token",
                &format_args!(
                    "{}",
                    if self.admin_token.is_empty() {
                        "<unset>"
                    } else {
                        "<redacted>"
                    }
                ),
            )
            .field("protect_metrics", &self.protect_metrics)
            .finish()
    }
}

/// Env vars that hold secrets, read verbatim: `try_parsing` would turn `007` into 7 and `1e3`
/// into 1000.
const ENV_API_KEYS: &str = "INFERFLUX__AUTH__API_KEYS";
const ENV_ADMIN_TOKEN: &str = "INFERFLUX__AUTH__ADMIN_TOKEN";
/// Short spellings of `log.level` and `log.format`, as operators expect of a daemon.
const ENV_LOG: &str = "INFERFLUX_LOG";
const ENV_LOG_FORMAT: &str = "INFERFLUX_LOG_FORMAT";

/// Values from the command line, the top layer.
#[derive(Clone, Default)]
pub struct CliOverrides {
    pub model: Option<PathBuf>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub device: Option<DeviceKind>,
    /// `--api-key`, repeatable: replaces the configured list when given.
    pub api_keys: Option<Vec<String>>,
    pub admin_token: Option<String>,
}

/// Redacts the secrets, as [`AuthConfig`]'s does.
impl std::fmt::Debug for CliOverrides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CliOverrides")
            .field("model", &self.model)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("device", &self.device)
            .field(
                "api_keys",
                &self.api_keys.as_ref().map(|k| format!("<{} redacted>", k.len())),
            )
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Which built-in defaults the lowest layer holds: a few keys differ on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltIn {
    Cpu,
    Cuda,
}

impl Settings {
    /// The built-in defaults for `device`. With CUDA, as vLLM does on a GPU: the KV pool takes
    /// its share of the GPU memory left free after the weights (`kv.num_pages = 0`) instead of
    /// 1,024 pages (16,384 tokens, a few percent of a large GPU), and a step takes up to 2,048
    /// tokens of up to 256 sequences: a GPU step costs about the same from 1 row to hundreds,
    /// where the CPU's grows with every row.
    pub fn built_in(device: BuiltIn) -> Self {
        let mut s = Self::default();
        if device == BuiltIn::Cuda {
            s.kv.num_pages = 0;
            s.scheduler.max_batched_tokens = 2048;
            s.scheduler.max_running = 256;
        }
        s
    }

    /// Builds the settings from every layer. `file` is `--config`; without it
    /// `config/inferflux.toml` is read when it exists. `is_cuda` says whether `model.device`, as
    /// the layers set it, means CUDA here (`auto` probes): then the settings are built again on
    /// [`BuiltIn::Cuda`]'s defaults.
    pub fn load(
        file: Option<&Path>,
        cli: &CliOverrides,
        is_cuda: impl FnOnce(DeviceKind) -> bool,
    ) -> Result<Self, ConfigError> {
        Self::load_for_device(file, cli, std::env::vars().collect(), is_cuda)
    }

    /// As [`Settings::load`], with the environment given (tests pass their own).
    pub fn load_for_device(
        file: Option<&Path>,
        cli: &CliOverrides,
        env: Vec<(String, String)>,
        is_cuda: impl FnOnce(DeviceKind) -> bool,
    ) -> Result<Self, ConfigError> {
        let settings = Self::load_with_env(file, cli, env.clone())?;
        match is_cuda(settings.model.device) {
            true => Self::load_with_env_on(file, cli, env, BuiltIn::Cuda),
            false => Ok(settings),
        }
    }

    /// As [`Settings::load`] on the CPU's defaults, with the environment given (tests pass their
    /// own).
    pub fn load_with_env(
        file: Option<&Path>,
        cli: &CliOverrides,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        Self::load_with_env_on(file, cli, env, BuiltIn::Cpu)
    }

    /// As [`Settings::load_with_env`] on `built_in`'s defaults.
    pub fn load_with_env_on(
        file: Option<&Path>,
        cli: &CliOverrides,
        env: impl IntoIterator<Item = (String, String)>,
        built_in: BuiltIn,
    ) -> Result<Self, ConfigError> {
        let mut builder =
            config::Config::builder().add_source(config::Config::try_from(&Settings::built_in(built_in))?);
        match file {
            Some(path) => builder = builder.add_source(config::File::from(path).required(true)),
            None => {
                builder = builder.add_source(config::File::with_name("config/inferflux.toml").required(false))
            }
        }
        let mut env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("INFERFLUX__") || k == ENV_LOG || k == ENV_LOG_FORMAT)
            .collect();
        let env_log = env.remove(ENV_LOG);
        let env_log_format = env.remove(ENV_LOG_FORMAT);
        let env_api_keys = env.remove(ENV_API_KEYS);
        let env_admin_token = env.remove(ENV_ADMIN_TOKEN);
        builder = builder.add_source(
            config::Environment::with_prefix("INFERFLUX")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
        // The secrets as overrides set before the flags' ones, so that the flags still win.
        if let Some(keys) = env_api_keys {
            let keys: Vec<String> = keys.split(',').map(|k| k.trim().to_string()).collect();
            builder = builder.set_override("auth.api_keys", keys)?;
        }
        if let Some(token) = env_admin_token {
            builder = builder.set_override("auth.admin_token", token)?;
        }
        // The short log variables are the env layer's most specific spelling: they win over
        // `INFERFLUX__LOG__*`.
        if let Some(level) = env_log {
            builder = builder.set_override("log.level", level)?;
        }
        if let Some(format) = env_log_format {
            builder = builder.set_override("log.format", format)?;
        }
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
        if let Some(keys) = &cli.api_keys {
            builder = builder.set_override("auth.api_keys", keys.clone())?;
        }
        if let Some(token) = &cli.admin_token {
            builder = builder.set_override("auth.admin_token", token.clone())?;
        }
        let file_used = file.map_or_else(|| PathBuf::from("config/inferflux.toml"), Path::to_path_buf);
        let settings: Settings = match builder.build().and_then(|c| c.try_deserialize()) {
            Ok(s) => s,
            // Blame the file when the file alone is wrong, naming it and the key.
            Err(e) => return Err(file_error(&file_used).unwrap_or(ConfigError::Invalid(e))),
        };
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
        positive("server.max_connections", self.server.max_connections)?;
        positive(
            "server.client_request_timeout_ms",
            self.server.client_request_timeout_ms as usize,
        )?;
        if !(self.limits.rate_limit_rps.is_finite() && self.limits.rate_limit_rps >= 0.0) {
            return Err(ConfigError::BadValue {
                key: "limits.rate_limit_rps",
                message: format!(
                    "must be a number >= 0 (0 turns the rate limit off), got {}",
                    self.limits.rate_limit_rps
                ),
            });
        }
        positive(
            "parallel.tensor_parallel_size",
            self.parallel.tensor_parallel_size,
        )?;
        positive("parallel.data_parallel_size", self.parallel.data_parallel_size)?;
        if let Some(message) = self.cuda.skinny.refusal() {
            return Err(ConfigError::BadValue {
                key: "cuda.skinny",
                message,
            });
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(ConfigError::BadValue {
                key: "log.format",
                message: "must be `text` or `json`".into(),
            });
        }
        self.auth.validate()
    }
}

impl AuthConfig {
    /// Every secret is a nonempty run of visible ASCII (what a `Bearer` header can carry), the
    /// admin token is not also an API key, and `protect_metrics` has something to check against.
    /// Messages name the entry, never its value.
    fn validate(&self) -> Result<(), ConfigError> {
        let usable = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
        if let Some(i) = self.api_keys.iter().position(|k| !usable(k)) {
            return Err(ConfigError::BadValue {
                key: "auth.api_keys",
                message: format!(
                    "entry {} of {} is empty or holds spaces or non-ASCII characters",
                    i + 1,
                    self.api_keys.len()
                ),
            });
        }
        if !self.admin_token.is_empty() && !usable(&self.admin_token) {
            return Err(ConfigError::BadValue {
                key: "auth.admin_token",
                message: "holds spaces or non-ASCII characters".into(),
            });
        }
        if !self.admin_token.is_empty() && self.api_keys.contains(&self.admin_token) {
            return Err(ConfigError::BadValue {
                key: "auth.admin_token",
                message: "is also listed in auth.api_keys; the admin token must open /admin/* only".into(),
            });
        }
        if self.protect_metrics && self.api_keys.is_empty() && self.admin_token.is_empty() {
            return Err(ConfigError::BadValue {
                key: "auth.protect_metrics",
                message: "needs auth.api_keys or auth.admin_token to check against".into(),
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
        // Over each device's built-in defaults: the file sets none of the keys that differ
        // (the server reads it from the repository's root, where it would pin the CPU's).
        for built_in in [BuiltIn::Cpu, BuiltIn::Cuda] {
            let from_file: Settings = config::Config::builder()
                .add_source(config::Config::try_from(&Settings::built_in(built_in)).unwrap())
                .add_source(config::File::from_str(text, config::FileFormat::Toml))
                .build()
                .unwrap()
                .try_deserialize()
                .unwrap();
            assert_eq!(
                from_file,
                Settings::built_in(built_in),
                "config/inferflux.toml drifted from the {built_in:?} defaults"
            );
        }
        // Alone, with serde's defaults for the keys it leaves out: the CPU's.
        let alone: Settings = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        assert_eq!(alone, Settings::default());
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

    /// A GPU's built-in defaults differ in three keys, and every layer above still wins over
    /// them; the CPU's are `Settings::default()`.
    #[test]
    fn cuda_built_in_defaults_sit_below_every_layer() {
        let none = CliOverrides::default();
        assert_eq!(Settings::built_in(BuiltIn::Cpu), Settings::default());
        let s = Settings::load_with_env_on(None, &none, env(&[]), BuiltIn::Cuda).unwrap();
        assert_eq!(s.kv.num_pages, 0, "the pool sized from free GPU memory");
        assert_eq!(
            (s.scheduler.max_batched_tokens, s.scheduler.max_running),
            (2048, 256)
        );
        assert_eq!(s.server, Settings::default().server);
        let dir = std::env::temp_dir().join(format!("inferflux-config-cuda-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "[scheduler]\nmax_running = 100\n").unwrap();
        let vars = env(&[("INFERFLUX__KV__NUM_PAGES", "300")]);
        let s = Settings::load_with_env_on(Some(&file), &none, vars, BuiltIn::Cuda).unwrap();
        assert_eq!(
            (
                s.kv.num_pages,
                s.scheduler.max_running,
                s.scheduler.max_batched_tokens
            ),
            (300, 100, 2048)
        );
        // `load` builds on the GPU's defaults only where the device is CUDA.
        let devices = std::cell::RefCell::new(Vec::new());
        let cpu = Settings::load_for_device(Some(&file), &none, env(&[]), |d| {
            devices.borrow_mut().push(d);
            false
        })
        .unwrap();
        assert_eq!(
            (cpu.scheduler.max_running, cpu.scheduler.max_batched_tokens),
            (100, 512)
        );
        assert_eq!(devices.into_inner(), [DeviceKind::Auto]);
        let cuda = Settings::load_for_device(Some(&file), &none, env(&[]), |_| true).unwrap();
        assert_eq!(
            (cuda.scheduler.max_running, cuda.scheduler.max_batched_tokens),
            (100, 2048)
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn logs_short_env_vars_win_over_the_layered_ones() {
        let none = CliOverrides::default();
        let s = Settings::load_with_env(None, &none, env(&[])).unwrap();
        assert_eq!((s.log.level.as_str(), s.log.format.as_str()), ("info", "text"));
        let vars = env(&[
            ("INFERFLUX__LOG__LEVEL", "warn"),
            ("INFERFLUX__LOG__FORMAT", "text"),
            ("INFERFLUX_LOG", "inferflux=debug"),
            ("INFERFLUX_LOG_FORMAT", "json"),
        ]);
        let s = Settings::load_with_env(None, &none, vars).unwrap();
        assert_eq!(
            (s.log.level.as_str(), s.log.format.as_str()),
            ("inferflux=debug", "json")
        );
        let s = Settings::load_with_env(None, &none, env(&[("INFERFLUX__LOG__FORMAT", "json")])).unwrap();
        assert_eq!(s.log.format, "json");
        let err = Settings::load_with_env(None, &none, env(&[("INFERFLUX_LOG_FORMAT", "xml")])).unwrap_err();
        assert!(err.to_string().contains("log.format"), "{err}");
    }

    #[test]
    fn parallel_sizes_come_from_env_and_zero_is_refused() {
        let s = Settings::load_with_env(None, &CliOverrides::default(), env(&[])).unwrap();
        assert_eq!(s.parallel, ParallelConfig::default());
        let vars = env(&[
            ("INFERFLUX__PARALLEL__TENSOR_PARALLEL_SIZE", "2"),
            ("INFERFLUX__PARALLEL__DATA_PARALLEL_SIZE", "3"),
        ]);
        let s = Settings::load_with_env(None, &CliOverrides::default(), vars).unwrap();
        assert_eq!(
            (s.parallel.tensor_parallel_size, s.parallel.data_parallel_size),
            (2, 3)
        );
        let err = Settings::load_with_env(
            None,
            &CliOverrides::default(),
            env(&[("INFERFLUX__PARALLEL__TENSOR_PARALLEL_SIZE", "0")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("parallel.tensor_parallel_size"), "{err}");
    }

    #[test]
    fn cuda_kernels_come_from_env_and_unknown_names_are_refused() {
        let s = Settings::load_with_env(None, &CliOverrides::default(), env(&[])).unwrap();
        let choice = s.cuda.gemm_choice();
        assert_eq!(
            (choice.kernel_for(8), choice.kernel_for(9), s.cuda.weight_layout),
            (GemmKernel::Gemv, GemmKernel::Cublas, WeightLayout::OutIn),
            "the kernels measured fastest unless told otherwise"
        );
        assert_eq!(s.cuda.attention, AttentionKernel::Paged);
        assert!(s.cuda.split_attention);
        assert!(s.cuda.fused_ops);
        assert!(s.cuda.fused_kv_write && s.cuda.fused_gate_up && s.cuda.device_argmax);
        assert!(!s.cuda.device_sampling, "not yet measured on a GPU");
        assert!(!s.cuda.fused_norm_gemv, "not yet measured on a GPU");
        let vars = env(&[
            ("INFERFLUX__CUDA__GEMV", "burn"),
            ("INFERFLUX__CUDA__GEMM", "burn"),
            ("INFERFLUX__CUDA__ATTENTION", "burn"),
            ("INFERFLUX__CUDA__FUSED_OPS", "false"),
            ("INFERFLUX__CUDA__DEVICE_ARGMAX", "false"),
            ("INFERFLUX__CUDA__FUSED_GATE_UP", "false"),
            ("INFERFLUX__CUDA__FUSED_NORM_GEMV", "true"),
            ("INFERFLUX__CUDA__SPLIT_ATTENTION", "false"),
        ]);
        let s = Settings::load_with_env(None, &CliOverrides::default(), vars).unwrap();
        assert!(s.cuda.gemm_choice().is_burn_only(), "burn's matmul when asked");
        assert_eq!(s.cuda.attention, AttentionKernel::Burn);
        assert!(!s.cuda.fused_ops && !s.cuda.device_argmax && !s.cuda.fused_gate_up);
        assert!(s.cuda.fused_norm_gemv);
        assert!(!s.cuda.split_attention);
        let vars = env(&[
            ("INFERFLUX__CUDA__GEMV", "gemv-plane"),
            ("INFERFLUX__CUDA__GEMM", "cublas-ordered"),
            ("INFERFLUX__CUDA__GEMV_MAX_ROWS", "4"),
            ("INFERFLUX__CUDA__WEIGHT_LAYOUT", "out_in"),
            ("INFERFLUX__CUDA__ATTENTION", "paged"),
            ("INFERFLUX__CUDA__FUSED_OPS", "true"),
            ("INFERFLUX__CUDA__FUSED_KV_WRITE", "true"),
            ("INFERFLUX__CUDA__DEVICE_SAMPLING", "true"),
        ]);
        let s = Settings::load_with_env(None, &CliOverrides::default(), vars).unwrap();
        assert_eq!(s.cuda.attention, AttentionKernel::Paged);
        assert!(s.cuda.fused_ops && s.cuda.fused_kv_write && s.cuda.device_sampling);
        let choice = s.cuda.gemm_choice();
        assert_eq!(
            (choice.kernel_for(4), choice.kernel_for(5), s.cuda.weight_layout),
            (
                GemmKernel::GemvPlane,
                GemmKernel::CublasOrdered,
                WeightLayout::OutIn
            )
        );
        assert!(!choice.is_burn_only());
        // Our tensor-core GEMM by its name, for the batches above the GEMV's.
        let vars = env(&[("INFERFLUX__CUDA__GEMM", "skinny")]);
        let s = Settings::load_with_env(None, &CliOverrides::default(), vars).unwrap();
        let choice = s.cuda.gemm_choice();
        assert_eq!(
            (choice.kernel_for(8), choice.kernel_for(9)),
            (GemmKernel::Gemv, GemmKernel::Skinny)
        );
        assert_eq!(s.cuda.skinny, SkinnyTuning::DEFAULT);
        let vars = env(&[
            ("INFERFLUX__CUDA__SKINNY__MIN_CUBES", "256"),
            ("INFERFLUX__CUDA__SKINNY__MAX_STEPS", "4"),
        ]);
        let s = Settings::load_with_env(None, &CliOverrides::default(), vars).unwrap();
        assert_eq!((s.cuda.skinny.min_cubes, s.cuda.skinny.max_steps), (256, 4));
        let vars = env(&[("INFERFLUX__CUDA__SKINNY__MAX_STEPS", "3")]);
        let err = Settings::load_with_env(None, &CliOverrides::default(), vars).unwrap_err();
        assert!(err.to_string().contains("max_steps"), "{err}");
        let err = Settings::load_with_env(
            None,
            &CliOverrides::default(),
            env(&[("INFERFLUX__CUDA__GEMV", "fastest")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("fastest"), "{err}");
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
    fn auth_keys_from_file_env_and_flags() {
        let dir = std::env::temp_dir().join(format!("inferflux-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.toml");
        std::fs::write(
            &file,
            "[auth]\napi_keys = [\"f1\", \"f2\", \"f3\"]\nadmin_token = \"file-admin\"\n",
        )
        .unwrap();
        let none = CliOverrides::default();
        let s = Settings::load_with_env(Some(&file), &none, env(&[])).unwrap();
        assert_eq!(
            (s.auth.api_keys.len(), s.auth.admin_token.as_str()),
            (3, "file-admin")
        );

        // A comma-separated list replaces the file's; secrets stay verbatim (no number parsing).
        let vars = env(&[
            ("INFERFLUX__AUTH__API_KEYS", "sk-a, 007,1e3"),
            ("INFERFLUX__AUTH__ADMIN_TOKEN", "0042"),
            ("INFERFLUX__AUTH__PROTECT_METRICS", "true"),
        ]);
        let s = Settings::load_with_env(Some(&file), &none, vars.clone()).unwrap();
        assert_eq!(s.auth.api_keys, ["sk-a", "007", "1e3"]);
        assert_eq!(s.auth.admin_token, "0042");
        assert!(s.auth.protect_metrics);
        let s = Settings::load_with_env(None, &none, env(&[("INFERFLUX__AUTH__API_KEYS", "12345")])).unwrap();
        assert_eq!(s.auth.api_keys, ["12345"], "one numeric key is still a list");

        // `--api-key` replaces the list, `--admin-token` the token.
        let cli = CliOverrides {
            api_keys: Some(vec!["cli-1".into()]),
            admin_token: Some("cli-admin".into()),
            ..Default::default()
        };
        let s = Settings::load_with_env(Some(&file), &cli, vars).unwrap();
        assert_eq!(s.auth.api_keys, ["cli-1"]);
        assert_eq!(s.auth.admin_token, "cli-admin");

        // Neither Debug shows a secret.
        let shown = format!("{s:?} {cli:?}");
        for secret in ["cli-1", "cli-admin"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn auth_bad_secrets_name_the_key_not_the_value() {
        let load =
            |pairs: &[(&str, &str)]| Settings::load_with_env(None, &CliOverrides::default(), env(pairs));
        for (vars, key) in [
            (&[("INFERFLUX__AUTH__API_KEYS", "good,")][..], "auth.api_keys"),
            (&[("INFERFLUX__AUTH__API_KEYS", "")][..], "auth.api_keys"),
            (&[("INFERFLUX__AUTH__API_KEYS", "has space")][..], "auth.api_keys"),
            (
                &[("INFERFLUX__AUTH__ADMIN_TOKEN", "tab\tbed")][..],
                "auth.admin_token",
            ),
            (
                &[
                    ("INFERFLUX__AUTH__API_KEYS", "shared-secret"),
                    ("INFERFLUX__AUTH__ADMIN_TOKEN", "shared-secret"),
                ][..],
                "auth.admin_token",
            ),
            (
                &[("INFERFLUX__AUTH__PROTECT_METRICS", "true")][..],
                "auth.protect_metrics",
            ),
        ] {
            let err = load(vars).unwrap_err().to_string();
            assert!(err.contains(key), "{vars:?}: {err}");
            for (_, value) in vars {
                let value = value.trim_matches(',');
                assert!(
                    value.is_empty() || value == "true" || !err.contains(value),
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn security_config_file_errors_name_the_key_and_the_file() {
        let dir = std::env::temp_dir().join(format!("inferflux-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text, key) in [
            ("type.toml", "[server]\nport = \"eighty\"\n", "server.port"),
            ("unknown.toml", "[server]\nbogus_key = 1\n", "server.bogus_key"),
            (
                "section.toml",
                "[limits]\nrate_limit_rps = \"fast\"\n",
                "limits.rate_limit_rps",
            ),
            ("syntax.toml", "[kv]\npage_size = = 3\n", "page_size"),
        ] {
            let file = dir.join(name);
            std::fs::write(&file, text).unwrap();
            let err = Settings::load_with_env(Some(&file), &CliOverrides::default(), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{name}: {err}");
            assert!(err.contains(&file.display().to_string()), "{name}: {err}");
        }
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
