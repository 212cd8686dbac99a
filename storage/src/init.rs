//! The storvsc protocol state of one channel: which requests are valid
//! now, and the answer to each that is not.
//!
//! A Linux guest (`storvsc_channel_init`) initialises a primary channel in
//! this order, each step a request that must complete with status 0:
//!
//! ```text
//!  Begin ──BEGIN_INITIALIZATION──▶ Version ──QUERY_PROTOCOL_VERSION (accepted)──▶ Properties
//!  Properties ──QUERY_PROPERTIES──▶ End ──END_INITIALIZATION──▶ Ready
//! ```
//!
//! and only then sends EXECUTE_SRBs, CREATE_SUB_CHANNELS (after
//! END_INITIALIZATION, when the properties offered multi-channel) and
//! RESET_BUS. Sub-channels carry no initialisation: their workers start
//! `Ready`, and only SRBs and resets are valid there.
//!
//! The answers, as Hyper-V gives them (openvmm's storvsp does the same):
//! - a request valid now is answered as the protocol says; QUERY_PROTOCOL_
//!   VERSION with a version vspa does not speak gets REVISION_MISMATCH and
//!   leaves the state as it was, so the guest can step down (Linux tries
//!   Win10, Win8.1, Win8, ... on that status);
//! - a request of the protocol sent at the wrong time (an SRB before
//!   END_INITIALIZATION, a second BEGIN_INITIALIZATION, QUERY_PROPERTIES
//!   before a version) gets a COMPLETE_IO with INVALID_DEVICE_STATE and
//!   changes nothing; an SRB refused so is not executed;
//! - an operation no guest may send at any time (FCHBA_DATA, host-to-guest
//!   operations, unknown numbers) gets INVALID_PARAMETER, in every state.
//!
//! One leniency over Hyper-V: until QUERY_PROPERTIES a guest may propose
//! versions again; an accepted one replaces the last, a refused one keeps
//! it. A guest probing the versions one by one therefore ends with the
//! last it had accepted.

use crate::protocol::{
    ChannelProperties, SUPPORTED_VERSIONS, ScsiRequest, VstorPacket, VstorRequest, operation,
    status,
};

/// Where a channel is in the initialisation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitState {
    /// A fresh primary channel: BEGIN_INITIALIZATION next.
    Begin,
    /// QUERY_PROTOCOL_VERSION next, until one is accepted.
    Version,
    /// A version is agreed: QUERY_PROPERTIES next.
    Properties,
    /// END_INITIALIZATION next (CREATE_SUB_CHANNELS allowed too).
    End,
    /// Initialised: SRBs, resets and CREATE_SUB_CHANNELS.
    Ready,
}

/// What a channel's worker does with a request.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    /// Send this completion; nothing else happens (initialisation
    /// requests, and every refusal).
    Answer(VstorPacket),
    /// Run it: the work of a ready channel.
    Run(Work),
}

/// The requests a ready channel runs.
#[derive(Debug, Clone, Copy)]
pub enum Work {
    ExecuteSrb(ScsiRequest),
    CreateSubChannels(u16),
    /// Resets are no-ops answered with success: the worker has no queue
    /// of its own to abort, every command completes as it finishes.
    Reset,
}

impl InitState {
    /// The state a channel's worker starts in.
    pub fn for_channel(primary: bool) -> Self {
        if primary {
            InitState::Begin
        } else {
            InitState::Ready
        }
    }

    /// Takes one request: moves the state on and says what to do.
    /// `properties` is what QUERY_PROPERTIES answers.
    pub fn step(&mut self, request: VstorRequest, properties: &ChannelProperties) -> Step {
        use InitState as S;
        use VstorRequest as R;
        let next = match (*self, request) {
            (_, R::Unsupported(op)) => {
                tracing::debug!(op, "unsupported vstor operation");
                return answer(status::INVALID_PARAMETER);
            }
            (S::Begin, R::BeginInitialization) => S::Version,
            (S::Version | S::Properties, R::QueryProtocolVersion(v)) => {
                let accepted = SUPPORTED_VERSIONS.contains(&v.major_minor.get());
                let mut reply = completion(if accepted {
                    status::SUCCESS
                } else {
                    status::REVISION_MISMATCH
                });
                reply.set_body(&v);
                if accepted {
                    *self = S::Properties;
                }
                return Step::Answer(reply);
            }
            (S::Properties, R::QueryProperties) => {
                let mut reply = completion(status::SUCCESS);
                reply.set_body(properties);
                *self = S::End;
                return Step::Answer(reply);
            }
            (S::End, R::EndInitialization) => S::Ready,
            (S::End | S::Ready, R::CreateSubChannels(n)) => {
                return Step::Run(Work::CreateSubChannels(n));
            }
            (S::Ready, R::ExecuteSrb(srb)) => return Step::Run(Work::ExecuteSrb(srb)),
            (S::Ready, R::Reset(_)) => return Step::Run(Work::Reset),
            (state, request) => {
                tracing::debug!(?state, ?request, "vstor request out of order");
                return answer(status::INVALID_DEVICE_STATE);
            }
        };
        *self = next;
        answer(status::SUCCESS)
    }
}

fn completion(status: u32) -> VstorPacket {
    VstorPacket::new(operation::COMPLETE_IO, status)
}

