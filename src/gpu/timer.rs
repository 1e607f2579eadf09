//! Timing GPU work for benchmarks: timestamp queries around many repetitions in one submission,
//! or wall-clock time over the same submission when the adapter has no timestamps.

#[cfg(not(target_arch = "wasm32"))]
use std::time::Instant;

#[cfg(not(target_arch = "wasm32"))]
use crate::error::{Error, Result};
use crate::gpu::{Encoder, Gpu};

/// How a measurement was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerSource {
    Timestamps,
    WallClock,
}

/// How many repetitions to time.
#[derive(Clone, Copy, Debug)]
pub enum Reps {
    Fixed(u32),
    /// Enough to fill about this many seconds (3 to 200), judged from the warm-up run.
    Target(f64),
}

/// Seconds per repetition and how they were measured.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub seconds: f64,
    pub source: TimerSource,
    pub reps: u32,
}

impl Gpu {
    /// Time repetitions of the work `encode` records, all in one submission, after one untimed
    /// warm-up submission. Returns the mean time of one repetition.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn time<F>(&self, reps: Reps, mut encode: F) -> Result<Timing>
    where
        F: FnMut(&mut Encoder) -> Result<()>,
    {
        // Warm-up: first-use costs (pipeline upload, page faults) stay out of the measurement.
        let warm = Instant::now();
        // Inside an error scope: work the device rejects fails the benchmark instead of timing
        // an empty submission.
        self.scoped("timed work", || -> Result<()> {
            let mut enc = self.encoder();
            encode(&mut enc)?;
            self.queue.submit([enc.finish()]);
            Ok(())
        })??;
        self.wait()?;
        let reps = match reps {
            Reps::Fixed(0) => {
                return Err(Error::InvalidInput(
                    "timing needs at least one repetition".into(),
                ));
            }
            Reps::Fixed(n) => n,
            Reps::Target(s) => ((s / warm.elapsed().as_secs_f64().max(1e-6)) as u32).clamp(3, 200),
        };

        let queries = self.timer_queries();
        let mark = |enc: &mut Encoder, index: u32| mark(queries.as_ref(), enc, index);
        let mut enc = self.encoder();
        mark(&mut enc, 0);
        for _ in 0..reps {
            encode(&mut enc)?;
        }
        mark(&mut enc, 1);
        if let Some((set, resolve, read)) = &queries {
            enc.raw().resolve_query_set(set, 0..2, resolve, 0);
            enc.raw().copy_buffer_to_buffer(resolve, 0, read, 0, 16);
        }
        let start = Instant::now();
        self.queue.submit([enc.finish()]);
        self.wait()?;
        let wall = start.elapsed().as_secs_f64();
        let Some((_, _, read)) = &queries else {
            return Ok(Timing {
                seconds: wall / reps as f64,
                source: TimerSource::WallClock,
                reps,
            });
        };
        let bytes = self.read_mapped(read, "timestamp readback")?;
        let gpu = self.elapsed(&bytes);
        // A zero or absurd reading (some drivers) falls back to the wall clock.
        if gpu <= 0.0 || gpu > wall * 1.5 {
            return Ok(Timing {
                seconds: wall / reps as f64,
                source: TimerSource::WallClock,
                reps,
            });
        }
        Ok(Timing {
            seconds: gpu / reps as f64,
            source: TimerSource::Timestamps,
            reps,
        })
    }
}

/// Timestamp query set (2 queries) with its resolve and readback buffers.
type TimerQueries = (wgpu::QuerySet, wgpu::Buffer, wgpu::Buffer);

/// An empty pass whose only job is to write timestamp `index` between the real passes.
fn mark(queries: Option<&TimerQueries>, enc: &mut Encoder, index: u32) {
    if let Some((set, _, _)) = queries {
        enc.raw().begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("timestamp"),
            timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                query_set: set,
                beginning_of_pass_write_index: Some(index),
                end_of_pass_write_index: None,
            }),
        });
    }
}

