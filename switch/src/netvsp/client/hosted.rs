//! A netvsc guest in hosted mode in one call: its own connection (its own
//! "VM", with `memory` bytes of guest memory), the NIC with a given
//! instance GUID found among the offers, initialised as Linux would.

use std::path::Path;

use vmbus::guid::NETWORK_INTERFACE;
use vmbus::hosted::client::HostedClient;

use super::{NetvscClient, NetvscError, NetvscOptions};

/// Connects to the hosted-mode socket at `socket` and brings up the NIC
/// whose instance is `instance`.
pub fn connect_hosted(
    socket: &Path,
    memory: u64,
    instance: vmbus::Guid,
    opts: &NetvscOptions,
) -> Result<(HostedClient, NetvscClient), NetvscError> {
    let mut host = HostedClient::connect(socket, memory)?;
    let offer = host
        .request_offers()?
        .into_iter()
        .find(|o| o.interface == NETWORK_INTERFACE && o.instance == instance)
        .ok_or(NetvscError::NoOffer(instance))?;
    let c = NetvscClient::connect(&mut host, &offer, opts)?;
    Ok((host, c))
}
