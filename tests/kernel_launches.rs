//! How many kernels a decode step launches, counted on wgpu's Vulkan backend over lavapipe: cubecl
//! logs each kernel it runs (its profiling log at `minimal`: `Executing <kernel> | <runtime>`). A decode step at batch 1 was bound by
//! the host's issue on the H100 (some 12 µs of host time per launch, docs/Performance.md), so a
//! launch that creeps back in, such as the per-layer copy the fourth GPU run found, shows here
//! first. Its own test binary: cubecl's configuration is set once per process, before any device.

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::tensor::{DType, Int, Tensor};
use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
use cubecl_wgpu::{WgpuDevice, WgpuRuntime};
use inferflux::config::CudaConfig;
use inferflux::model::cuda_gemm::{Cube, GemmKernel};
use inferflux::model::serving_kernels::ServingKernels;
use inferflux::model::{FedTokens, KvStorage, Llama, ModelFiles, ModelSource, PagedKvCache, SequenceChunk};

type B = Cube<WgpuRuntime>;

const DECODES: usize = 6;

/// The kernels the log names from launch `from` on, by name, once the log has stopped growing
/// (cubecl writes it from a task of its own, behind the launches), and the launches in all.
fn launches(log: &PathBuf, from: usize) -> (usize, BTreeMap<String, usize>) {
    let read = || -> Vec<String> {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.strip_prefix("Executing "))
            .map(|l| l.split(" | ").next().unwrap_or(l).trim().to_string())
            .collect()
    };
    let (mut names, mut unchanged) = (read(), 0);
    while unchanged < 2 {
        std::thread::sleep(std::time::Duration::from_millis(250));
        let again = read();
        unchanged = if again.len() == names.len() {
            unchanged + 1
        } else {
            0
        };
        names = again;
    }
    let mut by_name = BTreeMap::new();
    for name in &names[from.min(names.len())..] {
        *by_name.entry(name.clone()).or_insert(0) += 1;
    }
    (names.len(), by_name)
}

