//! Data parallelism. One process per device; after each backward, the trainable
//! parameters' gradients are summed across processes, so every process applies the same
//! update. The engines are the ones clusters already run — MPI (Open MPI, MPICH) on CPU and
//! wherever NCCL is absent, NCCL through cudarc on CUDA — behind [`Collective`], so the
//! training loop never knows which is in use.
//!
//! A collective that a dead peer never answers would block forever; [`Group`] arms a
//! watchdog around each one, which stops the process with a message naming the operation
//! after `dist.timeout_s`.

pub mod grads;
pub mod launch;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "cuda")]
mod nccl;
pub mod outcomes;
mod watchdog;

use std::time::Duration;

pub use launch::Launch;

/// What went wrong setting up or running the process group.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("{var}={value:?}: {why}")]
    Launch {
        var: String,
        value: String,
        why: String,
    },
    #[error("{0}")]
    Unavailable(String),
    #[error("{backend} initialisation failed: {msg}")]
    Init { backend: &'static str, msg: String },
    #[error("{backend} {op} failed: {msg}")]
    Op {
        backend: &'static str,
        op: String,
        msg: String,
    },
    #[error("rank {rank} failed before training started (see its message); this rank stops too")]
    PeerFailed { rank: usize },
}

/// The few collectives data parallelism needs. Every rank calls each one in the same order
/// with buffers of the same length.
pub trait Collective {
    /// The engine's name, for messages.
    fn backend(&self) -> &'static str;
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `buf` by its elementwise sum over ranks.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError>;
    /// Every rank's `local` (all the same length), concatenated in rank order.
    fn all_gather(&self, local: &[f64]) -> Result<Vec<f64>, DistError>;
}

/// One process alone: every collective is the identity.
struct Alone;

impl Collective for Alone {
    fn backend(&self) -> &'static str {
        "none"
    }
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }
    fn all_gather(&self, local: &[f64]) -> Result<Vec<f64>, DistError> {
        Ok(local.to_vec())
    }
}

/// The `[dist]` settings a group is built from.
#[derive(Debug, Clone)]
pub struct Options {
    /// `auto`, `mpi` or `nccl`.
    pub backend: String,
    /// How long a collective may wait for the other ranks.
    pub timeout: Duration,
    /// Gradient bytes per all-reduce call.
    pub bucket_bytes: usize,
    /// Whether training runs on a CUDA device (where `auto` means NCCL).
    pub cuda: bool,
}

/// The process group the training loop talks to.
pub struct Group {
    inner: Box<dyn Collective>,
    watchdog: Option<watchdog::Watchdog>,
    pub bucket_bytes: usize,
    pub local_rank: usize,
}

/// The exit status of a rank stopped by the watchdog (EX_UNAVAILABLE).
pub const PEER_LOST_EXIT: i32 = 69;

impl Group {
    /// One process, no communication.
    pub fn alone() -> Self {
        Self {
            inner: Box::new(Alone),
            watchdog: None,
            bucket_bytes: usize::MAX,
            local_rank: 0,
        }
    }

    /// The group this process was launched into, from its environment; alone when no
    /// launcher's variables are set or the world has one process.
    pub fn from_env(options: &Options) -> Result<Self, DistError> {
        match launch::from_env()? {
            Some(l) => Self::join(&l, options),
            None => Ok(Self::alone()),
        }
    }

    fn join(launch: &Launch, options: &Options) -> Result<Self, DistError> {
        let backend = match options.backend.as_str() {
            "auto" if options.cuda && cfg!(feature = "cuda") => "nccl",
            "auto" => "mpi",
            other => other,
        };
        if launch.world_size == 1 && options.backend == "auto" {
            return Ok(Self {
                local_rank: launch.local_rank,
                ..Self::alone()
            });
        }
        let inner: Box<dyn Collective> = match backend {
            "mpi" => mpi_group(launch)?,
            "nccl" => nccl_group(launch, options)?,
            other => {
                return Err(DistError::Unavailable(format!(
                    "dist.backend = {other:?}: expected auto, mpi or nccl"
                )));
            }
        };
        if inner.world_size() != launch.world_size || inner.rank() != launch.rank {
            return Err(DistError::Init {
                backend: inner.backend(),
                msg: format!(
                    "it sees rank {} of {}, but {} set rank {} of {}: start MPI jobs with mpirun or srun --mpi=pmix",
                    inner.rank(),
                    inner.world_size(),
                    launch.source,
                    launch.rank,
                    launch.world_size
                ),
            });
        }
        let watchdog = watchdog::Watchdog::start(
            format!("rank {} of {}", launch.rank, launch.world_size),
            options.timeout,
        );
        Ok(Self {
            inner,
            watchdog: Some(watchdog),
            bucket_bytes: options.bucket_bytes.max(4),
            local_rank: launch.local_rank,
        })
    }

