//! `device_check issue`: the host's cost of issuing decode steps through cubecl, on wgpu's Vulkan
//! backend (lavapipe on a machine without a GPU), so that it can be measured and reduced without
//! a GPU.
//!
//! ```text
//! device_check issue [--fixture DIR] [--steps 200] [--batch 1]
//! ```
//!
//! cubecl 0.10 hands every launch, allocation and upload to a runner thread of its own through a
//! queue of two 32-task buffers. The thread that calls the model (the executor's, in the server)
//! only builds each launch and queues it. That caller's part is common to every cubecl runtime:
//! the model's code, burn's ops and cubecl's launch builder are the same on CUDA. The runner's
//! part is not (wgpu's encoder here, the CUDA driver there). So this measures the caller:
//!
//! - it prints the caller's wall time per decode step (median), each step issued after the last
//!   one's ids are read back, and how long the steps took in all;
//! - every step is issued by [`issue_decode_step`], which `scripts/issue-instructions.sh` counts
//!   instructions in under callgrind: repeatable on a shared, noisy machine.
//!
//! The model is the fixture in f16 with the kernels the server's `[cuda]` settings choose, from
//! `INFERFLUX__CUDA__*` (cuBLAS and the skinny GEMM, which wgpu cannot run, become burn's
//! matmul; a decode at these batches runs the GEMV anyway).

use std::time::{Duration, Instant};

use burn::tensor::{DType, Int, Tensor};
use cubecl_wgpu::{WgpuDevice, WgpuRuntime};
use inferflux::config::CudaConfig;
use inferflux::model::cuda_gemm::{Cube, GemmKernel};
use inferflux::model::draw::DeviceArgmaxFn;
use inferflux::model::serving_kernels::ServingKernels;
use inferflux::model::{KvStorage, Llama, ModelFiles, ModelSource, PagedKvCache, SequenceChunk};

type B = Cube<WgpuRuntime>;

/// Steps issued before the measured ones: the first compiles every kernel a decode runs.
const WARM_UP: usize = 10;

/// `cuda`: the server's `[cuda]` settings, as `device_check` reads them from `INFERFLUX__CUDA__*`.
pub fn main(mut argv: impl Iterator<Item = String>, mut cuda: CudaConfig) {
    let (mut fixture, mut steps, mut batch) = ("tests/fixtures/tiny-llama".to_string(), 200, 1);
    while let Some(flag) = argv.next() {
        let mut value = || argv.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--fixture" => fixture = value(),
            "--steps" => steps = value().parse().expect("--steps N"),
            "--batch" => batch = value().parse().expect("--batch N"),
            other => panic!("unknown argument {other}"),
        }
    }
    if matches!(
        cuda.gemm,
        GemmKernel::Cublas | GemmKernel::CublasOrdered | GemmKernel::Skinny
    ) {
        cuda.gemm = GemmKernel::Burn;
    }
    let device = WgpuDevice::DefaultDevice;
    inferflux::model::kernels::set_up_vulkan(&device);
    let files = ModelFiles::open(&ModelSource::Dir(fixture.into())).expect("fixture opens");
    let kernels = ServingKernels::<B>::from_cuda(&cuda, &files.config);
    let index = files.checkpoint.index().expect("weights index");
    let model = Llama::<B>::load_shard_in(&files.config, &index, (&device, DType::F16), None, kernels.layout)
        .expect("model loads");
    let model = kernels.install(model);
    let argmax = kernels
        .device_sampling
        .argmax
        .clone()
        .expect("[cuda] device_argmax is on");
    let c = model.config();
    let pages_per_seq = 16;
    let mut cache = PagedKvCache::<B>::new(
        c.num_layers,
        batch * pages_per_seq,
        16,
        c.num_kv_heads * c.head_dim,
        &device,
        DType::F16,
        KvStorage::Device,
    );
    eprintln!(
        "issue: {} layers, batch {batch}, fused_norm_gemv {}, {steps} steps on {:?}",
        c.num_layers, cuda.fused_norm_gemv, device
    );
    let read = |ids: Tensor<B, 1, Int>| ids.into_data().to_vec::<i32>().expect("ids");
    let mut tokens: Vec<u32> = (0..batch as u32).map(|s| s + 1).collect();
    let mut times = Vec::with_capacity(steps);
    let started = Instant::now();
    for step in 0..WARM_UP + steps {
        // Contexts cycle through the 256 slots a sequence owns, so that pages stay valid.
        let chunks: Vec<SequenceChunk> = tokens
            .iter()
            .enumerate()
            .map(|(s, &t)| SequenceChunk {
                tokens: vec![t],
                start_pos: 5 + step % 200,
                block_table: (0..pages_per_seq)
                    .map(|p| (s * pages_per_seq + p) as u32)
                    .collect(),
                wants_logits: true,
            })
            .collect();
        let t = Instant::now();
        let ids = issue_decode_step(&model, &mut cache, &chunks, &argmax);
        if step >= WARM_UP {
            times.push(t.elapsed());
        }
        tokens = read(ids).into_iter().map(|id| id as u32).collect();
    }
    let all = started.elapsed();
    times.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("| caller's issue per decode step, median µs | p10 µs | p90 µs | steps | s in all |");
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {:.1} | {:.1} | {:.1} | {steps} | {:.1} |",
        us(times[steps / 2]),
        us(times[steps / 10]),
        us(times[steps * 9 / 10]),
        all.as_secs_f64()
    );
}

/// One decode step issued, its ids not read: the function `scripts/issue-instructions.sh` counts
/// instructions in (kept out of line for that).
#[inline(never)]
pub fn issue_decode_step(
    model: &Llama<B>,
    cache: &mut PagedKvCache<B>,
    chunks: &[SequenceChunk],
    argmax: &DeviceArgmaxFn<B>,
) -> Tensor<B, 1, Int> {
    let logits = model
        .forward_fed(cache, chunks, None)
        .expect("a decode step wants logits");
    argmax(logits).expect("device argmax")
}
