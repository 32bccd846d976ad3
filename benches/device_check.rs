//! Checks and profiles the model on a device, without the server (`scripts/gpu-check.sh` runs
//! both on the lent GPU; on the CPU they run anywhere):
//!
//! ```text
//! cargo bench --bench device_check -- logits [--device cpu|cuda|cuda-nofusion|cuda-kernels] [FIXTURE_DIR...]
//! cargo bench --bench device_check -- profile [--device cpu|cuda|cuda-nofusion] [--model DIR] [--batches 1,8]
//!     [--context 192] [--iters 10] [--bandwidth-gbs 3000] [--pages N] [--json FILE] [--step-only]
//! cargo bench --bench device_check -- gemm [--device cuda|cpu] [--model DIR] [--rows 1,8,32,128] [--kernels all|a,b]
//!     [--layouts in_out,out_in] [--iters 20] [--budget-s 120] [--json FILE] [--recommend FILE]
//! cargo bench --bench device_check -- issue [--fixture DIR] [--steps 200] [--batch 1]
//! ```
//!
//! `logits` runs every golden prompt of each fixture (default: all of `tests/fixtures`) on the CPU
//! in f32 and on the device in the checkpoint's half precision: whole-prompt logits against the
//! CPU's and transformers', then 24 batched greedy steps (chunked prefill, decode groups, K/V
//! writes) against transformers' greedy tokens. `cuda-kernels` runs the kernels that the
//! `INFERFLUX__CUDA__*` settings choose (projections, paged decode attention), as the server would.
//!
//! `profile` shows where a decode step's time goes: one unified decode step of a checkpoint at
//! several batch sizes, each of the step's matrix products alone at the same shapes, the
//! logits' trip to the host, and the step's memory roofline (every weight and every cached K/V
//! byte read once), then the host's time to issue one upload, launch or read of the kinds a step
//! makes. Without `--model` it profiles the embedded tiny model. It takes the server's
//! `[cuda]` settings from `INFERFLUX__CUDA__*`: with kernels other than burn's it runs them, on
//! burn's CUDA backend without fusion, as the server would.
//!
//! `gemm` (CUDA only) times every projection kernel of `cuda_gemm` on the model's shapes and
//! recommends the `[cuda]` settings (see `device_check/gemm.rs`).
//!
//! `issue` times, on wgpu's Vulkan backend, the host's part of issuing a decode step through
//! cubecl, which is the same on CUDA (see `device_check/issue.rs`).

#[path = "device_check/gemm.rs"]
mod gemm;
#[path = "device_check/issue.rs"]
mod issue;

/// The server's allocator, so that the profile's numbers are the server's (see `inferflux::heap`).
#[global_allocator]
static HEAP: inferflux::heap::ServerHeap = inferflux::heap::ServerHeap;

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::{DType, Distribution};
use inferflux::config::{CliOverrides, Settings};
use inferflux::model::serving_kernels::ServingKernels;
use inferflux::model::step_indices::{IndexViewFn, StepIndices};
use inferflux::model::{
    cuda_gemm, output_blocks, KvStorage, Llama, ModelFiles, ModelSource, PagedKvCache, SequenceChunk,
    WeightLayout,
};

const PAGE_SIZE: usize = 16;

/// burn's CUDA backend without the fusion layer that `burn::backend::Cuda` adds: the profile
/// runs both, to show what fusion's planning costs a decode step (and the chosen projection
/// kernels run on it, as in the server).
type CudaNoFusion = cuda_gemm::CudaCube;

