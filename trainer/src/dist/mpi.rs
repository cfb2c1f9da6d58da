//! The MPI engine (Open MPI or MPICH through the `mpi` crate): how hearth runs data
//! parallel on CPU, and on GPUs where NCCL is not wanted.

use std::cell::RefCell;

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::CommunicatorCollectives;

use super::{Collective, DistError};

thread_local! {
    /// MPI is initialised once per process (a pipeline trains several stages) and
    /// finalised by [`finish`], on the thread that initialised it.
    static UNIVERSE: RefCell<Option<Universe>> = const { RefCell::new(None) };
}

pub struct Mpi {
    world: SimpleCommunicator,
}

impl Mpi {
    pub fn init() -> Result<Self, DistError> {
        if !mpi::environment::is_initialized() {
            let universe = mpi::initialize().ok_or_else(|| DistError::Init {
                backend: "MPI",
                msg: "MPI_Init failed".into(),
            })?;
            UNIVERSE.with(|u| *u.borrow_mut() = Some(universe));
        } else if UNIVERSE.with(|u| u.borrow().is_none()) {
            return Err(DistError::Init {
                backend: "MPI",
                msg: "MPI was initialised and finalised already in this process".into(),
            });
        }
        Ok(Self {
            world: SimpleCommunicator::world(),
        })
    }
}

/// After a clean end, finalises MPI (mpirun counts a process that exits without it as
/// failed); after a failure, aborts the whole job with `code`, so the other ranks stop now
/// rather than wait for this one until their timeout.
pub fn finish(clean: bool, code: i32) {
    let Some(universe) = UNIVERSE.with(|u| u.borrow_mut().take()) else {
        return;
    };
    if clean {
        drop(universe);
    } else {
        universe.world().abort(code);
    }
}

impl Collective for Mpi {
    fn backend(&self) -> &'static str {
        "MPI"
    }

    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn world_size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError> {
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }

    fn all_gather(&self, local: &[f64]) -> Result<Vec<f64>, DistError> {
        let mut out = vec![0.0; local.len() * self.world_size()];
        self.world.all_gather_into(local, &mut out[..]);
        Ok(out)
    }
}
