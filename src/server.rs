//! Wiring: load the model on the chosen backend, start the five actors, serve HTTP.
//!
//! The backend is chosen here and only here; everything below is generic over `B: Backend`.

use std::net::TcpListener;
use std::sync::Arc;

use actix::prelude::*;
use actix_web::{web, App, HttpServer};
use burn::prelude::Backend;
use burn::tensor::DType;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::actors::dp_router::{DpRouter, Replica};
use crate::actors::executor::{spawn_executor, ExecutorAddrs, ModelExecutor, RestartExecutor};
use crate::actors::fault::FaultInjector;
use crate::actors::intake::{IntakeLimits, RequestIntake};
use crate::actors::kv_pages::KvPageManager;
use crate::actors::scheduler::Scheduler;
use crate::actors::stop_detector::{ConnectScheduler, StopSequenceDetector};
use crate::actors::tp_ranks::{Rank, RankWorker};
use crate::config::{DeviceKind, OverlapSteps, Settings};
use crate::http::{self, AppState};
use crate::kv::BlockHasher;
use crate::model::cuda_gemm::CudaCube;
use crate::model::draw::DeviceSampling;
use crate::model::serving_kernels::ServingKernels;
use crate::model::{cpu_fused, cpu_gemm};
use crate::model::{
    KvStorage, Llama, ModelError, ModelFiles, ModelSource, PagedKvCache, WeightIndex, WeightLayout,
};
use crate::parallel::{Communicator, LocalCommunicator};
use crate::scheduler::SchedulerCore;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("--device cuda was asked for, but no CUDA device answered ({0})")]
    NoCuda(String),
    #[error("cannot bind: {0}")]
    Io(#[from] std::io::Error),
    #[error("kv.num_pages = 0 sizes the pool from free memory, but {0}")]
    PoolSize(String),
    #[error(
        "refusing to serve /admin/* without a token on the non-loopback address {0}: set \
         auth.admin_token (--admin-token, INFERFLUX__AUTH__ADMIN_TOKEN), or server.enable_admin = \
         false (INFERFLUX__SERVER__ENABLE_ADMIN=false), or bind to 127.0.0.1"
    )]
    AdminExposed(std::net::SocketAddr),
    #[error("parallel.data_parallel_size = {size}: {reason}")]
    DataParallel { size: usize, reason: String },
    #[error("parallel.tensor_parallel_size = {size}: {reason}")]
    TensorParallel { size: usize, reason: String },
}

/// Admin routes cancel requests and drain the server: on an address other hosts can reach they
/// need a token, or must be turned off.
pub fn check_exposure(settings: &Settings, addr: std::net::SocketAddr) -> Result<(), StartError> {
    if settings.server.enable_admin && settings.auth.admin_token.is_empty() && !addr.ip().is_loopback() {
        return Err(StartError::AdminExposed(addr));
    }
    Ok(())
}

/// Which backend serves, decided once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChosenBackend {
    Cpu,
    Cuda,
}

impl ChosenBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            ChosenBackend::Cpu => "cpu",
            ChosenBackend::Cuda => "cuda",
        }
    }
}

/// Whether a CUDA device can be used: the driver and NVRTC libraries load, the driver
/// initialises and reports a device. Never panics on a machine without CUDA.
pub fn probe_cuda() -> Result<usize, String> {
    // SAFETY: these only try to dlopen the libraries.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the CUDA driver library (libcuda) is not installed".into());
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("NVRTC (libnvrtc) is not installed".into());
    }
    cudarc::driver::result::init().map_err(|e| format!("cuInit failed: {e:?}"))?;
    let count = cudarc::driver::result::device::get_count().map_err(|e| format!("{e:?}"))?;
    if count <= 0 {
        return Err("the CUDA driver reports no device".into());
    }
    Ok(count as usize)
}

pub fn choose_backend(kind: DeviceKind) -> Result<ChosenBackend, StartError> {
    match kind {
        DeviceKind::Cpu => Ok(ChosenBackend::Cpu),
        DeviceKind::Cuda => probe_cuda()
            .map(|_| ChosenBackend::Cuda)
            .map_err(StartError::NoCuda),
        DeviceKind::Auto => match probe_cuda() {
            Ok(n) => {
                tracing::info!(devices = n, "CUDA device found");
                Ok(ChosenBackend::Cuda)
            }
            Err(why) => {
                tracing::info!(reason = %why, "no usable CUDA device; using CPU");
                Ok(ChosenBackend::Cpu)
            }
        },
    }
}

