//! Microbenchmark of the merge stage: ns per request of `MergePlanner::plan`.
//!
//! Usage: merge-bench [--cpu N] [--requests N]
//! `--requests` is the number of requests planned per (pattern, batch size)
//! cell (default 20 million); inputs are pregenerated and the planner reused.
//! Three patterns: sequential (the case merging is for), random (nothing
//! merges), and overlapping (the worst case a guest can force: random
//! writes and a last one overlapping the first, so the planner must cut
//! the batch by conflicts; its cost per request must stay flat as batches
//! grow to the engine's 1024).

use std::hint::black_box;
use std::time::Instant;

use clap::Parser;
use quern_bdev::merge::{MergeConfig, MergeInput, MergePlanner};
use quern_bdev::IoKind;
use quern_bench::{pin_to_cpu, Rng};

const BATCHES: [usize; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];
const BS: u64 = 4096;
const SPAN: u64 = 1 << 30;
/// Distinct pregenerated batches per cell, cycled through.
const VARIANTS: usize = 64;

fn req(offset: u64) -> MergeInput {
    MergeInput {
        dev: 0,
        kind: IoKind::Write,
        offset,
        len: BS,
        segments: 1,
        fua: false,
    }
}

/// Consecutive 4k writes starting at a random aligned base, shuffled.
fn sequential(rng: &mut Rng, n: usize) -> Vec<MergeInput> {
    let base = rng.below(SPAN / BS - n as u64) * BS;
    let mut v: Vec<MergeInput> = (0..n as u64).map(|i| req(base + i * BS)).collect();
    rng.shuffle(&mut v);
    v
}

/// 4k writes at random aligned offsets over 1 GiB, without overlaps (an
/// overlap would cut the batch into segments, which is a different test).
fn random(rng: &mut Rng, n: usize) -> Vec<MergeInput> {
    let mut v: Vec<MergeInput> = Vec::with_capacity(n);
    while v.len() < n {
        let off = rng.below(SPAN / BS) * BS;
        if v.iter().all(|r| r.offset != off) {
            v.push(req(off));
        }
    }
    v
}

/// The planner's worst case: random writes that do not overlap, and last
/// one that overlaps the first. The conflict makes the planner cut the
/// batch in submission order, checking each write against those before it
/// in its segment; with no other conflict that segment is the whole batch
/// (O(n²) before the check was bounded by `MAX_CONFLICT_SCAN`).
fn overlapping(rng: &mut Rng, n: usize) -> Vec<MergeInput> {
    let mut v = random(rng, n.max(2) - 1);
    v.push(req(v[0].offset));
    v.truncate(n);
    v
}

struct Cell {
    ns_per_req: f64,
    ops_per_batch: f64,
}

fn run(batches: &[Vec<MergeInput>], total_requests: u64) -> Cell {
    let n = batches[0].len();
    let mut p = MergePlanner::new(MergeConfig::default(), 1024);
    let iters = (total_requests / n as u64).max(1) as usize;
    // warm-up: grow the planner's buffers and the caches
    for b in batches.iter().cycle().take(iters.min(10_000)) {
        black_box(p.plan(black_box(b)));
    }
    let before = p.stats();
    let t = Instant::now();
    for i in 0..iters {
        let b = &batches[i % batches.len()];
        let (order, groups) = p.plan(black_box(b));
        black_box((order.len(), groups.len()));
    }
    let el = t.elapsed();
    let after = p.stats();
    Cell {
        ns_per_req: el.as_nanos() as f64 / (iters * n) as f64,
        ops_per_batch: (after.requests_out - before.requests_out) as f64 / iters as f64,
    }
}

/// ns per request of the merge stage's planner.
#[derive(Parser)]
#[command(name = "merge-bench")]
struct Opts {
    #[arg(long, default_value_t = 1)]
    cpu: usize,
    /// Requests planned per (pattern, batch size) cell.
    #[arg(long, default_value_t = 20_000_000)]
    requests: u64,
}

fn main() {
    let Opts {
        cpu,
        requests: total,
    } = Opts::parse();
    if let Err(e) = pin_to_cpu(cpu) {
        eprintln!("warning: could not pin to cpu {cpu}: {e}");
    }
    let mut rng = Rng::new(0x5eed_1234);
    println!("merge stage: MergePlanner::plan, MergeConfig::default(), 4k writes, {total} requests per cell, pinned to cpu {cpu}");
    println!();
    println!("| batch | sequential ns/req | seq ops/batch | random ns/req | rand ops/batch | overlapping ns/req | ovl ops/batch |");
    println!("|------:|------------------:|--------------:|--------------:|---------------:|-------------------:|--------------:|");
    for &n in &BATCHES {
        let seq: Vec<Vec<MergeInput>> = (0..VARIANTS).map(|_| sequential(&mut rng, n)).collect();
        let rnd: Vec<Vec<MergeInput>> = (0..VARIANTS).map(|_| random(&mut rng, n)).collect();
        let ovl: Vec<Vec<MergeInput>> = (0..VARIANTS).map(|_| overlapping(&mut rng, n)).collect();
        let s = run(&seq, total);
        let r = run(&rnd, total);
        let o = run(&ovl, total);
        println!(
            "| {n:>5} | {:>17.1} | {:>13.1} | {:>13.1} | {:>14.1} | {:>18.1} | {:>13.1} |",
            s.ns_per_req,
            s.ops_per_batch,
            r.ns_per_req,
            r.ops_per_batch,
            o.ns_per_req,
            o.ops_per_batch
        );
    }
}
