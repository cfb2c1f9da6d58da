//! Parameter ids that follow the module path, so optimizer state saved by one process finds
//! its parameter again in the next: burn draws fresh ids for every new `Param`, which would
//! orphan every moment on resume.

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::tensor::Tensor;

use super::llama::Llama;

/// FNV-1a over the path: stable across processes, platforms and Rust versions.
fn path_id(path: &str) -> ParamId {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.bytes() {
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    ParamId::from(hash)
}

#[derive(Default)]
struct PathIds {
    path: Vec<String>,
}

impl ModuleMapper for PathIds {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, mut param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.id = path_id(&format!("hearth.{}", self.path.join(".")));
        param
    }
}

/// Gives every parameter of `model` the id of its module path.
pub fn with_path_ids(model: Llama) -> Llama {
    model.map(&mut PathIds::default())
}