/// How long a stopping HTTP server waits for open connections (streams that just got their
/// last event, idle keep-alive ones) before closing them.
const HTTP_STOP_TIMEOUT_SECS: u64 = 5;

/// A running server: its HTTP handle, the address it listens on, and the scheduler's front
/// (the data-parallel router over every replica, for graceful shutdown, see [`crate::shutdown`]).
pub struct Running {
    pub server: actix_web::dev::Server,
    pub addr: std::net::SocketAddr,
    pub scheduler: Addr<DpRouter>,
}

/// Loads the model and starts everything; must be called inside an actix `System`.
pub fn start(
    settings: &Settings,
    listener: TcpListener,
    metrics: PrometheusHandle,
) -> Result<Running, StartError> {
    check_exposure(settings, listener.local_addr()?)?;
    let source = match &settings.model.path {
        Some(p) if !p.as_os_str().is_empty() => ModelSource::Dir(p.clone()),
        _ => ModelSource::Embedded,
    };
    let backend = choose_backend(settings.model.device)?;
    let dp = settings.parallel.data_parallel_size.max(1);
    if dp > 1 && backend == ChosenBackend::Cuda {
        // One device per replica: two replicas on one GPU would split its memory and compute
        // for nothing.
        let devices = probe_cuda().unwrap_or(0);
        if devices < dp {
            return Err(StartError::DataParallel {
                size: dp,
                reason: format!(
                    "each replica needs its own CUDA device and {devices} answered; lower \
                     parallel.data_parallel_size or use --device cpu"
                ),
            });
        }
    }
    let tp = settings.parallel.tensor_parallel_size;
    if tp > 1 && backend == ChosenBackend::Cuda {
        return Err(StartError::TensorParallel {
            size: tp,
            reason: "tensor parallel runs on the CPU backend only for now (one GPU per rank over \
                     NCCL is not wired into serving); use --device cpu"
                .into(),
        });
    }
    let files = ModelFiles::open(&source)?;
    if source == ModelSource::Embedded {
        tracing::info!(
            model = %files.name,
            "no --model given: serving the embedded tiny Llama (random weights, for trying the server out)"
        );
    }
    let fault = FaultInjector::from_env();
    let executors = match backend {
        ChosenBackend::Cpu => start_replicas::<burn::backend::Flex>(
            &files,
            settings,
            backend,
            (vec![Default::default(); dp], DType::F32),
            ServingKernels {
                // Each output's weights contiguous: `cpu_gemm` streams them (`skinny_gemm_t`).
                layout: WeightLayout::OutIn,
                project: Some(cpu_gemm::projection()),
                fused: Some(cpu_fused::fused_ops()),
                ..ServingKernels::default()
            },
            fault.clone(),
        )?,
        ChosenBackend::Cuda => {
            let index = files.checkpoint.index()?;
            let dtype = match index.dtype_of("model.embed_tokens.weight") {
                Some(safetensors::Dtype::BF16) => DType::BF16,
                _ => DType::F16,
            };
            drop(index);
            let devices = (0..dp).map(|index| burn::backend::cuda::CudaDevice { index });
            // Validated with the rest of the configuration, so a refusal here is a bug.
            if let Err(e) = crate::model::kernels::skinny_gemm::set_tuning(settings.cuda.skinny) {
                tracing::warn!(error = %e, "[cuda.skinny] refused: the skinny GEMM keeps its defaults");
            }
            crate::model::output_blocks::set_carving(settings.cuda.carve_outputs);
            let kernels = ServingKernels::<CudaCube>::from_cuda(&settings.cuda, &files.config);
            if !kernels.has_hooks() {
                let kernels = ServingKernels {
                    layout: kernels.layout,
                    ..ServingKernels::default()
                };
                start_replicas::<burn::backend::Cuda>(
                    &files,
                    settings,
                    backend,
                    (devices.collect(), dtype),
                    kernels,
                    fault.clone(),
                )?
            } else {
                // The chosen kernels run on burn's CUDA tensors directly, under the fusion layer.
                let (choice, fused) = (settings.cuda.gemm_choice(), kernels.fused.as_ref());
                let sampling = &kernels.device_sampling;
                tracing::info!(
                    gemm = %choice.large,
                    gemv = %choice.small,
                    gemv_max_rows = choice.small_max_rows,
                    layout = ?kernels.layout,
                    paged_attention = kernels.paged_attention.is_some(),
                    split_attention = kernels.paged_attention.is_some() && settings.cuda.split_attention,
                    fused_ops = fused.is_some(),
                    fused_kv_write = fused.is_some_and(|f| f.qkv_write.is_some()),
                    fused_gate_up = fused.is_some_and(|f| f.gate_up_act.is_some()),
                    fused_norm_gemv = fused.is_some_and(|f| f.norm_project.is_some()),
                    fused_norm_qkv_write = fused.is_some_and(|f| f.norm_qkv_write.is_some()),
                    device_argmax = sampling.argmax.is_some(),
                    device_sampling = sampling.draw.is_some(),
                    carve_outputs = settings.cuda.carve_outputs,
                    "projections and attention on the chosen kernels; serving without burn's fusion layer"
                );
                start_replicas::<CudaCube>(
                    &files,
                    settings,
                    backend,
                    (devices.collect(), dtype),
                    kernels,
                    fault.clone(),
                )?
            }
        }
    };
    let model_name = settings
        .model
        .served_name
        .clone()
        .unwrap_or_else(|| files.name.clone());
    let prefix_caching = settings.kv.enable_prefix_caching;
    // Every replica's pool has the configured size.
    let (num_pages, page_bytes) = (executors[0].num_pages, executors[0].page_bytes);
    let swap_pages = settings.kv.swap_space_mib.saturating_mul(1 << 20) / page_bytes;
    let detector = StopSequenceDetector::new(files.tokenizer.clone()).start();
    // K/V depend on the weights and the backend's numerics besides the tokens: both salt the keys.
    // One hasher (one random key) for every replica and the router, so that their keys agree.
    let hasher = prefix_caching
        .then(|| BlockHasher::new(&format!("{}/{backend:?}", files.name), settings.kv.page_size));
    // Only a device that runs queued kernels while the host goes on gains from holding a step.
    let overlap_steps = match settings.scheduler.overlap_steps {
        OverlapSteps::Auto => backend == ChosenBackend::Cuda && settings.parallel.tensor_parallel_size == 1,
        OverlapSteps::On => true,
        OverlapSteps::Off => false,
    };
    let async_scheduling = settings.scheduler.async_scheduling;
    tracing::info!(
        backend = ?backend,
        async_scheduling,
        overlap_steps = overlap_steps && async_scheduling,
        "step loop"
    );
    let scheduler = DpRouter::create(|ctx| {
        let replicas = executors
            .into_iter()
            .enumerate()
            .map(|(r, executor)| {
                let mut kv = KvPageManager::new(num_pages, settings.kv.page_size, prefix_caching, swap_pages);
                if dp > 1 {
                    kv = kv.with_replica_label(r);
                }
                let kv = kv.start();
                let mut scheduler = Scheduler::new(
                    SchedulerCore::new(settings.scheduler.clone(), hasher.clone()),
                    kv.clone(),
                    executor.addrs,
                    detector.clone(),
                    settings.scheduler.preemption,
                )
                .with_supervisor(executor.restart)
                .with_async_scheduling(settings.scheduler.async_scheduling)
                .with_overlapped_steps(overlap_steps)
                .with_router(ctx.address().recipient());
                if dp > 1 {
                    scheduler = scheduler.with_replica_label(r);
                }
                Replica {
                    scheduler: scheduler.start(),
                    kv,
                }
            })
            .collect();
        DpRouter::new(replicas, hasher.clone())
    });
    if dp > 1 {
        tracing::info!(
            replicas = dp,
            kv_pages_per_replica = num_pages,
            "data parallel: one scheduler, KV pool and executor per replica behind one router"
        );
    }
    detector.do_send(ConnectScheduler(scheduler.clone().recipient()));
    let limits = IntakeLimits {
        model_name: model_name.clone(),
        max_context: files.max_context,
        kv_capacity_tokens: num_pages * settings.kv.page_size,
        vocab_size: files.config.vocab_size,
        eos_token_ids: files.special.eos_token_ids.clone(),
        max_stop_strings: settings.limits.max_stop_strings,
        max_stop_bytes: settings.limits.max_stop_bytes,
        max_prompt_tokens: settings.limits.max_prompt_tokens,
        max_output_tokens: settings.limits.max_output_tokens,
    };
    let intake = RequestIntake::new(files.tokenizer.clone(), limits, scheduler.clone(), detector).start();
    metrics::gauge!("inferflux_model_info", "model" => model_name.clone(), "backend" => backend.as_str())
        .set(1.0);
    let state = AppState {
        intake,
        scheduler,
        model_name: model_name.clone(),
        backend: backend.as_str(),
        max_context: files.max_context.min(num_pages * settings.kv.page_size),
        metrics,
        max_body_bytes: settings.server.max_body_bytes,
        chat_template: files.chat_template.clone(),
        tokenizer: files.tokenizer.clone(),
        started: std::time::Instant::now(),
        fault,
        max_output_tokens: settings.limits.max_output_tokens,
        stream_idle_timeout: std::time::Duration::from_secs(settings.server.stream_idle_timeout_seconds),
    };
    let auth = web::Data::new(http::auth::Auth::new(&settings.auth));
    let rate_limit = web::Data::new(http::rate_limit::RateLimiter::new(
        settings.limits.rate_limit_rps,
        settings.limits.rate_limit_burst,
        !settings.auth.api_keys.is_empty(),
    ));
    let enable_admin = settings.server.enable_admin;
    let s = &settings.server;
    // actix counts connections per worker: the configured total is shared out (rounded up to a
    // multiple of the worker count; fewer workers than that many connections).
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(s.max_connections)
        .max(1);
    let per_worker = s.max_connections.div_ceil(workers).max(1);
    // Counts only: the keys and token never reach a log.
    tracing::info!(
        api_keys = settings.auth.api_keys.len(),
        admin_token = !settings.auth.admin_token.is_empty(),
        protect_metrics = settings.auth.protect_metrics,
        "auth configured"
    );
    let addr = listener.local_addr()?;
    let http_scheduler = state.scheduler.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(state.clone()))
            .app_data(auth.clone())
            .app_data(rate_limit.clone())
            .wrap(actix_web::middleware::from_fn(http::rate_limit::limit))
            .wrap(actix_web::middleware::from_fn(http::auth::guard))
            .wrap(actix_web::middleware::from_fn(http::metrics_mw::count_requests))
            // Outermost: the id and span exist before auth or counting look at the request.
            .wrap(actix_web::middleware::from_fn(
                http::request_context::request_context,
            ))
            .configure(|cfg| http::routes(cfg, enable_admin))
    })
    .workers(workers)
    .max_connections(per_worker)
    .client_request_timeout(std::time::Duration::from_millis(s.client_request_timeout_ms))
    .client_disconnect_timeout(std::time::Duration::from_millis(s.client_disconnect_timeout_ms))
    .keep_alive(match s.keep_alive_seconds {
        0 => actix_web::http::KeepAlive::Disabled,
        n => actix_web::http::KeepAlive::Timeout(std::time::Duration::from_secs(n)),
    })
    // SIGTERM/SIGINT are handled by `crate::shutdown`, which drains before the server stops.
    .disable_signals()
    .shutdown_timeout(HTTP_STOP_TIMEOUT_SECS)
    .listen(listener)?
    .run();
    tracing::info!(%addr, model = %model_name, backend = ?backend, "listening");
    Ok(Running {
        server,
        addr,
        scheduler: http_scheduler,
    })
}

