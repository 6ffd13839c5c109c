//! `null`: completes every request at once and touches no data. Measures
//! the engine's own cost per request.

use crate::types::{Bdev, BdevChannel, BdevInfo, Op, Submitter};

pub struct NullBdev {
    info: BdevInfo,
}

impl NullBdev {
    pub fn new(name: &str, capacity_bytes: u64, block_size: u32, read_only: bool) -> Self {
        NullBdev {
            info: BdevInfo {
                name: name.to_string(),
                block_size,
                capacity_bytes: capacity_bytes - capacity_bytes % u64::from(block_size),
                read_only,
                buf_align: 1,
                supports_discard: true,
                supports_write_zeroes: true,
                driver: "null",
            },
        }
    }
}

struct NullChannel;

impl BdevChannel for NullChannel {
    fn submit(&mut self, op: &Op<'_>, tag: u64, sub: &mut Submitter<'_>) -> bool {
        let n = if op.kind.has_data() { op.len as i32 } else { 0 };
        sub.complete(tag, n);
        true
    }
}

impl Bdev for NullBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn open_channel(
        &self,
        _ring: &io_uring::IoUring,
        _slot: u32,
    ) -> std::io::Result<Box<dyn BdevChannel>> {
        Ok(Box::new(NullChannel))
    }
}