impl Gpu {
    fn timer_queries(&self) -> Option<TimerQueries> {
        self.has_timestamps().then(|| {
            let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("timer"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            });
            let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timer-resolve"),
                size: 16,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let read = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timer-read"),
                size: 16,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            (set, resolve, read)
        })
    }

    /// Seconds between the two resolved timestamps in `bytes`.
    fn elapsed(&self, bytes: &[u8]) -> f64 {
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(bytes);
        let period_ns = self.queue.get_timestamp_period() as f64;
        ticks[1].saturating_sub(ticks[0]) as f64 * period_ns * 1e-9
    }

    /// GPU seconds per repetition of the work `encode` records (`reps` repetitions in one
    /// submission after one untimed one), from timestamp queries; `None` when the adapter has
    /// none. Does not block, so it works in the browser.
    pub async fn time_async<F>(&self, reps: u32, mut encode: F) -> crate::error::Result<Option<f64>>
    where
        F: FnMut(&mut Encoder) -> crate::error::Result<()>,
    {
        let Some(q) = self.timer_queries() else {
            return Ok(None);
        };
        let reps = reps.max(1);
        let mut enc = self.encoder();
        encode(&mut enc)?;
        self.queue.submit([enc.finish()]);
        let mut enc = self.encoder();
        mark(Some(&q), &mut enc, 0);
        for _ in 0..reps {
            encode(&mut enc)?;
        }
        mark(Some(&q), &mut enc, 1);
        enc.raw().resolve_query_set(&q.0, 0..2, &q.1, 0);
        enc.raw().copy_buffer_to_buffer(&q.1, 0, &q.2, 0, 16);
        self.queue.submit([enc.finish()]);
        let bytes = self.read_mapped_async(&q.2, "timestamp readback").await?;
        Ok(Some(self.elapsed(&bytes) / reps as f64))
    }
}

/// Per-dispatch timestamps while `Gpu::profile` records (see `ops::launch::dispatch`).
pub(crate) struct Profiler {
    set: wgpu::QuerySet,
    labels: Vec<String>,
}

impl Gpu {
    /// Start timing every dispatch our launchers record, in any encoder, until
    /// [`Gpu::profile_end`] (e.g. across the training steps of a Burn model). Needs timestamps.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn profile_begin(&self) -> Result<()> {
        if !self.has_timestamps() {
            return Err(Error::Unsupported(
                "profiling needs timestamp queries, which this adapter lacks".into(),
            ));
        }
        let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile"),
            ty: wgpu::QueryType::Timestamp,
            count: PROFILE_QUERIES,
        });
        *self.profiler.lock().expect("profiler") = Some(Profiler {
            set,
            labels: Vec::new(),
        });
        Ok(())
    }

    /// Stop the profile `profile_begin` started (after everything it timed was submitted) and
    /// return `(file:entry, total seconds, dispatches)` per kernel in order of first appearance.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn profile_end(&self) -> Result<Vec<(String, f64, u32)>> {
        Ok(by_kernel(&self.profile_end_events()?))
    }

    /// As [`Gpu::profile_end`], but every dispatch on its own, in submission order, with its
    /// start and end in seconds from the first one's start (a timeline: the gaps between our
    /// dispatches hold the work of others on the same queue, e.g. Burn's, and idle time).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn profile_end_events(&self) -> Result<Vec<ProfileEvent>> {
        let Some(p) = self.profiler.lock().expect("profiler").take() else {
            return Ok(Vec::new());
        };
        let enc = self.encoder();
        self.resolve_profile(enc, &p.set, p.labels)
    }
}

/// One timed dispatch of a profile (see [`Gpu::profile_end_events`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileEvent {
    /// `file:entry`
    pub kernel: String,
    /// Seconds from the profile's first dispatch.
    pub start: f64,
    pub end: f64,
}

/// `(file:entry, total seconds, dispatches)` per kernel, in order of first appearance.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn by_kernel(events: &[ProfileEvent]) -> Vec<(String, f64, u32)> {
    sum_by_label(events.iter().map(|e| (e.kernel.clone(), e.end - e.start)))
}

