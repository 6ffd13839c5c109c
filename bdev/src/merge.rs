//! The merge stage.
//!
//! Once per poll cycle a reactor hands its batch of requests to
//! [`MergePlanner::plan`]. The planner cuts the batch into ordered segments,
//! sorts each segment by (device, offset) and fuses reads with reads and
//! writes with writes whose ranges touch, within `max_bytes` and
//! `max_segments`. It returns the execution order and the fused groups; the
//! engine executes each group as one operation and completes every original.
//!
//! Ordering rules (what keeps merging invisible to the guest):
//! - flush, discard and write-zeroes are barriers: each forms its own
//!   segment, so nothing merges across one or moves past one;
//! - a request that overlaps an earlier request of the same segment on the
//!   same device, where either of the two modifies data, starts a new
//!   segment, so overlapping writes keep their submission order;
//! - every segment but the batch's first starts with a drained group (and a
//!   barrier always drains): it runs only after everything before it.
//!
//! Within a segment no two requests conflict, so any order is equivalent.
//! The planner keeps its buffers between cycles: no allocation once warm.

use crate::types::{IoKind, IOV_MAX};

/// Most requests of a segment a new request is checked against for
/// conflicts (see `MergePlanner::emit_run`).
pub const MAX_CONFLICT_SCAN: usize = 32;

/// Limits on fused requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergeConfig {
    pub enabled: bool,
    /// Largest fused request in bytes.
    pub max_bytes: u64,
    /// Most iovec segments in one fused request (at most IOV_MAX).
    pub max_segments: usize,
}

impl Default for MergeConfig {
    fn default() -> Self {
        MergeConfig {
            enabled: true,
            max_bytes: 1 << 20,
            max_segments: 256,
        }
    }
}

/// What the planner needs to know of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergeInput {
    pub dev: u16,
    pub kind: IoKind,
    pub offset: u64,
    pub len: u64,
    pub segments: u32,
    pub fua: bool,
}

/// One operation to execute: `order[start..start+count]` are its originals,
/// in offset order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergedGroup {
    pub start: u32,
    pub count: u32,
    pub dev: u16,
    pub kind: IoKind,
    pub offset: u64,
    pub len: u64,
    pub segments: u32,
    pub fua: bool,
    /// Start only after every earlier operation has completed.
    pub drain: bool,
}

/// Counters since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeStats {
    /// Requests handed to the planner.
    pub requests_in: u64,
    /// Operations it produced.
    pub requests_out: u64,
    /// Bytes carried by those requests.
    pub bytes: u64,
    /// Operations that carry more than one request.
    pub merged_ops: u64,
}

/// The per-reactor merge stage, with buffers reused across cycles.
pub struct MergePlanner {
    cfg: MergeConfig,
    order: Vec<u32>,
    /// Sort keys, reused: (device, offset, index) packed in one integer.
    keys: Vec<u128>,
    groups: Vec<MergedGroup>,
    stats: MergeStats,
}

impl MergePlanner {
    pub fn new(mut cfg: MergeConfig, batch_capacity: usize) -> Self {
        cfg.max_segments = cfg.max_segments.clamp(1, IOV_MAX);
        cfg.max_bytes = cfg.max_bytes.max(1);
        MergePlanner {
            cfg,
            order: Vec::with_capacity(batch_capacity),
            keys: Vec::with_capacity(batch_capacity),
            groups: Vec::with_capacity(batch_capacity),
            stats: MergeStats::default(),
        }
    }

    pub fn config(&self) -> MergeConfig {
        self.cfg
    }

    pub fn stats(&self) -> MergeStats {
        self.stats
    }

    /// Plan one batch. Returns the execution order (indices into `batch`)
    /// and the groups that slice it.
    pub fn plan(&mut self, batch: &[MergeInput]) -> (&[u32], &[MergedGroup]) {
        self.order.clear();
        self.groups.clear();
        if let [r] = batch {
            // one request (every cycle at queue depth 1): its own group,
            // as the general path below would plan it
            self.order.push(0);
            self.push_group(batch, 0, false);
            self.stats.requests_in += 1;
            self.stats.requests_out += 1;
            self.stats.bytes += r.len;
            return (&self.order, &self.groups);
        }
        let mut run_start = 0usize;
        for i in 0..batch.len() {
            if batch[i].kind.is_barrier() {
                self.emit_run(batch, run_start, i);
                self.order.push(i as u32);
                self.push_group(batch, i as u32, true);
                run_start = i + 1;
            }
        }
        self.emit_run(batch, run_start, batch.len());
        self.stats.requests_in += batch.len() as u64;
        self.stats.requests_out += self.groups.len() as u64;
        for g in &self.groups {
            self.stats.bytes += g.len;
            if g.count > 1 {
                self.stats.merged_ops += 1;
            }
        }
        (&self.order, &self.groups)
    }