/// How long a tensor-parallel rank waits for the others at one collective before it fails the
/// step: ranks do the same work between collectives, so only a stuck rank waits this long.
const TP_COLLECTIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// The executor's mailboxes, how to restart it, and the pool it allocated.
struct ExecutorHandle {
    addrs: ExecutorAddrs,
    restart: RestartExecutor,
    num_pages: usize,
    /// Bytes of K and V of one page over all layers.
    page_bytes: usize,
}

/// The process's peak resident memory (`VmHWM`), to show that loading held one copy of the
/// weights; `None` where `/proc` is missing.
fn peak_rss_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<usize>()
        .ok()?;
    Some(kib * 1024)
}

/// Free memory of the device serving the model, in bytes.
fn free_memory(cuda: bool) -> Result<usize, String> {
    if cuda {
        let ctx = cudarc::driver::CudaContext::new(0).map_err(|e| format!("{e:?}"))?;
        return ctx
            .mem_get_info()
            .map(|(free, _)| free)
            .map_err(|e| format!("{e:?}"));
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|e| e.to_string())?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| "/proc/meminfo has no MemAvailable".into())
}

/// One replica's ranks, loaded: a model per tensor-parallel rank and the ranks' communicators.
type LoadedRanks<B> = (Vec<Llama<B>>, Vec<Arc<dyn Communicator>>);

