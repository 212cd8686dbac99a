//! Stopping a guest of `vspa run` politely: on SIGTERM (or SIGINT) the
//! guest is asked to shut down through its Shutdown integration service and
//! gets a grace period to power off; a guest without that service, or one
//! that refuses or does not answer, is stopped at once. The exit status of
//! `vspa run` then says which happened ([`exit_code`]).

use std::time::Duration;

use vmm::vm::{Control, VmExit};

/// How `vspa run` asks its guest to stop.
#[derive(Debug, Clone)]
pub struct GuestStop {
    /// The guest's integration services (None: it has none).
    pub ic: Option<ic::IcHandle>,
    /// How long the guest has to answer the shutdown request.
    pub ack: Duration,
    /// How long an acknowledging guest has to power off.
    pub grace: Duration,
}

/// What stopping the guest came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// The guest acknowledged and powered off (or reset) within the grace
    /// period.
    ShutDown,
    /// vspa stopped the VM: why the guest did not shut down itself.
    Forced(String),
}

/// Exit status of a guest that shut down, or was stopped from its console.
pub const EXIT_CLEAN: u8 = 0;
/// Exit status of a guest that triple-faulted or broke the VMM's rules.
pub const EXIT_GUEST_FAILED: u8 = 2;
/// Exit status when a signal had to stop a guest that did not shut down.
pub const EXIT_FORCED: u8 = 3;

impl GuestStop {
    /// Asks the guest to stop, waits as configured and stops the VM if it
    /// must. Progress goes to the log.
    pub fn stop(&self, control: &Control) -> StopOutcome {
        let outcome = self.ask(control);
        if let StopOutcome::Forced(why) = &outcome {
            tracing::warn!("stopping the VM: {why}");
            control.request_exit(VmExit::Stopped);
        }
        outcome
    }

    fn ask(&self, control: &Control) -> StopOutcome {
        let Some(ic) = &self.ic else {
            return StopOutcome::Forced("the guest has no integration services".into());
        };
        tracing::info!("asking the guest to shut down");
        match ic.shutdown(ic::ShutdownKind::PowerOff, self.ack) {
            ic::ShutdownOutcome::Acknowledged => {
                tracing::info!(
                    "the guest acknowledged the shutdown; waiting up to {:?}",
                    self.grace
                );
                match control.wait_for_exit(self.grace) {
                    Some(_) => StopOutcome::ShutDown,
                    None => StopOutcome::Forced(format!(
                        "the guest did not power off within {:?}",
                        self.grace
                    )),
                }
            }
            other => StopOutcome::Forced(format!("shutdown request: {other:?}")),
        }
    }
}

/// The exit status of `vspa run` for a VM that ended with `exit`, after
/// `stopped` if a signal asked it to stop.
pub fn exit_code(exit: &VmExit, stopped: Option<&StopOutcome>) -> u8 {
    match exit {
        VmExit::TripleFault { .. } | VmExit::Error(_) => EXIT_GUEST_FAILED,
        VmExit::Stopped if matches!(stopped, Some(StopOutcome::Forced(_))) => EXIT_FORCED,
        VmExit::Reset | VmExit::PowerOff | VmExit::Stopped => EXIT_CLEAN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_say_what_happened() {
        let forced = StopOutcome::Forced("no answer".into());
        assert_eq!(
            exit_code(&VmExit::PowerOff, Some(&StopOutcome::ShutDown)),
            0
        );
        assert_eq!(exit_code(&VmExit::Stopped, Some(&forced)), 3);
        assert_eq!(exit_code(&VmExit::Stopped, None), 0, "console Ctrl-A x");
        assert_eq!(
            exit_code(&VmExit::TripleFault { vcpu: 0 }, Some(&forced)),
            2
        );
    }
}
