//! Our own cubecl kernels, for what burn's generic ops do slowly on a GPU.
//!
//! Each kernel is generic over the cubecl runtime. Serving launches it on CUDA; the tests launch
//! the same source on wgpu's OpenGL backend, which Mesa's llvmpipe runs on the CPU, so a kernel is
//! checked against an f32 reference on every machine, GPU or not. llvmpipe's GL has no plane
//! (warp) operations, so a kernel that reduces across a plane takes a `plane_reduce` switch. The
//! tests run the shared-memory path on GL and the plane path on wgpu's Vulkan backend over Mesa's
//! lavapipe (also the CPU), whose planes are 8 lanes wide where CUDA's warps are 32.

#[macro_use]
mod queue;

pub mod gather;
pub mod gemv;
pub mod paged_attention;
pub mod qkv_write;
pub mod rms_norm;
pub mod rope;
pub mod sample;
pub mod silu_mul;
pub mod skinny_gemm;
pub mod stream_order;

/// Why a kernel will not run a problem; the caller falls back to burn's ops.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The widest vector of `elem_bytes`-byte elements, at most 16 bytes and `max_vector`
/// elements, that divides `len`: rows of `len` elements then start on a vector boundary.
pub fn vector_width(len: usize, elem_bytes: usize, max_vector: usize) -> usize {
    let mut width = (16 / elem_bytes.max(1)).clamp(1, max_vector.max(1));
    while width > 1 && !len.is_multiple_of(width) {
        width /= 2;
    }
    width
}

/// Cubes one dimension of a grid may hold (CUDA's y and z limit, and wgpu's on every axis).
pub const MAX_CUBES_PER_DIM: u32 = 65_535;

/// A grid of `units`-unit cubes for one unit per element of `len`, split over two dimensions past
/// [`MAX_CUBES_PER_DIM`] (kernels index with `ABSOLUTE_POS` and check `< len`).
pub fn elementwise_cubes(len: usize, units: u32) -> Result<cubecl::prelude::CubeCount, Refused> {
    let cubes = u32::try_from(len.div_ceil(units as usize))
        .map_err(|_| Refused(format!("{len} elements do not fit one launch")))?;
    let (x, y) = match cubes {
        0..=MAX_CUBES_PER_DIM => (cubes, 1),
        _ => (MAX_CUBES_PER_DIM, cubes.div_ceil(MAX_CUBES_PER_DIM)),
    };
    Ok(cubecl::prelude::CubeCount::Static(x, y, 1))
}

/// Sets wgpu's `device` up on its Vulkan backend: call once per process and device. The tests
/// run our kernels there without a GPU, on Mesa's lavapipe (a CPU driver with subgroups of 8
/// lanes); panics saying how to install it where it is missing.
pub fn set_up_vulkan(device: &cubecl_wgpu::WgpuDevice) {
    let lavapipe = std::fs::read_dir("/usr/share/vulkan/icd.d")
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| entry.file_name().to_string_lossy().starts_with("lvp_icd"));
    assert!(
        lavapipe,
        "the kernel tests on Vulkan need Mesa's Vulkan CPU driver (lavapipe): \
         apt-get install mesa-vulkan-drivers (.ci/run installs it)"
    );
    let setup = cubecl_wgpu::init_setup::<cubecl_wgpu::Vulkan>(device, Default::default());
    let info = setup.adapter.get_info();
    assert_eq!(format!("{:?}", setup.backend), "Vulkan", "{info:?}");
}

#[cfg(test)]
pub(crate) mod gl {
    //! The tests' cubecl runtime: wgpu on OpenGL, which Mesa's llvmpipe runs on the CPU.

    use std::sync::OnceLock;

    use cubecl::prelude::*;
    use cubecl_wgpu::{WgpuDevice, WgpuRuntime};

    pub type Gl = WgpuRuntime;

    /// The one GL device, set up on first use (wgpu's default is Vulkan, which these machines lack).
    pub fn client() -> ComputeClient<Gl> {
        static SETUP: OnceLock<()> = OnceLock::new();
        let device = WgpuDevice::DefaultDevice;
        SETUP.get_or_init(|| {
            cubecl_wgpu::init_setup::<cubecl_wgpu::OpenGl>(&device, Default::default());
        });
        Gl::client(&device)
    }

    /// The plane path's runtime: wgpu on Vulkan over Mesa's lavapipe, a CPU driver with
    /// subgroups (8 lanes). cubecl does not list plane operations for a CPU adapter, but it
    /// requests the adapter's subgroup feature and compiles them all the same.
    pub fn plane_client() -> ComputeClient<Gl> {
        static SETUP: OnceLock<()> = OnceLock::new();
        let device = WgpuDevice::Cpu;
        SETUP.get_or_init(|| super::set_up_vulkan(&device));
        Gl::client(&device)
    }

    /// Each reduction path with its runtime: `(client, plane_reduce)`, shared memory on GL and
    /// planes on Vulkan.
    pub fn reduction_paths() -> [(ComputeClient<Gl>, bool); 2] {
        [(client(), false), (plane_client(), true)]
    }

    pub fn upload(client: &ComputeClient<Gl>, values: &[f32]) -> cubecl::server::Handle {
        client.create_from_slice(f32::as_bytes(values))
    }

    pub fn download(client: &ComputeClient<Gl>, handle: cubecl::server::Handle) -> Vec<f32> {
        let bytes = client.read_one(handle).expect("read back a kernel's output");
        f32::from_bytes(&bytes).to_vec()
    }

    /// `x [rows, k] · wᵀ` with `w` stored `[n, k]`, summed in f64: the reference of the GEMV and
    /// GEMM kernels.
    pub fn product(x: &[f32], w: &[f32], [rows, k, n]: [usize; 3]) -> Vec<f32> {
        let mut out = vec![0.0f32; rows * n];
        for r in 0..rows {
            for o in 0..n {
                out[r * n + o] = (0..k)
                    .map(|j| x[r * k + j] as f64 * w[o * k + j] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    /// Deterministic values in [-1, 1] that differ from element to element and with `salt`.
    pub fn values(len: usize, salt: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + salt * 104_729) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_width_divides_the_row_and_fits_16_bytes() {
        assert_eq!(vector_width(2048, 2, 16), 8);
        assert_eq!(vector_width(2048, 4, 16), 4);
        assert_eq!(vector_width(2048, 2, 4), 4);
        assert_eq!(vector_width(36, 2, 16), 4);
        assert_eq!(vector_width(33, 2, 16), 1);
    }
}
