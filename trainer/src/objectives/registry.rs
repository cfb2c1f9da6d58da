//! `train.method` → objective. A new method is a file under `objectives/`, its recipe
//! section (a field of [`Recipe`]) and one line here.

use super::objective::Objective;
use super::{cpo, dpo, grpo, orpo, reward, sft, simpo};
use crate::recipe::Recipe;

/// A registered method: its name, whether the recipe holds its own `[section]`, and its
/// constructor, which checks the section.
pub struct Method {
    pub name: &'static str,
    pub has_section: fn(&Recipe) -> bool,
    pub build: fn(&Recipe) -> std::result::Result<Box<dyn Objective>, String>,
}

/// Every method, in the order error messages list them.
pub const METHODS: &[Method] = &[
    Method {
        name: "sft",
        has_section: |_| false,
        build: sft::build,
    },
    Method {
        name: "dpo",
        has_section: |r| r.dpo.is_some(),
        build: dpo::build,
    },
    Method {
        name: "orpo",
        has_section: |r| r.orpo.is_some(),
        build: orpo::build,
    },
    Method {
        name: "reward",
        has_section: |r| r.reward.is_some(),
        build: reward::build,
    },
    Method {
        name: "grpo",
        has_section: |r| r.grpo.is_some(),
        build: grpo::build,
    },
    Method {
        name: "simpo",
        has_section: |r| r.simpo.is_some(),
        build: simpo::build,
    },
    Method {
        name: "cpo",
        has_section: |r| r.cpo.is_some(),
        build: cpo::build,
    },
];

/// The names `train.method` takes.
pub fn names() -> Vec<&'static str> {
    METHODS.iter().map(|m| m.name).collect()
}

/// The recipe's objective, its settings checked; the error is the recipe message without
/// its origin.
pub fn objective(recipe: &Recipe) -> std::result::Result<Box<dyn Objective>, String> {
    let method = recipe.train.method.as_str();
    let Some(entry) = METHODS.iter().find(|m| m.name == method) else {
        return Err(format!(
            "train.method `{method}` (one of {})",
            names().join(", ")
        ));
    };
    if let Some(other) = METHODS
        .iter()
        .find(|m| m.name != method && (m.has_section)(recipe))
    {
        return Err(format!(
            "a [{}] section, but train.method is `{method}`",
            other.name
        ));
    }
    (entry.build)(recipe)
}

/// [`objective`] for the loop, with the error as the crate's.
pub fn for_recipe(recipe: &Recipe) -> crate::Result<Box<dyn Objective>> {
    objective(recipe).map_err(crate::TrainerError::Input)
}