/// Loads every tensor-parallel rank of one replica on `device`; each rank reads only its shard.
fn load_ranks<B: Backend>(
    files: &ModelFiles,
    index: &WeightIndex<'_>,
    tp: usize,
    (device, dtype): (&B::Device, DType),
    kernels: &ServingKernels<B>,
) -> Result<LoadedRanks<B>, StartError> {
    // One communicator per rank, a group per replica (replicas step independently).
    let comms: Vec<Arc<dyn Communicator>> = if tp > 1 {
        LocalCommunicator::group(tp, Some(TP_COLLECTIVE_TIMEOUT))
            .into_iter()
            .map(|c| Arc::new(c) as Arc<dyn Communicator>)
            .collect()
    } else {
        Vec::new()
    };
    let mut models = Vec::with_capacity(tp);
    for rank in 0..tp {
        let comm = comms.get(rank).cloned();
        let model = Llama::<B>::load_shard_in(&files.config, index, (device, dtype), comm, kernels.layout)
            .map_err(|e| {
                if tp > 1 {
                    StartError::TensorParallel {
                        size: tp,
                        reason: e.to_string(),
                    }
                } else {
                    e.into()
                }
            })?;
        models.push(kernels.install(model));
    }
    Ok((models, comms))
}

/// Loads the model and starts one executor per data-parallel replica, replica `r` on
/// `devices[r]`. On the CPU without tensor parallel the replicas share one copy of the weights
/// (burn's tensors are reference counted; nothing writes them); with tensor parallel each
/// replica's ranks are bound to the replica's own communicator group, so each replica loads its
/// shards; on CUDA each replica loads onto its own device.
fn start_replicas<B: Backend>(
    files: &ModelFiles,
    settings: &Settings,
    backend: ChosenBackend,
    (devices, dtype): (Vec<B::Device>, DType),
    kernels: ServingKernels<B>,
    fault: Option<std::sync::Arc<FaultInjector>>,
) -> Result<Vec<ExecutorHandle>, StartError> {
    let started = std::time::Instant::now();
    let device_sampling = kernels.device_sampling.clone();
    let (tp, dp) = (settings.parallel.tensor_parallel_size, devices.len());
    let index = files.checkpoint.index()?;
    let share_weights = backend == ChosenBackend::Cpu && tp == 1;
    let mut loaded: Vec<LoadedRanks<B>> = Vec::with_capacity(dp);
    for device in &devices {
        let ranks = match loaded.first() {
            Some(first) if share_weights => first.clone(),
            _ => load_ranks(files, &index, tp, (device, dtype), &kernels)?,
        };
        loaded.push(ranks);
    }
    drop(index);
    let c = &files.config;
    // Every rank holds the same number of KV heads (replicated when there are fewer than ranks),
    // and all of them live in this process's memory.
    let kv_dim = loaded[0].0[0].kv_dim();
    let page_bytes = tp * 2 * c.num_layers * settings.kv.page_size * kv_dim * dtype.size();
    let num_pages = match settings.kv.num_pages {
        0 => {
            let free = free_memory(backend == ChosenBackend::Cuda)
                .map_err(|e| StartError::PoolSize(format!("free memory is unknown: {e}")))?;
            // CPU replicas share the host's memory; CUDA replicas each have a device like the first.
            let share = if backend == ChosenBackend::Cpu { dp } else { 1 };
            let pages = (free as f64 * settings.kv.memory_fraction) as usize / share / page_bytes;
            if pages == 0 {
                return Err(StartError::PoolSize(format!("{free} free bytes hold no page")));
            }
            tracing::info!(
                free_bytes = free,
                fraction = settings.kv.memory_fraction,
                pages,
                replicas = dp,
                "KV pool sized from free memory"
            );
            pages
        }
        n => n,
    };
    tracing::info!(
        backend = B::name(&devices[0]),
        ?dtype,
        layers = c.num_layers,
        tensor_parallel = tp,
        data_parallel = dp,
        shared_weights = share_weights && dp > 1,
        kv_pages = num_pages,
        page_size = settings.kv.page_size,
        kv_bytes = num_pages * page_bytes,
        load_ms = started.elapsed().as_millis() as u64,
        peak_rss_mib = peak_rss_bytes().map(|b| b >> 20),
        "model loaded"
    );
    loaded
        .into_iter()
        .zip(devices)
        .map(|((models, comms), device)| {
            // Where each backend writes K/V in place: see `KvStorage`.
            let storage = match backend {
                ChosenBackend::Cuda => KvStorage::Device,
                ChosenBackend::Cpu => KvStorage::Host,
            };
            let addrs_restart = spawn_replica(
                models,
                comms,
                (device, dtype, storage),
                (c.num_layers, num_pages, settings.kv.page_size, kv_dim),
                (fault.clone(), device_sampling.clone()),
            )?;
            Ok(ExecutorHandle {
                addrs: addrs_restart.0,
                restart: addrs_restart.1,
                num_pages,
                page_bytes,
            })
        })
        .collect()
}

