//! Counters: the one way the switch and its ports count. A counter set is a
//! struct of relaxed atomics any thread may bump, with a plain snapshot type
//! the control plane reads and prints (`each` names every counter).

/// Declares a counter set `$live` (atomics) and its snapshot `$snap`.
macro_rules! counters {
    ($(#[$m:meta])* $live:ident, $snap:ident { $($(#[doc = $d:literal])* $name:ident,)* }) => {
        $(#[$m])*
        #[derive(Debug, Default)]
        pub struct $live { $($(#[doc = $d])* pub $name: ::std::sync::atomic::AtomicU64,)* }

        /// A snapshot of the counters.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct $snap { $($(#[doc = $d])* pub $name: u64,)* }

        impl $live {
            pub fn snapshot(&self) -> $snap {
                $snap { $($name: self.$name.load(::std::sync::atomic::Ordering::Relaxed),)* }
            }
        }

        impl $snap {
            /// Calls `f` with each counter's name and value.
            pub fn each(&self, mut f: impl FnMut(&'static str, u64)) {
                $(f(stringify!($name), self.$name);)*
            }
        }
    };
}
pub(crate) use counters;

#[cfg(test)]
mod tests {
    counters!(
        /// Two counters.
        Live, Snap {
            /// The first.
            a,
            b,
        }
    );

    #[test]
    fn snapshots_name_every_counter() {
        let c = Live::default();
        c.b.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
        let s = c.snapshot();
        assert_eq!(s, Snap { a: 0, b: 2 });
        let mut seen = Vec::new();
        s.each(|k, v| seen.push((k, v)));
        assert_eq!(seen, [("a", 0), ("b", 2)]);
    }
}
