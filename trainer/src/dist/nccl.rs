//! The NCCL engine, through cudarc (which burn-cuda already loads). One process per GPU,
//! the GPU being the launcher's local rank. The unique id rank 0 makes reaches the others
//! over a TCP rendezvous at `MASTER_ADDR:MASTER_PORT`, as torchrun's does.
//!
//! Gradients arrive here as host buffers (burn does not hand out its device pointers), so
//! each bucket is copied to the GPU, reduced there over NVLink or the network by NCCL, and
//! copied back: a copy each way over PCIe per bucket on top of the reduction itself.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::{Collective, DistError, Launch};

pub struct Nccl {
    comm: Comm,
    stream: Arc<CudaStream>,
}

fn init_err(msg: impl std::fmt::Display) -> DistError {
    DistError::Init {
        backend: "NCCL",
        msg: msg.to_string(),
    }
}

fn op_err(op: &str, msg: impl std::fmt::Debug) -> DistError {
    DistError::Op {
        backend: "NCCL",
        op: op.into(),
        msg: format!("{msg:?}"),
    }
}

impl Nccl {
    pub fn init(launch: &Launch, timeout: Duration) -> Result<Self, DistError> {
        let ctx = CudaContext::new(launch.local_rank)
            .map_err(|e| init_err(format!("GPU {}: {e:?}", launch.local_rank)))?;
        let stream = ctx.default_stream();
        let id = if launch.world_size == 1 {
            Id::new().map_err(|e| init_err(format!("{e:?}")))?
        } else {
            let (addr, port) = launch.master.clone().ok_or_else(|| {
                init_err(format!(
                    "{} processes need MASTER_ADDR and MASTER_PORT for the NCCL rendezvous",
                    launch.world_size
                ))
            })?;
            rendezvous(launch, &addr, port, timeout)?
        };
        let comm = Comm::from_rank(stream.clone(), launch.rank, launch.world_size, id)
            .map_err(|e| init_err(format!("{e:?}")))?;
        Ok(Self { comm, stream })
    }
}

/// Rank 0 makes the id and hands it to each other rank over TCP; the others connect, retrying
/// while rank 0 starts up, until `timeout`.
fn rendezvous(launch: &Launch, addr: &str, port: u16, timeout: Duration) -> Result<Id, DistError> {
    let bytes = |id: &Id| id.internal().map(|c| c as u8);
    if launch.rank == 0 {
        let id = Id::new().map_err(|e| init_err(format!("{e:?}")))?;
        let listener = TcpListener::bind(("0.0.0.0", port))
            .map_err(|e| init_err(format!("listening on port {port}: {e}")))?;
        for _ in 1..launch.world_size {
            let (mut peer, _) = listener
                .accept()
                .map_err(|e| init_err(format!("rendezvous on port {port}: {e}")))?;
            peer.write_all(&bytes(&id))
                .map_err(|e| init_err(format!("rendezvous on port {port}: {e}")))?;
        }
        Ok(id)
    } else {
        let started = Instant::now();
        loop {
            match TcpStream::connect((addr, port)) {
                Ok(mut s) => {
                    let mut buf = [0u8; 128];
                    s.read_exact(&mut buf)
                        .map_err(|e| init_err(format!("rendezvous at {addr}:{port}: {e}")))?;
                    return Ok(Id::uninit(buf.map(|b| b as core::ffi::c_char)));
                }
                Err(e) if started.elapsed() > timeout => {
                    return Err(init_err(format!(
                        "no rendezvous at {addr}:{port} within {} s: {e}",
                        timeout.as_secs()
                    )));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Collective for Nccl {
    fn backend(&self) -> &'static str {
        "NCCL"
    }

    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError> {
        let mut dev = self
            .stream
            .clone_htod(&*buf)
            .map_err(|e| op_err("all-reduce", e))?;
        self.comm
            .all_reduce_in_place(&mut dev, &ReduceOp::Sum)
            .map_err(|e| op_err("all-reduce", e))?;
        self.stream
            .memcpy_dtoh(&dev, buf)
            .map_err(|e| op_err("all-reduce", e))?;
        self.stream
            .synchronize()
            .map_err(|e| op_err("all-reduce", e))
    }

    fn all_gather(&self, local: &[f64]) -> Result<Vec<f64>, DistError> {
        let send = self
            .stream
            .clone_htod(local)
            .map_err(|e| op_err("all-gather", e))?;
        let mut recv = self
            .stream
            .alloc_zeros::<f64>(local.len() * self.world_size())
            .map_err(|e| op_err("all-gather", e))?;
        self.comm
            .all_gather(&send, &mut recv)
            .map_err(|e| op_err("all-gather", e))?;
        let mut out = vec![0.0; local.len() * self.world_size()];
        self.stream
            .memcpy_dtoh(&recv, &mut out[..])
            .map_err(|e| op_err("all-gather", e))?;
        self.stream
            .synchronize()
            .map_err(|e| op_err("all-gather", e))?;
        Ok(out)
    }
}