    pub fn rank(&self) -> usize {
        self.inner.rank()
    }

    pub fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    /// Whether this rank writes the run directory.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    fn guarded<T>(
        &self,
        what: &str,
        f: impl FnOnce(&dyn Collective) -> Result<T, DistError>,
    ) -> Result<T, DistError> {
        let _armed = self.watchdog.as_ref().map(|w| w.arm(what));
        f(self.inner.as_ref())
    }

    /// Sums `buf` across ranks in place.
    pub fn all_reduce_sum(&self, buf: &mut [f32], what: &str) -> Result<(), DistError> {
        if self.world_size() == 1 {
            return Ok(());
        }
        self.guarded(what, |c| c.all_reduce_sum(buf))
    }

    /// Every rank's `local`, which may differ in length, in rank order.
    pub fn gather(&self, local: &[f64], what: &str) -> Result<Vec<Vec<f64>>, DistError> {
        if self.world_size() == 1 {
            return Ok(vec![local.to_vec()]);
        }
        self.guarded(what, |c| {
            let lens = c.all_gather(&[local.len() as f64])?;
            let longest = lens.iter().map(|&l| l as usize).max().unwrap_or(0);
            let mut padded = local.to_vec();
            padded.resize(longest, 0.0);
            let all = c.all_gather(&padded)?;
            Ok(lens
                .iter()
                .enumerate()
                .map(|(r, &l)| all[r * longest..r * longest + l as usize].to_vec())
                .collect())
        })
    }

    /// Every rank's `local` text, in rank order: [`gather`](Self::gather) of its bytes, for
    /// what only the first rank writes (GRPO's logged completions) but every rank made.
    pub fn gather_text(&self, local: &str, what: &str) -> Result<Vec<String>, DistError> {
        if self.world_size() == 1 {
            return Ok(vec![local.to_string()]);
        }
        let bytes: Vec<f64> = local.bytes().map(f64::from).collect();
        Ok(self
            .gather(&bytes, what)?
            .into_iter()
            .map(|v| {
                let bytes: Vec<u8> = v.into_iter().map(|b| b as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .collect())
    }

    /// Whether every rank got through a phase: a rank whose phase failed passes `false`
    /// (and then returns its own error); the others learn which rank failed and stop too,
    /// instead of waiting for it at the next collective.
    pub fn agree(&self, ok: bool, what: &str) -> Result<(), DistError> {
        let all = self.gather(&[f64::from(u8::from(ok))], what)?;
        match all.iter().position(|v| v.first() != Some(&1.0)) {
            Some(rank) if ok => Err(DistError::PeerFailed { rank }),
            _ => Ok(()),
        }
    }
}

/// Whether this process is rank 0 of its job (or alone): the one that prints reports.
pub fn is_main_process() -> bool {
    launch::from_env()
        .ok()
        .flatten()
        .is_none_or(|l| l.rank == 0)
}

/// Ends this process's part in a data-parallel job; call it once, just before exiting.
/// After a clean end (`clean`, including a stop on a signal, which every rank takes at the
/// same step) MPI is finalised; after a failure the whole job is aborted with `code`, so
/// the other ranks do not wait for this one until their timeout. Nothing to do alone.
pub fn finish(clean: bool, code: i32) {
    #[cfg(feature = "mpi")]
    mpi::finish(clean, code);
    #[cfg(not(feature = "mpi"))]
    let _ = (clean, code);
}

#[cfg(feature = "mpi")]
fn mpi_group(launch: &Launch) -> Result<Box<dyn Collective>, DistError> {
    if !launch.mpi {
        return Err(DistError::Unavailable(format!(
            "dist.backend mpi needs an MPI launcher (mpirun, or srun --mpi=pmix); {} variables alone cannot start MPI",
            launch.source
        )));
    }
    Ok(Box::new(mpi::Mpi::init()?))
}

#[cfg(not(feature = "mpi"))]
fn mpi_group(launch: &Launch) -> Result<Box<dyn Collective>, DistError> {
    Err(DistError::Unavailable(format!(
        "{} started {} processes, but this hearth was built without MPI: rebuild with --features mpi (needs libopenmpi-dev or MPICH, and libclang)",
        launch.source, launch.world_size
    )))
}

#[cfg(feature = "cuda")]
fn nccl_group(launch: &Launch, options: &Options) -> Result<Box<dyn Collective>, DistError> {
    Ok(Box::new(nccl::Nccl::init(launch, options.timeout)?))
}

#[cfg(not(feature = "cuda"))]
fn nccl_group(launch: &Launch, _options: &Options) -> Result<Box<dyn Collective>, DistError> {
    Err(DistError::Unavailable(format!(
        "dist.backend nccl for {} processes needs a CUDA build: rebuild with --features cuda",
        launch.world_size
    )))
}