    /// Plan `batch[from..to]`, which holds no barrier. The common case has
    /// no conflicting pair and is one sorted segment, checked in one pass
    /// over the sorted order; otherwise (rare, but a guest can force it)
    /// the run is cut greedily in submission order at each conflict, and
    /// every [`MAX_CONFLICT_SCAN`] requests: each request is checked against
    /// at most that many before it, so a batch of overlapping writes costs
    /// O(n), not O(n²). A cut is always safe (it only adds a drain point).
    fn emit_run(&mut self, batch: &[MergeInput], from: usize, to: usize) {
        if from >= to {
            return;
        }
        let first = self.order.len();
        self.order.extend(from as u32..to as u32);
        sort_by_offset(&mut self.keys, batch, &mut self.order[first..]);
        if !sorted_has_conflict(batch, &self.order[first..]) {
            if !self.cfg.enabled {
                // merging off: keep submission order
                self.order.truncate(first);
                self.order.extend(from as u32..to as u32);
            }
            self.group_segment(batch, first);
            return;
        }
        self.order.truncate(first);
        let mut seg = from;
        for i in from..to {
            if i - seg >= MAX_CONFLICT_SCAN || conflicts_in_segment(batch, seg, i) {
                self.emit_segment(batch, seg, i);
                seg = i;
            }
        }
        self.emit_segment(batch, seg, to);
    }

    /// Plan `batch[from..to]`, a conflict-free segment.
    fn emit_segment(&mut self, batch: &[MergeInput], from: usize, to: usize) {
        if from >= to {
            return;
        }
        let first = self.order.len();
        self.order.extend(from as u32..to as u32);
        if self.cfg.enabled {
            sort_by_offset(&mut self.keys, batch, &mut self.order[first..]);
        }
        self.group_segment(batch, first);
    }

    /// Fuse neighbours of `order[first..]` into groups.
    fn group_segment(&mut self, batch: &[MergeInput], first: usize) {
        let drain = !self.groups.is_empty();
        let mut pos = first;
        while pos < self.order.len() {
            let ix = self.order[pos];
            self.push_group(batch, ix, drain && pos == first);
            let g = self.groups.last_mut().expect("group just pushed");
            g.start = pos as u32;
            pos += 1;
            if !self.cfg.enabled || !g.kind.has_data() {
                continue;
            }
            while pos < self.order.len() {
                let n = &batch[self.order[pos] as usize];
                let fits = n.dev == g.dev
                    && n.kind == g.kind
                    && n.fua == g.fua
                    && n.offset == g.offset + g.len
                    && g.len + n.len <= self.cfg.max_bytes
                    && (g.segments + n.segments) as usize <= self.cfg.max_segments;
                if !fits {
                    break;
                }
                g.len += n.len;
                g.segments += n.segments;
                g.count += 1;
                pos += 1;
            }
        }
    }

    fn push_group(&mut self, batch: &[MergeInput], ix: u32, drain: bool) {
        let r = &batch[ix as usize];
        self.groups.push(MergedGroup {
            start: (self.order.len() - 1) as u32,
            count: 1,
            dev: r.dev,
            kind: r.kind,
            offset: r.offset,
            len: r.len,
            segments: r.segments,
            fua: r.fua,
            drain: drain || r.kind.is_barrier(),
        });
    }
}

/// Order requests by device, then offset (submission order breaks ties).
/// The three are packed into one integer per request, so the sort compares
/// plain integers instead of chasing each index into the batch.
fn sort_by_offset(keys: &mut Vec<u128>, batch: &[MergeInput], order: &mut [u32]) {
    if order.len() < 2 {
        return;
    }
    keys.clear();
    keys.extend(order.iter().map(|&ix| {
        let r = &batch[ix as usize];
        (u128::from(r.dev) << 96) | (u128::from(r.offset) << 32) | u128::from(ix)
    }));
    keys.sort_unstable();
    for (o, k) in order.iter_mut().zip(keys.iter()) {
        *o = *k as u32;
    }
}

/// Does `batch[i]` conflict with any request in `batch[seg_start..i]`?
/// (Same device, overlapping ranges, and at least one of the two modifies.)
fn conflicts_in_segment(batch: &[MergeInput], seg_start: usize, i: usize) -> bool {
    let r = &batch[i];
    let r_end = r.offset + r.len;
    batch[seg_start..i].iter().any(|p| {
        p.dev == r.dev
            && (p.kind.modifies() || r.kind.modifies())
            && p.offset < r_end
            && r.offset < p.offset + p.len
    })
}

