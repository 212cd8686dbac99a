//! `vspa image` on NBD URIs: what `info` reports about an export, and how
//! `convert` writes into one (an existing export, written in place).

use super::client::{NbdClient, NbdOptions};
use super::uri::NbdUri;
use crate::device::BlockDevice;
use crate::error::ImageError;
use crate::open::Format;
use crate::tool::ImageInfo;
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;

/// What the handshake told about an export, for `info`.
#[derive(Debug, Clone, Serialize)]
pub struct NbdExportInfo {
    pub export: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub transmission_flags: Vec<&'static str>,
    pub structured_replies: bool,
    pub base_allocation: bool,
    pub block_size_minimum: u32,
    pub block_size_preferred: u32,
    pub block_size_maximum: u32,
}

fn parse(path: &Path) -> Result<NbdUri, ImageError> {
    let text = path
        .to_str()
        .ok_or_else(|| ImageError::InvalidArgument(format!("{} is not UTF-8", path.display())))?;
    Ok(text.parse()?)
}

/// `vspa image info` of an NBD URI: size, what the server offers, and the
/// allocated bytes its block status reports.
pub fn info(path: &Path) -> Result<ImageInfo, ImageError> {
    let uri = parse(path)?;
    let options = NbdOptions {
        read_only: true,
        ..NbdOptions::default()
    };
    let client = NbdClient::open(&uri, &options)?;
    let export = client.export();
    let size = client.info().size();
    let allocated = allocated_bytes(&client)?;
    Ok(ImageInfo {
        virtual_size: size,
        file_size: size,
        disk_usage: allocated,
        allocated_bytes: allocated,
        nbd: Some(NbdExportInfo {
            export: uri.export.clone(),
            description: export.description.clone(),
            transmission_flags: export.flag_names(),
            structured_replies: export.structured,
            base_allocation: export.allocation_context.is_some(),
            block_size_minimum: export.min_block,
            block_size_preferred: export.preferred_block,
            block_size_maximum: export.max_payload,
        }),
        ..ImageInfo::new(uri.to_string(), "nbd")
    })
}

/// Bytes of `dev` its allocation reports as data.
pub fn allocated_bytes(dev: &dyn BlockDevice) -> Result<u64, ImageError> {
    let info = dev.info();
    let mut at = 0;
    let mut data = 0;
    while at < info.blocks {
        let (state, run) = dev.allocation(at, info.blocks - at)?;
        if !state.reads_zero() {
            data += run;
        }
        at += run.max(1);
    }
    Ok(data * u64::from(info.block_size))
}

/// The export `convert` writes into: it must exist, be raw and hold at
/// least `size` bytes.
pub fn open_target(
    path: &Path,
    format: Format,
    size: u64,
) -> Result<Arc<dyn BlockDevice>, ImageError> {
    if format != Format::Raw {
        return Err(ImageError::InvalidArgument(format!(
            "an NBD export is written as raw, not {}",
            format.name()
        )));
    }
    let uri = parse(path)?;
    let client = NbdClient::open(&uri, &NbdOptions::default())?;
    let have = client.info().size();
    if client.info().read_only {
        return Err(ImageError::ReadOnly);
    }
    if have < size {
        return Err(ImageError::InvalidArgument(format!(
            "the export holds {have} bytes, the image {size}"
        )));
    }
    Ok(Arc::new(client))
}