struct Args {
    cuda: bool,
    fusion: bool,
    model: ModelSource,
    batches: Vec<usize>,
    context: usize,
    iters: usize,
    bandwidth_gbs: f64,
    json: Option<String>,
    /// Pages in the pool (default: just enough); a step's cost must not grow with it.
    pages: Option<usize>,
    /// Times the step and stops there: under cubecl's profiler (`[profiling.logger]` in
    /// cubecl.toml) the last summary it logs is then the timed steps' kernels alone.
    step_only: bool,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Args {
    let mut a = Args {
        cuda: false,
        fusion: true,
        model: ModelSource::Embedded,
        batches: vec![1, 8],
        context: 192,
        iters: 10,
        bandwidth_gbs: 3000.0,
        json: None,
        pages: None,
        step_only: false,
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => {
                let d = value();
                a.cuda = d.starts_with("cuda");
                a.fusion = d != "cuda-nofusion";
            }
            "--model" => a.model = ModelSource::Dir(value().into()),
            "--batches" => {
                a.batches = value()
                    .split(',')
                    .map(|b| b.parse().expect("--batches 1,8"))
                    .collect()
            }
            "--context" => a.context = value().parse().expect("--context N"),
            "--iters" => a.iters = value().parse().expect("--iters N"),
            "--bandwidth-gbs" => a.bandwidth_gbs = value().parse().expect("--bandwidth-gbs X"),
            "--json" => a.json = Some(value()),
            "--pages" => a.pages = Some(value().parse().expect("--pages N")),
            "--step-only" => a.step_only = true,
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// One batch size's measurements, in milliseconds.
#[derive(serde::Serialize)]
struct Row {
    batch: usize,
    context: usize,
    step_ms: f64,
    /// The host's time to issue the step (`forward` returning, before the logits are read).
    /// Near `step_ms`, the GPU waits on the host: per-op overhead or synchronisations.
    host_issue_ms: f64,
    /// The layers' matrix products, timed alone at the step's shapes.
    layer_gemms_ms: f64,
    lm_head_ms: f64,
    logits_to_host_ms: f64,
    /// What the step spends beyond those: attention, norms, RoPE, K/V writes, launches.
    rest_ms: f64,
    weight_bytes: usize,
    kv_bytes: usize,
    roofline_ms: f64,
}

fn main() {
    // As the server runs (see `inferflux::heap`).
    inferflux::heap::keep_freed_memory();
    // `[cuda.skinny]`'s knobs and `carve_outputs` from `INFERFLUX__CUDA__*`, as the server takes them.
    let vars = std::env::vars().filter(|(k, _)| k.starts_with("INFERFLUX__CUDA__"));
    let cuda = Settings::load_with_env(None, &CliOverrides::default(), vars)
        .expect("INFERFLUX__CUDA__* settings")
        .cuda;
    inferflux::model::kernels::skinny_gemm::set_tuning(cuda.skinny).expect("[cuda.skinny] knobs");
    eprintln!("skinny GEMM knobs: {:?}", cuda.skinny);
    inferflux::model::output_blocks::set_carving(cuda.carve_outputs);
    // `cargo bench` adds `--bench`.
    let mut argv = std::env::args().skip(1).filter(|a| a != "--bench");
    match argv.next().as_deref() {
        Some("logits") => logits_main(argv),
        Some("profile") => profile_main(parse_args(argv)),
        Some("gemm") => gemm::main(argv),
        Some("issue") => issue::main(argv, cuda),
        _ => panic!("usage: device_check logits|profile|gemm|issue [options] (see the file's doc comment)"),
    }
}

fn profile_main(args: Args) {
    let files = ModelFiles::open(&args.model).expect("model opens");
    // The server's `[cuda]` settings, from INFERFLUX__CUDA__* only (no file).
    let (rows, issue) = if args.cuda {
        let dtype = device_dtype(&files, true);
        let kernels = chosen_kernels(&files);
        let on = (Default::default(), dtype);
        if args.fusion && !kernels.has_hooks() {
            let layout_only = ServingKernels {
                layout: kernels.layout,
                ..ServingKernels::default()
            };
            profile::<burn::backend::Cuda>(&files, &args, on, KvStorage::Device, layout_only)
        } else {
            // The chosen kernels run on burn's CUDA tensors directly, as in the server.
            profile::<CudaNoFusion>(&files, &args, on, KvStorage::Device, kernels)
        }
    } else {
        // As the server runs the CPU: its projection hook (`model::cpu_gemm`) and its row-wise
        // ops (`model::cpu_fused`).
        let server_cpu = ServingKernels {
            project: Some(inferflux::model::cpu_gemm::projection()),
            fused: Some(inferflux::model::cpu_fused::fused_ops()),
            ..ServingKernels::default()
        };
        profile::<burn::backend::Flex>(
            &files,
            &args,
            (Default::default(), DType::F32),
            KvStorage::Host,
            server_cpu,
        )
    };
    println!(
        "| batch | context | step ms | host issue ms | layer GEMMs ms | lm_head ms | logits to host ms | rest ms | roofline ms | step / roofline |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} ({:.0}%) | {:.2} | {:.2} | {:.2} | {:.3} | {:.1}x |",
            r.batch,
            r.context,
            r.step_ms,
            r.host_issue_ms,
            r.layer_gemms_ms,
            100.0 * r.layer_gemms_ms / r.step_ms,
            r.lm_head_ms,
            r.logits_to_host_ms,
            r.rest_ms,
            r.roofline_ms,
            r.step_ms / r.roofline_ms
        );
    }
    if !issue.is_empty() {
        println!();
        println!("| host time to issue, without waiting for the device | µs per call |");
        println!("|---|---:|");
        for (what, us) in &issue {
            println!("| {what} | {us:.1} |");
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows).unwrap()).expect("write --json");
    }
}

/// A model's weight layout and hooks, as the server installs them.
type Kernels<B> = ServingKernels<B>;

/// The kernels the server's `[cuda]` settings choose, from `INFERFLUX__CUDA__*` only (no file).
fn chosen_kernels(files: &ModelFiles) -> Kernels<CudaNoFusion> {
    let vars = std::env::vars().filter(|(k, _)| k.starts_with("INFERFLUX__CUDA__"));
    let cuda = Settings::load_with_env(None, &CliOverrides::default(), vars)
        .expect("INFERFLUX__CUDA__* settings")
        .cuda;
    // The server's own choice (a paged attention that cannot run the model is logged and left out).
    let kernels = ServingKernels::<CudaNoFusion>::from_cuda(&cuda, &files.config);
    let (choice, layout) = (cuda.gemm_choice(), kernels.layout);
    let (attend, fused) = (&kernels.paged_attention, &kernels.fused);
    eprintln!(
        "kernels: gemv {} (up to {} rows), gemm {}, weights {layout:?}, paged attention {} (split {}), fused ops {}, fused K/V write {}, fused gate/up {}, norms in the GEMVs {} (with RoPE and K/V write {})",
        choice.small,
        choice.small_max_rows,
        choice.large,
        attend.is_some(),
        attend.is_some() && cuda.split_attention,
        fused.is_some(),
        fused.as_ref().is_some_and(|f| f.qkv_write.is_some()),
        fused.as_ref().is_some_and(|f| f.gate_up_act.is_some()),
        fused.as_ref().is_some_and(|f| f.norm_project.is_some()),
        fused.as_ref().is_some_and(|f| f.norm_qkv_write.is_some())
    );
    kernels
}

/// The checkpoint's half precision on a GPU (as the server picks it), f32 on the CPU.
fn device_dtype(files: &ModelFiles, cuda: bool) -> DType {
    if !cuda {
        return DType::F32;
    }
    let index = files.checkpoint.index().expect("weights index");
    match index.dtype_of("model.embed_tokens.weight") {
        Some(safetensors::Dtype::BF16) => DType::BF16,
        _ => DType::F16,
    }
}

/// One [`Row`] per batch size; `projections` as the server's `[cuda]` keys make them.
fn profile<B: Backend>(
    files: &ModelFiles,
    args: &Args,
    (device, dtype): (B::Device, DType),
    storage: KvStorage,
    kernels: Kernels<B>,
) -> (Vec<Row>, Vec<(String, f64)>) {
    let started = Instant::now();
    // The fused ops merge gate and up into one projection, and with the fused K/V write q, k
    // and v into another.
    let merged_gate_up = kernels.fused.is_some();
    let merged_qkv = kernels.fused.as_ref().is_some_and(|f| f.qkv_write.is_some());
    let (layout, hook) = (kernels.layout, kernels.project.clone());
    let index = files.checkpoint.index().expect("weights index");
    let model = Llama::<B>::load_shard_in(&files.config, &index, (&device, dtype), None, layout)
        .expect("model loads");
    let model = kernels.install(model);
    drop(index);
    let c = model.config().clone();
    eprintln!(
        "loaded {} ({} layers, hidden {}, {:?}) in {:.1} s on {}",
        files.name,
        c.num_layers,
        c.hidden_size,
        dtype,
        started.elapsed().as_secs_f64(),
        B::name(&device)
    );
    let elements = model.weight_elements();
    // Decode reads every weight once per step except the embedding (a few rows).
    let weight_bytes = elements
        .iter()
        .filter(|(k, _)| **k != "embed")
        .map(|(_, n)| n)
        .sum::<usize>()
        * dtype.size();
    let kv_dim = model.kv_dim();
    let max_batch = args.batches.iter().copied().max().unwrap_or(1);
    let pages_per_seq = (args.context + 1).div_ceil(PAGE_SIZE);
    let mut cache = PagedKvCache::<B>::new(
        c.num_layers,
        args.pages.unwrap_or(0).max(max_batch * pages_per_seq),
        PAGE_SIZE,
        kv_dim,
        &device,
        dtype,
        storage,
    );
    let time_ms = |iters: usize, f: &mut dyn FnMut()| {
        f(); // warm-up: kernels compile and autotune on first use
        f();
        B::sync(&device).expect("device sync");
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        B::sync(&device).expect("device sync");
        t.elapsed().as_secs_f64() * 1e3 / iters as f64
    };
    let (h, q_dim, inter) = (
        c.hidden_size,
        model.shard().num_heads() * c.head_dim,
        c.intermediate_size,
    );
    // (in, out, times per layer) of q, k and v, o, gate and up, down; `(_, 0, 0)` stands for
    // none (k and v merged with q).
    let layer_shapes = [
        if merged_qkv {
            (h, q_dim + 2 * kv_dim, 1)
        } else {
            (h, q_dim, 1)
        },
        if merged_qkv { (h, 0, 0) } else { (h, kv_dim, 2) },
        (q_dim, h, 1),
        if merged_gate_up {
            (h, 2 * inter, 1)
        } else {
            (h, inter, 2)
        },
        (inter, h, 1),
    ];
    let mut rows = Vec::new();
    for &batch in &args.batches {
        let chunks: Vec<SequenceChunk> = (0..batch)
            .map(|s| SequenceChunk {
                tokens: vec![(s % 100) as u32 + 1],
                start_pos: args.context,
                block_table: (0..pages_per_seq)
                    .map(|p| (s * pages_per_seq + p) as u32)
                    .collect(),
                wants_logits: true,
            })
            .collect();
        let step_ms = time_ms(args.iters, &mut || {
            model.forward(&mut cache, &chunks).into_data();
        });
        if args.step_only {
            eprintln!("batch {batch}: {step_ms:.2} ms per step");
            continue;
        }
        let mut issue = std::time::Duration::ZERO;
        for _ in 0..args.iters {
            let t = Instant::now();
            let logits = model.forward(&mut cache, &chunks);
            issue += t.elapsed();
            logits.into_data();
        }
        let host_issue_ms = issue.as_secs_f64() * 1e3 / args.iters as f64;
        let gemm = |k: usize, n: usize| {
            let x = Tensor::<B, 2>::random([batch, k], Distribution::Default, (&device, dtype));
            let w = match layout {
                WeightLayout::InOut => {
                    Tensor::<B, 2>::random([k, n], Distribution::Default, (&device, dtype))
                }
                WeightLayout::OutIn => {
                    Tensor::<B, 2>::random([n, k], Distribution::Default, (&device, dtype)).transpose()
                }
            };
            // Held until the next product, so that no backend can skip an unread result.
            let mut sink = None;
            time_ms(args.iters, &mut || {
                sink = Some(match &hook {
                    Some(project) => project(x.clone(), w.clone()),
                    None => x.clone().matmul(w.clone()),
                });
            })
        };
        let layer_gemms_ms = c.num_layers as f64
            * layer_shapes
                .iter()
                .filter(|&&(_, _, times)| times > 0)
                .map(|&(k, n, times)| times as f64 * gemm(k, n))
                .sum::<f64>();
        let lm_head_ms = gemm(h, c.vocab_size);
        let logits = Tensor::<B, 2>::zeros([batch, c.vocab_size], (&device, DType::F32));
        let logits_to_host_ms = time_ms(args.iters, &mut || {
            logits.clone().add_scalar(0.0).into_data();
        });
        let kv_bytes = batch * args.context * c.num_layers * 2 * kv_dim * dtype.size();
        rows.push(Row {
            batch,
            context: args.context,
            step_ms,
            host_issue_ms,
            layer_gemms_ms,
            lm_head_ms,
            logits_to_host_ms,
            rest_ms: step_ms - layer_gemms_ms - lm_head_ms - logits_to_host_ms,
            weight_bytes,
            kv_bytes,
            roofline_ms: (weight_bytes + kv_bytes) as f64 / (args.bandwidth_gbs * 1e9) * 1e3,
        });
    }
    let issue = match args.step_only {
        true => Vec::new(),
        false => issue_costs(&device, dtype, c.hidden_size, &kernels),
    };
    (rows, issue)
}

/// What the step's host issue is made of: the host's time for one call of each kind a decode
/// step makes, `CALLS` in a row without waiting for the device (whose queue absorbs them), so
/// that the profile says what an upload, a launch and a read cost here. The uploads are the
/// step's integer arrays as `model::step_indices` sends them, apart and in one upload.
fn issue_costs<B: Backend>(
    device: &B::Device,
    dtype: DType,
    hidden: usize,
    kernels: &Kernels<B>,
) -> Vec<(String, f64)> {
    const CALLS: usize = 200;
    // The arrays of a decode step at batch 32: positions, write slots, tokens, query rows and
    // context bounds of 32, and block tables of 32 sequences of 13 pages.
    const ARRAYS: [usize; 7] = [32, 32, 32, 416, 32, 32, 32];
    let per_call_us = |f: &mut dyn FnMut()| {
        f(); // warm-up: a kernel compiles on first use
        B::sync(device).expect("device sync");
        let t = Instant::now();
        for _ in 0..CALLS {
            f();
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / CALLS as f64;
        B::sync(device).expect("device sync");
        us
    };
    let upload = |view: Option<&IndexViewFn<B>>| {
        let mut ix = StepIndices::default();
        let ids: Vec<_> = ARRAYS.iter().map(|&n| ix.push(vec![1; n])).collect();
        let up = ix.upload::<B>(device, view);
        ids.into_iter().map(|id| up.get(id)).collect::<Vec<_>>()
    };
    let mut costs = vec![
        (
            "upload: one array of 32 ints".to_string(),
            per_call_us(&mut || {
                drop(Tensor::<B, 1, Int>::from_data(
                    TensorData::new(vec![1i32; 32], [32]),
                    device,
                ))
            }),
        ),
        (
            format!("upload: a step's {} index arrays, apart", ARRAYS.len()),
            per_call_us(&mut || drop(upload(None))),
        ),
    ];
    if let Some(view) = &kernels.index_view {
        costs.push((
            format!("upload: the same {} in one upload, viewed", ARRAYS.len()),
            per_call_us(&mut || drop(upload(Some(view)))),
        ));
    }
    // The caller's own part of a launch: cubecl queues each task (a launch, its output's
    // allocation where `output_blocks` does not carve it) for a runner thread, in buffers of
    // 32. A burst of `BURST` launches after a sync fits in one buffer, so the caller never
    // waits for the runner; `CALLS` in a row wait for whichever of the two is slower. Equal:
    // the caller binds; the burst far cheaper: the runner (the driver's launch and cubecl's
    // work on that thread) does.
    const BURST: usize = 12;
    let burst_us = |f: &mut dyn FnMut()| {
        f();
        let mut caller = std::time::Duration::ZERO;
        for _ in 0..CALLS / BURST {
            B::sync(device).expect("device sync");
            let t = Instant::now();
            for _ in 0..BURST {
                f();
            }
            caller += t.elapsed();
        }
        B::sync(device).expect("device sync");
        caller.as_secs_f64() * 1e6 / (CALLS / BURST * BURST) as f64
    };
    let x = Tensor::<B, 2>::ones([1, hidden], (device, dtype));
    let gain = Tensor::<B, 1>::ones([hidden], (device, dtype));
    let mut sink = Vec::with_capacity(11 * (CALLS + 1));
    let mut add = || sink.push(x.clone().add_scalar(1.0));
    costs.push((
        format!("launch: burn's add_scalar on [1, {hidden}]"),
        per_call_us(&mut add),
    ));
    costs.push((
        format!("launch, the caller's part: the same, {BURST} after a sync"),
        burst_us(&mut add),
    ));
    if let Some(fused) = &kernels.fused {
        let mut norm = || sink.push((fused.rms_norm)(x.clone(), gain.clone(), 1e-5));
        costs.push((
            format!("launch: our RMSNorm on [1, {hidden}]"),
            per_call_us(&mut norm),
        ));
        costs.push((
            format!("launch, the caller's part: the same, {BURST} after a sync"),
            burst_us(&mut norm),
        ));
        // The same launches with their outputs allocated one by one (`carve_outputs = false`):
        // the difference is what an allocation task costs the two threads.
        let carving = output_blocks::carving();
        output_blocks::set_carving(!carving);
        costs.push((
            format!("launch: the same, carve_outputs = {}", !carving),
            per_call_us(&mut norm),
        ));
        costs.push((
            format!("launch, the caller's part: the same, {BURST} after a sync"),
            burst_us(&mut norm),
        ));
        output_blocks::set_carving(carving);
        // The embedding's gather, burn's and ours: burn's binds tensors, whose shapes and
        // strides cubecl-cuda uploads on its runner at every launch; ours binds arrays only.
        if let Some(embed) = &fused.embed {
            let table = Tensor::<B, 2>::ones([256, hidden], (device, dtype));
            let ids = Tensor::<B, 1, Int>::zeros([1], device);
            let mut select = || sink.push(table.clone().select(0, ids.clone()));
            costs.push((
                format!("launch: burn's select of one row of [256, {hidden}]"),
                per_call_us(&mut select),
            ));
            costs.push((
                format!("launch, the caller's part: the same, {BURST} after a sync"),
                burst_us(&mut select),
            ));
            let mut gather = || sink.push(embed(table.clone(), ids.clone()));
            costs.push((
                "launch: our gather of the same".to_string(),
                per_call_us(&mut gather),
            ));
            costs.push((
                format!("launch, the caller's part: the same, {BURST} after a sync"),
                burst_us(&mut gather),
            ));
        }
    }
    // What `queue_kernel!` saves each launch of ours over the launch function cubecl's macro
    // generates, which burn's kernels still use: a clone and a drop of the client's
    // `DeviceProperties`, whose feature sets are CUDA's here.
    if let Some(cuda) = (device as &dyn std::any::Any).downcast_ref::<cubecl::cuda::CudaDevice>() {
        let client = <cubecl::cuda::CudaRuntime as cubecl::Runtime>::client(cuda);
        costs.push((
            "host: a copy of cubecl's DeviceProperties, which queue_kernel! skips".to_string(),
            per_call_us(&mut || drop(std::hint::black_box(client.properties().clone()))),
        ));
    }
    drop(sink);
    let id = Tensor::<B, 1, Int>::zeros([1], device);
    costs.push((
        "read back: one int (a round trip to an idle device)".to_string(),
        per_call_us(&mut || drop(id.clone().into_data())),
    ));
    costs
}

#[derive(serde::Deserialize)]
struct Goldens {
    prompts: Vec<GoldenPrompt>,
}

#[derive(serde::Deserialize)]
struct GoldenPrompt {
    input_ids: Vec<u32>,
    last_logits: Vec<f32>,
    greedy_ids: Vec<u32>,
}

/// What one backend made of a fixture's golden prompts.
struct FixtureRun {
    /// Whole-prompt last-position logits of each prompt.
    logits: Vec<Vec<f32>>,
    /// Batched greedy continuation of each prompt.
    greedy: Vec<Vec<u32>>,
}

fn logits_main(mut argv: impl Iterator<Item = String>) {
    let (mut cuda, mut fusion, mut kernels) = (false, true, false);
    let mut dirs = Vec::new();
    while let Some(a) = argv.next() {
        match a.as_str() {
            "--device" => {
                let d = argv.next().unwrap_or_default();
                cuda = d.starts_with("cuda");
                fusion = d == "cuda";
                kernels = d == "cuda-kernels";
            }
            dir => dirs.push(std::path::PathBuf::from(dir)),
        }
    }
    if dirs.is_empty() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        dirs = std::fs::read_dir(root)
            .expect("tests/fixtures")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("goldens.json").exists())
            .collect();
        dirs.sort();
    }
    println!("| fixture | device dtype | max abs logit diff vs CPU f32 | vs transformers | top-1 agrees | greedy tokens = transformers (CPU) | (device) |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let mut failed = false;
    for dir in dirs {
        let files = ModelFiles::open(&ModelSource::Dir(dir.clone())).expect("fixture opens");
        let goldens: Goldens =
            serde_json::from_str(&std::fs::read_to_string(dir.join("goldens.json")).expect("goldens.json"))
                .expect("goldens parse");
        let cpu = run_fixture::<burn::backend::Flex>(
            &files,
            &goldens,
            (Default::default(), DType::F32),
            KvStorage::Host,
            plain(),
        );
        let dtype = device_dtype(&files, cuda);
        let dev = if cuda && fusion {
            run_fixture::<burn::backend::Cuda>(
                &files,
                &goldens,
                (Default::default(), dtype),
                KvStorage::Device,
                plain(),
            )
        } else if kernels {
            let chosen = chosen_kernels(&files);
            run_fixture::<CudaNoFusion>(
                &files,
                &goldens,
                (Default::default(), dtype),
                KvStorage::Device,
                chosen,
            )
        } else if cuda {
            run_fixture::<CudaNoFusion>(
                &files,
                &goldens,
                (Default::default(), dtype),
                KvStorage::Device,
                plain(),
            )
        } else {
            run_fixture::<burn::backend::Flex>(
                &files,
                &goldens,
                (Default::default(), dtype),
                KvStorage::Device,
                plain(),
            )
        };
        let max_diff = |a: &[Vec<f32>], b: &dyn Fn(usize) -> Vec<f32>| {
            a.iter()
                .enumerate()
                .flat_map(|(i, row)| {
                    row.iter()
                        .zip(b(i))
                        .map(|(x, y)| (x - y).abs())
                        .collect::<Vec<_>>()
                })
                .fold(0.0f32, f32::max)
        };
        let vs_cpu = max_diff(&dev.logits, &|i| cpu.logits[i].clone());
        let vs_hf = max_diff(&dev.logits, &|i| goldens.prompts[i].last_logits.clone());
        let top1 = dev
            .logits
            .iter()
            .zip(&cpu.logits)
            .filter(|(d, c)| argmax(d) == argmax(c))
            .count();
        let agree = |run: &FixtureRun| -> (usize, usize) {
            let total = goldens.prompts.iter().map(|p| p.greedy_ids.len()).sum();
            let same = run
                .greedy
                .iter()
                .zip(&goldens.prompts)
                .map(|(g, p)| g.iter().zip(&p.greedy_ids).take_while(|(a, b)| a == b).count())
                .sum();
            (same, total)
        };
        let ((cs, ct), (ds, dt)) = (agree(&cpu), agree(&dev));
        // f32 on the CPU must match exactly; half precision may part from a random model's
        // near-ties late, but not on the first token.
        failed |= cs != ct || top1 != cpu.logits.len();
        println!(
            "| {} | {dtype:?} | {vs_cpu:.4} | {vs_hf:.4} | {top1}/{} | {cs}/{ct} | {ds}/{dt} |",
            dir.file_name().unwrap().to_string_lossy(),
            cpu.logits.len()
        );
    }
    if failed {
        eprintln!("device_check logits: FAILED (CPU f32 greedy off the goldens, or a first token differs)");
        std::process::exit(1);
    }
}

/// burn's own kernels, weights `[in, out]`.
fn plain<B: Backend>() -> Kernels<B> {
    ServingKernels::default()
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(
            (0, f32::MIN),
            |best, (i, &x)| if x > best.1 { (i, x) } else { best },
        )
        .0
}

fn run_fixture<B: Backend>(
    files: &ModelFiles,
    goldens: &Goldens,
    (device, dtype): (B::Device, DType),
    storage: KvStorage,
    kernels: Kernels<B>,
) -> FixtureRun {
    let index = files.checkpoint.index().expect("weights index");
    let model = Llama::<B>::load_shard_in(&files.config, &index, (&device, dtype), None, kernels.layout)
        .expect("model loads");
    let model = kernels.install(model);
    drop(index);
    let c = model.config().clone();
    let prompts = &goldens.prompts;
    let n = prompts.len();
    let steps = prompts[0].greedy_ids.len();
    let per_seq = (prompts.iter().map(|p| p.input_ids.len()).max().unwrap() + steps).div_ceil(PAGE_SIZE);
    let new_cache = || {
        PagedKvCache::<B>::new(
            c.num_layers,
            n * per_seq,
            PAGE_SIZE,
            model.kv_dim(),
            &device,
            dtype,
            storage,
        )
    };
    let table = |i: usize| (0..per_seq).map(|p| (i * per_seq + p) as u32).collect::<Vec<_>>();
    let rows = |t: Tensor<B, 2>| {
        let [r, v] = t.dims();
        // `forward_fed` hands over the head's output in the model's dtype.
        let data = t
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("f32 logits");
        (0..r)
            .map(|i| data[i * v..(i + 1) * v].to_vec())
            .collect::<Vec<_>>()
    };
    let logits = prompts
        .iter()
        .map(|p| {
            let mut cache = new_cache();
            let chunk = SequenceChunk {
                tokens: p.input_ids.clone(),
                start_pos: 0,
                block_table: table(0),
                wants_logits: true,
            };
            rows(model.forward(&mut cache, &[chunk])).remove(0)
        })
        .collect();
    // Every prompt at once: prefill in chunks of 7 tokens, then batched decode.
    let mut cache = new_cache();
    let mut seqs: Vec<Vec<u32>> = prompts.iter().map(|p| p.input_ids.clone()).collect();
    let mut computed = vec![0usize; n];
    let mut greedy = vec![Vec::new(); n];
    while greedy.iter().any(|g| g.len() < steps) {
        let live: Vec<usize> = (0..n).filter(|&i| greedy[i].len() < steps).collect();
        let chunks: Vec<SequenceChunk> = live
            .iter()
            .map(|&i| {
                let end = (computed[i] + 7).min(seqs[i].len());
                SequenceChunk {
                    tokens: seqs[i][computed[i]..end].to_vec(),
                    start_pos: computed[i],
                    block_table: table(i),
                    wants_logits: end == seqs[i].len(),
                }
            })
            .collect();
        // The first steps want no logits (every prompt is longer than a chunk): no head runs.
        let out = model
            .forward_fed(&mut cache, &chunks, None)
            .map_or_else(Vec::new, rows);
        let mut out = out.iter();
        for (&i, chunk) in live.iter().zip(&chunks) {
            computed[i] = chunk.end_pos();
            if chunk.wants_logits {
                let next = argmax(out.next().expect("a row per chunk wanting logits")) as u32;
                seqs[i].push(next);
                greedy[i].push(next);
            }
        }
    }
    FixtureRun { logits, greedy }
}
