//! The Quern benchmarks' library: fio-style jobs, the libblkio load
//! generator, the backends `vhost-bench compare` measures side by side, and
//! the reports. The binaries in `src/bin/` are thin command lines over it.

pub mod backends;
pub mod client;
pub mod clock;
pub mod compare;
pub mod interleave;
pub mod job;
pub mod plot;
pub mod proc;
pub mod quern;
pub mod report;
pub mod watchdog;

/// Pin the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it and
    // sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A small xorshift64* generator: deterministic, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0; the tiny modulo bias does not matter here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// Create (if needed) and fully write the file so reads hit real blocks.
pub fn prepare_file(path: &std::path::Path, size: u64) -> std::io::Result<()> {
    if let Ok(m) = std::fs::metadata(path) {
        // st_blocks counts 512-byte units actually allocated
        use std::os::unix::fs::MetadataExt;
        if m.len() >= size && m.blocks() * 512 >= size {
            return Ok(());
        }
    }
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    eprintln!(
        "filling {} with {} MiB of random data ...",
        path.display(),
        size >> 20
    );
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)?;
    use std::os::unix::fs::FileExt;
    let mut rng = Rng::new(42);
    let mut chunk = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        for w in chunk.chunks_exact_mut(8) {
            w.copy_from_slice(&rng.next_u64().to_ne_bytes());
        }
        let n = (size - off).min(chunk.len() as u64) as usize;
        f.write_all_at(&chunk[..n], off)?;
        off += n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// The repository this benchmark was built from.
pub fn root_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}

/// Cores online.
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}
