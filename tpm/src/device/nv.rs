//! NV indices: reading a whole index in chunks the TPM allows, and trimming a DER
//! certificate from the padding manufacturers leave after it. It never writes NV.

use super::*;

impl Device {
    /// The whole contents of the NV index `nvh` (its size from its public area), read in
    /// `chunk`-byte NV_Reads under the index's own empty authorization, as go-tpm reads it.
    pub(super) fn nv_read_whole(
        &mut self,
        nvh: tss_esapi::handles::NvIndexHandle,
        chunk: u16,
    ) -> Result<Vec<u8>> {
        let size = self
            .ctx
            .execute_without_session(|c| c.nv_read_public(nvh))
            .map_err(step("NV_ReadPublic"))?
            .0
            .data_size();
        let mut data = Vec::with_capacity(size);
        while data.len() < size {
            let offset = u16::try_from(data.len())
                .map_err(|_| DeviceError::Invalid("NV index larger than 64 KiB".into()))?;
            let n = chunk.min(u16::try_from(size - data.len()).unwrap_or(chunk));
            let b = self
                .exec_auth(false, |c| {
                    c.nv_read(
                        tss_esapi::interface_types::resource_handles::NvAuth::NvIndex(nvh),
                        nvh,
                        n,
                        offset,
                    )
                })
                .map_err(step("NV_Read"))?;
            if b.is_empty() {
                return Err(DeviceError::Invalid("NV_Read returned nothing".into()));
            }
            data.extend_from_slice(b.value());
        }
        Ok(data)
    }
}

/// The DER certificate at the start of NV contents (which may be padded).
pub fn trim_der(nv: &[u8]) -> std::result::Result<Vec<u8>, wire::Error> {
    let mut r = wire::Reader::new(nv, "EK certificate");
    if r.u8()? != 0x30 {
        return Err(wire::Error::Invalid(
            "EK certificate is not a DER SEQUENCE".into(),
        ));
    }
    let first = r.u8()?;
    let (len, hdr) = match first {
        n if n < 0x80 => (n as usize, 2),
        0x81 => (r.u8()? as usize, 3),
        0x82 => ((r.u16()?) as usize, 4),
        _ => {
            return Err(wire::Error::Invalid(
                "EK certificate length is not supported".into(),
            ));
        }
    };
    if nv.len() < hdr + len {
        return Err(wire::Error::Truncated("EK certificate"));
    }
    Ok(nv[..hdr + len].to_vec())
}
