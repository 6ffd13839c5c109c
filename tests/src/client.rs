//! A host-side vhost-user-blk client for the tests: libblkio's
//! `virtio-blk-vhost-user` driver (the `blkio` crate) with one shared
//! buffer region and blocking helpers.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

pub struct Client {
    pub b: Blkio,
    pub queues: Vec<Blkioq>,
    region: MemoryRegion,
}

/// Bytes of buffer memory each client maps.
pub const REGION_BYTES: usize = 8 << 20;

impl Client {
    pub fn connect(socket: &Path, queues: i32) -> Result<Client, blkio::Error> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", socket.to_str().expect("utf-8 socket path"))?;
        b.connect()?;
        b.set_i32("num-queues", queues)?;
        let out = b.start()?;
        let region = b.alloc_mem_region(REGION_BYTES)?;
        b.map_mem_region(&region)?;
        Ok(Client {
            b,
            queues: out.queues,
            region,
        })
    }

    /// Connect, retrying until `timeout` (a backend that is starting up).
    pub fn connect_retry(socket: &Path, queues: i32, timeout: Duration) -> Client {
        let t0 = std::time::Instant::now();
        loop {
            match Client::connect(socket, queues) {
                Ok(c) => return c,
                Err(e) if t0.elapsed() < timeout => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot connect to {}: {e}", socket.display()),
            }
        }
    }

    pub fn capacity(&self) -> u64 {
        self.b.get_u64("capacity").expect("capacity")
    }

    #[allow(clippy::mut_from_ref)] // the region is memory shared with the device
    pub fn buf(&self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.region.len);
        // SAFETY: inside the region we allocated; callers use disjoint ranges
        // for requests in flight at the same time.
        unsafe { std::slice::from_raw_parts_mut((self.region.addr + off) as *mut u8, len) }
    }

    pub fn write(&mut self, q: usize, offset: u64, buf_off: usize, len: usize, tag: usize) {
        let p = self.buf(buf_off, len).as_mut_ptr();
        self.queues[q].write(offset, p, len, tag, ReqFlags::empty());
    }

    pub fn read(&mut self, q: usize, offset: u64, buf_off: usize, len: usize, tag: usize) {
        let p = self.buf(buf_off, len).as_mut_ptr();
        self.queues[q].read(offset, p, len, tag, ReqFlags::empty());
    }

    pub fn flush(&mut self, q: usize, tag: usize) {
        self.queues[q].flush(tag, ReqFlags::empty());
    }

    /// Wait for `n` completions on queue `q`: (tag, result) each.
    pub fn wait(&mut self, q: usize, n: usize) -> Vec<(usize, i32)> {
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..n).map(|_| MaybeUninit::uninit()).collect();
        let mut got = Vec::new();
        while got.len() < n {
            let mut t = Duration::from_secs(20);
            let k = self.queues[q]
                .do_io(&mut comps[got.len()..], 1, Some(&mut t), None)
                .expect("do_io");
            assert!(k > 0, "timed out waiting for completions");
            for c in &comps[got.len()..got.len() + k] {
                // SAFETY: do_io initialised the first k entries.
                let c = unsafe { c.assume_init_read() };
                got.push((c.user_data, c.ret));
            }
        }
        got
    }

    /// Submit what is queued and take the completions there are, without
    /// waiting: (tag, result) each.
    pub fn poll(&mut self, q: usize) -> Vec<(usize, i32)> {
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..64).map(|_| MaybeUninit::uninit()).collect();
        let k = self.queues[q]
            .do_io(&mut comps, 0, None, None)
            .expect("do_io");
        comps[..k]
            .iter()
            .map(|c| {
                // SAFETY: do_io initialised the first k entries.
                let c = unsafe { c.assume_init_read() };
                (c.user_data, c.ret)
            })
            .collect()
    }

    /// Submit without waiting (for tests that disconnect mid-request).
    pub fn submit(&mut self, q: usize) {
        let mut none: [MaybeUninit<Completion>; 0] = [];
        let _ = self.queues[q].do_io(&mut none, 0, None, None);
    }
}

/// The contents of 4 KiB block `block` written in generation `gen`
/// (gen 0: never written, zeroes).
pub fn fill_block(out: &mut [u8], block: u64, gen: u32) {
    if gen == 0 {
        out.fill(0);
        return;
    }
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ u64::from(gen).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    for c in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
}

/// Which generation, of `candidates`, block `block` holds.
pub fn block_gen(data: &[u8], block: u64, candidates: &[u32]) -> Option<u32> {
    let mut want = vec![0u8; data.len()];
    candidates.iter().copied().find(|&g| {
        fill_block(&mut want, block, g);
        want == data
    })
}