fn answer(status: u32) -> Step {
    Step::Answer(completion(status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ProtocolVersion, version};
    use zerocopy::FromZeros;

    fn props() -> ChannelProperties {
        let mut p = ChannelProperties::new_zeroed();
        p.max_channel_count = 4.into();
        p
    }

    fn version(v: u16) -> VstorRequest {
        VstorRequest::QueryProtocolVersion(ProtocolVersion {
            major_minor: v.into(),
            revision: 0.into(),
        })
    }

    /// The status of the answer, or None if the request runs.
    fn status_of(state: &mut InitState, r: VstorRequest) -> Option<u32> {
        match state.step(r, &props()) {
            Step::Answer(p) => {
                assert_eq!(p.header.operation.get(), operation::COMPLETE_IO);
                Some(p.header.status.get())
            }
            Step::Run(_) => None,
        }
    }

    fn srb() -> VstorRequest {
        VstorRequest::ExecuteSrb(ScsiRequest::new_zeroed())
    }

    #[test]
    fn linux_order_reaches_ready() {
        let mut s = InitState::for_channel(true);
        let ok = Some(status::SUCCESS);
        assert_eq!(status_of(&mut s, VstorRequest::BeginInitialization), ok);
        // Linux steps down from an unknown version on REVISION_MISMATCH.
        assert_eq!(
            status_of(&mut s, version(0x0700)),
            Some(status::REVISION_MISMATCH)
        );
        assert_eq!(s, InitState::Version);
        match s.step(version(version::WIN10), &props()) {
            Step::Answer(p) => {
                let v: ProtocolVersion = p.body_as();
                assert_eq!(v.major_minor.get(), version::WIN10, "echoed");
            }
            Step::Run(_) => panic!("answered"),
        }
        match s.step(VstorRequest::QueryProperties, &props()) {
            Step::Answer(p) => {
                let got: ChannelProperties = p.body_as();
                assert_eq!(got.max_channel_count.get(), 4);
            }
            Step::Run(_) => panic!("answered"),
        }
        assert_eq!(status_of(&mut s, VstorRequest::EndInitialization), ok);
        assert_eq!(s, InitState::Ready);
        assert!(matches!(
            s.step(srb(), &props()),
            Step::Run(Work::ExecuteSrb(_))
        ));
        assert!(matches!(
            s.step(VstorRequest::CreateSubChannels(2), &props()),
            Step::Run(Work::CreateSubChannels(2))
        ));
        assert!(matches!(
            s.step(VstorRequest::Reset(operation::RESET_BUS), &props()),
            Step::Run(Work::Reset)
        ));
    }

    #[test]
    fn requests_out_of_order_get_invalid_device_state() {
        let bad = Some(status::INVALID_DEVICE_STATE);
        let mut s = InitState::for_channel(true);
        // Nothing but BEGIN_INITIALIZATION first; an SRB is not run.
        for r in [
            srb(),
            version(version::WIN10),
            VstorRequest::QueryProperties,
            VstorRequest::EndInitialization,
            VstorRequest::CreateSubChannels(1),
            VstorRequest::Reset(operation::RESET_LUN),
        ] {
            assert_eq!(status_of(&mut s, r), bad, "{r:?} before BEGIN");
            assert_eq!(s, InitState::Begin);
        }
        status_of(&mut s, VstorRequest::BeginInitialization);
        assert_eq!(status_of(&mut s, VstorRequest::BeginInitialization), bad);
        assert_eq!(status_of(&mut s, VstorRequest::QueryProperties), bad);
        assert_eq!(status_of(&mut s, srb()), bad);
        status_of(&mut s, version(version::WIN8));
        assert_eq!(status_of(&mut s, VstorRequest::EndInitialization), bad);
        status_of(&mut s, VstorRequest::QueryProperties);
        assert_eq!(status_of(&mut s, version(version::WIN10)), bad);
        assert_eq!(status_of(&mut s, srb()), bad);
        status_of(&mut s, VstorRequest::EndInitialization);
        // Ready: initialisation is over.
        for r in [
            VstorRequest::BeginInitialization,
            version(version::WIN10),
            VstorRequest::QueryProperties,
            VstorRequest::EndInitialization,
        ] {
            assert_eq!(status_of(&mut s, r), bad, "{r:?} when ready");
        }
        assert_eq!(s, InitState::Ready);
    }

    #[test]
    fn unsupported_operations_are_invalid_parameters_in_every_state() {
        let mut s = InitState::for_channel(true);
        let steps = [
            VstorRequest::BeginInitialization,
            version(version::WIN10),
            VstorRequest::QueryProperties,
            VstorRequest::EndInitialization,
        ];
        for next in steps.into_iter().map(Some).chain([None]) {
            for op in [operation::FCHBA_DATA, operation::ENUMERATE_BUS, 0x77] {
                let before = s;
                assert_eq!(
                    status_of(&mut s, VstorRequest::Unsupported(op)),
                    Some(status::INVALID_PARAMETER)
                );
                assert_eq!(s, before);
            }
            if let Some(r) = next {
                status_of(&mut s, r);
            }
        }
    }

    #[test]
    fn versions_may_be_proposed_again_until_properties() {
        let mut s = InitState::for_channel(true);
        status_of(&mut s, VstorRequest::BeginInitialization);
        status_of(&mut s, version(version::WIN10));
        assert_eq!(
            status_of(&mut s, version(version::WIN8)),
            Some(status::SUCCESS)
        );
        // A refused proposal keeps the agreed version.
        assert_eq!(
            status_of(&mut s, version(version::WIN7)),
            Some(status::REVISION_MISMATCH)
        );
        assert_eq!(s, InitState::Properties);
    }

    #[test]
    fn subchannels_start_ready_without_initialisation() {
        let mut s = InitState::for_channel(false);
        assert!(matches!(s.step(srb(), &props()), Step::Run(_)));
        assert_eq!(
            status_of(&mut s, VstorRequest::BeginInitialization),
            Some(status::INVALID_DEVICE_STATE)
        );
    }
}
