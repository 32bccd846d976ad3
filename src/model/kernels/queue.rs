//! [`queue_kernel!`]: our kernels' launches without cubecl's per-launch copy of the device's
//! properties.

/// Queues a kernel that `#[cube(launch_unchecked)]` defined, as the `launch_unchecked` function
/// that macro generates does, less one step.
///
/// Why: the generated function clones the client's `DeviceProperties` (a struct of `BTreeMap`s
/// and `BTreeSet`s: storage types, atomics, tensor-core shapes) into the launcher's type scope on
/// every launch, dropping the last launch's copy. In cubecl 0.10 that scope only resolves the
/// arguments' types, and no type reads a property: only `comptime::device_properties()` does,
/// inside a kernel's expansion, and the kernel's `define` gives its own builder the properties.
/// The clone and the drop were about 1.6k instructions of the caller's ~20k per launch on
/// lavapipe (docs/Performance.md), and are likely more on CUDA, whose feature sets are larger.
///
/// The call lists what the generated function takes, in the kernel's order:
/// - `module::Struct<R>(client, cube_count, cube_dim)`: the module `#[cube]` makes (the kernel's
///   name) and the kernel's struct in it (that name in PascalCase);
/// - `define [F = dtype]`: each `#[define(F)]` generic and its storage type, if any;
/// - `size [N = width]`: each `N: Size` generic and its vector width, if any;
/// - `args [Type = value]`: the runtime parameters, typed as in the kernel's signature (its
///   generics are the module's aliases, brought into scope here);
/// - `comptime [...]`, if any: the sizes' widths, then the `#[comptime]` and `#[define]`
///   parameters, in the signature's order.
///
/// A wrong type or count of arguments fails to compile. Two arguments of one type swapped do not;
/// each kernel's tests against an f32 reference catch that.
///
/// # Safety
///
/// Call it in an `unsafe` block, under the kernel's `launch_unchecked` contract: no read or write
/// out of bounds, no loop that never ends.
macro_rules! queue_kernel {
    (
        $kernel:ident :: $Struct:ident < $R:ty > ($client:expr, $count:expr, $dim:expr $(,)?),
        $(define [$($scalar:ident = $dtype:expr),* $(,)?],)?
        $(size [$($size:ident = $width:expr),* $(,)?],)?
        args [$($ty:ty = $arg:expr),* $(,)?]
        $(, comptime [$($comptime:expr),* $(,)?])? $(,)?
    ) => {{
        #[allow(unused_imports)]
        use $kernel::*;
        let client: &cubecl::prelude::ComputeClient<$R> = $client;
        let settings = cubecl::prelude::KernelSettings::default()
            .cube_dim($dim)
            .address_type(cubecl::prelude::AddressType::U32);
        let mut launcher = cubecl::prelude::KernelLauncher::<$R>::new(settings.clone());
        launcher.with_scope(|scope| {
            // The generated function's `scope.device_properties(client.properties())` was here.
            $($(scope.register_type::<$scalar>($dtype.into());)*)?
            $($(scope.register_size::<$size>($width.into());)*)?
            let _ = scope;
        });
        // Function arguments are evaluated in order: the bindings go in as the kernel lists them.
        let kernel = $Struct::<$R>::new(
            settings,
            client.clone(),
            $(<$ty as cubecl::prelude::LaunchArg>::register($arg, &mut launcher),)*
            $($($comptime,)*)?
        );
        launcher.launch_unchecked($count, kernel, client)
    }};
}
