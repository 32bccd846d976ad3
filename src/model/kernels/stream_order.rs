//! Ordering between cubecl's stream and another CUDA stream (cuBLAS's) without the host waiting:
//! a flag in device memory that one side sets and the other waits for.
//!
//! Why: cubecl's CUDA streams are private to its server, so a library that runs on a stream of
//! its own (cuBLAS) could so far only be ordered by host synchronisations: wait for cubecl's
//! queue before the call, for the call after it. Each drains the GPU and stops the host from
//! issuing ahead, and a decode step makes about a hundred such calls (docs/Performance.md).
//! With these two kernels: [`launch_signal`] on cubecl's stream sets `flags[slot] = value` once
//! everything queued before it has run, which the other stream waits for with
//! `cuStreamWaitValue32`; that stream sets another slot with `cuStreamWriteValue32` after its
//! work, and [`launch_wait`] holds cubecl's stream until it reads that value. The wait is one
//! unit polling through the L2 (an atomic load), the usual way for a kernel to wait on another
//! stream's progress.

use cubecl::prelude::*;

use super::Refused;

#[cube(launch_unchecked)]
fn signal_kernel(flags: &mut Array<Atomic<u32>>, slot: u32, value: u32) {
    if ABSOLUTE_POS == 0 {
        flags[slot as usize].store(value);
    }
}

/// Polls `flags[slot]` until it holds `value`, at most `max_polls` times; writes the polls left
/// into `flags[report]` (0: it gave up).
#[cube(launch_unchecked)]
fn wait_kernel(flags: &mut Array<Atomic<u32>>, slot: u32, value: u32, max_polls: u32, report: u32) {
    if ABSOLUTE_POS == 0 {
        let mut left = max_polls;
        while left > 0 && flags[slot as usize].load() != value {
            left -= 1;
        }
        flags[report as usize].store(left);
    }
}

/// Queues `flags[slot] = value` (`flags`: `len` u32s) behind everything queued on `client`'s
/// stream.
pub fn launch_signal<R: Runtime>(
    client: &ComputeClient<R>,
    flags: cubecl::server::Handle,
    len: usize,
    slot: usize,
    value: u32,
) -> Result<(), Refused> {
    if slot >= len {
        return Err(Refused(format!("flag {slot} of {len}")));
    }
    // SAFETY: one unit writes element `slot`, below `len`, the handle's length (the caller's
    // contract).
    unsafe {
        queue_kernel!(
            signal_kernel::SignalKernel<R>(
                client,
                CubeCount::Static(1, 1, 1),
                CubeDim::new_1d(1),
            ),
            args [
                Array<Atomic<u32>> = ArrayArg::from_raw_parts(flags, len),
                u32 = slot as u32,
                u32 = value,
            ],
        );
    }
    Ok(())
}

/// Queues a wait on `client`'s stream: nothing queued after it starts before `flags[slot]`
/// holds `value` or `max_polls` polls have passed; the polls left go to `flags[report]`.
pub fn launch_wait<R: Runtime>(
    client: &ComputeClient<R>,
    flags: cubecl::server::Handle,
    len: usize,
    (slot, value): (usize, u32),
    max_polls: u32,
    report: usize,
) -> Result<(), Refused> {
    if slot >= len || report >= len || slot == report {
        return Err(Refused(format!("flags {slot} and {report} of {len}")));
    }
    // SAFETY: one unit reads element `slot` and writes element `report`, both below `len`, the
    // handle's length (the caller's contract). The loop ends after `max_polls` polls.
    unsafe {
        queue_kernel!(
            wait_kernel::WaitKernel<R>(
                client,
                CubeCount::Static(1, 1, 1),
                CubeDim::new_1d(1),
            ),
            args [
                Array<Atomic<u32>> = ArrayArg::from_raw_parts(flags, len),
                u32 = slot as u32,
                u32 = value,
                u32 = max_polls,
                u32 = report as u32,
            ],
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::gl;

    fn read(client: &ComputeClient<gl::Gl>, flags: cubecl::server::Handle) -> Vec<u32> {
        let bytes = client.read_one(flags).expect("read back the flags");
        u32::from_bytes(&bytes).to_vec()
    }

    #[test]
    fn kernels_stream_order_signal_sets_the_flag_and_wait_sees_it() {
        let client = gl::client();
        let flags = client.create_from_slice(u32::as_bytes(&[0, 0, 0]));
        launch_signal(&client, flags.clone(), 3, 1, 7).unwrap();
        assert_eq!(read(&client, flags.clone()), [0, 7, 0]);
        // The value is there: the wait ends at its first poll, every poll left.
        launch_wait(&client, flags.clone(), 3, (1, 7), 1000, 2).unwrap();
        assert_eq!(read(&client, flags.clone()), [0, 7, 1000]);
        // Another value never comes: the wait gives up after its polls and says so.
        launch_wait(&client, flags.clone(), 3, (1, 8), 50, 2).unwrap();
        assert_eq!(read(&client, flags), [0, 7, 0]);
    }

    #[test]
    fn kernels_stream_order_refuses_flags_past_the_buffer() {
        let client = gl::client();
        let flags = client.create_from_slice(u32::as_bytes(&[0, 0]));
        assert!(launch_signal(&client, flags.clone(), 2, 2, 1).is_err());
        assert!(launch_wait(&client, flags.clone(), 2, (0, 1), 10, 2).is_err());
        assert!(launch_wait(&client, flags, 2, (1, 1), 10, 1).is_err());
    }
}
