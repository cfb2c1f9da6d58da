//! The MPI engine (Open MPI or MPICH through the `mpi` crate): how hearth runs data
//! parallel on CPU, and on GPUs where NCCL is not wanted.

use mpi::collective::SystemOperation;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::CommunicatorCollectives;

use super::{Collective, DistError};

pub struct Mpi {
    world: SimpleCommunicator,
    // Finalises MPI when dropped, so it goes last.
    _universe: mpi::environment::Universe,
}

impl Mpi {
    pub fn init() -> Result<Self, DistError> {
        let universe = mpi::initialize().ok_or_else(|| DistError::Init {
            backend: "MPI",
            msg: "MPI was already initialised in this process".into(),
        })?;
        Ok(Self {
            world: universe.world(),
            _universe: universe,
        })
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