/// Per decode step at batch 1 of the 2-layer fixture in f16, served as `[cuda]` says (but for
/// cuBLAS): 8 launches per layer with the GPU's defaults (RMSNorm, q/k/v GEMV, RoPE and K/V
/// write, attention, o GEMV, add + RMSNorm, gate/up GEMV with its activation, down GEMV) and 5
/// with `fused_norm_gemv`; 4 per step besides (the embedding's gather, ours, the final norm,
/// `lm_head` and the argmax: the kernels that RoPE read its tables at each row's position, so no
/// launch gathers the step's rows of them, and the argmax reads the logits in the model's type,
/// so none casts them). Steps run as the executor runs them (`forward_fed`). A 16-layer
/// Llama-3.2-1B: 132 and 84.
#[test]
fn kernels_launched_per_decode_step_are_counted() {
    let log = std::env::temp_dir().join(format!("inferflux-launches-{}.log", std::process::id()));
    let config = serde_json::json!({
        "profiling": { "logger": { "level": "minimal", "file": log, "append": false } }
    });
    CubeClRuntimeConfig::set(serde_json::from_value(config).unwrap());
    let device = WgpuDevice::DefaultDevice;
    inferflux::model::kernels::set_up_vulkan(&device);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    let files = ModelFiles::open(&ModelSource::Dir(dir)).unwrap();
    let layers = files.config.num_layers;
    for (norm_gemv, per_layer) in [(false, 8), (true, 5)] {
        let cuda = CudaConfig {
            gemm: GemmKernel::Burn,
            fused_norm_gemv: norm_gemv,
            ..CudaConfig::default()
        };
        let kernels = ServingKernels::<B>::from_cuda(&cuda, &files.config);
        let index = files.checkpoint.index().unwrap();
        let model =
            Llama::<B>::load_shard_in(&files.config, &index, (&device, DType::F16), None, kernels.layout)
                .unwrap();
        let model = kernels.install(model);
        let argmax = kernels
            .device_sampling
            .argmax
            .clone()
            .expect("device argmax is on");
        let c = model.config();
        let new_cache = || {
            PagedKvCache::<B>::new(
                c.num_layers,
                64,
                4,
                c.num_kv_heads * c.head_dim,
                &device,
                DType::F16,
                KvStorage::Device,
            )
        };
        let table: Vec<u32> = (0..16).rev().collect();
        let chunk = |tokens: Vec<u32>, start_pos: usize| SequenceChunk {
            tokens,
            start_pos,
            block_table: table.clone(),
            wants_logits: true,
        };
        let read = |ids: &Tensor<B, 1, Int>| ids.clone().into_data().to_vec::<i32>().unwrap()[0] as u32;
        let prompt = vec![1, 381, 362, 14, 262];
        // The prompt, then decodes at batch 1. Fed: each step's token taken on the device from
        // the previous step's argmax, nothing read back in between, as the executor overlaps
        // steps; else read back and uploaded. The first decode compiles every kernel a decode
        // runs; the launches of the next `DECODES` are counted.
        let decode = |fed: bool| -> (Vec<u32>, f64, BTreeMap<String, usize>) {
            let mut cache = new_cache();
            let mut step = |tokens: Vec<u32>, pos: usize, feed: Option<FedTokens<B>>| {
                let logits = model.forward_fed(&mut cache, &[chunk(tokens, pos)], feed.as_ref());
                // Positions, write slots, block tables, query rows, context bounds and (fed
                // from the host) tokens: one upload.
                assert_eq!(
                    model.last_step_index_uploads(),
                    1,
                    "norm-GEMV {norm_gemv}, fed {fed}: uploads of the step at {pos}"
                );
                argmax(logits.unwrap()).unwrap()
            };
            let mut ids = vec![step(prompt.clone(), 0, None)];
            let mut before = 0;
            for pos in prompt.len()..prompt.len() + 1 + DECODES {
                if pos == prompt.len() + 1 {
                    // Read, so that everything queued so far has run (and been logged).
                    read(ids.last().unwrap());
                    before = launches(&log, 0).0;
                }
                let last = ids.last().unwrap().clone();
                let next = match fed {
                    true => step(
                        vec![0],
                        pos,
                        Some(FedTokens {
                            ids: last,
                            last_of_chunk: vec![(0, 0)],
                        }),
                    ),
                    false => step(vec![read(&last)], pos, None),
                };
                ids.push(next);
            }
            let tokens = ids.iter().map(read).collect();
            let (after, by_name) = launches(&log, before);
            (tokens, (after - before) as f64 / DECODES as f64, by_name)
        };
        let (host_fed, per_step, by_name) = decode(false);
        assert_eq!(
            per_step,
            (per_layer * layers + 4) as f64,
            "norm-GEMV {norm_gemv}: launches per decode step, by kernel over {DECODES} steps: {by_name:?}"
        );
        // The embedding's rows by our gather, not burn's `select` (which costs the host
        // nearly twice as much to issue).
        let gathers = |by_name: &BTreeMap<String, usize>, what: &str| {
            by_name
                .iter()
                .filter(|(k, _)| k.to_lowercase().contains(what))
                .map(|(_, n)| n)
                .sum::<usize>()
        };
        assert_eq!(
            (gathers(&by_name, "gatherrows"), gathers(&by_name, "select")),
            (DECODES, 0),
            "norm-GEMV {norm_gemv}: the embedding's gathers by kernel: {by_name:?}"
        );
        let (device_fed, per_step, by_name) = decode(true);
        assert_eq!(
            device_fed, host_fed,
            "norm-GEMV {norm_gemv}: the tokens fed on the device"
        );
        assert_eq!(
            per_step,
            (per_layer * layers + 4) as f64,
            "norm-GEMV {norm_gemv}: launches per decode step fed on the device, by kernel over \
             {DECODES} steps: {by_name:?}"
        );
    }
    let _ = std::fs::remove_file(&log);
}
