//! Wiring: load the model on the chosen backend, start the five actors, serve HTTP.
//!
//! The backend is chosen here and only here; everything below is generic over `B: Backend`.

use std::net::TcpListener;

use actix::prelude::*;
use actix_web::{web, App, HttpServer};
use burn::prelude::Backend;
use burn::tensor::DType;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::actors::executor::ModelExecutor;
use crate::actors::intake::{IntakeLimits, RequestIntake};
use crate::actors::kv_pages::KvPageManager;
use crate::actors::scheduler::Scheduler;
use crate::actors::stop_detector::{ConnectScheduler, StopSequenceDetector};
use crate::config::{DeviceKind, Settings};
use crate::http::{self, AppState};
use crate::model::{Llama, ModelError, ModelFiles, ModelSource, PagedKvCache};
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
}

/// Which backend serves, decided once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChosenBackend {
    Cpu,
    Cuda,
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

/// A running server: its HTTP handle and the address it listens on.
pub struct Running {
    pub server: actix_web::dev::Server,
    pub addr: std::net::SocketAddr,
}

/// Loads the model and starts everything; must be called inside an actix `System`.
pub fn start(
    settings: &Settings,
    listener: TcpListener,
    metrics: PrometheusHandle,
) -> Result<Running, StartError> {
    let source = match &settings.model.path {
        Some(p) if !p.as_os_str().is_empty() => ModelSource::Dir(p.clone()),
        _ => ModelSource::Embedded,
    };
    let backend = choose_backend(settings.model.device)?;
    let files = ModelFiles::open(&source)?;
    if source == ModelSource::Embedded {
        tracing::info!(
            model = %files.name,
            "no --model given: serving the embedded tiny Llama (random weights, for trying the server out)"
        );
    }
    let executor = match backend {
        ChosenBackend::Cpu => {
            start_executor::<burn::backend::Flex>(&files, settings, Default::default(), DType::F32)?
        }
        ChosenBackend::Cuda => {
            let index = files.checkpoint.index()?;
            let dtype = match index.dtype_of("model.embed_tokens.weight") {
                Some(safetensors::Dtype::BF16) => DType::BF16,
                _ => DType::F16,
            };
            drop(index);
            start_executor::<burn::backend::Cuda>(&files, settings, Default::default(), dtype)?
        }
    };
    let model_name = settings
        .model
        .served_name
        .clone()
        .unwrap_or_else(|| files.name.clone());
    let kv = KvPageManager::new(settings.kv.num_pages, settings.kv.page_size).start();
    let detector = StopSequenceDetector::new(files.tokenizer.clone()).start();
    let scheduler = Scheduler::new(
        SchedulerCore::new(settings.scheduler.clone()),
        kv,
        executor,
        detector.clone(),
    )
    .start();
    detector.do_send(ConnectScheduler(scheduler.clone().recipient()));
    let limits = IntakeLimits {
        model_name: model_name.clone(),
        max_context: files.max_context,
        kv_capacity_tokens: settings.kv.num_pages * settings.kv.page_size,
        vocab_size: files.config.vocab_size,
        eos_token_ids: files.special.eos_token_ids.clone(),
        max_stop_strings: settings.limits.max_stop_strings,
        max_stop_bytes: settings.limits.max_stop_bytes,
    };
    let intake = RequestIntake::new(files.tokenizer.clone(), limits, scheduler, detector).start();
    metrics::gauge!("inferflux_model_info", "model" => model_name.clone(), "backend" => format!("{backend:?}").to_lowercase())
        .set(1.0);
    let state = AppState {
        intake,
        model_name: model_name.clone(),
        max_context: files
            .max_context
            .min(settings.kv.num_pages * settings.kv.page_size),
        metrics,
        max_body_bytes: settings.server.max_body_bytes,
    };
    let addr = listener.local_addr()?;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(state.clone()))
            .configure(http::routes)
    })
    .listen(listener)?
    .run();
    tracing::info!(%addr, model = %model_name, backend = ?backend, "listening");
    Ok(Running { server, addr })
}

fn start_executor<B: Backend>(
    files: &ModelFiles,
    settings: &Settings,
    device: B::Device,
    dtype: DType,
) -> Result<Recipient<crate::actors::executor::ExecuteStep>, StartError> {
    let started = std::time::Instant::now();
    let index = files.checkpoint.index()?;
    let model = Llama::<B>::load(&files.config, &index, &device, dtype)?;
    drop(index);
    let c = &files.config;
    let cache = PagedKvCache::<B>::new(
        c.num_layers,
        settings.kv.num_pages,
        settings.kv.page_size,
        c.num_kv_heads * c.head_dim,
        &device,
        dtype,
    );
    tracing::info!(
        backend = B::name(&device),
        ?dtype,
        layers = c.num_layers,
        kv_pages = settings.kv.num_pages,
        page_size = settings.kv.page_size,
        load_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    // One executor thread owns the device; the slot holds the model between its creation here
    // and the SyncArbiter's factory call on that thread.
    let slot = std::sync::Mutex::new(Some(ModelExecutor::new(model, cache)));
    let addr = SyncArbiter::start(1, move || {
        slot.lock()
            .ok()
            .and_then(|mut s| s.take())
            .expect("the executor is created once")
    });
    Ok(addr.recipient())
}
