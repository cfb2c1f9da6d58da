//! Where this process sits in a data-parallel job, read from the variables the usual
//! launchers set, so hearth runs under torchrun-style launchers, Slurm's `srun` and
//! `mpirun` alike without flags of its own.

use super::DistError;

/// This process's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    /// The rank among the processes on this machine: which GPU this process takes.
    pub local_rank: usize,
    /// `MASTER_ADDR:MASTER_PORT`, where rank 0 serves the TCP rendezvous, when set.
    pub master: Option<(String, u16)>,
    /// The convention the values came from, for messages.
    pub source: &'static str,
    /// Whether an MPI launcher (mpirun, or srun with PMI) started the job, so MPI can be
    /// initialised.
    pub mpi: bool,
}

/// One convention: its rank and world-size variables, and where it keeps the local rank.
const CONVENTIONS: [(&str, &str, &str, &[&str]); 4] = [
    ("torchrun", "RANK", "WORLD_SIZE", &["LOCAL_RANK"]),
    (
        "Open MPI",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        &["OMPI_COMM_WORLD_LOCAL_RANK"],
    ),
    // MPICH's hydra and Intel MPI set MPI_LOCALRANKID; Slurm's PMI2 sets PMI_LOCAL_RANK.
    (
        "PMI",
        "PMI_RANK",
        "PMI_SIZE",
        &["MPI_LOCALRANKID", "PMI_LOCAL_RANK"],
    ),
    ("Slurm", "SLURM_PROCID", "SLURM_NTASKS", &["SLURM_LOCALID"]),
];

/// Reads the launch from `var` (the environment, in production). torchrun's variables win
/// over MPI's, which win over Slurm's: a torchrun inside a Slurm allocation sees Slurm's
/// too, and `srun --mpi=pmix` sets both Slurm's and PMI's, which agree. `None` when no
/// launcher's variables are set: a plain single-process run.
pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>, DistError> {
    let number = |name: &str| -> Result<Option<usize>, DistError> {
        match var(name) {
            None => Ok(None),
            Some(v) => v.trim().parse().map(Some).map_err(|_| DistError::Launch {
                var: name.to_string(),
                value: v,
                why: "expected a non-negative integer".into(),
            }),
        }
    };
    // mpirun and MPICH's hydra set these; srun --mpi=pmix sets PMIX_RANK (Open MPI then
    // fills in its own variables during initialisation).
    let mpi_launched = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
        .iter()
        .any(|v| var(v).is_some());
    for (source, rank_var, size_var, local_vars) in CONVENTIONS {
        let (Some(rank), Some(world_size)) = (number(rank_var)?, number(size_var)?) else {
            continue;
        };
        if world_size == 0 || rank >= world_size {
            return Err(DistError::Launch {
                var: rank_var.to_string(),
                value: rank.to_string(),
                why: format!("must be below {size_var}={world_size}"),
            });
        }
        // Without a local rank, one process per machine is the safe reading.
        let mut local_rank = 0;
        for name in local_vars {
            if let Some(l) = number(name)? {
                local_rank = l;
                break;
            }
        }
        let master = match (var("MASTER_ADDR"), var("MASTER_PORT")) {
            (Some(addr), Some(port)) => {
                let port = port.trim().parse().map_err(|_| DistError::Launch {
                    var: "MASTER_PORT".into(),
                    value: port.clone(),
                    why: "expected a port number".into(),
                })?;
                Some((addr, port))
            }
            _ => None,
        };
        return Ok(Some(Launch {
            rank,
            world_size,
            local_rank,
            master,
            source,
            mpi: mpi_launched,
        }));
    }
    Ok(None)
}

/// The launch of this process, from its environment.
pub fn from_env() -> Result<Option<Launch>, DistError> {
    from_vars(|name| std::env::var(name).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>, DistError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        from_vars(|name| map.get(name).cloned())
    }

    #[test]
    fn each_convention_is_read() {
        let t = launch(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node01"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (t.rank, t.world_size, t.local_rank, t.source, t.mpi),
            (3, 8, 1, "torchrun", false)
        );
        assert_eq!(t.master, Some(("node01".into(), 29500)));

        let o = launch(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((o.rank, o.world_size, o.local_rank, o.mpi), (1, 2, 1, true));

        let p = launch(&[
            ("PMI_RANK", "5"),
            ("PMI_SIZE", "6"),
            ("PMI_LOCAL_RANK", "2"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (p.rank, p.world_size, p.local_rank, p.source),
            (5, 6, 2, "PMI")
        );
        let h = launch(&[
            ("PMI_RANK", "5"),
            ("PMI_SIZE", "6"),
            ("MPI_LOCALRANKID", "3"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(h.local_rank, 3);

        let s = launch(&[
            ("SLURM_PROCID", "9"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (s.rank, s.world_size, s.local_rank, s.source, s.mpi),
            (9, 16, 1, "Slurm", false)
        );
    }

    #[test]
    fn torchrun_wins_over_slurm_and_nothing_set_is_single() {
        let t = launch(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((t.rank, t.world_size, t.source), (1, 2, "torchrun"));
        assert_eq!(launch(&[("LOCAL_RANK", "0")]).unwrap(), None);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = launch(&[("RANK", "x"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK") && e.contains("\"x\""), "{e}");
        let e = launch(&[("RANK", "2"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("WORLD_SIZE=2"), "{e}");
        let e = launch(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "port"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("MASTER_PORT"), "{e}");
    }
}