/// Starts one replica's executor (rank 0 on the executor thread, the other ranks on their own)
/// and the way to restart it.
fn spawn_replica<B: Backend>(
    models: Vec<Llama<B>>,
    comms: Vec<Arc<dyn Communicator>>,
    (device, dtype, storage): (B::Device, DType, KvStorage),
    (num_layers, num_pages, page_size, kv_dim): (usize, usize, usize, usize),
    (fault, device_sampling): (Option<std::sync::Arc<FaultInjector>>, DeviceSampling<B>),
) -> std::io::Result<(ExecutorAddrs, RestartExecutor)> {
    let tp = models.len();
    // One executor thread owns the device. A restart (see `Scheduler::recover`) builds the
    // executor again from clones of the loaded ranks (the weight tensors are shared, nothing is
    // read again) with fresh caches, on the new executor's thread.
    let build = move || -> std::io::Result<ModelExecutor<B>> {
        let new_cache =
            || PagedKvCache::<B>::new(num_layers, num_pages, page_size, kv_dim, &device, dtype, storage);
        let executor = if tp > 1 {
            // A failed step may have left the group poisoned.
            for comm in &comms {
                comm.reset();
            }
            let mut workers = Vec::with_capacity(tp - 1);
            for (rank, model) in models.iter().enumerate().skip(1) {
                workers.push(RankWorker::spawn(
                    rank,
                    Rank::new(model.clone(), new_cache()),
                    comms[rank].clone(),
                )?);
            }
            ModelExecutor::tensor_parallel(
                Rank::new(models[0].clone(), new_cache()),
                workers,
                comms[0].clone(),
            )
        } else {
            ModelExecutor::new(models[0].clone(), new_cache())
        };
        Ok(executor
            .with_fault(fault.clone())
            .with_device_sampling(device_sampling.clone()))
    };
    let first = build()?;
    let addrs = spawn_executor(move || first);
    let build = std::sync::Arc::new(build);
    let restart: RestartExecutor = Box::new(move || {
        let build = build.clone();
        // A restart that cannot start its ranks kills the new thread; the next step then fails
        // and counts toward the supervisor's failures in a row.
        spawn_executor(move || build().unwrap_or_else(|e| panic!("restarting the executor failed: {e}")))
    });
    Ok((addrs, restart))
}
