//! Recipe settings that take one of a few names, as enums: parsed once, by serde, with an
//! error that names the key and lists the valid values.

/// An enum of named values that (de)serialises as its name.
macro_rules! choice {
    ($(#[$meta:meta])* $name:ident, $key:literal, $lead:literal { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub enum $name {
            $($variant),+
        }

        impl $name {
            /// Every valid name, in the order errors list them.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                match s.as_str() {
                    $($text => Ok(Self::$variant),)+
                    other => Err(format!(
                        "{} `{other}` ({}{})",
                        $key,
                        $lead,
                        Self::NAMES.join(", ")
                    )),
                }
            }
        }

        impl From<$name> for String {
            fn from(c: $name) -> String {
                c.as_str().to_string()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

choice!(
    /// `train.lr_scheduler_type`: the learning-rate schedule after warmup.
    LrScheduler, "train.lr_scheduler_type", "" {
        Constant => "constant",
        Linear => "linear",
        Cosine => "cosine",
    }
);

choice!(
    /// `train.kernels`: which implementation of the fused ops runs.
    KernelsChoice, "train.kernels", "" {
        Auto => "auto",
        Fused => "fused",
        Reference => "reference",
    }
);

choice!(
    /// `train.attention`: how the GPU backends run fused attention ([`kernels::AttentionPath`]).
    AttentionChoice, "train.attention", "one of " {
        Auto => "auto",
        Flash => "flash",
        Blocked => "blocked",
    }
);

choice!(
    /// `dist.backend`: the collective library of a data-parallel run.
    DistBackend, "dist.backend", "one of " {
        Auto => "auto",
        Mpi => "mpi",
        Nccl => "nccl",
    }
);

choice!(
    /// `model.quantize`: how the frozen projection weights are stored.
    Quantize, "model.quantize", "one of " {
        None => "none",
        Nf4 => "nf4",
        Q8_0 => "q8_0",
        Keep => "keep",
    }
);

impl From<KernelsChoice> for kernels::Kernels {
    fn from(c: KernelsChoice) -> Self {
        match c {
            KernelsChoice::Auto => Self::Auto,
            KernelsChoice::Fused => Self::Fused,
            KernelsChoice::Reference => Self::Reference,
        }
    }
}

impl From<AttentionChoice> for kernels::AttentionPath {
    fn from(c: AttentionChoice) -> Self {
        match c {
            AttentionChoice::Auto => Self::Auto,
            AttentionChoice::Flash => Self::Flash,
            AttentionChoice::Blocked => Self::Blocked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_list_the_valid_ones() {
        for name in LrScheduler::NAMES {
            let c = LrScheduler::try_from(name.to_string()).unwrap();
            assert_eq!(String::from(c), *name);
        }
        assert_eq!(
            LrScheduler::try_from("cosin".to_string()).unwrap_err(),
            "train.lr_scheduler_type `cosin` (constant, linear, cosine)"
        );
        assert_eq!(
            DistBackend::try_from("gloo".to_string()).unwrap_err(),
            "dist.backend `gloo` (one of auto, mpi, nccl)"
        );
        assert_eq!(
            AttentionChoice::try_from("flash2".to_string()).unwrap_err(),
            "train.attention `flash2` (one of auto, flash, blocked)"
        );
        for name in AttentionChoice::NAMES {
            let c = AttentionChoice::try_from(name.to_string()).unwrap();
            assert_eq!(String::from(c), *name);
        }
        assert_eq!(
            KernelsChoice::try_from("fast".to_string()).unwrap_err(),
            "train.kernels `fast` (auto, fused, reference)"
        );
    }
}
