//! Timing GPU work for benchmarks: timestamp queries around many repetitions in one submission,
//! or wall-clock time over the same submission when the adapter has no timestamps.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::gpu::Gpu;

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
        F: FnMut(&mut wgpu::CommandEncoder) -> Result<()>,
    {
        // Warm-up: first-use costs (pipeline upload, page faults) stay out of the measurement.
        let warm = Instant::now();
        let mut enc = self.device.create_command_encoder(&Default::default());
        encode(&mut enc)?;
        self.queue.submit([enc.finish()]);
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

        let queries = self.has_timestamps().then(|| {
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
        });
        let mark = |enc: &mut wgpu::CommandEncoder, index: u32| {
            if let Some((set, _, _)) = &queries {
                // An empty pass whose only job is to write a timestamp between the real passes.
                enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("timestamp"),
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: set,
                        beginning_of_pass_write_index: Some(index),
                        end_of_pass_write_index: None,
                    }),
                });
            }
        };
        let mut enc = self.device.create_command_encoder(&Default::default());
        mark(&mut enc, 0);
        for _ in 0..reps {
            encode(&mut enc)?;
        }
        mark(&mut enc, 1);
        if let Some((set, resolve, read)) = &queries {
            enc.resolve_query_set(set, 0..2, resolve, 0);
            enc.copy_buffer_to_buffer(resolve, 0, read, 0, 16);
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
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&bytes);
        let period_ns = self.queue.get_timestamp_period() as f64;
        let gpu = ticks[1].saturating_sub(ticks[0]) as f64 * period_ns * 1e-9;
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