/// `(label, total, count)` per label of `items`, in order of first appearance.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn sum_by_label(items: impl Iterator<Item = (String, f64)>) -> Vec<(String, f64, u32)> {
    let mut out: Vec<(String, f64, u32)> = Vec::new();
    for (label, x) in items {
        match out.iter_mut().find(|k| k.0 == label) {
            Some(k) => {
                k.1 += x;
                k.2 += 1;
            }
            None => out.push((label, x, 1)),
        }
    }
    out
}

/// Queries in one profile: wgpu caps a query set at 4096 (two per dispatch).
const PROFILE_QUERIES: u32 = 4096;

impl Gpu {
    /// The query set and first index for the next dispatch of `label` while a profile records
    /// (a clone of the handle: wgpu resources are reference counted).
    pub(crate) fn profile_slot(&self, label: &str) -> Option<(wgpu::QuerySet, u32)> {
        let mut guard = self.profiler.lock().ok()?;
        let p = guard.as_mut()?;
        let i = 2 * p.labels.len() as u32;
        if i + 2 > PROFILE_QUERIES {
            return None;
        }
        p.labels.push(label.to_string());
        Some((p.set.clone(), i))
    }

    /// Time every dispatch `encode` records, by kernel: `(file:entry, seconds per call of
    /// encode, dispatches per call)` in order of first appearance. Runs `encode` once untimed,
    /// then `reps` times in one submission with timestamps around each dispatch. Needs the
    /// adapter's timestamp queries.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn profile<F>(&self, reps: u32, mut encode: F) -> Result<Vec<(String, f64, u32)>>
    where
        F: FnMut(&mut Encoder) -> Result<()>,
    {
        if !self.has_timestamps() {
            return Err(Error::Unsupported(
                "profiling needs timestamp queries, which this adapter lacks".into(),
            ));
        }
        let reps = reps.max(1);
        let mut enc = self.encoder();
        encode(&mut enc)?;
        self.queue.submit([enc.finish()]);
        self.wait()?;
        let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile"),
            ty: wgpu::QueryType::Timestamp,
            count: PROFILE_QUERIES,
        });
        *self.profiler.lock().expect("profiler") = Some(Profiler {
            set: set.clone(),
            labels: Vec::new(),
        });
        let mut enc = self.encoder();
        let recorded = (0..reps).try_for_each(|_| encode(&mut enc));
        let labels = self
            .profiler
            .lock()
            .expect("profiler")
            .take()
            .map(|p| p.labels)
            .unwrap_or_default();
        recorded?;
        let mut out = by_kernel(&self.resolve_profile(enc, &set, labels)?);
        for e in &mut out {
            e.1 /= reps as f64;
            e.2 = e.2.div_ceil(reps);
        }
        Ok(out)
    }

    /// Read back the timestamps of `labels` (two queries each, in order) after `enc`.
    #[cfg(not(target_arch = "wasm32"))]
    fn resolve_profile(
        &self,
        mut enc: Encoder,
        set: &wgpu::QuerySet,
        labels: Vec<String>,
    ) -> Result<Vec<ProfileEvent>> {
        let n = 2 * labels.len() as u64;
        if n == 0 {
            return Ok(Vec::new());
        }
        if n == PROFILE_QUERIES as u64 {
            log::warn!("profile full: dispatches past {} were not timed", n / 2);
        }
        let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile-resolve"),
            size: 8 * n,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let read = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile-read"),
            size: 8 * n,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        enc.raw().resolve_query_set(set, 0..n as u32, &resolve, 0);
        enc.raw()
            .copy_buffer_to_buffer(&resolve, 0, &read, 0, 8 * n);
        self.queue.submit([enc.finish()]);
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&self.read_mapped(&read, "profile")?);
        let period = self.queue.get_timestamp_period() as f64 * 1e-9;
        let t0 = ticks.first().copied().unwrap_or(0);
        let at = |t: u64| t.saturating_sub(t0) as f64 * period;
        Ok(labels
            .into_iter()
            .enumerate()
            .map(|(i, kernel)| {
                let start = at(ticks[2 * i]);
                ProfileEvent {
                    kernel,
                    start,
                    end: at(ticks[2 * i + 1]).max(start),
                }
            })
            .collect())
    }
}