/// Whether any two requests in `sorted` (ordered by device, offset)
/// conflict. Any overlapping pair (a, b) with a first has b.offset < a's
/// end, so a running maximum of ends per device finds it in one pass.
fn sorted_has_conflict(batch: &[MergeInput], sorted: &[u32]) -> bool {
    let mut dev = u16::MAX;
    let (mut end_all, mut end_mod) = (0u64, 0u64);
    for (k, &ix) in sorted.iter().enumerate() {
        let r = &batch[ix as usize];
        if k == 0 || r.dev != dev {
            dev = r.dev;
            end_all = 0;
            end_mod = 0;
        } else if r.offset < end_mod || (r.kind.modifies() && r.offset < end_all) {
            return true;
        }
        let end = r.offset + r.len;
        end_all = end_all.max(end);
        if r.kind.modifies() {
            end_mod = end_mod.max(end);
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rq(kind: IoKind, offset: u64, len: u64) -> MergeInput {
        MergeInput {
            dev: 0,
            kind,
            offset,
            len,
            segments: 1,
            fua: false,
        }
    }

    fn planner(max_bytes: u64, max_segments: usize) -> MergePlanner {
        MergePlanner::new(
            MergeConfig {
                enabled: true,
                max_bytes,
                max_segments,
            },
            64,
        )
    }

    fn shape(p: &mut MergePlanner, batch: &[MergeInput]) -> Vec<(Vec<u32>, bool)> {
        let (order, groups) = p.plan(batch);
        let order = order.to_vec();
        groups
            .iter()
            .map(|g| {
                (
                    order[g.start as usize..(g.start + g.count) as usize].to_vec(),
                    g.drain,
                )
            })
            .collect()
    }

    #[test]
    fn sequential_out_of_order_writes_fuse_into_one() {
        let mut p = planner(1 << 20, 256);
        let b = [
            rq(IoKind::Write, 8192, 4096),
            rq(IoKind::Write, 0, 4096),
            rq(IoKind::Write, 4096, 4096),
        ];
        assert_eq!(shape(&mut p, &b), vec![(vec![1, 2, 0], false)]);
        let s = p.stats();
        assert_eq!(
            (s.requests_in, s.requests_out, s.bytes, s.merged_ops),
            (3, 1, 12288, 1)
        );
    }

    #[test]
    fn a_lone_request_is_planned_as_the_general_path_plans_it() {
        for enabled in [true, false] {
            let mut p = planner(1 << 20, 256);
            p.cfg.enabled = enabled;
            for (kind, drain) in [
                (IoKind::Read, false),
                (IoKind::Write, false),
                (IoKind::Flush, true),
            ] {
                let (order, groups) = p.plan(&[rq(kind, 4096, 4096)]);
                assert_eq!(order, [0]);
                assert_eq!(groups.len(), 1);
                let g = &groups[0];
                assert_eq!(
                    (g.start, g.count, g.kind, g.offset, g.len, g.drain),
                    (0, 1, kind, 4096, 4096, drain)
                );
            }
            let s = p.stats();
            assert_eq!(
                (s.requests_in, s.requests_out, s.bytes, s.merged_ops),
                (3, 3, 12288, 0)
            );
        }
    }

    #[test]
    fn adjacent_but_different_kinds_stay_apart() {
        let mut p = planner(1 << 20, 256);
        let b = [rq(IoKind::Read, 0, 4096), rq(IoKind::Write, 4096, 4096)];
        assert_eq!(shape(&mut p, &b), vec![(vec![0], false), (vec![1], false)]);
    }

    #[test]
    fn one_sector_gap_is_not_merged() {
        let mut p = planner(1 << 20, 256);
        let b = [
            rq(IoKind::Read, 0, 4096),
            rq(IoKind::Read, 4096 + 512, 4096),
        ];
        assert_eq!(shape(&mut p, &b).len(), 2);
    }

    #[test]
    fn different_devices_never_fuse() {
        let mut p = planner(1 << 20, 256);
        let mut b = [rq(IoKind::Read, 0, 4096), rq(IoKind::Read, 4096, 4096)];
        b[1].dev = 1;
        assert_eq!(shape(&mut p, &b).len(), 2);
    }

    #[test]
    fn max_bytes_edge() {
        let mut p = planner(8192, 256);
        let b = [
            rq(IoKind::Read, 0, 4096),
            rq(IoKind::Read, 4096, 4096),
            rq(IoKind::Read, 8192, 4096),
        ];
        // exactly max_bytes fuses, one byte more does not
        assert_eq!(
            shape(&mut p, &b),
            vec![(vec![0, 1], false), (vec![2], false)]
        );
    }

    #[test]
    fn max_segments_edge() {
        let mut p = planner(1 << 20, 3);
        let mut b = [
            rq(IoKind::Write, 0, 512),
            rq(IoKind::Write, 512, 512),
            rq(IoKind::Write, 1024, 512),
        ];
        b[0].segments = 2;
        assert_eq!(
            shape(&mut p, &b),
            vec![(vec![0, 1], false), (vec![2], false)]
        );
        b[0].segments = 1;
        assert_eq!(shape(&mut p, &b), vec![(vec![0, 1, 2], false)]);
    }

    #[test]
    fn max_segments_is_clamped_to_iov_max() {
        let p = MergePlanner::new(
            MergeConfig {
                enabled: true,
                max_bytes: 1 << 30,
                max_segments: 100_000,
            },
            4,
        );
        assert_eq!(p.config().max_segments, IOV_MAX);
    }

    #[test]
    fn barriers_split_and_drain() {
        let mut p = planner(1 << 20, 256);
        let b = [
            rq(IoKind::Write, 0, 4096),
            rq(IoKind::Flush, 0, 0),
            rq(IoKind::Write, 4096, 4096),
            rq(IoKind::Discard, 8192, 4096),
            rq(IoKind::Write, 12288, 4096),
        ];
        assert_eq!(
            shape(&mut p, &b),
            vec![
                (vec![0], false),
                (vec![1], true),
                (vec![2], true),
                (vec![3], true),
                (vec![4], true)
            ]
        );
    }

    #[test]
    fn overlapping_writes_keep_their_order() {
        let mut p = planner(1 << 20, 256);
        // the second write overlaps the first: it must not move before it,
        // and nothing may fuse across the cut; the third overlaps only the
        // first, which the drained cut already orders, so it joins the second
        let b = [
            rq(IoKind::Write, 4096, 8192),
            rq(IoKind::Write, 0, 8192),
            rq(IoKind::Write, 8192, 4096),
        ];
        assert_eq!(
            shape(&mut p, &b),
            vec![(vec![0], false), (vec![1, 2], true)]
        );
        // a read of a range an earlier write touches is ordered the same way
        let b = [rq(IoKind::Write, 0, 4096), rq(IoKind::Read, 0, 512)];
        assert_eq!(shape(&mut p, &b), vec![(vec![0], false), (vec![1], true)]);
    }

    #[test]
    fn overlapping_reads_may_move_freely() {
        let mut p = planner(1 << 20, 256);
        let b = [rq(IoKind::Read, 4096, 8192), rq(IoKind::Read, 0, 4096)];
        assert_eq!(shape(&mut p, &b), vec![(vec![1, 0], false)]);
    }

    #[test]
    fn disabled_keeps_submission_order() {
        let mut p = MergePlanner::new(
            MergeConfig {
                enabled: false,
                ..MergeConfig::default()
            },
            8,
        );
        let b = [rq(IoKind::Write, 4096, 4096), rq(IoKind::Write, 0, 4096)];
        assert_eq!(shape(&mut p, &b), vec![(vec![0], false), (vec![1], false)]);
    }

    /// A guest can fill a batch with writes that all overlap; the conflict
    /// check used to compare each with every earlier one of its segment
    /// (O(n²) over up to 1024 requests). It compares with at most
    /// MAX_CONFLICT_SCAN now: segments are cut at that length, so the work
    /// per request is bounded, and the order still holds.
    #[test]
    fn a_batch_of_overlapping_writes_is_planned_in_bounded_segments() {
        let mut p = planner(1 << 20, 256);
        // every write covers block 0 and its own next block: each conflicts
        // with its predecessor, so every one starts a segment
        let b: Vec<MergeInput> = (0..1024u64)
            .map(|i| rq(IoKind::Write, (i % 2) * 512, 4096))
            .collect();
        let s = shape(&mut p, &b);
        assert_eq!(s.len(), 1024);
        assert!(s.iter().skip(1).all(|(_, drain)| *drain));
        // writes that never conflict with their neighbours but do with one
        // far back: the scan window cuts every MAX_CONFLICT_SCAN requests,
        // and submission order is kept across cuts
        let mut b: Vec<MergeInput> = (0..200u64)
            .map(|i| rq(IoKind::Write, 4096 * (i + 1), 4096))
            .collect();
        b.push(rq(IoKind::Write, 4096, 4096)); // overlaps request 0
        let s = shape(&mut p, &b);
        let order: Vec<u32> = s.iter().flat_map(|(o, _)| o.clone()).collect();
        let pos = |ix: u32| order.iter().position(|&x| x == ix).unwrap();
        assert!(
            pos(0) < pos(200),
            "the overlapping write moved before the first"
        );
        for (o, _) in &s {
            assert!(o.len() <= MAX_CONFLICT_SCAN, "a segment of {}", o.len());
        }
    }

    #[test]
    fn empty_batch_plans_nothing() {
        let mut p = planner(1 << 20, 256);
        assert!(shape(&mut p, &[]).is_empty());
    }
}
